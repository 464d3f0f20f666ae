"""The GPU table of docs/benchmarks.md from the JSON files of ``scripts/gpu_check.sh``.

    python scripts/gpu_table.py OUT

One row per model and dtype: its device, images and captions a second at the default tolerance with the nodes
they took (mean / max), the ratio to plain embedding, the same throughput at a fixed N = 10, pair maps a second
and peak memory; then the end-to-end ratio of an `xclip attribute` run to the engine alone.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

COLUMNS = ("model", "dtype", "images/s (nodes mean / max)", "captions/s (nodes mean / max)", "image ratio to plain",
           "images/s at N = 10", "captions/s at N = 10", "pair maps/s", "peak memory GB")


def row(adaptive: dict, fixed: dict) -> list[str]:
    memory = adaptive.get("peak_memory_gb", adaptive.get("peak_rss_gb"))
    return [
        f"{adaptive['family']} {adaptive['architecture']}", adaptive["dtype"],
        f"{adaptive['images_per_s']:.1f} ({adaptive['image_nodes_mean']:.1f} / {adaptive['image_nodes_max']})",
        f"{adaptive['captions_per_s']:.1f} ({adaptive['caption_nodes_mean']:.1f} / {adaptive['caption_nodes_max']})",
        f"{adaptive['image_ratio_to_plain']:.3f}", f"{fixed['images_per_s']:.1f}", f"{fixed['captions_per_s']:.1f}",
        f"{adaptive['pair_maps_per_s']:.0f}", f"{memory:.2f}",
    ]


def table(folder: Path) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    devices = set()
    for adaptive_file in sorted(folder.glob("*-adaptive.json")):
        adaptive = json.loads(adaptive_file.read_text())
        fixed = json.loads(adaptive_file.with_name(adaptive_file.name.replace("-adaptive", "-fixed10")).read_text())
        devices.add(adaptive["device"])
        lines.append("| " + " | ".join(row(adaptive, fixed)) + " |")
    for end_file in sorted(folder.glob("*-end-to-end.json")):
        run = json.loads(end_file.read_text())
        end = run["end_to_end"]
        lines.append("")
        lines.append(f"`xclip attribute` on {end['pairs']} photo-sized JPEG pairs ({run['family']} {run['architecture']}, "
                     f"{run['dtype']}): {end['ratio_to_engine']:.2f} of the engine's speed on the same work.")
    return f"Device: {', '.join(sorted(devices))}\n\n" + "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    print(table(parser.parse_args().folder), end="")


if __name__ == "__main__":
    main()

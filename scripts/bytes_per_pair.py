"""Bytes per pair of a run file, full and summary (output.contributions: store | none), at the demo model's shape
and at CLIP ViT-B/32 and ViT-B/16 shapes, for a 1:1 given run and a pairing.mode all run.

    python scripts/bytes_per_pair.py            # the table, then a real demo run checked against its estimate
    python scripts/bytes_per_pair.py --no-measure

The table is the store's own count of its fixed-size columns (xclip.store.space.declared_bytes: exactly what HDF5
allocates, whatever the weights), per pair: a 1:1 run of 1,000 pairs (each pair has its own caption and image) and
an all run of 1,000 captions x 1,000 images (each input's rows shared by 1,000 pairs). Beside them a file holds the
captions' text and image paths (variable length, tens of bytes an item), HDF5's metadata, and in a summary run the
tokenizer's vocabulary once. float32 storage (output.precision auto for a float32 model); "full" stores
contributions and no pair maps (output.pair_maps none, as auto chooses for large runs), "+ maps" stores them too.

--measure (the default) attributes the demo model on copies of the shipped demo scenes in summary mode and in full
mode, and prints the file's real size per pair next to the estimate: the fixed-size columns must match HDF5's
allocation to the byte.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import h5py
import numpy as np

from xclip.store.schema import RunInputs, RunKind, Sizes
from xclip.store.space import declared_bytes

REPOSITORY = Path(__file__).resolve().parents[1]
DEMO_SCENES = REPOSITORY / "configs" / "demo" / "scenes"
# (text positions L, image positions S = CLS + patches, embedding size E)
SHAPES = {
    "demo (xclip:demo, L=32, 8x8+CLS, E=128)": (32, 65, 128),
    "ViT-B/32 (L=77, 7x7+CLS, E=512)": (77, 50, 512),
    "ViT-B/16 (L=77, 14x14+CLS, E=512)": (77, 197, 512),
}
TOP_CELLS = 16  # output.top_cells' default


def per_pair(shape: tuple[int, int, int], *, mode: str, contributions: bool, maps: bool, n: int = 1000) -> float:
    """Fixed-size bytes per pair of a run of ``n`` pairs (given, 1:1) or ``n`` x ``n`` pairs (all)."""
    n_inputs, n_pairs = (n, n) if mode == "given" else (n, n * n)
    return fixed_bytes(shape, n_inputs, n_inputs, n_pairs, contributions=contributions, maps=maps) / n_pairs


def fixed_bytes(shape: tuple[int, int, int], n_captions: int, n_images: int, n_pairs: int, *, contributions: bool,
                maps: bool) -> int:
    """The store's count of the fixed-size columns of such a run."""
    inputs = RunInputs(["c"] * n_captions, ["i"] * n_images, np.zeros((n_pairs, 2), dtype=np.int64), [])
    length, positions, embedding = shape
    sizes = Sizes(length, positions, embedding, min(TOP_CELLS, length * positions))
    return declared_bytes(inputs, sizes, "float32", RunKind.of(contributions, maps))


def table() -> str:
    lines = ["| shape | pairing | full + maps | full | summary |", "|---|---|---:|---:|---:|"]
    for name, shape in SHAPES.items():
        for mode, label in (("given", "1:1 given"), ("all", "all (1,000 x 1,000)")):
            cells = [per_pair(shape, mode=mode, contributions=c, maps=m) for c, m in ((True, True), (True, False), (False, False))]
            lines.append(f"| {name} | {label} | " + " | ".join(f"{b:,.0f}" for b in cells) + " |")
    return "\n".join(lines)


def measure(n_copies: int) -> str:
    """Real demo runs on ``n_copies`` copies of the demo scenes (1:1 given), summary and full: file size per
    pair, and the fixed-size columns as HDF5 allocated them against the store's count for the run's numbers of
    captions, images and pairs (the copies share their twelve captions: the run keeps each caption once)."""
    from xclip.config import load_config
    from xclip.run.runner import run

    rows = [json.loads(line) for line in (DEMO_SCENES / "metadata.jsonl").read_text().splitlines() if line.strip()]
    lines = ["| run | captions, images, pairs | file bytes / pair | fixed-size columns / pair (HDF5) | store's count / pair |",
             "|---|---:|---:|---:|---:|"]
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        images = root / "images"
        images.mkdir()
        records = []
        for copy in range(n_copies):
            for row in rows:
                name = f"{copy:03d}-{row['file_name']}"
                shutil.copyfile(DEMO_SCENES / row["file_name"], images / name)
                records.append(json.dumps({"file_name": name, "text": row["text"]}))
        (images / "metadata.jsonl").write_text("\n".join(records) + "\n")
        base = REPOSITORY / "configs" / "demo.yaml"
        for contributions in ("none", "store"):
            directory = root / f"run-{contributions}"
            config = load_config(base, [f"data.root={images}", f"data.metadata={images / 'metadata.jsonl'}",
                                        "pairing.mode=given", f"output.directory={directory}",
                                        f"output.contributions={contributions}", "output.pair_maps=none"])
            summary = run(config)
            path = directory / "run.h5"
            with h5py.File(path, "r") as f:
                allocated = []
                f.visititems(lambda _, obj: allocated.append(obj.id.get_storage_size())
                             if isinstance(obj, h5py.Dataset) and obj.dtype.kind != "O" else None)
                counts = [len(f[group]["status"]) for group in ("captions", "images", "pairs")]
            n_pairs = summary.n_pairs
            shape = SHAPES["demo (xclip:demo, L=32, 8x8+CLS, E=128)"]
            estimate = fixed_bytes(shape, *counts, contributions=contributions == "store", maps=False)
            label = "summary" if contributions == "none" else "full"
            lines.append(f"| demo {label}, given | {', '.join(map(str, counts))} | {path.stat().st_size / n_pairs:,.0f} | "
                         f"{sum(allocated) / n_pairs:,.1f} | {estimate / n_pairs:,.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-measure", action="store_true", help="print the table only (no demo run)")
    parser.add_argument("--copies", type=int, default=8, help="copies of the 12 demo scenes in the measured runs")
    arguments = parser.parse_args()
    print("Fixed-size bytes per pair (float32 storage):\n")
    print(table())
    if not arguments.no_measure:
        print(f"\nMeasured: the demo model on {arguments.copies} copies of the 12 demo scenes (1:1 given):\n")
        print(measure(arguments.copies))


if __name__ == "__main__":
    main()

"""What a large run costs on a Slurm array: device hours, disk and shards, from a benchmark's measured rates.

    python scripts/bench.py --architecture vit-b-16 --no-naive --no-scaling --end-to-end 0 --out bench.json
    python scripts/plan.py bench.json --images 5000 --captions 25014 --shards 8
    python scripts/plan.py bench.json --images 400000000 --captions 400000000 --shards 4000 --pairing given   # LAION-400M

Times are the benchmark's per-item rates multiplied out, on the device the benchmark ran on (a GPU's JSON gives
GPU hours). Bytes are exact: a run file of one caption, one image and one pair is created with the benchmark's
geometry (text positions, image positions, embedding size) and its rows are measured, so the plan follows the
store's layout as it is. Prints a Markdown table for given pairs (one per caption) and for `pairing.mode: all`,
with stored contributions (with and without pair maps) and as a summary run (`output.contributions: none`), whose
pairs cost a map and its summary each (the benchmark's `pair_summaries_per_s`) and whose inputs keep no
contributions.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

from xclip.store.create import create_run_file
from xclip.store.reader import RunReader


@dataclass(frozen=True)
class ItemCosts:
    caption_seconds: float
    image_seconds: float
    pair_map_seconds: float  # a pair whose map is stored
    pair_numbers_seconds: float  # a pair without its map: score and terms from the summed contributions
    pair_summary_seconds: float  # a summary run's pair: its map, numbers and token summary
    caption_bytes: int
    image_bytes: int
    pair_bytes: int  # without the map
    map_bytes: int
    summary_caption_bytes: int  # in a summary run
    summary_image_bytes: int
    summary_pair_bytes: int


def measured_bytes(text_positions: int, image_positions: int, embedding_dim: int, precision: str) -> dict[str, dict[str, int]]:
    """Bytes per caption, image and pair in a run file of this geometry: with contributions and no maps, with maps,
    and a summary run (output.top_cells' default 16)."""
    kinds = {"full": (True, False), "maps": (True, True), "summary": (False, False)}
    counts = {}
    with tempfile.TemporaryDirectory() as folder:
        for name, (contributions, maps) in kinds.items():
            path = Path(folder) / f"run-{name}.h5"
            create_run_file(
                path, attributes={"config": {}}, captions=["a"], images=["a.jpg"], pairs=[(0, 0)], rejected_records=[],
                store_pair_maps=maps, precision=precision, max_text_positions=text_positions,
                n_image_positions=image_positions, embedding_dim=embedding_dim, grid=(1, image_positions - 1), n_prefix=1,
                store_contributions=contributions, n_top_cells=16, vocabulary=["a"],
            )
            with RunReader(path) as run:
                counts[name] = {group: run.bytes_per_item(group) for group in ("captions", "images", "pairs")}
    return counts


def costs(bench: dict, precision: str, input_time_factor: float) -> ItemCosts:
    sizes = measured_bytes(bench["text_positions"], bench["image_positions"], bench["embedding_dim"], precision)
    return ItemCosts(
        caption_seconds=input_time_factor / bench["captions_per_s"],
        image_seconds=input_time_factor / bench["images_per_s"],
        pair_map_seconds=1 / bench["pair_maps_per_s"],
        pair_numbers_seconds=1 / bench["pair_numbers_per_s"],
        pair_summary_seconds=1 / bench["pair_summaries_per_s"],
        caption_bytes=sizes["full"]["captions"],
        image_bytes=sizes["full"]["images"],
        pair_bytes=sizes["full"]["pairs"],
        map_bytes=sizes["maps"]["pairs"] - sizes["full"]["pairs"],
        summary_caption_bytes=sizes["summary"]["captions"],
        summary_image_bytes=sizes["summary"]["images"],
        summary_pair_bytes=sizes["summary"]["pairs"],
    )


@dataclass(frozen=True)
class Plan:
    pairs: int
    device_hours: float  # all shards together
    hours_per_shard: float  # the slowest shard's wall time
    disk_bytes: int  # all shard files together


def plan(c: ItemCosts, images: int, captions: int, shards: int, *, all_pairs: bool, output: str) -> Plan:
    """``output``: "full" (contributions, no maps), "maps" (contributions and maps) or "summary". Given pairs split
    their inputs across shards; an `all` run's shard takes a block of the caption-major pairs, which is 1/N of the
    captions and every image, so each shard attributes (and a full run stores) every image."""
    pairs = images * captions if all_pairs else captions
    pair_seconds = {"full": c.pair_numbers_seconds, "maps": c.pair_map_seconds, "summary": c.pair_summary_seconds}[output]
    if output == "summary":
        caption_bytes, image_bytes, pair_bytes = c.summary_caption_bytes, c.summary_image_bytes, c.summary_pair_bytes
    else:
        caption_bytes, image_bytes = c.caption_bytes, c.image_bytes
        pair_bytes = c.pair_bytes + (c.map_bytes if output == "maps" else 0)
    image_seconds = images * c.image_seconds
    split_seconds = captions * c.caption_seconds + pairs * pair_seconds  # divided among the shards
    image_copies = shards if all_pairs else 1
    seconds = image_copies * image_seconds + split_seconds
    per_shard = image_seconds + split_seconds / shards if all_pairs else seconds / shards
    disk = image_copies * images * image_bytes + captions * caption_bytes + pairs * pair_bytes
    return Plan(pairs=pairs, device_hours=seconds / 3600, hours_per_shard=per_shard / 3600, disk_bytes=disk)


def size(n_bytes: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:.1f} {unit}"
    return f"{n_bytes:.0f} B"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bench", type=Path, help="JSON written by scripts/bench.py --out")
    parser.add_argument("--images", type=int, default=5000, help="default: COCO val")
    parser.add_argument("--captions", type=int, default=25014, help="given pairs: one per caption")
    parser.add_argument("--shards", type=int, default=8, help="Slurm array tasks")
    parser.add_argument("--precision", choices=["float64", "float32", "float16"], default="float32", help="output.precision")
    parser.add_argument("--pairing", choices=["given", "all", "both"], default="both", help="which runs to plan")
    parser.add_argument("--input-time-factor", type=float, default=1.0,
                        help="multiply input times: trained weights take more quadrature nodes than a random "
                             "model's (in forward passes, 1.4x for captions and 2.0x for images on the demo model; see docs/method.md, Accuracy)")
    args = parser.parse_args()
    bench = json.loads(args.bench.read_text())
    c = costs(bench, args.precision, args.input_time_factor)
    print(f"{bench['architecture']} on {bench['device']}, {bench['dtype']}, {bench['quadrature']}; "
          f"{args.images:,} images x {args.captions:,} captions, {args.shards} shards, {args.precision} arrays")
    print(f"per item: caption {c.caption_seconds * 1e3:.1f} ms, {size(c.caption_bytes)}; image {c.image_seconds * 1e3:.1f} ms, "
          f"{size(c.image_bytes)}; pair {size(c.pair_bytes)} + map {size(c.map_bytes)}; summary run: caption "
          f"{size(c.summary_caption_bytes)}, image {size(c.summary_image_bytes)}, pair {size(c.summary_pair_bytes)}, "
          f"{c.pair_summary_seconds * 1e3:.2f} ms\n")
    print("| run | pairs | device hours | hours per shard | disk |")
    print("|---|---|---|---|---|")
    names = {"full": "no maps", "maps": "maps stored", "summary": "summary only"}
    for all_pairs in {"given": (False,), "all": (True,), "both": (False, True)}[args.pairing]:
        for output, name in names.items():
            p = plan(c, args.images, args.captions, args.shards, all_pairs=all_pairs, output=output)
            print(f"| {'`all`' if all_pairs else 'given pairs'}, {name} | {p.pairs:,} | {p.device_hours:,.1f} | "
                  f"{p.hours_per_shard:,.2f} | {size(p.disk_bytes)} |")


if __name__ == "__main__":
    main()

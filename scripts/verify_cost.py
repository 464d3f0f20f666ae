"""What `data.verify: always` costs against the default `changed` when a finished run is resumed.

    python scripts/verify_cost.py [--images 200] [--repeats 5] [--busy 0]

Attributes N generated photo-like JPEGs (640x480, about 100 KB each) with the shipped demo model, then resumes the
finished run with each setting, alternating, and prints the median resume time (the `run` call: model load, data
digest and the check of every image; nothing is left to attribute). `changed` stats each image, `always` also
reads and hashes it. Both are timed twice: with the images in the page cache (just written), and with their pages
evicted first (`posix_fadvise(DONTNEED)`, as after a reboot; a virtual disk may still be cached by its host).
Hashing alone is timed over the same files. `--busy K` runs K busy-looping processes beside the measurement (a
shared node); they are stopped when it ends.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from xclip.config import load_config
from xclip.disk.digests import sha256_of
from xclip.run.runner import run

CAPTIONS = ["a red circle", "a blue square", "two green triangles", "a yellow star"]
WIDTH, HEIGHT = 640, 480
NOISE = 14  # standard deviation of the grain over a smooth field: about 100 KB per JPEG at quality 85


def write_images(folder: Path, n_images: int) -> list[Path]:
    """``n_images`` photo-like JPEGs and their imagefolder metadata."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    paths, records = [], []
    for index in range(n_images):
        coarse = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize((WIDTH, HEIGHT), Image.BICUBIC)
        pixels = np.asarray(coarse, dtype=np.float32) + rng.normal(0, NOISE, (HEIGHT, WIDTH, 3))
        path = folder / f"photo{index:05d}.jpg"
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=85)
        paths.append(path)
        records.append(json.dumps({"file_name": path.name, "text": CAPTIONS[index % len(CAPTIONS)]}))
    (folder / "metadata.jsonl").write_text("\n".join(records) + "\n")
    return paths


def evict(paths: list[Path]) -> None:
    """Drop the files' pages from the page cache (clean pages only: the files are fsynced first)."""
    for path in paths:
        descriptor = os.open(path, os.O_RDONLY)
        try:
            os.fsync(descriptor)
            os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(descriptor)


def resume_seconds(config: Path, verify: str, paths: list[Path], *, is_cold: bool) -> float:
    if is_cold:
        evict(paths)
    summary = run(load_config(config, [f"data.verify={verify}"]))
    assert summary.n_done == 0 and not summary.changed_images, "the resume found work: the measurement is not of a finished run"
    return summary.seconds


def hashing_seconds(paths: list[Path], *, is_cold: bool) -> float:
    if is_cold:
        evict(paths)
    start = time.perf_counter()
    for path in paths:
        sha256_of([path])
    return time.perf_counter() - start


def measure(config: Path, paths: list[Path], megabytes: float, repeats: int, *, is_cold: bool) -> dict[str, float]:
    times: dict[str, list[float]] = {"changed": [], "always": [], "hash": []}
    for _ in range(repeats):  # alternating, so that a drift of the machine's speed falls on both settings alike
        for verify in ("changed", "always"):
            times[verify].append(resume_seconds(config, verify, paths, is_cold=is_cold))
        times["hash"].append(hashing_seconds(paths, is_cold=is_cold))
    changed, always, hashing = (statistics.median(times[key]) for key in ("changed", "always", "hash"))
    return {
        "changed_s": changed,
        "always_s": always,
        "extra_s_per_1000_images": (always - changed) / len(paths) * 1000,
        "hash_ms_per_image": hashing / len(paths) * 1000,
        "hash_mb_per_s": megabytes / hashing,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5, help="resumes per setting and cache state (the median is shown)")
    parser.add_argument("--busy", type=int, default=0, help="busy-looping processes run beside the measurement")
    args = parser.parse_args()
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)]
    try:
        with tempfile.TemporaryDirectory() as folder:
            root = Path(folder)
            paths = write_images(root / "images", args.images)
            config = root / "run.yaml"
            config.write_text(yaml.safe_dump({
                "model": {"name": "xclip:demo", "device": "cpu"},
                "attribution": {"n_steps": 2, "tolerance": None},  # the attribution is not what is measured
                "data": {"format": "imagefolder", "root": "images", "metadata": "images/metadata.jsonl"},
                "output": {"directory": "run"},
                "runtime": {"batch_size": 32},
            }))
            first = run(load_config(config))
            assert first.n_done == args.images and not first.n_failed
            megabytes = sum(path.stat().st_size for path in paths) / 1e6
            rows = {state: measure(config, paths, megabytes, args.repeats, is_cold=state == "evicted")
                    for state in ("page cache", "evicted")}
    finally:
        for process in busy:
            process.terminate()
            process.wait()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"{args.images} images, {megabytes:.1f} MB ({megabytes / args.images * 1000:.0f} KB each); {cores} cores, "
          f"{args.busy} busy processes beside; first run {first.seconds:.1f} s; median of {args.repeats} resumes each")
    header = ["images", "total MB", "image files", "resume s, changed", "resume s, always", "extra s per 1000 images",
              "hash ms per image", "hash MB/s"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for state, row in rows.items():
        cells = [str(args.images), f"{megabytes:.1f}", state, f"{row['changed_s']:.2f}", f"{row['always_s']:.2f}",
                 f"{row['extra_s_per_1000_images']:.2f}", f"{row['hash_ms_per_image']:.2f}", f"{row['hash_mb_per_s']:.0f}"]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()

"""The benchmark script runs end to end on a tiny model and reports what the README says it reports."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench.py"


def test_bench_reports_throughput_errors_and_speedup(tmp_path):
    out = tmp_path / "bench.json"
    args = ["--architecture", "tiny", "--device", "cpu", "--batch-size", "2", "--repeats", "1", "--out", str(out)]
    result = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert report == json.loads(result.stdout)
    for key in ("plain_images_per_s", "images_per_s", "captions_per_s", "pair_maps_per_s", "image_ratio_to_plain",
                "naive_seconds_per_pair", "peak_rss_gb"):
        assert report[key] > 0, key
    assert report["completeness_error_relative_max"] < 1e-2
    assert report["speedup_vs_naive_unbatched"] > 1  # even a tiny model: the naive loop is slower
    assert set(report["scaling"]) == {"caption_seconds_by_tokens", "image_seconds_by_steps", "image_seconds_by_patches"}
    assert set(report["memory_knob"]) == {"8", "16", "32", "64", "128", "256"}

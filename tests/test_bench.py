"""The benchmark script runs end to end on a tiny model and reports what the README says it reports."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench.py"


def bench(tmp_path, *args: str) -> dict:
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--repeats", "1", "--out", str(out), *args],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert report == json.loads(result.stdout)
    return report


def test_bench_reports_throughput_errors_and_speedup(tmp_path):
    report = bench(tmp_path, "--architecture", "tiny", "--batch-size", "2", "--end-to-end", "4", "--num-workers", "0")
    for key in ("plain_images_per_s", "images_per_s", "captions_per_s", "pair_maps_per_s", "image_ratio_to_plain",
                "naive_seconds_per_pair", "peak_rss_gb"):
        assert report[key] > 0, key
    assert report["completeness_error_relative_max"] < 1e-2
    assert report["speedup_vs_naive_unbatched"] > 1  # even a tiny model: the naive loop is slower
    assert set(report["scaling"]) == {"caption_seconds_by_tokens", "image_seconds_by_steps", "image_seconds_by_patches"}
    assert set(report["memory_knob"]) == {"8", "16", "32", "64", "128", "256"}
    # random weights are smooth: the first two panels of 8 nodes meet the tolerance
    assert report["caption_nodes_max"] == report["image_nodes_max"] == 16
    assert report["caption_not_converged"] == report["image_not_converged"] == 0
    end_to_end = report["end_to_end"]  # `xclip attribute` on 4 JPEG files and 4 captions
    assert end_to_end["pairs"] == 4 and end_to_end["seconds_without_model_load"] > 0
    assert end_to_end["ratio_to_engine"] == end_to_end["engine_seconds_same_work"] / end_to_end["seconds_without_model_load"]


def test_bench_on_the_demo_model_reports_the_nodes_trained_weights_need(tmp_path):
    report = bench(tmp_path, "--architecture", "demo", "--batch-size", "4", "--no-naive", "--end-to-end", "0")
    assert report["quadrature"] == "adaptive, tolerance 0.001"
    assert report["image_nodes_mean"] > 16 and report["caption_nodes_mean"] > 16
    assert report["image_relative_error_max"] <= 1e-3 and report["image_not_converged"] == 0
    fixed = bench(tmp_path, "--architecture", "demo", "--batch-size", "4", "--no-naive", "--n-steps", "10", "--end-to-end", "0")
    assert fixed["image_nodes_max"] == 10 and fixed["image_not_converged"] >= 1

"""The benchmark script runs end to end on a tiny model and reports what docs/benchmarks.md says it reports."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

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


@pytest.mark.slow  # runs scripts/bench.py
def test_bench_reports_throughput_errors_and_speedup(tmp_path):
    report = bench(tmp_path, "--architecture", "tiny", "--batch-size", "2", "--end-to-end", "4", "--num-workers", "0")
    for key in ("plain_images_per_s", "images_per_s", "captions_per_s", "pair_maps_per_s", "pair_numbers_per_s", "pair_summaries_per_s",
                "image_ratio_to_plain", "naive_seconds_per_pair", "peak_rss_gb"):
        assert report[key] > 0, key
    assert report["completeness_error_relative_max"] < 1e-2
    assert (report["image_positions"], report["embedding_dim"]) == (17, 16) and report["text_positions"] > 0  # for plan.py
    assert report["speedup_vs_naive_unbatched"] > 1  # even a tiny model: the naive loop is slower
    assert set(report["scaling"]) == {"caption_seconds_by_tokens", "image_seconds_by_steps", "image_seconds_by_patches"}
    assert set(report["memory_knob"]) == {"8", "16", "32", "64", "128", "256"}
    # random weights are smooth: the first rule (3 nodes) on each of the four first panels meets the tolerance, and
    # the three inner panel edges are the only plain forward passes
    assert report["caption_nodes_max"] == report["image_nodes_max"] == 12
    assert report["caption_endpoints_mean"] == report["image_endpoints_mean"] == 3
    assert report["panel_layout"] == "default"
    assert report["caption_not_converged"] == report["image_not_converged"] == 0
    end_to_end = report["end_to_end"]  # `xclip attribute` on 4 JPEG files and 4 captions
    assert end_to_end["pairs"] == 4 and end_to_end["seconds_without_model_load"] > 0
    assert end_to_end["ratio_to_engine"] == end_to_end["engine_seconds_same_work"] / end_to_end["seconds_without_model_load"]


@pytest.mark.slow  # runs scripts/bench.py
def test_bench_on_the_demo_model_reports_the_nodes_trained_weights_need(tmp_path):
    report = bench(tmp_path, "--architecture", "demo", "--batch-size", "4", "--no-naive", "--end-to-end", "0")
    assert report["quadrature"] == "adaptive, tolerance 0.001"
    assert report["panel_layout"] == "calibrated"  # the demo model ships its layout
    assert report["image_nodes_mean"] > 16 and report["caption_nodes_mean"] > 12
    assert report["image_relative_error_max"] <= 1e-3 and report["image_not_converged"] == 0
    fixed = bench(tmp_path, "--architecture", "demo", "--batch-size", "4", "--no-naive", "--n-steps", "10", "--end-to-end", "0")
    assert fixed["image_nodes_max"] == 10 and fixed["image_not_converged"] >= 1


def test_plan_multiplies_measured_rates_and_the_layouts_bytes(tmp_path):
    rates = {"captions_per_s": 10.0, "images_per_s": 2.0, "pair_maps_per_s": 100.0, "pair_numbers_per_s": 1000.0,
             "pair_summaries_per_s": 50.0}
    bench_json = {"architecture": "vit-b-16", "device": "test", "dtype": "float32", "quadrature": "adaptive",
                  "text_positions": 77, "image_positions": 197, "embedding_dim": 512, **rates}
    (tmp_path / "bench.json").write_text(json.dumps(bench_json))
    result = subprocess.run(
        [sys.executable, str(SCRIPT.with_name("plan.py")), str(tmp_path / "bench.json"), "--images", "500",
         "--captions", "2000", "--shards", "4"], capture_output=True, text=True, timeout=120, check=True,
    )
    rows = {line.split("|")[1].strip(): [cell.strip() for cell in line.split("|")[2:-1]]
            for line in result.stdout.splitlines() if line.startswith("| ") and "pairs |" not in line}
    images, captions = 500 / 2.0, 2000 / 10.0  # seconds
    # given pairs: each input once, split among the shards; `all`: every shard attributes every image
    expected = {
        "given pairs, no maps": (2000, images + captions + 2000 / 1000, (images + captions + 2000 / 1000) / 4),
        "given pairs, maps stored": (2000, images + captions + 2000 / 100, (images + captions + 2000 / 100) / 4),
        "`all`, no maps": (10**6, 4 * images + captions + 10**6 / 1000, images + (captions + 10**6 / 1000) / 4),
        "`all`, maps stored": (10**6, 4 * images + captions + 10**6 / 100, images + (captions + 10**6 / 100) / 4),
        "given pairs, summary only": (2000, images + captions + 2000 / 50, (images + captions + 2000 / 50) / 4),
        "`all`, summary only": (10**6, 4 * images + captions + 10**6 / 50, images + (captions + 10**6 / 50) / 4),
    }
    assert set(rows) == set(expected)
    for name, (pairs, seconds, shard_seconds) in expected.items():
        assert rows[name][0] == f"{pairs:,}"
        assert float(rows[name][1].replace(",", "")) == pytest.approx(seconds / 3600, abs=0.05)
        assert float(rows[name][2].replace(",", "")) == pytest.approx(shard_seconds / 3600, abs=0.005)
    # the map of a pair: 77 x 197 float32
    assert "map 60.7 KB" in result.stdout
    # disk: the items times the layout's bytes per item, which a summary run prints beside the full run's
    def in_bytes(text: str) -> float:
        number, unit = text.split()
        return float(number) * {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9}[unit]

    items = result.stdout.split("summary run: ")[1].split(",")
    caption, image, pair = (in_bytes(item.split(maxsplit=1)[1]) for item in items[:3])
    assert in_bytes(rows["given pairs, summary only"][3]) == pytest.approx(2000 * caption + 500 * image + 2000 * pair, rel=0.02)
    assert in_bytes(rows["`all`, summary only"][3]) == pytest.approx(2000 * caption + 4 * 500 * image + 10**6 * pair, rel=0.02)
    assert pair < 4e3 and in_bytes(rows["given pairs, no maps"][3]) > 50 * in_bytes(rows["given pairs, summary only"][3])
    given_only = subprocess.run(
        [sys.executable, str(SCRIPT.with_name("plan.py")), str(tmp_path / "bench.json"), "--images", "500",
         "--captions", "2000", "--shards", "4", "--pairing", "given"], capture_output=True, text=True, timeout=120, check=True,
    ).stdout
    assert "`all`" not in given_only and given_only.count("| given pairs") == 3


@pytest.mark.slow  # runs scripts/bench.py
def test_bench_runs_an_open_clip_architecture(tmp_path):
    pytest.importorskip("open_clip")
    config = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 8},
              "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2}}
    (tmp_path / "tiny-open-clip.json").write_text(json.dumps(config))
    report = bench(tmp_path, "--family", "open_clip", "--architecture", str(tmp_path / "tiny-open-clip.json"),
                   "--batch-size", "2", "--no-naive", "--no-scaling", "--end-to-end", "2", "--num-workers", "0")
    assert report["family"] == "open_clip" and (report["image_positions"], report["embedding_dim"]) == (17, 16)
    for key in ("plain_images_per_s", "plain_captions_per_s", "image_ratio_to_plain", "caption_ratio_to_plain"):
        assert report[key] > 0, key  # the ratio is to open_clip's own encode_image / encode_text
    assert report["end_to_end"]["pairs"] == 2  # `xclip attribute` on the open_clip checkpoint, from a config


@pytest.mark.slow  # runs scripts/gpu_check.sh
def test_the_gpu_check_runs_in_its_reduced_mode_and_tables_what_it_measured(tmp_path):
    """CI runs the prepared GPU check on CPU with tiny models, so that it cannot rot before a GPU runs it."""
    import os
    import re

    out = tmp_path / "gpu-check"
    result = subprocess.run(
        ["bash", str(SCRIPT.with_name("gpu_check.sh")), "--reduced"], capture_output=True, text=True, timeout=900,
        env={**os.environ, "OUT": str(out), "PYTHON": sys.executable},
    )
    assert result.returncode == 0, result.stderr
    junit = (out / "cuda-tests.xml").read_text()
    assert re.search(r'tests="(\d+)"', junit).group(1) == re.search(r'skipped="(\d+)"', junit).group(1) != "0"  # no CUDA here
    table = (out / "table.md").read_text()
    assert result.stdout == table
    for model in ("clip-tiny", "siglip-tiny", "clip-demo"):
        adaptive = json.loads((out / f"{model}-float32-adaptive.json").read_text())
        fixed = json.loads((out / f"{model}-float32-fixed10.json").read_text())
        assert adaptive["quadrature"] == "adaptive, tolerance 0.001" and fixed["image_nodes_max"] == 10
        # the table's row is the files' numbers
        (line,) = [line for line in table.splitlines() if line.startswith(f"| {adaptive['family']} {adaptive['architecture']} |")]
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        assert cells[2] == f"{adaptive['images_per_s']:.1f} ({adaptive['image_nodes_mean']:.1f} / {adaptive['image_nodes_max']})"
        assert cells[5] == f"{fixed['images_per_s']:.1f}"
    end = json.loads((out / "clip-tiny-float32-end-to-end.json").read_text())["end_to_end"]
    assert f"on {end['pairs']} photo-sized JPEG pairs" in table and f"{end['ratio_to_engine']:.2f} of the engine's speed" in table

"""Fixtures: tiny random CLIP and SigLIP checkpoints saved to disk and loaded through ``xclip.load_model``."""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the tests never reach a model hub

import numpy as np
import pytest
import torch
from PIL import Image

import xclip
from xclip.random_models import save_random_model

# smaller initial weights keep the tiny random towers close to the smoothness of trained ones, so that the
# quadrature error at N = 16 is far below the tolerances the tests assert
SMOOTH = 0.5
CAPTIONS = ["a red dog", "two blue circle and a square on the cat"]
# the shipped demo model and its held-out demo scenes: a trained model, far less smooth than random weights
DEMO_MODEL = Path(__file__).resolve().parents[1] / "xclip" / "models" / "shapes-clip"
DEMO_SCENES = Path(__file__).resolve().parents[1] / "configs" / "demo" / "scenes"


def demo_pairs() -> tuple[list[str], list[Path]]:
    """Captions and image paths of the twelve demo scenes, in file order."""
    rows = [json.loads(line) for line in (DEMO_SCENES / "metadata.jsonl").read_text().splitlines() if line.strip()]
    return [row["text"] for row in rows], [DEMO_SCENES / row["file_name"] for row in rows]


@pytest.fixture(scope="session", params=["float64", "float32"])
def demo_model(request: pytest.FixtureRequest) -> xclip.DualEncoderAdapter:
    return xclip.load_model(DEMO_MODEL, dtype=request.param, device="cpu")


@pytest.fixture(scope="session", params=["clip", "siglip"])
def family(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("models")
    return {
        name: str(save_random_model(root / name, name, "tiny", seed=0, initializer_factor=SMOOTH))
        for name in ("clip", "siglip")
    }


@pytest.fixture(scope="session")
def model64(model_dirs: dict[str, str], family: str) -> xclip.DualEncoderAdapter:
    return xclip.load_model(model_dirs[family], dtype="float64", device="cpu")


@pytest.fixture(scope="session")
def model32(model_dirs: dict[str, str], family: str) -> xclip.DualEncoderAdapter:
    return xclip.load_model(model_dirs[family], dtype="float32", device="cpu")


def make_images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    sizes = [(40, 50), (32, 32), (64, 48), (50, 40)]
    return [Image.fromarray((rng.random((*sizes[i % 4], 3)) * 255).astype("uint8")) for i in range(n)]


@pytest.fixture()
def images() -> list[Image.Image]:
    return make_images(2)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _layout_cache(tmp_path_factory, monkeypatch) -> Path:
    """Every test gets an empty layout cache of its own: the user's calibrations never reach a test."""
    cache = tmp_path_factory.mktemp("layouts")
    monkeypatch.setenv("XCLIP_LAYOUT_CACHE", str(cache))
    return cache


def plant_pair_number(f, pair: int, name: str, value: float) -> None:
    """Replace one of a stored pair's numbers in an open run file, with the checksum readers verify."""
    from xclip.store import _checksum, _pair_numbers_row

    pairs = f["pairs"]
    pairs[name][pair] = value
    pairs["checksum"][pair] = _checksum(pairs["interactions"][pair], *_pair_numbers_row(pairs, pair))


def plant_map(f, pair: int, interactions: np.ndarray) -> None:
    """Replace a stored pair map in an open run file, with the checksum that readers verify (a plant without it
    is refused as damage)."""
    from xclip.store import _checksum, _pair_numbers_row

    pairs = f["pairs"]
    pairs["interactions"][pair] = interactions
    pairs["checksum"][pair] = _checksum(pairs["interactions"][pair], *_pair_numbers_row(pairs, pair))

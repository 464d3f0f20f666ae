"""Fixtures: tiny random CLIP and SigLIP checkpoints saved to disk and loaded through ``xclip.load_model``, finished
runs and a headless browser (plain helpers are in helpers.py)."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the tests never reach a model hub
# before torch loads, as the CLI does: OpenMP threads sleep instead of spinning, as many as the CPUs we may use
# (tests/test_pipeline.py beside other work on 2 cores: 80 to 91 s with torch's defaults, 25 to 27 s so)
from xclip.threads import prepare_process

prepare_process()

import pytest
import torch
from helpers import CHROMEDRIVER, CHROMIUM, DEMO_CONFIG, DEMO_MODEL, invoke, jsonl_folder, make_images, write_config
from PIL import Image

import xclip
from xclip.config import load_config
from xclip.models.random_models import save_random_model
from xclip.run.runner import run

# smaller initial weights keep the tiny random towers close to the smoothness of trained ones, so that the
# quadrature error at N = 16 is far below the tolerances the tests assert
SMOOTH = 0.5


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


@pytest.fixture()
def finished_run(tmp_path, model_dirs) -> Path:
    """A finished run of the random CLIP over ``jsonl_folder``'s records: ``tmp_path / "run"``."""
    jsonl_folder(tmp_path, '{"file_name": "img1.png", "text": "a red dog"}')
    assert invoke("attribute", write_config(tmp_path, model_dirs["clip"]), "-q")[0] == 0
    return tmp_path / "run"


@pytest.fixture()
def demo_run(tmp_path_factory) -> Path:
    """The demo config, first 40 pairs: enough rows to sort and filter, maps of the trained demo model."""
    root = tmp_path_factory.mktemp("demo")
    config = load_config(DEMO_CONFIG, [f"output.directory={root / 'run'}", "data.limit=40"])
    run(config)
    return root / "run"


@pytest.fixture()
def driver():
    """Headless Chromium through selenium (tests that use it carry ``helpers.browser``)."""
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1400,1000", "--force-device-scale-factor=1"):
        options.add_argument(flag)
    chrome = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    yield chrome
    chrome.quit()

"""CUDA path: the same maps as on the CPU (skipped without a GPU)."""

from __future__ import annotations

import pytest
import torch
from helpers import CAPTIONS, make_images

import xclip

pytestmark = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@needs_cuda
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_cuda_agrees_with_cpu(model_dirs, family, dtype):
    images = make_images(2)
    cpu = xclip.load_model(model_dirs[family], device="cpu", dtype=dtype)
    gpu = xclip.load_model(model_dirs[family], device="cuda", dtype=dtype)
    expected = xclip.InteractionAttribution(cpu, n_steps=8).attribute(CAPTIONS, images)
    actual = xclip.InteractionAttribution(gpu, n_steps=8).attribute(CAPTIONS, images)
    tolerance = 1e-10 if dtype == "float64" else 2e-4
    for a, b in zip(actual, expected):
        assert a.interactions.device.type == "cuda"
        scale = b.interactions.abs().max().item()
        torch.testing.assert_close(a.interactions.cpu(), b.interactions, rtol=0, atol=tolerance * scale)


@needs_cuda
def test_bfloat16_keeps_completeness_within_a_stated_bound(model_dirs, family):
    model = xclip.load_model(model_dirs[family], device="cuda", dtype="bfloat16")
    maps = xclip.InteractionAttribution(model, n_steps=10).attribute(CAPTIONS, make_images(2))
    for m in maps:
        assert m.interactions.dtype == torch.float32  # accumulated in float32
        assert m.completeness_error <= 1e-3 * max(abs(m.four_term_value), 1e-2)

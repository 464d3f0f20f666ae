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


@needs_cuda
def test_the_finite_check_takes_a_batch_of_pair_numbers_on_the_gpu():
    from xclip.attribution.result import PairNumbers
    from xclip.run.runner import _FiniteCheck

    def numbers(error: float, term: float = 0.5) -> PairNumbers:
        return PairNumbers(score=0.5, terms=torch.tensor([term, 0.1, 0.2, 0.3], device="cuda"), four_term_value=0.5,
                           completeness_error=error, completeness_bound=1.0, score_scale=1.0, map_error_bound=0.0)

    check = _FiniteCheck(model=None)  # the model is asked only once a result is not finite
    assert check.all_finite([numbers(1e-6), numbers(2e-6)])  # tensors on the GPU, errors as Python numbers
    assert not check.all_finite([numbers(1e-6), numbers(float("nan"))])
    assert not check.all_finite([numbers(1e-6, term=float("inf"))])

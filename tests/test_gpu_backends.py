"""Every op on the GPU backends (cuda and triton, compiled), forward and every
gradient, against the reference in float64, in each dtype the backend runs on
a GPU. Without a GPU these skip ("no GPU"); `make gpu-check` runs them.

The same check runs here on the cpu backend, so the harness itself is tested
on every machine.
"""

from __future__ import annotations

import math

import pytest
import torch

import medmtl
from medmtl import ops
from tests.conftest import requires_cuda_gpu, requires_extension, requires_triton_gpu

# Largest error allowed, relative to max(1, max|expected|), per dtype: float32
# leaves room for TF32 (the default for convolutions on the GPU).
TOL = {torch.float64: 1e-9, torch.float32: 3e-3, torch.float16: 2e-2, torch.bfloat16: 8e-2}


def _g(seed):
    return torch.Generator().manual_seed(seed)


def _multiscale_pool_case():
    g = _g(0)
    leaves = [torch.randn(2, 3, 13, 29, generator=g, dtype=torch.float64),
              torch.randn(2, 5, 7, 5, generator=g, dtype=torch.float64),
              torch.rand(3, generator=g, dtype=torch.float64) + 0.5, torch.rand(5, generator=g, dtype=torch.float64) + 0.5,
              torch.randn(3, generator=g, dtype=torch.float64) * 0.1, torch.randn(5, generator=g, dtype=torch.float64) * 0.1]
    return leaves, lambda a, b, s0, s1, t0, t1: ops.multiscale_pool([a, b], (1, 2, 3, 6), "avg", [s0, s1], [t0, t1],
                                                                    "relu")


def _multiscale_pool_max_case():
    g = _g(1)
    leaves = [torch.randn(2, 4, 9, 11, 5, generator=g, dtype=torch.float64)]
    return leaves, lambda x: ops.multiscale_pool([x], (1, 2, 4), "max")


def _multi_dilation_conv_case(combine):
    g = _g(2)
    leaves = [torch.randn(2, 8, 14, 13, generator=g, dtype=torch.float64),
              torch.randn(3, 6, 8, 3, 3, generator=g, dtype=torch.float64) / 5,
              torch.randn(6 if combine == "sum" else 18, generator=g, dtype=torch.float64)]
    return leaves, lambda x, w, b: ops.multi_dilation_conv(x, w, [0, 1, 6], b, combine, "relu")


def _spatial_attention_case():
    g = _g(3)
    leaves = [torch.randn(2, 5, 9, 7, generator=g, dtype=torch.float64),
              torch.randn(1, 2, 7, 7, generator=g, dtype=torch.float64) / 7]
    return leaves, lambda x, w: ops.spatial_attention(x, w)


def _window_attention_case(spatial, window, shift):
    g = _g(4)
    shape = (2, *spatial, 2, 16)
    rows = math.prod(2 * w - 1 for w in window)
    leaves = [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(3)]
    leaves += [torch.randn(rows, 2, generator=g, dtype=torch.float64),
               torch.randn(2, 16, generator=g, dtype=torch.float64), torch.randn(2, 16, generator=g, dtype=torch.float64)]
    return leaves, lambda q, k, v, t, pk, pv: ops.window_attention(q, k, v, window, shift, t, 0.25, pk, pv)


CASES = {
    "multiscale_pool_avg": _multiscale_pool_case,
    "multiscale_pool_max_3d": _multiscale_pool_max_case,
    "multi_dilation_conv_sum": lambda: _multi_dilation_conv_case("sum"),
    "multi_dilation_conv_concat": lambda: _multi_dilation_conv_case("concat"),
    "spatial_attention": _spatial_attention_case,
    "window_attention_2d": lambda: _window_attention_case((15, 9), (7, 7), (3, 3)),
    "window_attention_3d": lambda: _window_attention_case((5, 6, 7), (3, 3, 3), (1, 1, 1)),
}


def check_backend(case: str, backend: str, dtype: torch.dtype, device: str) -> None:
    """The op of `case` on `backend` in `dtype` on `device`: output and every
    gradient within TOL[dtype] of the float64 reference."""
    leaves64, fn = CASES[case]()
    leaves64 = [t.to(device).requires_grad_() for t in leaves64]
    with medmtl.backend("reference"):
        expected = fn(*leaves64)
    grad = torch.randn(expected.shape, generator=_g(9), dtype=torch.float64).to(device)
    want = torch.autograd.grad(expected, leaves64, grad)
    leaves = [t.detach().to(dtype).requires_grad_() for t in leaves64]
    with medmtl.backend(backend):
        out = fn(*leaves)
    assert out.dtype == dtype and out.device.type == device
    have = torch.autograd.grad(out, leaves, grad.to(dtype))
    names = ["output"] + [f"grad[{i}]" for i in range(len(leaves))]
    for name, got, exp in zip(names, [out] + list(have), [expected] + list(want)):
        err = (got.double() - exp.detach()).abs().max().item()
        bound = TOL[dtype] * max(1.0, exp.abs().max().item())
        assert err <= bound, f"{case} {backend} {dtype} {name}: max error {err:.3g} > {bound:.3g}"


GPU_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@requires_cuda_gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES + [torch.float64], ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_cuda_backend_matches_reference(case, dtype):
    check_backend(case, "cuda", dtype, "cuda")


@requires_triton_gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_triton_backend_compiled_matches_reference(case, dtype):
    check_backend(case, "triton", dtype, "cuda")


@requires_extension
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_harness_on_the_cpu_backend(case, dtype):
    check_backend(case, "cpu", dtype, "cpu")


@requires_extension
def test_harness_detects_a_wrong_answer(monkeypatch):
    """With no tolerance, float32 against the float64 reference must fail: the
    comparison is live."""
    monkeypatch.setitem(TOL, torch.float32, 0.0)
    with pytest.raises(AssertionError, match="max error"):
        check_backend("spatial_attention", "cpu", torch.float32, "cpu")

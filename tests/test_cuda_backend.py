"""The CUDA kernels: built and registered everywhere CUDA
can be compiled; run against the reference where a GPU is present."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

import medmtl
from medmtl._extension import extension_has_cuda, extension_loaded
from medmtl.ops import multiscale_pool
from tests.conftest import in_ci, make_affine, make_features, requires_cuda_gpu

# CI always expects the CUDA kernels (.ci/run builds with MEDMTL_BUILD_CUDA=1);
# elsewhere, wherever setup.py would have built them.
CUDA_EXPECTED = in_ci() or (torch.version.cuda is not None and os.environ.get("MEDMTL_BUILD_CUDA") != "0"
                            and (shutil.which("nvcc") is not None or bool(os.environ.get("CUDA_HOME"))))


@pytest.mark.skipif(not CUDA_EXPECTED, reason="no CUDA build of torch and nvcc, or MEDMTL_BUILD_CUDA=0")
def test_cuda_kernels_were_compiled_and_registered():
    """In CI the CUDA sources must compile, link and register their kernels."""
    assert extension_loaded() and extension_has_cuda(), medmtl.info()
    for op in ("multiscale_pool", "multi_dilation_conv", "spatial_attention", "window_attention"):
        for name in (f"medmtl::{op}", f"medmtl::{op}_backward"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA"), name
            assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CPU"), name
    arches = medmtl._extension.cuda_arch_list()
    assert "8.0" in arches and "9.0" in arches


CASES = [
    ([(2, 3, 7, 5), (2, 5, 13, 29)], (1, 2, 3, 6, 9)),
    ([(2, 3, 13, 29, 3)], (1, 2, 4)),
    ([(1, 64, 14, 14)], (1,)),
]


@requires_cuda_gpu
@pytest.mark.parametrize("shapes,sizes", CASES)
@pytest.mark.parametrize("mode", ["avg", "max"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_cuda_matches_reference(shapes, sizes, mode, layout):
    features = [x.detach().cuda().requires_grad_() for x in make_features(shapes, layout=layout)]
    scale, shift = make_affine(features)
    scale = [s.detach().cuda().requires_grad_() for s in scale]
    shift = [s.detach().cuda().requires_grad_() for s in shift]
    params = features + scale + shift
    results = {}
    for backend in ("reference", "cuda"):
        with medmtl.backend(backend):
            out = multiscale_pool(features, sizes, mode, scale, shift, "relu")
        grad = torch.linspace(-1, 1, out.numel(), device="cuda").view_as(out)
        results[backend] = (out, torch.autograd.grad(out, params, grad))
    torch.testing.assert_close(results["cuda"][0], results["reference"][0], atol=1e-5, rtol=1e-5)
    for got, expected in zip(results["cuda"][1], results["reference"][1]):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@requires_cuda_gpu
@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3), (torch.bfloat16, 2e-2)])
def test_cuda_low_precision(dtype, tol):
    features = [x.cuda().to(dtype) for x in make_features([(2, 8, 9, 7)], requires_grad=False)]
    with medmtl.backend("cuda"):
        got = multiscale_pool(features, (1, 3), "avg", activation="relu")
    expected = medmtl.ops.reference.multiscale_pool([x.float() for x in features], (1, 3), "avg", None, None, "relu")
    torch.testing.assert_close(got.float(), expected, atol=tol, rtol=tol)


@requires_cuda_gpu
def test_cuda_gradcheck_and_opcheck():
    features = [x.detach().cuda().requires_grad_() for x in make_features([(1, 2, 5, 3)], dtype=torch.float64)]
    with medmtl.backend("cuda"):
        assert torch.autograd.gradcheck(lambda x: multiscale_pool([x], (1, 2, 5), "max", activation="relu"),
                                        features)
    torch.library.opcheck(torch.ops.medmtl.multiscale_pool.default, (features, [1, 2], "avg", None, None, True))


@requires_cuda_gpu
def test_auto_prefers_a_gpu_backend_for_cuda_tensors():
    assert medmtl.ops.resolve_backend("multiscale_pool", torch.device("cuda")) in ("cuda", "triton")


@requires_cuda_gpu
@pytest.mark.parametrize("combine", ["sum", "concat"])
@pytest.mark.parametrize("hw,dilations", [((14, 14), [6, 12, 18]), ((5, 7), [0, 1, 2]), ((1, 1), [18])])
def test_cuda_multi_dilation_conv_matches_reference(combine, hw, dilations):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, *hw, generator=g, dtype=torch.float64).cuda().requires_grad_()
    weight = (torch.randn(len(dilations), 6, 8, 3, 3, generator=g, dtype=torch.float64) / 5).cuda().requires_grad_()
    bias = torch.randn(6 if combine == "sum" else 6 * len(dilations), generator=g,
                       dtype=torch.float64).cuda().requires_grad_()
    results = {}
    for backend in ("reference", "cuda"):
        with medmtl.backend(backend):
            out = medmtl.ops.multi_dilation_conv(x, weight, dilations, bias, combine, "relu")
        grad = torch.linspace(-1, 1, out.numel(), device="cuda", dtype=out.dtype).view_as(out)
        results[backend] = (out, torch.autograd.grad(out, (x, weight, bias), grad))
    torch.testing.assert_close(results["cuda"][0], results["reference"][0])
    for got, expected in zip(results["cuda"][1], results["reference"][1]):
        torch.testing.assert_close(got, expected)


@requires_cuda_gpu
@pytest.mark.parametrize("k", [3, 7])
def test_cuda_spatial_attention_matches_reference(k):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 9, 7, generator=g, dtype=torch.float64).cuda().requires_grad_()
    weight = (torch.randn(1, 2, k, k, generator=g, dtype=torch.float64) / k).cuda().requires_grad_()
    results = {}
    for backend in ("reference", "cuda"):
        with medmtl.backend(backend):
            out = medmtl.ops.spatial_attention(x, weight)
        results[backend] = (out, torch.autograd.grad(out.square().sum(), (x, weight)))
    torch.testing.assert_close(results["cuda"][0], results["reference"][0])
    for got, expected in zip(results["cuda"][1], results["reference"][1]):
        torch.testing.assert_close(got, expected)
    with medmtl.backend("cuda"):
        nchw = medmtl.ops.spatial_attention(x.detach().to(memory_format=torch.channels_last), weight.detach(),
                                            contiguous_output=True)
    assert nchw.is_contiguous()
    torch.testing.assert_close(nchw, results["reference"][0].detach())


@requires_cuda_gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.float16, 2e-2), (torch.bfloat16, 5e-2)])
@pytest.mark.parametrize("shape, window, shift", [((2, 15, 9, 2, 32), (7, 7), (3, 3)),
                                                  ((1, 9, 10, 11, 3, 16), (7, 7, 7), (3, 3, 3))])
def test_gpu_window_attention_matches_reference(backend, dtype, tol, shape, window, shift):
    if backend == "triton":
        pytest.importorskip("triton")
    import math

    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(*shape, generator=g).cuda().to(dtype).requires_grad_() for _ in range(3))
    rows = math.prod(2 * w - 1 for w in window)
    table = torch.randn(rows, shape[-2], generator=g).cuda().to(dtype).requires_grad_()
    pad_key, pad_value = (torch.randn(shape[-2:], generator=g).cuda().to(dtype).requires_grad_() for _ in range(2))
    leaves = (q, k, v, table, pad_key, pad_value)
    expected = medmtl.ops.reference.window_attention(*(t.double() for t in leaves[:3]), window, shift,
                                                     table.double(), 0.2, pad_key.double(), pad_value.double())
    with medmtl.backend(backend):
        out = medmtl.ops.window_attention(q, k, v, window, shift, table, 0.2, pad_key, pad_value)
    torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol)
    grad = torch.randn_like(expected)
    want = torch.autograd.grad(expected, [t for t in leaves], grad)  # through the .double() casts
    have = torch.autograd.grad(out, leaves, grad.to(dtype))
    for w, h in zip(want, have):
        torch.testing.assert_close(h.double(), w, rtol=tol * 5, atol=tol * 5 * max(1.0, w.abs().max().item()))

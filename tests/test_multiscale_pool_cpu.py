"""The C++ CPU kernels of multiscale_pool against the reference."""

from __future__ import annotations

import pytest
import torch

import medmtl
from medmtl.ops import multiscale_pool, reference
from tests.conftest import make_affine, make_features, requires_extension

pytestmark = requires_extension

SHAPES_2D = [(2, 3, 7, 5), (2, 5, 13, 29), (2, 2, 1, 1)]
SHAPES_3D = [(2, 3, 13, 29, 3), (2, 4, 5, 4, 6)]
SIZES = (1, 2, 3, 6, 9)  # 6 and 9 exceed some inputs' sides


def _run(backend, features, sizes, mode, scale, shift, activation):
    with medmtl.backend(backend):
        return multiscale_pool(features, sizes, mode, scale, shift, activation)


def _compare(features, sizes, mode, with_affine, activation, atol, rtol):
    scale, shift = make_affine(features) if with_affine else (None, None)
    if with_affine == "scale":
        shift = None
    if with_affine == "shift":
        scale = None
    params = features + (scale or []) + (shift or [])
    expected = _run("reference", features, sizes, mode, scale, shift, activation)
    got = _run("cpu", features, sizes, mode, scale, shift, activation)
    torch.testing.assert_close(got, expected, atol=atol, rtol=rtol)
    grad = torch.randn(expected.shape, generator=torch.Generator().manual_seed(2), dtype=expected.dtype)
    expected_grads = torch.autograd.grad(expected, params, grad)
    got_grads = torch.autograd.grad(got, params, grad)
    # scale/shift gradients are float32 sums over thousands of positions, summed
    # in a different order than the reference's: allow 10x the output tolerance
    for g, e in zip(got_grads, expected_grads):
        torch.testing.assert_close(g, e, atol=10 * atol, rtol=10 * rtol)


@pytest.mark.parametrize("shapes", [SHAPES_2D, SHAPES_3D], ids=["2d", "3d"])
@pytest.mark.parametrize("mode", ["avg", "max"])
@pytest.mark.parametrize("with_affine", [None, "both", "scale", "shift"])
@pytest.mark.parametrize("activation", [None, "relu"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_cpu_matches_reference_float32(shapes, mode, with_affine, activation, layout):
    features = make_features(shapes, layout=layout)
    _compare(features, SIZES, mode, with_affine, activation, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shapes", [[(1, 2, 5, 3), (1, 3, 2, 4)], [(2, 2, 3, 2, 4)]], ids=["2d", "3d"])
@pytest.mark.parametrize("mode", ["avg", "max"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_cpu_gradcheck_float64(shapes, mode, layout):
    features = make_features(shapes, dtype=torch.float64, layout=layout)
    scale, shift = make_affine(features)
    n = len(features)

    def fn(*tensors):
        return multiscale_pool(list(tensors[:n]), (1, 2, 5), mode, list(tensors[n:2 * n]),
                               list(tensors[2 * n:]), "relu")

    with medmtl.backend("cpu"):
        assert torch.autograd.gradcheck(fn, features + scale + shift)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cpu_low_precision_matches_float32_reference(dtype):
    features = make_features([(2, 8, 9, 7)], requires_grad=False)
    low = [x.to(dtype) for x in features]
    expected = reference.multiscale_pool(low, (1, 3), "avg", None, None, "relu").float()
    with medmtl.backend("cpu"):
        got = multiscale_pool(low, (1, 3), "avg", activation="relu")
    assert got.dtype == dtype
    # accumulation in float32: at least as close to the float32 result as the reference is
    exact = reference.multiscale_pool([x.float() for x in low], (1, 3), "avg", None, None, "relu")
    assert (got.float() - exact).abs().max() <= (expected - exact).abs().max() + 1e-2


def test_cpu_output_layout_is_level_then_size():
    """Column blocks follow levels, then sizes; within a block channel-major."""
    features = make_features([(2, 3, 8, 8), (2, 2, 4, 4)], requires_grad=False)
    with medmtl.backend("cpu"):
        out = multiscale_pool(features, (1, 2), "avg")
    a, b = features
    blocks = [a.mean((2, 3)), torch.nn.functional.adaptive_avg_pool2d(a, 2).flatten(1),
              b.mean((2, 3)), torch.nn.functional.adaptive_avg_pool2d(b, 2).flatten(1)]
    torch.testing.assert_close(out, torch.cat(blocks, 1))


def test_cpu_max_ties_and_nan_follow_pytorch():
    x = torch.zeros(1, 1, 4, 4)
    x[0, 0, 1, 2] = float("nan")
    x = x.requires_grad_()
    for backend in ("reference", "cpu"):
        with medmtl.backend(backend):
            out = multiscale_pool([x], (1, 2), "max")
            (grad,) = torch.autograd.grad(out.nan_to_num().sum(), x)
        if backend == "reference":
            expected_out, expected_grad = out, grad
    torch.testing.assert_close(out, expected_out, equal_nan=True)
    torch.testing.assert_close(grad, expected_grad)


def test_cpu_empty_batch():
    features = make_features([(0, 3, 5, 5)], requires_grad=False)
    with medmtl.backend("cpu"):
        out = multiscale_pool(features, (1, 2))
    assert out.shape == (0, 15)


def test_auto_takes_cpu_for_cpu_tensors():
    assert medmtl.ops.resolve_backend("multiscale_pool", torch.device("cpu")) == "cpu"


@pytest.mark.parametrize("dims", [2, 3])
def test_opcheck(dims):
    spatial = (5, 3) if dims == 2 else (3, 2, 4)
    features = make_features([(2, 3, *spatial), (2, 2, *spatial[:-1], 7)], dtype=torch.float64)
    scale, shift = make_affine(features)
    args = (features, [1, 2], "avg", torch.cat(scale).detach().requires_grad_(),
            torch.cat(shift).detach().requires_grad_(), True)
    torch.library.opcheck(torch.ops.medmtl.multiscale_pool.default, args)
    torch.library.opcheck(torch.ops.medmtl.multiscale_pool.default, (features, [3], "max", None, None, False))


def test_torch_compile_fullgraph_forward_and_backward():
    features = make_features([(2, 4, 9, 7), (2, 3, 5, 5)])
    scale, shift = make_affine(features)

    def head(features, scale, shift):
        return multiscale_pool(features, (1, 2, 3), "avg", scale, shift, "relu").square().sum()

    with medmtl.backend("cpu"):
        compiled = torch.compile(head, fullgraph=True, backend="aot_eager")
        got = compiled(features, scale, shift)
        got_grads = torch.autograd.grad(got, features + scale + shift)
    with medmtl.backend("reference"):
        expected = head(features, scale, shift)
        expected_grads = torch.autograd.grad(expected, features + scale + shift)
    torch.testing.assert_close(got, expected)
    for g, e in zip(got_grads, expected_grads):
        torch.testing.assert_close(g, e)


def test_torch_compile_inductor_keeps_the_op():
    features = make_features([(2, 4, 9, 7)], requires_grad=False)
    with medmtl.backend("cpu"):
        compiled = torch.compile(lambda f: multiscale_pool(f, (1, 2), "max") * 2, fullgraph=True)
        got = compiled(features)
    torch.testing.assert_close(got, reference.multiscale_pool(features, (1, 2), "max", None, None, None) * 2)

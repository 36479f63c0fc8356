"""The CPU kernels of multi_dilation_conv and spatial_attention against the reference."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import medmtl
from medmtl.ops import multi_dilation_conv, reference, spatial_attention
from tests.conftest import requires_extension
from tests.ties import zero_ties

pytestmark = requires_extension


def _x(shape, dtype=torch.float64, layout="contiguous", seed=0):
    g = torch.Generator().manual_seed(seed)
    if layout == "strided":
        x = torch.randn(*shape[:-1], 2 * shape[-1], generator=g, dtype=dtype)[..., ::2]
    else:
        x = torch.randn(*shape, generator=g, dtype=dtype)
        if layout == "channels_last":
            x = x.to(memory_format=torch.channels_last)
    return x.requires_grad_()


def _params(n, cout, cin, combine, dtype, seed=1, with_bias=True):
    g = torch.Generator().manual_seed(seed)
    weight = (torch.randn(n, cout, cin, 3, 3, generator=g, dtype=dtype) / 3).requires_grad_()
    bias = None
    if with_bias:
        bias = torch.randn(cout if combine == "sum" else n * cout, generator=g, dtype=dtype).requires_grad_()
    return weight, bias


def _tie_free_grad(x, weight, dilations, bias, combine, activation, out, atol):
    """A seeded upstream gradient for out, zero where a ReLU's float64
    pre-activation lies within atol (of the output's scale) of zero: there the
    two backends' float32 roundings may put the output on either side of the
    kink (tests/ties.py). Every other output still checks the ReLU's mask."""
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=out.dtype)
    if activation != "relu":
        return grad
    exact = reference.multi_dilation_conv(x.detach().double(), weight.detach().double(), dilations,
                                          None if bias is None else bias.detach().double(), combine, None)
    return zero_ties(grad, exact, atol * max(1.0, exact.abs().max().item()))


def _compare_conv(x, weight, dilations, bias, combine, activation, atol, rtol):
    params = [x, weight] + ([bias] if bias is not None else [])
    before = [p.detach().clone() for p in params]
    grad = None
    results = {}
    for backend in ("reference", "cpu"):
        with medmtl.backend(backend):
            out = multi_dilation_conv(x, weight, dilations, bias, combine, activation)
        if grad is None:
            grad = _tie_free_grad(x, weight, dilations, bias, combine, activation, out, atol)
        results[backend] = (out, torch.autograd.grad(out, params, grad))
    # atol is relative to each tensor's scale: a weight gradient sums thousands
    # of products, and the rounding of any summation order (direct taps,
    # Winograd tiles) grows with the sum's size, not with each element.
    for got, expected in zip([results["cpu"][0], *results["cpu"][1]],
                             [results["reference"][0], *results["reference"][1]]):
        scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
        torch.testing.assert_close(got, expected, atol=atol * scale, rtol=rtol)
    for p, b in zip(params, before):  # the op never writes its inputs
        torch.testing.assert_close(p, b, atol=0, rtol=0)


@pytest.mark.parametrize("combine", ["sum", "concat"])
@pytest.mark.parametrize("activation", [None, "relu"])
@pytest.mark.parametrize("with_bias", [True, False])
# The CPU kernel's paths. Maps under 40x40 pixels take the tap GEMMs, forward
# and backward: on 14x14 dilation 18 reads the map only through its centre
# tap; 1-pixel rows and columns have no vertical or horizontal taps; column
# shifts of at most W / 8 (1 and 2 on 16x17, 1 and 3 on 12x24) run on whole
# pixel rows with the wrapped columns masked, wider ones on column blocks.
# Larger maps, and a batch of more than 1024 pixels whose taps mostly read the
# map (6, 12, 18 on 28x28, but not 18 alone), are convolved channels-last by
# oneDNN, with the centre-only branches (0 and 60 on 100x97) as GEMMs.
@pytest.mark.parametrize("hw,dilations", [((14, 14), [6, 12, 18]), ((5, 7), [0, 1, 2]), ((1, 1), [6, 12, 18]),
                                          ((14, 14), [18]), ((9, 4), [0, 3, 5]), ((28, 28), [6, 12, 18]),
                                          ((11, 20), [2, 9, 0]), ((100, 97), [5, 0, 60]), ((14, 14), [12]),
                                          ((28, 28), [18]), ((13, 9), [4]), ((1, 30), [1, 6, 6]),
                                          ((30, 1), [0, 2]), ((16, 17), [1, 2]), ((12, 24), [3, 1, 0, 9])])
def test_conv_matches_reference_float64(combine, activation, with_bias, hw, dilations):
    x = _x((2, 3, *hw))
    weight, bias = _params(len(dilations), 4, 3, combine, torch.float64, with_bias=with_bias)
    _compare_conv(x, weight, dilations, bias, combine, activation, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("layout", ["channels_last", "strided"])
@pytest.mark.parametrize("combine", ["sum", "concat"])
def test_conv_float32_layouts_and_batch_one(layout, combine):
    x = _x((1, 5, 13, 11), dtype=torch.float32, layout=layout)
    weight, bias = _params(3, 6, 5, combine, torch.float32)
    _compare_conv(x, weight, [1, 6, 12], bias, combine, "relu", atol=1e-4, rtol=1e-4)


# float32 on a large map goes through oneDNN's fused convolutions (bias,
# accumulation and ReLU inside the convolution): with and without a
# centre-only branch, bias and ReLU (NCHW x is converted first); the small map
# takes the tap GEMMs.
@pytest.mark.parametrize("combine", ["sum", "concat"])
@pytest.mark.parametrize("layout", ["channels_last", "contiguous"])
@pytest.mark.parametrize("hw,dilations", [((43, 41), [2, 7, 13]), ((43, 41), [0, 3, 60]), ((43, 41), [5]),
                                          ((9, 12), [0, 2, 20])])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("activation", ["relu", None])
def test_fused_float32(combine, layout, hw, dilations, with_bias, activation):
    x = _x((2, 6, *hw), dtype=torch.float32, layout=layout)
    weight, bias = _params(len(dilations), 5, 6, combine, torch.float32, with_bias=with_bias)
    _compare_conv(x, weight, dilations, bias, combine, activation, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("combine", ["sum", "concat"])
def test_float32_without_mkldnn(monkeypatch, combine):
    """With torch.backends.mkldnn disabled a large map takes ATen's convolutions
    (bias in the first result, the ReLU in place), with the same answer."""
    x = _x((2, 6, 43, 41), dtype=torch.float32, layout="channels_last")
    weight, bias = _params(3, 5, 6, combine, torch.float32)
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)
    assert not torch._C._get_mkldnn_enabled()
    _compare_conv(x, weight, [0, 3, 9], bias, combine, "relu", atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("combine", ["sum", "concat"])
@pytest.mark.parametrize("weight_layout", ["cin_innermost", "strided"])
@pytest.mark.parametrize("hw", [(14, 14), (48, 45)])
def test_conv_weight_layouts(combine, weight_layout, hw):
    """The weight is read in place when Cin is innermost (the layout the DFE
    layer folds into) and copied otherwise: both give the reference's answer,
    on a small map (tap GEMMs) and a large one (oneDNN, channels-last)."""
    x = _x((2, 5, *hw))
    weight, bias = _params(4, 3, 5, combine, torch.float64)
    weight = weight.detach()
    if weight_layout == "cin_innermost":
        weight = weight.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)
    else:
        weight = torch.cat([weight, weight], 2)[:, :, ::2]
    weight.requires_grad_()
    _compare_conv(x, weight, [0, 6, 12, 18], bias, combine, "relu", atol=1e-10, rtol=1e-10)
    with medmtl.backend("cpu"):
        out = multi_dilation_conv(x, weight, [0, 6, 12, 18], bias, combine, "relu")
    (grad_weight,) = torch.autograd.grad(out.sum(), weight)
    assert grad_weight.stride() == torch.empty_like(weight).stride()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("combine", ["sum", "concat"])
@pytest.mark.parametrize("hw", [(14, 14), (45, 44)])
def test_conv_half_precision(dtype, combine, hw):
    """16-bit inputs (tap GEMMs on the small map, ATen's convolutions on the
    large one) against the float64 reference, to 16-bit precision (without the
    ReLU, whose mask flips where 16-bit rounding changes a near-zero sign)."""
    x64 = _x((2, 8, *hw))
    w64, b64 = _params(3, 4, 8, combine, torch.float64)
    x, weight, bias = (t.detach().to(dtype).requires_grad_() for t in (x64, w64, b64))
    with medmtl.backend("cpu"):
        out = multi_dilation_conv(x, weight, [1, 6, 12], bias, combine)
    with medmtl.backend("reference"):
        expected = multi_dilation_conv(x.double(), weight.double(), [1, 6, 12], bias.double(), combine)
    assert out.dtype == dtype
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    got = [out] + list(torch.autograd.grad(out, [x, weight, bias], grad.to(dtype)))
    want = [expected] + list(torch.autograd.grad(expected, [x, weight, bias], grad))
    for g, e in zip(got, want):
        scale = e.abs().max().item()
        torch.testing.assert_close(g.double(), e.double(), atol=0.02 * scale, rtol=0.02)


@pytest.mark.parametrize("combine", ["sum", "concat"])
@pytest.mark.parametrize("hw", [(14, 14), (45, 44)])
def test_conv_empty_batch(combine, hw):
    """A batch of 0 images gives an empty output and zero weight and bias gradients."""
    x = _x((0, 4, *hw))
    weight, bias = _params(2, 3, 4, combine, torch.float64)
    with medmtl.backend("cpu"):
        out = multi_dilation_conv(x, weight, [1, 6], bias, combine, "relu")
    assert out.shape == (0, 3 * (2 if combine == "concat" else 1), *hw)
    grads = torch.autograd.grad(out.sum(), [x, weight, bias])
    assert grads[0].shape == x.shape and grads[1].abs().max() == 0 and grads[2].abs().max() == 0


@pytest.mark.parametrize("combine", ["sum", "concat"])
def test_conv_gradcheck(combine):
    x = _x((1, 2, 4, 5))
    weight, bias = _params(3, 2, 2, combine, torch.float64)
    with medmtl.backend("cpu"):
        assert torch.autograd.gradcheck(
            lambda x, w, b: multi_dilation_conv(x, w, [0, 1, 3], b, combine, "relu"), (x, weight, bias))


def test_conv_skips_padding_only_taps():
    """On a 14x14 map at dilation 18 only the centre tap reads the map: the other
    taps' weights must not matter, and get zero gradient."""
    x = _x((1, 3, 14, 14))
    weight, _ = _params(1, 4, 3, "sum", torch.float64)
    with medmtl.backend("cpu"):
        out = multi_dilation_conv(x, weight, [18], None, "sum")
        (grad_w,) = torch.autograd.grad(out.sum(), weight)
    centre = torch.nn.functional.conv2d(x, weight[0, :, :, 1:2, 1:2])
    torch.testing.assert_close(out, centre)
    off_centre = grad_w.clone()
    off_centre[..., 1, 1] = 0
    assert off_centre.abs().max() == 0


@pytest.mark.parametrize("combine", ["sum", "concat"])
def test_conv_opcheck_and_compile(combine):
    x = _x((2, 3, 6, 5))
    weight, bias = _params(2, 4, 3, combine, torch.float64)
    torch.library.opcheck(torch.ops.medmtl.multi_dilation_conv.default, (x, weight, [0, 2], bias, combine, True))

    def fn(x, w, b):
        return multi_dilation_conv(x, w, [0, 2], b, combine, "relu").square().sum()

    with medmtl.backend("cpu"):
        compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
        got = compiled(x, weight, bias)
        got_grads = torch.autograd.grad(got, (x, weight, bias))
    with medmtl.backend("reference"):
        expected = fn(x, weight, bias)
        expected_grads = torch.autograd.grad(expected, (x, weight, bias))
    torch.testing.assert_close(got, expected)
    for g, e in zip(got_grads, expected_grads):
        torch.testing.assert_close(g, e)


@st.composite
def conv_problems(draw):
    n = draw(st.integers(1, 3))
    return dict(b=draw(st.integers(1, 2)), cin=draw(st.integers(1, 4)), cout=draw(st.integers(1, 4)),
                h=draw(st.integers(1, 12)), w=draw(st.integers(1, 12)),
                dilations=draw(st.lists(st.integers(0, 20), min_size=n, max_size=n)),
                combine=draw(st.sampled_from(["sum", "concat"])), relu=draw(st.booleans()),
                bias=draw(st.booleans()), seed=draw(st.integers(0, 2**16)))


@settings(max_examples=60, deadline=None)
@given(p=conv_problems())
def test_conv_property(p):
    x = _x((p["b"], p["cin"], p["h"], p["w"]), seed=p["seed"])
    weight, bias = _params(len(p["dilations"]), p["cout"], p["cin"], p["combine"], torch.float64,
                           seed=p["seed"] + 1, with_bias=p["bias"])
    _compare_conv(x, weight, p["dilations"], bias, p["combine"], "relu" if p["relu"] else None, 1e-10, 1e-10)


# --------------------------------------------------------------------------- spatial attention

# The gate's KxK convolution runs directly; 7 on 1x1 and 4x4 maps reads
# mostly padding, 1 none, 5 on 2 x 9 a band of rows.
@pytest.mark.parametrize("shape", [(2, 5, 9, 7), (1, 1, 4, 4), (2, 3, 1, 1), (1, 8, 14, 14), (1, 4, 2, 9)])
@pytest.mark.parametrize("k", [7, 3, 1, 5])
def test_attention_matches_reference(shape, k):
    x = _x(shape)
    weight = (torch.randn(1, 2, k, k, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
              / k).requires_grad_()
    results = {}
    for backend in ("reference", "cpu"):
        with medmtl.backend(backend):
            out = spatial_attention(x, weight)
        grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=out.dtype)
        results[backend] = (out, torch.autograd.grad(out, (x, weight), grad))
    torch.testing.assert_close(results["cpu"][0], results["reference"][0], atol=1e-12, rtol=1e-12)
    for got, expected in zip(results["cpu"][1], results["reference"][1]):
        torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-12)


def test_attention_channel_max_ties_take_the_first_channel():
    x = torch.zeros(1, 4, 3, 3, dtype=torch.float64)
    x[:, 1:3] = 1.0  # channels 1 and 2 tie for the max
    x.requires_grad_()
    weight = torch.randn(1, 2, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    grads = {}
    for backend in ("reference", "cpu"):
        with medmtl.backend(backend):
            (grads[backend],) = torch.autograd.grad(spatial_attention(x, weight).sum(), x)
    torch.testing.assert_close(grads["cpu"], grads["reference"])


def test_attention_gradcheck_opcheck_compile():
    x = _x((1, 3, 5, 4))
    weight = (torch.randn(1, 2, 3, 3, dtype=torch.float64) / 3).requires_grad_()
    with medmtl.backend("cpu"):
        assert torch.autograd.gradcheck(lambda x, w: spatial_attention(x, w), (x, weight))
        compiled = torch.compile(lambda x, w: spatial_attention(x, w).sum(), fullgraph=True, backend="aot_eager")
        got = compiled(x, weight)
    torch.library.opcheck(torch.ops.medmtl.spatial_attention.default, (x, weight))
    torch.testing.assert_close(got, reference.spatial_attention(x, weight).sum())


@pytest.mark.parametrize("dtype, tol", [(torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("contiguous_output", [False, True])
def test_attention_half_precision(dtype, tol, layout, contiguous_output):
    """The gate accumulates in float32 and rounds once (the reference rounds the
    convolution, then the sigmoid): within a rounding of the reference's output."""
    x = _x((2, 6, 11, 9), dtype=torch.float32, layout=layout).detach()
    weight = torch.randn(1, 2, 7, 7, generator=torch.Generator().manual_seed(7)) / 7
    with medmtl.backend("cpu"):
        got = spatial_attention(x.to(dtype), weight.to(dtype), contiguous_output=contiguous_output)
    expected = reference.spatial_attention(x, weight)
    assert got.dtype == dtype
    assert got.is_contiguous(memory_format=torch.channels_last if layout == "channels_last" and not contiguous_output
                             else torch.contiguous_format)
    torch.testing.assert_close(got.float(), expected, atol=tol, rtol=tol)


def test_attention_float32_channels_last():
    x = _x((2, 6, 11, 9), dtype=torch.float32, layout="channels_last")
    weight = torch.randn(1, 2, 7, 7) / 7
    with medmtl.backend("cpu"):
        got = spatial_attention(x, weight)
    torch.testing.assert_close(got, reference.spatial_attention(x, weight), atol=1e-5, rtol=1e-5)

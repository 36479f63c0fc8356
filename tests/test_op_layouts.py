"""The CPU ops keep the layouts their fake kernels promise (medmtl/ops/_layout.py):
multi_dilation_conv's output is channels-last when x is, spatial_attention's is
laid out as x, and every input gradient as torch.empty_like(input). Eager and
torch.compile then see the same strides, and channels-last models are never
converted back and forth."""

from __future__ import annotations

import pytest
import torch

import medmtl
from medmtl.ops import multi_dilation_conv, spatial_attention
from tests.conftest import requires_extension

pytestmark = requires_extension

LAYOUTS = ["contiguous", "channels_last", "sliced_channels_last", "permuted"]


def _x(shape, layout, dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    B, C, H, W = shape
    if layout == "contiguous":
        x = torch.randn(shape, generator=g, dtype=dtype)
    elif layout == "channels_last":
        x = torch.randn(shape, generator=g, dtype=dtype).contiguous(memory_format=torch.channels_last)
    elif layout == "sliced_channels_last":
        x = torch.randn(B, C, H, W + 3, generator=g, dtype=dtype).contiguous(
            memory_format=torch.channels_last)[..., 1:W + 1]
    else:  # dense, but neither NCHW nor NHWC
        x = torch.randn(W, B, H, C, generator=g, dtype=dtype).permute(1, 3, 2, 0)
    assert x.shape == shape
    return x.requires_grad_()


def _assert_laid_out_like(t, like, what):
    expected = torch.empty_like(like)
    assert t.stride() == expected.stride(), f"{what}: strides {t.stride()}, empty_like gives {expected.stride()}"


def _run(fn, params, backend):
    with medmtl.backend(backend):
        out = fn(*params)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=out.dtype)
    return out, torch.autograd.grad(out, params, grad)


# 7x6 takes the NCHW path, 41x40 the channels-last convolutions; dilation 50
# is centre-only there (a GEMM), 0 a 1x1 branch.
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("hw,dilations", [((7, 6), [1, 3]), ((41, 40), [2, 7]), ((41, 40), [0, 3, 50]),
                                          ((41, 40), [5])])
@pytest.mark.parametrize("combine", ["sum", "concat"])
def test_multi_dilation_conv_layouts(layout, hw, dilations, combine):
    x = _x((2, 3, *hw), layout)
    g = torch.Generator().manual_seed(1)
    weight = (torch.randn(len(dilations), 4, 3, 3, 3, generator=g, dtype=x.dtype) / 3).requires_grad_()
    bias = torch.randn(4 * (len(dilations) if combine == "concat" else 1), generator=g,
                       dtype=x.dtype).requires_grad_()

    def fn(x, w, b):
        return multi_dilation_conv(x, w, dilations, b, combine, "relu")

    out, grads = _run(fn, (x, weight, bias), "cpu")
    expected_out, expected_grads = _run(fn, (x, weight, bias), "reference")
    channels_last = layout == "channels_last"
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    torch.testing.assert_close(out, expected_out, atol=1e-10, rtol=1e-10)
    for got, expected, like, name in zip(grads, expected_grads, (x, weight, bias), ("x", "weight", "bias")):
        _assert_laid_out_like(got, like, f"grad of {name}")
        torch.testing.assert_close(got, expected, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_spatial_attention_layouts(layout):
    x = _x((2, 5, 9, 8), layout)
    weight = (torch.randn(1, 2, 7, 7, dtype=x.dtype, generator=torch.Generator().manual_seed(1)) / 7)
    weight = weight.requires_grad_()
    out, grads = _run(spatial_attention, (x, weight), "cpu")
    expected_out, expected_grads = _run(spatial_attention, (x, weight), "reference")
    _assert_laid_out_like(out, x, "output")
    torch.testing.assert_close(out, expected_out, atol=1e-12, rtol=1e-12)
    for got, expected, like in zip(grads, expected_grads, (x, weight)):
        _assert_laid_out_like(got, like, "gradient")
        torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_spatial_attention_contiguous_output(layout):
    """contiguous_output=True: the output is NCHW-contiguous whatever x's layout
    (channels-last x is gated as it is transposed), with the reference's values;
    the gradients still come back laid out as the inputs."""
    x = _x((2, 70, 9, 8), layout)
    weight = (torch.randn(1, 2, 7, 7, dtype=x.dtype, generator=torch.Generator().manual_seed(1)) / 7)
    weight = weight.requires_grad_()

    def fn(x, w):
        return spatial_attention(x, w, contiguous_output=True)

    out, grads = _run(fn, (x, weight), "cpu")
    expected_out, expected_grads = _run(fn, (x, weight), "reference")
    assert out.is_contiguous()
    torch.testing.assert_close(out, expected_out, atol=1e-12, rtol=1e-12)
    for got, expected, like in zip(grads, expected_grads, (x, weight)):
        _assert_laid_out_like(got, like, "gradient")
        torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-12)


def test_spatial_attention_contiguous_output_must_be_a_bool():
    x = _x((1, 3, 4, 4), "contiguous")
    weight = torch.randn(1, 2, 3, 3, dtype=x.dtype)
    for backend in ("cpu", "reference"):
        with medmtl.backend(backend), pytest.raises(TypeError, match="contiguous_output must be a bool, got str"):
            spatial_attention(x, weight, contiguous_output="yes")


def test_channels_last_max_ties_take_the_first_channel():
    """Channels-last spatial attention routes the max's gradient to the first maximal
    channel, as torch.max does."""
    x = torch.zeros(1, 4, 3, 3, dtype=torch.float64).contiguous(memory_format=torch.channels_last).requires_grad_()
    weight = torch.ones(1, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    out, grads = _run(spatial_attention, (x, weight), "cpu")
    expected_out, expected_grads = _run(spatial_attention, (x, weight), "reference")
    torch.testing.assert_close(out, expected_out)
    torch.testing.assert_close(grads[0], expected_grads[0])


@pytest.mark.parametrize("hw", [(5, 6), (41, 40)])
def test_opcheck_channels_last(hw):
    x = _x((1, 3, *hw), "channels_last")
    weight = (torch.randn(2, 4, 3, 3, 3, dtype=x.dtype) / 3).requires_grad_()
    torch.library.opcheck(torch.ops.medmtl.multi_dilation_conv.default, (x, weight, [1, 2], None, "sum", True))
    torch.library.opcheck(torch.ops.medmtl.multi_dilation_conv.default, (x, weight, [0, 4], None, "concat", False))
    gate = (torch.randn(1, 2, 7, 7, dtype=x.dtype) / 7).requires_grad_()
    torch.library.opcheck(torch.ops.medmtl.spatial_attention.default, (x, gate))
    torch.library.opcheck(torch.ops.medmtl.spatial_attention.default, (x, gate, True))


def test_compiled_channels_last_matches_eager():
    x = _x((2, 3, 41, 40), "channels_last")
    weight = (torch.randn(2, 4, 3, 3, 3, dtype=x.dtype) / 3).requires_grad_()
    gate = (torch.randn(1, 2, 7, 7, dtype=x.dtype) / 7).requires_grad_()

    def fn(x, w, a):
        return spatial_attention(multi_dilation_conv(x, w, [2, 6], None, "sum", "relu"), a).square().sum()

    with medmtl.backend("cpu"):
        compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
        got = torch.autograd.grad(compiled(x, weight, gate), (x, weight, gate))
        expected = torch.autograd.grad(fn(x, weight, gate), (x, weight, gate))
    for a, b in zip(got, expected):
        assert a.stride() == b.stride()
        torch.testing.assert_close(a, b)


def test_spatial_attention_channels_last_nan_and_inf_match_reference():
    """A NaN channel makes a pixel's max NaN (torch.max); -inf everywhere keeps the
    max -inf. The channels-last kernel reduces with lane partials and must agree."""
    x = torch.randn(1, 20, 4, 5, dtype=torch.float64)
    x[0, 17, 1, 2] = float("nan")
    x[0, :, 3, 4] = float("-inf")
    x[0, 3, 0, 0] = float("inf")
    x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(1, 2, 3, 3, dtype=torch.float64)
    with medmtl.backend("cpu"):
        got = spatial_attention(x, weight)
    with medmtl.backend("reference"):
        expected = spatial_attention(x, weight)
    torch.testing.assert_close(got, expected, equal_nan=True)


RELAYOUT_SHAPES = [(2, 5, 41, 7), (1, 3, 16, 4), (2, 1, 33, 3), (2, 70, 65, 66), (1, 130, 1, 1), (0, 3, 4, 4)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int32])
@pytest.mark.parametrize("shape", RELAYOUT_SHAPES)
@pytest.mark.parametrize("source", LAYOUTS)
@pytest.mark.parametrize("channels_last", [True, False])
def test_relayout_matches_contiguous(channels_last, source, shape, dtype):
    """relayout is .contiguous(memory_format) bit for bit (tile edges: 70 and 130
    channels, 65 x 66 and 1 x 1 maps; every dtype, any source layout), and its
    gradient comes back laid out as its input."""
    from medmtl.ops._layout import relayout

    x = _x(shape, source).detach().to(dtype)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    y = relayout(x, channels_last)
    assert y.is_contiguous(memory_format=memory_format)
    assert torch.equal(y, x)
    if x.is_contiguous(memory_format=memory_format):
        assert y is x  # no copy
    op_out = torch.ops.medmtl.relayout(x, channels_last)
    assert op_out.data_ptr() != x.data_ptr() or x.numel() == 0  # the op never aliases its input
    assert torch.equal(op_out, x)
    if dtype.is_floating_point and x.numel() and not x.is_contiguous(memory_format=memory_format):
        x.requires_grad_()
        grad = torch.randn(shape, dtype=torch.float64).to(dtype)
        (got,) = torch.autograd.grad(relayout(x, channels_last), x, grad)
        _assert_laid_out_like(got, x, "relayout's gradient")
        assert torch.equal(got, grad)


def test_relayout_opcheck_and_compile():
    from medmtl.ops._layout import relayout

    x = _x((2, 70, 9, 11), "contiguous")
    for channels_last, source in ((True, x), (False, x.detach().contiguous(memory_format=torch.channels_last))):
        torch.library.opcheck(torch.ops.medmtl.relayout.default, (source.detach().requires_grad_(), channels_last))

    def fn(t):
        return relayout(relayout(t, True) * 2, False).square().sum()

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    (got,) = torch.autograd.grad(compiled(x), x)
    (expected,) = torch.autograd.grad(fn(x), x)
    assert got.stride() == expected.stride()
    torch.testing.assert_close(got, expected)


def test_relayout_rejects_bad_input():
    from medmtl.ops._layout import relayout

    with pytest.raises(ValueError, match="relayout: t must be a 4-D tensor"):
        relayout(torch.zeros(2, 3, 4), True)
    with pytest.raises(RuntimeError, match="relayout: x must be 4-D"):
        torch.ops.medmtl.relayout(torch.zeros(2, 3), False)

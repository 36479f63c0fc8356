"""multi_dilation_conv's Winograd F(4x4, 3x3) path on the CPU (dense 3x3
branches on large maps, csrc/cpu/winograd_conv3x3.cpp) against the reference,
and the routing that sends branches there."""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import medmtl
from medmtl.ops import multi_dilation_conv
from medmtl.ops.multi_dilation_conv import prefers_channels_last
from tests.conftest import requires_extension
from tests.test_multi_dilation_conv_cpu import _compare_conv, _params, _x

pytestmark = requires_extension


def _direct_convolutions(fn) -> int:
    """How many of ATen's / oneDNN's convolutions (forward or backward) fn ran."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    names = [e.name for e in prof.events()]
    return sum(("convolution" in n or "mkldnn" in n) and "medmtl" not in n for n in names)


def _forward_backward(x, weight, dilations, bias, combine, activation):
    def run():
        with medmtl.backend("cpu"):
            out = multi_dilation_conv(x, weight, dilations, bias, combine, activation)
        torch.autograd.grad(out.square().sum(), [x, weight])
    return run


# Winograd shapes: a dense 3x3 (dilation 1, 2 or 3) on maps of 28x28 or more,
# dilation 6 on 112x112, with at least 96 tiles in the batch. Partial tiles
# at the edges (45, 41 and 53 are not multiples of 4 d), channel counts across
# the 64-channel vectors and the 128-channel GEMM chunks, batches of 1 to 3.
WINOGRAD_CASES = [
    ((2, 5, 7), (48, 45), [1]),
    ((2, 70, 65), (44, 41), [2]),
    ((3, 130, 3), (40, 43), [1]),
    ((2, 4, 6), (53, 47), [3]),
    ((1, 3, 4), (112, 112), [6]),
    # 98 tiles, and a kernel larger than the tiles' transforms: in stages,
    # forward and both backward convolutions.
    ((2, 256, 200), (28, 27), [1]),
]


@pytest.mark.parametrize("combine", ["sum", "concat"])
@pytest.mark.parametrize("activation", [None, "relu"])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("channels,hw,dilations", WINOGRAD_CASES)
def test_winograd_matches_reference_float64(combine, activation, with_bias, channels, hw, dilations):
    batch, cin, cout = channels
    x = _x((batch, cin, *hw))
    weight, bias = _params(len(dilations), cout, cin, combine, torch.float64, with_bias=with_bias)
    _compare_conv(x, weight, dilations, bias, combine, activation, atol=1e-10, rtol=1e-10)
    # ... and no direct convolution ran, forward or backward.
    assert _direct_convolutions(_forward_backward(x, weight, dilations, bias, combine, activation)) == 0


def test_winograd_kernel_slabs():
    """A transformed kernel over 16 MB (260 -> 240 channels in float64: 18 MB)
    is made and used in slabs of output channels (forward) and of input
    channels (backward), 2 of each here."""
    x = _x((2, 260, 48, 48))
    weight, bias = _params(1, 240, 260, "sum", torch.float64)
    _compare_conv(x, weight, [1], bias, "sum", "relu", atol=1e-10, rtol=1e-10)
    assert _direct_convolutions(_forward_backward(x, weight, [1], bias, "sum", "relu")) == 0


@pytest.mark.parametrize("combine", ["sum", "concat"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("dilations", [[1, 12], [12, 1], [0, 1, 6, 40]])
def test_winograd_mixed_with_direct_branches_float32(combine, layout, dilations):
    """On 112x112, dilation 1 and 6 take Winograd tiles and 12 and 40 oneDNN
    (dilation 0 is a GEMM): a float32 sum chains them either way round (the
    first result carries the bias, the last applies the ReLU), a concat
    writes each into its slice of the output channels."""
    x = _x((1, 6, 112, 112), dtype=torch.float32, layout=layout)
    weight, bias = _params(len(dilations), 5, 6, combine, torch.float32)
    # With and without the ReLU; its gradient is compared away from the
    # outputs whose float64 pre-activation is within the tolerance of zero
    # (there float32 rounding may flip the mask: tests/ties.py). Winograd's
    # float32 weight gradients are off by up to about 1.5e-5 of their scale
    # (12544-pixel sums through the transforms): 3e-5 leaves a 2x margin.
    for activation in (None, "relu"):
        _compare_conv(x, weight, dilations, bias, combine, activation, atol=3e-5, rtol=1e-4)
    assert _direct_convolutions(_forward_backward(x, weight, dilations, bias, combine, "relu")) > 0


@pytest.mark.parametrize("weight_layout", ["contiguous", "cin_innermost", "strided"])
def test_winograd_weight_layouts(weight_layout):
    """The kernel transform reads any weight strides; the weight gradient comes
    back laid out as empty_like(weight)."""
    x = _x((2, 6, 44, 44))
    weight, bias = _params(1, 5, 6, "sum", torch.float64)
    weight = weight.detach()
    if weight_layout == "cin_innermost":
        weight = weight.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)
    elif weight_layout == "strided":
        weight = torch.cat([weight, weight], 2)[:, :, ::2]
    weight.requires_grad_()
    _compare_conv(x, weight, [1], bias, "sum", "relu", atol=1e-10, rtol=1e-10)
    with medmtl.backend("cpu"):
        out = multi_dilation_conv(x, weight, [1], bias, "sum", "relu")
    (grad_weight,) = torch.autograd.grad(out.sum(), weight)
    assert grad_weight.stride() == torch.empty_like(weight).stride()


# The float32 tiles' largest error relative to max|y| (benchmarks/winograd_accuracy.py,
# csrc/cpu/winograd_conv3x3.h): 0.6-1.0e-5 measured over 64-1024 channels, up to
# 1.5e-5 seen (issue 19, 256 -> 64 on 2 x 56 x 56). The tolerance leaves a 2x margin.
WINOGRAD_F32_BOUND = 1.5e-5
WINOGRAD_F32_TOL = 2 * WINOGRAD_F32_BOUND


@pytest.mark.parametrize("cin,cout", [(256, 64), (64, 64)])
def test_winograd_float32_accuracy_at_the_layer_sizes(cin, cout):
    """float32 at a DFE level's size (the concat fuse, 256 -> 64 channels on
    2 x 56 x 56, and 64 -> 64) against the float64 reference, forward and every
    gradient, to WINOGRAD_F32_TOL of each tensor's scale; the tiles ran."""
    x64 = _x((2, cin, 56, 56))
    w64, b64 = _params(1, cout, cin, "sum", torch.float64)
    x, weight, bias = (t.detach().float().requires_grad_() for t in (x64, w64, b64))
    grad = torch.randn(2, cout, 56, 56, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    with medmtl.backend("cpu"):
        out = multi_dilation_conv(x, weight, [1], bias, "sum")
    with medmtl.backend("reference"):
        expected = multi_dilation_conv(x64, w64, [1], b64, "sum")
    got = [out] + list(torch.autograd.grad(out, [x, weight, bias], grad.float()))
    want = [expected] + list(torch.autograd.grad(expected, [x64, w64, b64], grad))
    for g, e in zip(got, want):
        torch.testing.assert_close(g.double(), e, atol=WINOGRAD_F32_TOL * e.abs().max().item(), rtol=0)
    assert _direct_convolutions(_forward_backward(x, weight, [1], bias, "sum", None)) == 0


def test_winograd_switch():
    """medmtl.set_flags(winograd=False) sends the same call to direct convolutions
    (and medmtl info says so); True brings the tiles back."""
    x = _x((2, 5, 48, 45), dtype=torch.float32)
    weight, bias = _params(1, 7, 5, "sum", torch.float32)
    assert medmtl.get_flags()["winograd"] is True
    assert _direct_convolutions(_forward_backward(x, weight, [1], bias, "sum", None)) == 0
    try:
        medmtl.set_flags(winograd=False)
        assert medmtl.get_flags() == {"winograd": False}
        assert "winograd (cpu backend's F(4x4, 3x3) tiles; " in medmtl.info() and medmtl.info().count(": off") == 1
        assert _direct_convolutions(_forward_backward(x, weight, [1], bias, "sum", None)) > 0
        _compare_conv(x, weight, [1], bias, "sum", None, atol=1e-5, rtol=1e-5)
    finally:
        medmtl.set_flags(winograd=True)
    assert _direct_convolutions(_forward_backward(x, weight, [1], bias, "sum", None)) == 0
    with pytest.raises(TypeError, match="winograd must be True, False or None"):
        medmtl.set_flags(winograd="no")


def test_winograd_environment_variable():
    import os
    import subprocess
    import sys

    code = "import medmtl; print(medmtl.get_flags()['winograd'])"
    for value, expected in (("0", "False"), ("1", "True")):
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                              env={**os.environ, "MEDMTL_WINOGRAD": value})
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == expected


@pytest.mark.parametrize("combine", ["sum", "concat"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_winograd_non_finite_input_gives_the_direct_answer(combine, value):
    """A NaN or infinity in a tile's input would spread to all 16 of its
    outputs; the op then convolves directly, so exactly the outputs whose 3x3
    window holds it are non-finite, forward and backward."""
    x = _x((1, 3, 48, 48)).detach()
    x[0, 1, 20, 30] = value
    x.requires_grad_()
    weight, bias = _params(2, 4, 3, combine, torch.float64)
    grad = torch.randn(1, 4 * (2 if combine == "concat" else 1), 48, 48, dtype=torch.float64)
    grad[0, 0, 5, 5] = value
    results = {}
    for backend in ("reference", "cpu"):
        with medmtl.backend(backend):
            out = multi_dilation_conv(x, weight, [1, 2], bias, combine, "relu")
        results[backend] = [out] + list(torch.autograd.grad(out, [x, weight, bias], grad))
    for got, expected in zip(results["cpu"], results["reference"]):
        assert torch.equal(got.isnan(), expected.isnan()) and torch.equal(got.isinf(), expected.isinf())
        torch.testing.assert_close(got, expected, atol=1e-10, rtol=1e-10, equal_nan=True)


@pytest.mark.parametrize("batch,hw,dilations,expected", [
    (2, (28, 28), [2], True),             # a dense 3x3 on a batch of 1568 pixels: oneDNN
    (2, (28, 28), [18], False),           # dilation 18 reads 28x28 on 13% of its positions: tap GEMMs
    (1, (28, 28), [2], False),            # 784 pixels: tap GEMMs whatever the density
    (2, (28, 28), [6, 12, 18], True),
    (1, (40, 40), [18], True),            # 1600 pixels a map: oneDNN
    (2, (14, 14), [2], False),
])
def test_prefers_channels_last_mirrors_the_cpu_routing(batch, hw, dilations, expected):
    """prefers_channels_last (the layer's layout choice) says what the C++
    kernel does: oneDNN convolutions run exactly when it says channels-last
    (dilation 2 on 28x28 is not worth Winograd tiles, 6 and 12 neither)."""
    x = _x((batch, 4, *hw), dtype=torch.float32).detach()
    weight, _ = _params(len(dilations), 4, 4, "sum", torch.float32)
    with medmtl.backend("cpu"):
        assert prefers_channels_last(x, dilations) is expected

        def run():
            multi_dilation_conv(x, weight.detach(), dilations, None, "sum")
    assert (_direct_convolutions(run) > 0) is expected

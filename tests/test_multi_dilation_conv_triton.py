"""Triton kernels of multi_dilation_conv, run on CPU tensors in Triton's interpreter
against the reference (medmtl.ops.reference.multi_dilation_conv under autograd), and
compiled ahead of time for sm_80 and sm_90 (no GPU needed).

tests/conftest.py sets TRITON_INTERPRET=1 (no GPU) before triton is imported; with a GPU
the launcher tests here are skipped (tests/test_gpu_backends.py runs the kernels compiled)
and the ahead-of-time compiles still run.
The interpreter is slow: shapes are tiny. The kernels' pixel tiles are 8x8, so maps
of 10x9 have several tiles, and dilations of 3 to 8 make taps that some tiles skip
(their window lies outside the map) and others do not.
"""

import pytest  # noqa: E402
import torch  # noqa: E402


pytest.importorskip("triton", reason="the triton backend needs triton (pip install 'medmtl[triton]')")

import medmtl.ops  # noqa: E402
from medmtl.kernels import multi_dilation_conv as kernels  # noqa: E402
from medmtl.ops import reference  # noqa: E402
from tests import triton_aot  # noqa: E402
from tests.ties import zero_ties  # noqa: E402


TOL = {torch.float64: dict(atol=1e-10, rtol=1e-10), torch.float32: dict(atol=1e-4, rtol=1e-4)}
# (B, Cin, Cout, H, W, dilations): one 8x8 tile with a 1x1 branch, a dilation skipping the
# vertical taps only (5 on 5 rows) and one larger than the map (18 on 5x7); and a map of
# 2 x 2 tiles (rows 0-7 | 8-9, columns 0-7 | 8) whose tiles skip different taps, with
# windows that just meet the map (7 and 9 on 10x9: e.g. tile rows 0-7 shifted by -7).
SINGLE_TILE = (2, 3, 4, 5, 7, [1, 0, 5, 18])
MULTI_TILE = (2, 3, 4, 10, 9, [7, 0, 9])


def _inputs(B, Cin, Cout, H, W, dilations, combine, dtype, seed, with_bias=True):
    """x, weight and bias (or None) of the given sizes, seeded."""
    g = torch.Generator().manual_seed(seed)
    n = len(dilations)
    x = torch.randn(B, Cin, H, W, generator=g, dtype=torch.float64).to(dtype)
    weight = (torch.randn(n, Cout, Cin, 3, 3, generator=g, dtype=torch.float64) / (3 * Cin) ** 0.5).to(dtype)
    channels = Cout * (n if combine == "concat" else 1)
    bias = (0.5 * torch.randn(channels, generator=g, dtype=torch.float64)).to(dtype) if with_bias else None
    return x, weight, bias


def _reference(x, weight, dilations, bias, combine, relu, grad_output, dtype=None):
    """Reference output and gradients (x, weight, bias), in `dtype` (default: x's).
    A None bias is taken as zeros that need grad, which is what the kernels' backward
    computes (grad_bias is always returned)."""
    dtype = dtype or x.dtype
    n, cout = weight.shape[:2]
    xr = x.detach().to(dtype).requires_grad_()
    wr = weight.detach().to(dtype).requires_grad_()
    channels = cout * (n if combine == "concat" else 1)
    br = (torch.zeros(channels, dtype=dtype) if bias is None else bias.detach().to(dtype)).requires_grad_()
    out = reference.multi_dilation_conv(xr, wr, dilations, br, combine, relu)
    out.backward(grad_output.to(dtype))
    return out.detach(), xr.grad, wr.grad, br.grad


def _tie_free(grad_output, x, weight, dilations, bias, combine, relu, band=TOL[torch.float32]["atol"]):
    """grad_output, zero where the ReLU's float64 pre-activation is within band
    (of its scale; default the float32 tolerance) of zero: there the kernel's
    and the reference's rounding may fall on either side of the kink
    (tests/ties.py)."""
    if not relu:
        return grad_output
    exact = reference.multi_dilation_conv(x.detach().double(), weight.detach().double(), dilations,
                                          None if bias is None else bias.detach().double(), combine, None)
    return zero_ties(grad_output, exact, band * max(1.0, exact.abs().max().item()))


def _check_launchers(x, weight, dilations, bias, combine, relu, seed=1):
    """Runs the forward and backward launchers and compares all results with the reference."""
    tol = TOL[x.dtype]
    out = kernels.multi_dilation_conv_forward(x, weight, dilations, bias, combine, relu)
    n, cout = weight.shape[:2]
    channels = cout * (n if combine == "concat" else 1)
    assert out.shape == (x.shape[0], channels, *x.shape[2:]) and out.dtype == x.dtype
    grad_output = torch.randn(out.shape, dtype=x.dtype, generator=torch.Generator().manual_seed(seed))
    grad_output = _tie_free(grad_output, x, weight, dilations, bias, combine, relu)
    ref_out, ref_gx, ref_gw, ref_gb = _reference(x, weight, dilations, bias, combine, relu, grad_output)
    torch.testing.assert_close(out, ref_out, **tol)
    gx, gw, gb = kernels.multi_dilation_conv_backward(grad_output, x, weight, dilations, out, combine, relu)
    assert gx.shape == x.shape and gw.shape == weight.shape and gb.shape == (channels,)
    torch.testing.assert_close(gx, ref_gx, **tol)
    torch.testing.assert_close(gw, ref_gw, **tol)
    torch.testing.assert_close(gb, ref_gb, **tol)
    return out, (gx, gw, gb)


# --------------------------------------------------------------------------
# The launchers, called directly


# Each of combine, relu and bias takes both values.
@pytest.mark.parametrize(("combine", "relu", "with_bias"), [
    ("sum", False, True), ("sum", True, False), ("concat", False, False), ("concat", True, True),
], ids=["sum-id-bias", "sum-relu-nobias", "concat-id-nobias", "concat-relu-bias"])
def test_launchers_match_reference_float64(combine, relu, with_bias):
    B, Cin, Cout, H, W, dilations = SINGLE_TILE
    x, weight, bias = _inputs(B, Cin, Cout, H, W, dilations, combine, torch.float64, seed=3, with_bias=with_bias)
    _, (_, gw, _) = _check_launchers(x, weight, dilations, bias, combine, relu)
    outer = torch.ones(3, 3, dtype=torch.bool)
    outer[1, 1] = False
    assert (gw[1][..., outer] == 0).all(), "the 1x1 branch's outer taps must get zero gradients"


def test_launchers_several_tiles_float32():
    B, Cin, Cout, H, W, dilations = MULTI_TILE
    x, weight, bias = _inputs(B, Cin, Cout, H, W, dilations, "sum", torch.float32, seed=4)
    _check_launchers(x, weight, dilations, bias, "sum", True)


def test_launchers_several_tiles_float64_batch1():
    _, Cin, Cout, H, W, dilations = MULTI_TILE
    x, weight, bias = _inputs(1, Cin, Cout, H, W, dilations, "concat", torch.float64, seed=5)
    _check_launchers(x, weight, dilations, bias, "concat", False)


@pytest.mark.parametrize("combine", ["sum", "concat"])
def test_one_by_one_map(combine):
    """On a 1x1 map only the centre taps read the map; every other tap is skipped."""
    x, weight, bias = _inputs(1, 3, 4, 1, 1, [1, 12, 0], combine, torch.float64, seed=6)
    _check_launchers(x, weight, dilations=[1, 12, 0], bias=bias, combine=combine, relu=True)


def test_several_channel_blocks():
    """Cin = 33 and Cout = 65 take two blocks each (32 and 64 wide) in every kernel."""
    x, weight, bias = _inputs(1, 33, 65, 3, 4, [1, 0], "concat", torch.float64, seed=7)
    _check_launchers(x, weight, [1, 0], bias, "concat", True)


def test_single_one_by_one_branch_and_relu_zeros():
    """One 1x1 branch; integer-valued inputs put exact zeros in the pre-activation, where
    torch.relu's backward (and the kernels') gives zero."""
    g = torch.Generator().manual_seed(8)
    x = torch.randint(-1, 2, (2, 2, 3, 5), generator=g).double()
    weight = torch.randint(-1, 2, (1, 3, 2, 3, 3), generator=g).double()
    bias = torch.tensor([0.0, 1.0, -1.0], dtype=torch.float64)
    out, _ = _check_launchers(x, weight, [0], bias, "sum", True)
    assert (out == 0).sum() > 0


@pytest.mark.parametrize("programs", [1, 10**6], ids=["one_split", "max_splits"])
def test_weight_gradient_splits(programs, monkeypatch):
    """The weight gradient's (batch, tile) reduction split over 1 program per weight tile
    and over as many programs as there are (batch, tile) pairs gives the same result."""
    monkeypatch.setattr(kernels, "WEIGHT_PROGRAMS_CPU", programs)
    x, weight, bias = _inputs(2, 2, 3, 11, 5, [9, 0], "sum", torch.float64, seed=9)   # 2 tiles per image
    _check_launchers(x, weight, [9, 0], bias, "sum", False)


def test_backward_is_deterministic(monkeypatch):
    monkeypatch.setattr(kernels, "WEIGHT_PROGRAMS_CPU", 10**6)   # partial weight gradients summed on the host
    dilations = [1, 0]
    x, weight, bias = _inputs(2, 3, 4, 5, 7, dilations, "concat", torch.float32, seed=10)
    out = kernels.multi_dilation_conv_forward(x, weight, dilations, bias, "concat", True)
    grad_output = torch.randn(out.shape, generator=torch.Generator().manual_seed(11))
    first = kernels.multi_dilation_conv_backward(grad_output, x, weight, dilations, out, "concat", True)
    second = kernels.multi_dilation_conv_backward(grad_output, x, weight, dilations, out, "concat", True)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_launchers_float16():
    """Float16 feeds tl.dot and accumulates in float32: matches the float32 reference on the
    same (rounded) values up to the final rounding. (Not bfloat16: the interpreter's tl.dot
    does not handle it; the AOT test compiles it.)"""
    B, Cin, Cout, H, W, dilations = SINGLE_TILE
    x, weight, bias = _inputs(B, Cin, Cout, H, W, dilations, "sum", torch.float16, seed=12)
    out = kernels.multi_dilation_conv_forward(x, weight, dilations, bias, "sum", True)
    assert out.dtype == torch.float16
    grad_output = torch.randn(out.shape, generator=torch.Generator().manual_seed(13)).half()
    grad_output = _tie_free(grad_output, x, weight, dilations, bias, "sum", True, band=4e-3)
    ref_out, ref_gx, ref_gw, ref_gb = _reference(x, weight, dilations, bias, "sum", True, grad_output,
                                                 dtype=torch.float32)
    tol = dict(atol=4e-3, rtol=4e-3)
    torch.testing.assert_close(out.float(), ref_out, **tol)
    gx, gw, gb = kernels.multi_dilation_conv_backward(grad_output, x, weight, dilations, out, "sum", True)
    assert gx.dtype == gw.dtype == gb.dtype == torch.float16
    torch.testing.assert_close(gx.float(), ref_gx, **tol)
    torch.testing.assert_close(gw.float(), ref_gw, atol=2e-2, rtol=4e-3)   # sums of ~70 products
    torch.testing.assert_close(gb.float(), ref_gb, atol=2e-2, rtol=4e-3)


# --------------------------------------------------------------------------
# The registered op (torch.library custom op with autograd) and the backend switch


@pytest.mark.parametrize("combine", ["sum", "concat"])
def test_registered_op_autograd_float32(combine):
    B, Cin, Cout, H, W, dilations = SINGLE_TILE
    x, weight, bias = _inputs(B, Cin, Cout, H, W, dilations, combine, torch.float32, seed=20)
    xs, ws, bs = (t.clone().requires_grad_() for t in (x, weight, bias))
    out = torch.ops.medmtl.multi_dilation_conv_triton(xs, ws, dilations, bs, combine, True)
    grad_output = _tie_free(torch.randn(out.shape, generator=torch.Generator().manual_seed(21)),
                            x, weight, dilations, bias, combine, True)
    out.backward(grad_output)
    ref_out, ref_gx, ref_gw, ref_gb = _reference(x, weight, dilations, bias, combine, True, grad_output)
    torch.testing.assert_close(out.detach(), ref_out, **TOL[torch.float32])
    torch.testing.assert_close(xs.grad, ref_gx, **TOL[torch.float32])
    torch.testing.assert_close(ws.grad, ref_gw, **TOL[torch.float32])
    torch.testing.assert_close(bs.grad, ref_gb, **TOL[torch.float32])


def test_registered_op_without_bias_float64():
    B, Cin, Cout, H, W, dilations = SINGLE_TILE
    x, weight, _ = _inputs(B, Cin, Cout, H, W, dilations, "sum", torch.float64, seed=22)
    xs, ws = x.clone().requires_grad_(), weight.clone().requires_grad_()
    out = torch.ops.medmtl.multi_dilation_conv_triton(xs, ws, dilations, None, "sum", False)
    grad_output = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(23))
    out.backward(grad_output)
    ref_out, ref_gx, ref_gw, _ = _reference(x, weight, dilations, None, "sum", False, grad_output)
    torch.testing.assert_close(out.detach(), ref_out, **TOL[torch.float64])
    torch.testing.assert_close(xs.grad, ref_gx, **TOL[torch.float64])
    torch.testing.assert_close(ws.grad, ref_gw, **TOL[torch.float64])


def test_registered_op_opcheck():
    x, weight, bias = _inputs(1, 2, 3, 3, 4, [1, 0], "concat", torch.float64, seed=24)
    torch.library.opcheck(torch.ops.medmtl.multi_dilation_conv_triton.default,
                          (x.requires_grad_(), weight.requires_grad_(), [1, 0], bias.requires_grad_(),
                           "concat", True))


def test_torch_compile_fullgraph_with_triton_backend():
    """The triton op traces into a compiled graph without breaks, forward and backward."""
    x, weight, bias = _inputs(1, 2, 3, 5, 7, [1, 0, 18], "sum", torch.float32, seed=25)

    def head(x, weight, bias):
        return medmtl.ops.multi_dilation_conv(x, weight, [1, 0, 18], bias, "sum", "relu").square().sum()

    results = {}
    for backend in ("reference", "triton"):
        inputs = [t.clone().requires_grad_() for t in (x, weight, bias)]
        with medmtl.ops.backend(backend):
            fn = torch.compile(head, fullgraph=True, backend="aot_eager") if backend == "triton" else head
            out = fn(*inputs)
        results[backend] = (out, torch.autograd.grad(out, inputs))
    torch.testing.assert_close(results["triton"][0], results["reference"][0], **TOL[torch.float32])
    for got, expected in zip(results["triton"][1], results["reference"][1]):
        torch.testing.assert_close(got, expected, **TOL[torch.float32])


@pytest.mark.parametrize("layout", ["permuted", "channels_last"])
@pytest.mark.parametrize("combine", ["sum", "concat"])
def test_backend_triton_noncontiguous_and_channels_last(combine, layout, monkeypatch):
    """medmtl.ops.multi_dilation_conv under backend("triton") with a non-contiguous (permuted)
    or channels-last x and a non-contiguous weight; checks that the Triton launchers ran."""
    calls = []
    for name in ("multi_dilation_conv_forward", "multi_dilation_conv_backward"):
        real = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
    g = torch.Generator().manual_seed(26)
    dilations = [2, 0, 18]
    if layout == "permuted":
        x = torch.randn(2, 7, 5, 3, generator=g, dtype=torch.float64).permute(0, 3, 2, 1)     # (2, 3, 5, 7)
    else:
        x = torch.randn(2, 3, 5, 7, generator=g, dtype=torch.float64).to(memory_format=torch.channels_last)
    weight = torch.randn(3, 3, 4, 3, 3, generator=g, dtype=torch.float64).transpose(1, 2)   # (3, 4, 3, 3, 3)
    bias = torch.randn(4 * (3 if combine == "concat" else 1), generator=g, dtype=torch.float64)
    assert not x.is_contiguous() and not weight.is_contiguous()
    xs, ws, bs = (t.detach().requires_grad_() for t in (x, weight, bias))   # same strides, own .grad
    with medmtl.ops.backend("triton"):
        out = medmtl.ops.multi_dilation_conv(xs, ws, dilations, bs, combine, "relu")
    grad_output = torch.randn(out.shape, dtype=torch.float64, generator=g)
    # The layouts the fake kernels promise: out channels-last when x is, each
    # input gradient laid out as empty_like(input).
    expected_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    assert out.is_contiguous(memory_format=expected_format)
    grads = torch.autograd.grad(out, (xs, ws), grad_output, retain_graph=True)
    for grad, like in zip(grads, (xs, ws)):
        assert grad.stride() == torch.empty_like(like).stride()
    out.backward(grad_output)
    assert calls[0] == "multi_dilation_conv_forward" and calls[1:] == ["multi_dilation_conv_backward"] * 2

    ref = [t.detach().requires_grad_() for t in (x, weight, bias)]
    ref_out = reference.multi_dilation_conv(*ref[:2], dilations, ref[2], combine, True)
    ref_out.backward(grad_output)
    torch.testing.assert_close(out.detach(), ref_out.detach(), **TOL[torch.float64])
    for a, b in zip((xs, ws, bs), ref):
        torch.testing.assert_close(a.grad, b.grad, **TOL[torch.float64])


# --------------------------------------------------------------------------
# Ahead-of-time compilation for sm_80 and sm_90




def test_aot_list_covers_every_launch_configuration(monkeypatch):
    """Records each kernel launch of the launchers (kernel, constexprs, pointer dtypes)
    over every dtype, combine and TF32 setting, and checks aot_kernels() lists it."""
    launched = triton_aot.record_launches(monkeypatch, kernels, [
        "multi_dilation_conv_forward_kernel",
        "multi_dilation_conv_backward_prep_kernel",
        "multi_dilation_conv_backward_input_kernel",
        "multi_dilation_conv_backward_weight_kernel"])
    cases = [(torch.float16, True, "sum"), (torch.bfloat16, True, "concat"), (torch.float32, True, "sum"),
             (torch.float32, False, "concat"), (torch.float64, True, "sum")]
    for dtype, tf32, combine in cases:
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", tf32)
        x, weight, bias = _inputs(1, 2, 2, 3, 3, [1, 0], combine, dtype, seed=0)
        out = kernels.multi_dilation_conv_forward(x, weight, [1, 0], bias, combine, True)
        kernels.multi_dilation_conv_backward(torch.ones_like(out), x, weight, [1, 0], out, combine, True)
    triton_aot.check_covers(kernels, launched)


@pytest.fixture(scope="module", autouse=True)
def aot_compilers(request, tmp_path_factory):
    """The compilers of test_aot_compile_sm80_sm90, started early (tests/triton_aot.py)."""
    yield from triton_aot.early_compilers(request, tmp_path_factory, "medmtl.kernels.multi_dilation_conv")


def test_aot_compile_sm80_sm90(aot_compilers):
    """Every kernel configuration compiles for sm_80 and sm_90 within the shared memory."""
    triton_aot.check(aot_compilers, kernels)

"""Triton kernels of spatial_attention, run on CPU tensors in Triton's interpreter
against the reference (medmtl.ops.reference.spatial_attention under autograd), and
compiled ahead of time for sm_80 and sm_90 (no GPU needed).

tests/conftest.py sets TRITON_INTERPRET=1 (no GPU) before triton is imported; with a GPU
the launcher tests here are skipped (tests/test_gpu_backends.py runs the kernels compiled)
and the ahead-of-time compiles still run.
The interpreter is slow: shapes are tiny.
"""

import pytest  # noqa: E402
import torch  # noqa: E402


pytest.importorskip("triton", reason="the triton backend needs triton (pip install 'medmtl[triton]')")

import medmtl.ops  # noqa: E402
from medmtl.kernels import spatial_attention as kernels  # noqa: E402
from medmtl.ops import reference  # noqa: E402
from tests import triton_aot  # noqa: E402


TOL = {torch.float64: dict(atol=1e-10, rtol=1e-10), torch.float32: dict(atol=1e-4, rtol=1e-4)}


def _inputs(shape, k, dtype, seed):
    """x of `shape` and a (1, 2, k, k) weight, seeded."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    weight = (torch.randn(1, 2, k, k, generator=g, dtype=torch.float64) / k).to(dtype)
    return x, weight


def _reference(x, weight, grad_output, dtype=None):
    """Reference output and gradients (x, weight), in `dtype` (default: x's)."""
    dtype = dtype or x.dtype
    xr = x.detach().to(dtype).requires_grad_()
    wr = weight.detach().to(dtype).requires_grad_()
    out = reference.spatial_attention(xr, wr)
    out.backward(grad_output.to(dtype))
    return out.detach(), xr.grad, wr.grad


def _check_launchers(x, weight, seed=1):
    """Runs the forward and backward launchers and compares all results with the reference."""
    tol = TOL[x.dtype]
    out = kernels.spatial_attention_forward(x, weight)
    assert out.shape == x.shape and out.dtype == x.dtype
    grad_output = torch.randn(out.shape, dtype=x.dtype, generator=torch.Generator().manual_seed(seed))
    ref_out, ref_gx, ref_gw = _reference(x, weight, grad_output)
    torch.testing.assert_close(out, ref_out, **tol)
    gx, gw = kernels.spatial_attention_backward(grad_output, x, weight)
    assert gx.shape == x.shape and gw.shape == weight.shape
    torch.testing.assert_close(gx, ref_gx, **tol)
    torch.testing.assert_close(gw, ref_gw, **tol)
    return out, (gx, gw)


# --------------------------------------------------------------------------
# The launchers, called directly


# (B, C, H, W), K: odd sizes, K = 7 and 3, a 7x7 kernel on maps smaller than it (1x1, 5x7,
# 2x3), C = 1 (mean = max = x), batch 1.
@pytest.mark.parametrize(("shape", "k"), [
    ((2, 3, 5, 7), 7), ((2, 3, 5, 7), 3), ((1, 1, 1, 1), 7), ((2, 1, 4, 6), 3), ((1, 4, 2, 3), 7),
], ids=["2x3x5x7-k7", "2x3x5x7-k3", "1x1x1x1-k7", "C1-k3", "batch1-k7"])
def test_launchers_match_reference_float64(shape, k):
    x, weight = _inputs(shape, k, torch.float64, seed=sum(shape) + k)
    _check_launchers(x, weight)


def test_launchers_float32():
    x, weight = _inputs((2, 5, 6, 3), 3, torch.float32, seed=2)
    _check_launchers(x, weight)


def test_several_pixel_blocks():
    """17 x 19 = 323 pixels: two blocks of 256 in every per-pixel kernel (a 7x7 window
    crosses the block boundary), and several weight-gradient partials."""
    x, weight = _inputs((1, 2, 17, 19), 7, torch.float64, seed=3)
    _check_launchers(x, weight)


def test_channel_max_ties_take_the_first_channel():
    """Integer-valued inputs: ties in the channel max at most pixels; torch.max's gradient
    goes to the first maximal channel, and so must the kernels'."""
    g = torch.Generator().manual_seed(4)
    x = torch.randint(-1, 2, (2, 4, 5, 7), generator=g).double()
    x[0, :, 0, 0] = 1.0                       # all four channels tie
    x[1, :, 2, 3] = torch.tensor([0.0, 1.0, 1.0, 1.0])   # channels 1, 2, 3 tie
    x[1, :, 2, 2] = torch.tensor([1.0, 2.0, 0.0, 1.0])   # a nonzero gradient of the gate there
    weight = torch.randn(1, 2, 3, 3, generator=g, dtype=torch.float64)
    _, (gx, _) = _check_launchers(x, weight)
    # grad_output nonzero at pixel (2, 2) only: at its neighbour (2, 3) only the pooled map's
    # gradient reaches x, and the max share lands on channel 1 only
    grad_output = torch.zeros_like(x)
    grad_output[1, :, 2, 2] = 1.0
    gx, _ = kernels.spatial_attention_backward(grad_output, x, weight)
    _, ref_gx, _ = _reference(x, weight, grad_output)
    torch.testing.assert_close(gx, ref_gx, **TOL[torch.float64])
    shares = gx[1, :, 2, 3] - gx[1, 0, 2, 3]   # the mean's share is the same on every channel
    assert shares[1] != 0 and shares[2] == 0 and shares[3] == 0


def test_backward_is_deterministic():
    x, weight = _inputs((2, 3, 5, 7), 3, torch.float32, seed=5)
    grad_output = torch.randn(x.shape, generator=torch.Generator().manual_seed(6))
    first = kernels.spatial_attention_backward(grad_output, x, weight)
    second = kernels.spatial_attention_backward(grad_output, x, weight)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_launchers_half_precision(dtype):
    """Low-precision inputs compute in float32: matches the float32 reference on the same
    (rounded) values up to the final rounding."""
    x, weight = _inputs((2, 3, 5, 7), 3, dtype, seed=7)
    out = kernels.spatial_attention_forward(x, weight)
    assert out.dtype == dtype
    grad_output = torch.randn(x.shape, generator=torch.Generator().manual_seed(8)).to(dtype)
    ref_out, ref_gx, ref_gw = _reference(x, weight, grad_output, dtype=torch.float32)
    tol = dict(atol=2e-3, rtol=2e-3) if dtype == torch.float16 else dict(atol=1.6e-2, rtol=1.6e-2)
    torch.testing.assert_close(out.float(), ref_out, **tol)
    gx, gw = kernels.spatial_attention_backward(grad_output, x, weight)
    assert gx.dtype == gw.dtype == dtype
    torch.testing.assert_close(gx.float(), ref_gx, **tol)
    torch.testing.assert_close(gw.float(), ref_gw, **tol)


# --------------------------------------------------------------------------
# The registered op (torch.library custom op with autograd) and the backend switch


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_registered_op_autograd(dtype):
    x, weight = _inputs((2, 3, 5, 7), 7, dtype, seed=20)
    xs, ws = x.clone().requires_grad_(), weight.clone().requires_grad_()
    out = torch.ops.medmtl.spatial_attention_triton(xs, ws)
    grad_output = torch.randn(out.shape, dtype=dtype, generator=torch.Generator().manual_seed(21))
    out.backward(grad_output)
    ref_out, ref_gx, ref_gw = _reference(x, weight, grad_output)
    torch.testing.assert_close(out.detach(), ref_out, **TOL[dtype])
    torch.testing.assert_close(xs.grad, ref_gx, **TOL[dtype])
    torch.testing.assert_close(ws.grad, ref_gw, **TOL[dtype])


def test_registered_op_opcheck():
    x, weight = _inputs((1, 2, 3, 4), 3, torch.float64, seed=22)
    torch.library.opcheck(torch.ops.medmtl.spatial_attention_triton.default,
                          (x.requires_grad_(), weight.requires_grad_()))
    cl = x.detach().to(memory_format=torch.channels_last).requires_grad_()
    torch.library.opcheck(torch.ops.medmtl.spatial_attention_triton.default, (cl, weight, True))


def test_contiguous_output_from_channels_last():
    """contiguous_output=True returns the kernels' NCHW result as it is, with the
    reference's values and gradients (the gradient laid out as x)."""
    x, weight = _inputs((2, 3, 5, 4), 3, torch.float64, seed=25)
    xs = x.to(memory_format=torch.channels_last).requires_grad_()
    with medmtl.ops.backend("triton"):
        out = medmtl.ops.spatial_attention(xs, weight, contiguous_output=True)
    assert out.is_contiguous()
    grad_output = torch.randn(out.shape, dtype=x.dtype, generator=torch.Generator().manual_seed(26))
    (grad_x,) = torch.autograd.grad(out, xs, grad_output)
    ref_out, ref_gx, _ = _reference(x, weight, grad_output)
    torch.testing.assert_close(out, ref_out, **TOL[torch.float64])
    assert grad_x.stride() == xs.stride()
    torch.testing.assert_close(grad_x, ref_gx, **TOL[torch.float64])


def test_torch_compile_fullgraph_with_triton_backend():
    """The triton op traces into a compiled graph without breaks, forward and backward."""
    x, weight = _inputs((1, 3, 4, 5), 3, torch.float32, seed=23)

    def head(x, weight):
        return medmtl.ops.spatial_attention(x, weight).square().sum()

    results = {}
    for backend in ("reference", "triton"):
        inputs = [x.clone().requires_grad_(), weight.clone().requires_grad_()]
        with medmtl.ops.backend(backend):
            fn = torch.compile(head, fullgraph=True, backend="aot_eager") if backend == "triton" else head
            out = fn(*inputs)
        results[backend] = (out, torch.autograd.grad(out, inputs))
    torch.testing.assert_close(results["triton"][0], results["reference"][0], **TOL[torch.float32])
    for got, expected in zip(results["triton"][1], results["reference"][1]):
        torch.testing.assert_close(got, expected, **TOL[torch.float32])


@pytest.mark.parametrize("layout", ["permuted", "channels_last"])
def test_backend_triton_noncontiguous_and_channels_last(layout, monkeypatch):
    """medmtl.ops.spatial_attention under backend("triton") with a non-contiguous (permuted)
    or channels-last x and a non-contiguous weight; checks that the Triton launchers ran."""
    calls = []
    for name in ("spatial_attention_forward", "spatial_attention_backward"):
        real = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
    g = torch.Generator().manual_seed(24)
    if layout == "permuted":
        x = torch.randn(2, 7, 5, 3, generator=g, dtype=torch.float64).permute(0, 3, 2, 1)     # (2, 3, 5, 7)
    else:
        x = torch.randn(2, 3, 5, 7, generator=g, dtype=torch.float64).to(memory_format=torch.channels_last)
    weight = torch.randn(1, 2, 3, 3, generator=g, dtype=torch.float64).transpose(2, 3)
    assert not x.is_contiguous() and not weight.is_contiguous()
    xs, ws = x.detach().requires_grad_(), weight.detach().requires_grad_()   # same strides, own .grad
    with medmtl.ops.backend("triton"):
        out = medmtl.ops.spatial_attention(xs, ws)
    grad_output = torch.randn(out.shape, dtype=torch.float64, generator=g)
    # The layouts the fake kernels promise: out and each input gradient laid out
    # as empty_like of x (and of the weight).
    assert out.stride() == torch.empty_like(xs).stride()
    grads = torch.autograd.grad(out, (xs, ws), grad_output, retain_graph=True)
    for grad, like in zip(grads, (xs, ws)):
        assert grad.stride() == torch.empty_like(like).stride()
    out.backward(grad_output)
    assert calls[0] == "spatial_attention_forward" and calls[1:] == ["spatial_attention_backward"] * 2

    ref_x, ref_w = x.detach().requires_grad_(), weight.detach().requires_grad_()
    ref_out = reference.spatial_attention(ref_x, ref_w)
    ref_out.backward(grad_output)
    torch.testing.assert_close(out.detach(), ref_out.detach(), **TOL[torch.float64])
    torch.testing.assert_close(xs.grad, ref_x.grad, **TOL[torch.float64])
    torch.testing.assert_close(ws.grad, ref_w.grad, **TOL[torch.float64])


# --------------------------------------------------------------------------
# Ahead-of-time compilation for sm_80 and sm_90




def test_aot_list_covers_every_launch_configuration(monkeypatch):
    """Records each kernel launch of the launchers (kernel, constexprs, pointer dtypes)
    over every dtype, and checks aot_kernels() lists it."""
    launched = triton_aot.record_launches(monkeypatch, kernels, [
        "spatial_attention_pool_kernel",
        "spatial_attention_gate_kernel",
        "spatial_attention_apply_kernel",
        "spatial_attention_backward_gate_kernel",
        "spatial_attention_backward_conv_kernel",
        "spatial_attention_backward_input_kernel"])
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        x, weight = _inputs((1, 2, 2, 3), 3, dtype, seed=0)
        kernels.spatial_attention_forward(x, weight)
        kernels.spatial_attention_backward(torch.ones_like(x), x, weight)
    triton_aot.check_covers(kernels, launched)


@pytest.fixture(scope="module", autouse=True)
def aot_compilers(request, tmp_path_factory):
    """The compilers of test_aot_compile_sm80_sm90, started early (tests/triton_aot.py)."""
    yield from triton_aot.early_compilers(request, tmp_path_factory, "medmtl.kernels.spatial_attention")


def test_aot_compile_sm80_sm90(aot_compilers):
    """Every kernel configuration compiles for sm_80 and sm_90 within the shared memory."""
    triton_aot.check(aot_compilers, kernels)

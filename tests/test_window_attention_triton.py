"""Triton kernels of window_attention, run on CPU tensors in Triton's interpreter
against the reference (medmtl.ops.reference.window_attention under autograd), and
compiled ahead of time for sm_80 and sm_90 (no GPU needed).

tests/conftest.py sets TRITON_INTERPRET=1 (no GPU) before triton is imported; with a GPU
the launcher tests here are skipped (tests/test_gpu_backends.py runs the kernels compiled)
and the ahead-of-time compiles still run.
The interpreter is slow: maps are tiny. Tiles are 32 x 32 tokens in float32 and
16 x 16 in float64, so windows of 49 and 81 tokens (7x7, 9x9) span several query
and key blocks (online softmax across blocks, partial last blocks); in float32,
windows of up to 32 tokens are one partial block.
"""

import math  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402


pytest.importorskip("triton", reason="the triton backend needs triton (pip install 'medmtl[triton]')")

import medmtl  # noqa: E402
import medmtl.ops  # noqa: E402
from medmtl.kernels import window_attention as kernels  # noqa: E402
from medmtl.ops import reference  # noqa: E402
from tests import triton_aot  # noqa: E402


TOL = {torch.float64: dict(atol=1e-10, rtol=1e-10), torch.float32: dict(atol=1e-4, rtol=1e-4)}
GRAD_NAMES = ("q", "k", "v", "table", "pad_key", "pad_value")


def _inputs(shape, window, dtype, seed, layout="contiguous"):
    """q, k, v of shape (B, *S, heads, hd), table (prod(2 window - 1), heads), pad_key,
    pad_value (heads, hd), seeded. layout "qkv": q, k, v are the slices of one
    (B, *S, 3, heads, hd) tensor (as a qkv projection gives); "transposed": their
    head_dim stride is not 1; "mixed": three different stride patterns."""
    g = torch.Generator().manual_seed(seed)
    B, *S, heads, hd = shape

    def randn(*size):
        return torch.randn(*size, generator=g, dtype=torch.float64).to(dtype)

    if layout == "qkv":
        q, k, v = randn(B, *S, 3, heads, hd).unbind(-3)
    elif layout == "transposed":
        q, k, v = (randn(hd, B, *S, heads).movedim(0, -1) for _ in range(3))
        assert q.stride(-1) != 1
    elif layout == "mixed":
        q = randn(B, *S, heads, hd).transpose(1, 2).contiguous().transpose(1, 2)
        k = randn(B, *S, 2, heads, hd)[..., 1, :, :]
        v = randn(B, heads, *S, hd).movedim(1, -2)
        assert len({q.stride(), k.stride(), v.stride()}) == 3
    else:
        q, k, v = (randn(*shape) for _ in range(3))
    if layout != "contiguous":
        assert not q.is_contiguous() and not k.is_contiguous() and not v.is_contiguous()
    table = randn(math.prod(2 * w - 1 for w in window), heads)
    return q, k, v, table, randn(heads, hd), randn(heads, hd)


def _reference(q, k, v, window, shift, table, pad_key, pad_value, scale, grad_out):
    """Reference output and the six gradients (q, k, v, table, pad_key, pad_value)."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, table, pad_key, pad_value)]
    out = reference.window_attention(*leaves[:3], window, shift, leaves[3], scale, leaves[4], leaves[5])
    return out.detach(), torch.autograd.grad(out, leaves, grad_out)


def _check_launchers(shape, window, shift, dtype, seed=0, layout="contiguous"):
    """Runs both launchers and compares out and all six gradients with the reference."""
    q, k, v, table, pad_key, pad_value = _inputs(shape, window, dtype, seed, layout)
    scale = shape[-1] ** -0.5
    tol = TOL[dtype]
    out, lse = kernels.window_attention_forward(q, k, v, window, shift, table, pad_key, pad_value, scale)
    assert out.shape == q.shape and out.dtype == dtype and out.is_contiguous()
    assert lse.shape == q.shape[:-1] and lse.dtype == dtype and lse.is_contiguous()
    g = torch.Generator().manual_seed(seed + 1)
    grad_out = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    ref_out, ref_grads = _reference(q, k, v, window, shift, table, pad_key, pad_value, scale, grad_out)
    torch.testing.assert_close(out, ref_out, **tol)
    grads = kernels.window_attention_backward(grad_out, q, k, v, out, lse, window, shift, table, pad_key,
                                              pad_value, scale)
    for name, got, expected in zip(GRAD_NAMES, grads, ref_grads):
        assert got.shape == expected.shape and got.dtype == dtype and got.is_contiguous(), name
        torch.testing.assert_close(got, expected, **tol, msg=lambda m, name=name: f"grad {name}: {m}")
    return out, lse, grads, ref_grads


# --------------------------------------------------------------------------
# The launchers, called directly

# (B, *S, heads, hd), window, shift
CASES = {
    # 4 x 3 windows of 16 tokens, the last row/column of windows part padding, shifted: 9 regions
    "2d-15x9-w4-s2": ((2, 15, 9, 1, 5), [4, 4], [2, 2]),
    "2d-15x9-w4-unshifted": ((1, 15, 9, 2, 3), [4, 4], [0, 0]),
    # anisotropic window and shift: the bias-row strides of both dims differ
    "2d-10x7-w4x3-s2x1": ((1, 10, 7, 1, 4), [4, 3], [2, 1]),
    # the window covers the map: one window of 49 tokens (2 x 2 blocks), the shift is dropped
    "2d-7x7-w7-s3": ((1, 7, 7, 2, 3), [7, 7], [3, 3]),
    # map smaller than the window in both dims: bias read from the 13 x 13 table of window 7
    "2d-3x5-w7-s3": ((2, 3, 5, 1, 5), [7, 7], [3, 3]),
    # dim 0 smaller than its window (whole, unshifted), dim 1 shifted
    "2d-3x9-w4-s2": ((1, 3, 9, 2, 3), [4, 4], [2, 2]),
    # 81 tokens per window (3 blocks), the second window mostly padding, shifted along W
    "2d-9x10-w9-s4": ((1, 9, 10, 1, 4), [9, 9], [4, 4]),
    # 3-D: 2 x 2 x 3 windows of 27 tokens, padded and shifted in every dim
    "3d-5x6x7-w3-s1": ((1, 5, 6, 7, 1, 3), [3, 3, 3], [1, 1, 1]),
    "3d-3x4x5-w2x3x4-unshifted": ((2, 3, 4, 5, 2, 3), [2, 3, 4], [0, 0, 0]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_launchers_match_reference_float32(case):
    shape, window, shift = CASES[case]
    _check_launchers(shape, window, shift, torch.float32, seed=len(case))


@pytest.mark.parametrize("case", ["2d-7x7-w7-s3", "2d-3x9-w4-s2", "3d-5x6x7-w3-s1"])
def test_launchers_match_reference_float64(case):
    """Float64 (16 x 16 tiles: 49 tokens are 4 x 4 blocks), tight tolerance."""
    shape, window, shift = CASES[case]
    _check_launchers(shape, window, shift, torch.float64, seed=len(case) + 1)


def test_padding_gradients_are_exercised():
    """Maps the window does not divide give padded keys nonzero pad gradients; a divided
    map gives none (the padded keys do not exist)."""
    *_, grads, _ = _check_launchers((1, 6, 5, 2, 3), [4, 4], [2, 2], torch.float32, seed=3)
    assert grads[4].abs().min() > 0 and grads[5].abs().min() > 0
    *_, grads, _ = _check_launchers((1, 8, 4, 1, 3), [4, 4], [2, 2], torch.float32, seed=4)
    assert torch.count_nonzero(grads[4]) == 0 and torch.count_nonzero(grads[5]) == 0
    assert torch.count_nonzero(grads[3]) > 0


@pytest.mark.parametrize("layout", ["qkv", "mixed", "transposed"])
def test_launchers_noncontiguous_inputs(layout):
    """q, k, v as slices of one (B, H, W, 3, heads, hd) tensor, or each with its own strides
    (read in place), or with a head_dim stride != 1 (copied)."""
    _check_launchers((1, 5, 6, 2, 4), [4, 4], [2, 2], torch.float32, seed=5, layout=layout)
    _check_launchers((1, 3, 4, 5, 2, 3), [2, 4, 4], [1, 0, 2], torch.float64, seed=6, layout=layout)


def test_lse_is_logsumexp_of_scores():
    """One window covering the 5x6 map (window 7: no shift, no padding): lse equals
    torch.logsumexp of scale q k^T + bias, the bias from the 13 x 13 table."""
    shape, window = (1, 5, 6, 2, 3), [7, 7]
    q, k, v, table, pad_key, pad_value = _inputs(shape, window, torch.float64, seed=7)
    scale = 0.7
    _, lse = kernels.window_attention_forward(q, k, v, window, [3, 3], table, pad_key, pad_value, scale)
    coords = torch.stack(torch.meshgrid(torch.arange(5), torch.arange(6), indexing="ij")).flatten(1)   # (2, 30)
    rel = coords[:, :, None] - coords[:, None, :]
    index = (rel[0] + 6) * 13 + (rel[1] + 6)
    bias = table[index].permute(2, 0, 1)                                      # (heads, 30, 30)
    qf, kf = q.reshape(30, 2, 3).transpose(0, 1), k.reshape(30, 2, 3).transpose(0, 1)
    scores = scale * qf @ kf.transpose(1, 2) + bias
    expected = torch.logsumexp(scores, dim=-1).transpose(0, 1).reshape(1, 5, 6, 2)
    torch.testing.assert_close(lse, expected, **TOL[torch.float64])


@pytest.fixture
def interpreter_bf16_dot(monkeypatch):
    """Triton's interpreter stores bfloat16 as uint16 and its tl.dot multiplies those bit
    patterns (triton-lang/triton#11584, "not supported yet"): widen bfloat16 operands to
    float32 first, as the GPU's bf16 MMA does exactly (products of bf16 values are exact in
    float32). Only the interpreter is patched; the kernels are unchanged."""
    import numpy as np
    from triton.runtime import interpreter

    builder = interpreter.interpreter_builder
    real = builder.create_dot

    def widen(handle):
        if handle.dtype.scalar == interpreter.tl.bfloat16:
            data = (handle.data.astype(np.uint32) << 16).view(np.float32)
            return interpreter.TensorHandle(data, interpreter.tl.float32)
        return handle

    monkeypatch.setattr(builder, "create_dot", lambda a, b, *rest: real(widen(a), widen(b), *rest))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_launchers_half_precision(dtype, interpreter_bf16_dot):
    """Low-precision inputs accumulate in float32: close to the float32 reference on the same
    (rounded) values."""
    shape, window, shift = (1, 5, 6, 2, 4), [4, 4], [2, 2]
    q, k, v, table, pad_key, pad_value = _inputs(shape, window, dtype, seed=8)
    out, lse = kernels.window_attention_forward(q, k, v, window, shift, table, pad_key, pad_value, 0.5)
    assert out.dtype == dtype and lse.dtype == torch.float32
    grad_out = torch.randn(shape, generator=torch.Generator().manual_seed(9)).to(dtype)
    grads = kernels.window_attention_backward(grad_out, q, k, v, out, lse, window, shift, table, pad_key,
                                              pad_value, 0.5)
    ref_out, ref_grads = _reference(*(t.float() for t in (q, k, v)), window, shift,
                                    *(t.float() for t in (table, pad_key, pad_value)), 0.5, grad_out.float())
    tol = dict(atol=1e-2, rtol=1e-2) if dtype == torch.float16 else dict(atol=5e-2, rtol=5e-2)
    torch.testing.assert_close(out.float(), ref_out, **tol)
    for name, got, expected in zip(GRAD_NAMES, grads, ref_grads):
        assert got.dtype == dtype, name
        torch.testing.assert_close(got.float(), expected, **tol, msg=lambda m, name=name: f"grad {name}: {m}")


def test_head_dim_limit():
    q, k, v, table, pad_key, pad_value = _inputs((1, 2, 2, 1, kernels.MAX_HEAD_DIM + 1), [2, 2], torch.float32, 0)
    with pytest.raises(ValueError, match="head_dim"):
        kernels.window_attention_forward(q, k, v, [2, 2], [0, 0], table, pad_key, pad_value, 1.0)


# --------------------------------------------------------------------------
# The registered op (torch.library custom op with autograd) and the backend switch


@pytest.mark.parametrize("pads", ["given", "none"])
def test_public_op_triton_backend(pads, monkeypatch):
    """medmtl.ops.window_attention under backend("triton"), autograd through all inputs;
    checks that the Triton launchers ran."""
    calls = []
    for name in ("window_attention_forward", "window_attention_backward"):
        real = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
    shape, window, shift = (2, 7, 6, 3, 3), [4, 4], [2, 2]
    inputs = list(_inputs(shape, window, torch.float32, seed=10, layout="qkv"))
    if pads == "none":
        inputs = inputs[:4]
    grad_out = torch.randn(shape, generator=torch.Generator().manual_seed(11))
    results = {}
    for backend in ("triton", "reference"):
        leaves = [t.detach().clone().requires_grad_() for t in inputs]
        with medmtl.backend(backend):
            out = medmtl.ops.window_attention(*leaves[:3], window, shift, leaves[3], None, *leaves[4:])
        results[backend] = (out, torch.autograd.grad(out, leaves, grad_out))
    assert calls == ["window_attention_forward", "window_attention_backward"]
    torch.testing.assert_close(results["triton"][0], results["reference"][0], **TOL[torch.float32])
    for name, got, expected in zip(GRAD_NAMES, results["triton"][1], results["reference"][1]):
        torch.testing.assert_close(got, expected, **TOL[torch.float32], msg=lambda m, name=name: f"{name}: {m}")


def test_registered_op_opcheck():
    q, k, v, table, pad_key, pad_value = _inputs((1, 3, 4, 1, 2), [2, 2], torch.float64, seed=12)
    args = (q, k, v, [2, 2], [1, 1], table, pad_key, pad_value, 0.6)
    args = tuple(a.requires_grad_() if isinstance(a, torch.Tensor) else a for a in args)
    torch.library.opcheck(torch.ops.medmtl.window_attention_triton.default, args)


def test_torch_compile_fullgraph_with_triton_backend():
    """The triton op traces into a compiled graph without breaks, forward and backward."""
    inputs = _inputs((1, 5, 6, 1, 4), [4, 4], torch.float32, seed=13)

    def head(q, k, v, table, pad_key, pad_value):
        return medmtl.ops.window_attention(q, k, v, 4, 2, table, None, pad_key, pad_value).square().sum()

    results = {}
    for backend in ("reference", "triton"):
        leaves = [t.clone().requires_grad_() for t in inputs]
        with medmtl.backend(backend):
            fn = torch.compile(head, fullgraph=True, backend="aot_eager") if backend == "triton" else head
            out = fn(*leaves)
        results[backend] = (out, torch.autograd.grad(out, leaves))
    torch.testing.assert_close(results["triton"][0], results["reference"][0], **TOL[torch.float32])
    for got, expected in zip(results["triton"][1], results["reference"][1]):
        torch.testing.assert_close(got, expected, **TOL[torch.float32])


# --------------------------------------------------------------------------
# Ahead-of-time compilation for sm_80 and sm_90


def test_aot_list_covers_every_launch_configuration(monkeypatch, interpreter_bf16_dot):
    """Records each kernel launch of the launchers (kernel, constexprs, pointer dtypes)
    over every GPU dtype (float64 runs in the interpreter only) and head-dim block, and
    checks aot_kernels() lists it."""
    launched = triton_aot.record_launches(monkeypatch, kernels, [
        "window_attention_forward_kernel",
        "window_attention_backward_dq_kernel",
        "window_attention_backward_dkv_kernel"])
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for head_dim in (3, 40):          # BLOCK_D 32, 64
            q, k, v, table, pad_key, pad_value = _inputs((1, 2, 2, 1, head_dim), [2, 2], dtype, seed=0)
            out, lse = kernels.window_attention_forward(q, k, v, [2, 2], [0, 0], table, pad_key, pad_value, 1.0)
            kernels.window_attention_backward(torch.ones_like(out), q, k, v, out, lse, [2, 2], [0, 0], table,
                                              pad_key, pad_value, 1.0)
    triton_aot.check_covers(kernels, launched)


@pytest.fixture(scope="module", autouse=True)
def aot_compilers(request, tmp_path_factory):
    """The compilers of test_aot_compile_sm80_sm90, started early (tests/triton_aot.py)."""
    yield from triton_aot.early_compilers(request, tmp_path_factory, "medmtl.kernels.window_attention")


def test_aot_compile_sm80_sm90(aot_compilers):
    """Every kernel configuration compiles for sm_80 and sm_90 within the shared memory."""
    triton_aot.check(aot_compilers, kernels)

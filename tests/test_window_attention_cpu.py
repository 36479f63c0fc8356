"""window_attention on the C++ CPU backend against the reference composition."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import medmtl
from medmtl.ops import reference, window_attention
from tests.conftest import requires_extension

pytestmark = requires_extension


def make_inputs(shape, window, dtype=torch.float64, seed=0, qkv_views=True, pad=True):
    """q, k, v (B, *S, heads, hd), bias table and pad key/value, all leaves taking gradients.

    qkv_views: q, k, v are the strided slices of one (B, *S, 3, heads, hd)
    tensor, as a qkv projection gives them.
    """
    g = torch.Generator().manual_seed(seed)
    *lead, heads, hd = shape
    if qkv_views:
        qkv = torch.randn(*lead, 3, heads, hd, generator=g, dtype=dtype).requires_grad_()
        q, k, v = qkv.unbind(-3)
        leaves = [qkv]
        assert not q.is_contiguous() or math.prod(lead) == 1
    else:
        q, k, v = (torch.randn(*shape, generator=g, dtype=dtype).requires_grad_() for _ in range(3))
        leaves = [q, k, v]
    rows = math.prod(2 * w - 1 for w in window)
    table = torch.randn(rows, heads, generator=g, dtype=dtype).requires_grad_()
    pad_key = torch.randn(heads, hd, generator=g, dtype=dtype).requires_grad_() if pad else None
    pad_value = torch.randn(heads, hd, generator=g, dtype=dtype).requires_grad_() if pad else None
    return q, k, v, table, pad_key, pad_value, leaves + [t for t in (table, pad_key, pad_value) if t is not None]


def compare(shape, window, shift, dtype=torch.float64, backend="cpu", qkv_views=True, pad=True, tol=None, seed=0):
    q, k, v, table, pad_key, pad_value, leaves = make_inputs(shape, window, dtype, seed, qkv_views, pad)
    scale = 0.7 / math.sqrt(shape[-1])
    expected = reference.window_attention(q, k, v, window, shift, table, scale, pad_key, pad_value)
    with medmtl.backend(backend):
        got = window_attention(q, k, v, window, shift, table, scale, pad_key, pad_value)
    assert got.shape == expected.shape and got.dtype == expected.dtype
    tol = tol or ({torch.float64: 1e-10, torch.float32: 2e-5}[dtype])
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol)
    grad = torch.randn_like(expected)
    want = torch.autograd.grad(expected, leaves, grad)
    have = torch.autograd.grad(got, leaves, grad)
    for w, h in zip(want, have):
        torch.testing.assert_close(h, w, rtol=tol * 10, atol=tol * 10)


CASES = [
    # (shape (B, *S, heads, hd), window, shift)
    ((2, 8, 8, 2, 4), (4, 4), (0, 0)),
    ((2, 8, 8, 2, 4), (4, 4), (2, 2)),
    ((2, 15, 9, 2, 5), (4, 4), (2, 1)),  # not divided: padded, shifted
    ((1, 7, 7, 3, 3), (7, 7), (3, 3)),  # window = map: whole map, no shift
    ((1, 3, 5, 1, 4), (7, 7), (3, 3)),  # map smaller than the window
    ((2, 9, 6, 2, 3), (4, 8), (3, 5)),  # one dim whole, the other shifted
    ((2, 5, 6, 7, 2, 4), (3, 3, 3), (1, 1, 1)),
    ((1, 9, 10, 11, 1, 2), (4, 4, 4), (2, 2, 2)),
    ((1, 4, 9, 6, 2, 3), (7, 4, 3), (3, 0, 1)),
    ((1, 1, 1, 1, 1), (1, 1), (0, 0)),
]


@pytest.mark.parametrize("shape, window, shift", CASES)
def test_matches_reference_float64(shape, window, shift):
    compare(shape, window, shift)


@pytest.mark.parametrize("shape, window, shift", CASES[:3] + CASES[6:8])
def test_matches_reference_float32(shape, window, shift):
    compare(shape, window, shift, dtype=torch.float32)


def test_contiguous_inputs_and_no_pad_values():
    compare((2, 10, 7, 2, 4), (4, 4), (2, 2), qkv_views=False, pad=False)


def test_large_windows_split_queries_into_blocks():
    """Windows of more than 256 tokens (272 and 343 here) take their queries in several blocks."""
    compare((1, 20, 18, 1, 4), (17, 16), (8, 8), dtype=torch.float32)
    compare((1, 8, 8, 8, 1, 2), (7, 7, 7), (3, 3, 3), dtype=torch.float32)
    compare((1, 14, 14, 2, 8), (14, 14), (0, 0), dtype=torch.float32)


def test_half_inputs_compute_in_float32():
    q, k, v, table, pad_key, pad_value, _ = make_inputs((1, 8, 8, 2, 8), (4, 4), torch.float32)
    args32 = [t.detach() for t in (q, k, v)]
    expected = reference.window_attention(*args32, (4, 4), (2, 2), table.detach(), 0.3, pad_key.detach(),
                                          pad_value.detach())
    half = [t.detach().bfloat16() for t in (q, k, v, table, pad_key, pad_value)]
    with medmtl.backend("cpu"):
        got = window_attention(*half[:3], (4, 4), (2, 2), half[3], 0.3, half[4], half[5])
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected, rtol=3e-2, atol=3e-2)


def test_lse_is_the_log_sum_exp_of_the_visible_scores():
    """Unshifted whole-map window: one window, every key visible, no padding."""
    q, k, v = (torch.randn(1, 3, 4, 2, 5, dtype=torch.float64) for _ in range(3))
    table = torch.randn(5 * 7, 2, dtype=torch.float64)
    zeros = torch.zeros(2, 5, dtype=torch.float64)
    out, lse = torch.ops.medmtl.window_attention(q, k, v, [3, 4], [0, 0], table, zeros, zeros, 0.5)
    tokens = q.reshape(12, 2, 5).transpose(0, 1)
    keys = k.reshape(12, 2, 5).transpose(0, 1)
    pos = torch.stack(torch.meshgrid(torch.arange(3), torch.arange(4), indexing="ij")).flatten(1)
    rel = pos[:, :, None] - pos[:, None, :]
    bias = table[(rel[0] + 2) * 7 + rel[1] + 3].permute(2, 0, 1)
    scores = 0.5 * tokens @ keys.transpose(1, 2) + bias
    torch.testing.assert_close(lse.reshape(12, 2).t(), torch.logsumexp(scores, -1))
    assert out.is_contiguous() and lse.dtype == torch.float64


def test_batch_zero():
    q = torch.randn(0, 5, 5, 2, 4, requires_grad=True)
    with medmtl.backend("cpu"):
        out = window_attention(q, q, q, 4, 2, torch.randn(49, 2))
    assert out.shape == q.shape
    out.sum().backward()
    assert q.grad.shape == q.shape


def test_gradcheck():
    q, k, v, table, pad_key, pad_value, _ = make_inputs((1, 5, 3, 2, 2), (3, 2), qkv_views=False)
    with medmtl.backend("cpu"):
        assert torch.autograd.gradcheck(
            lambda q, k, v, t, pk, pv: window_attention(q, k, v, (3, 2), (1, 1), t, 0.8, pk, pv),
            (q, k, v, table, pad_key, pad_value))


def test_opcheck():
    q, k, v, table, pad_key, pad_value, _ = make_inputs((1, 6, 5, 2, 3), (4, 4), torch.float32, qkv_views=False)
    torch.library.opcheck(torch.ops.medmtl.window_attention.default,
                          (q, k, v, [4, 4], [2, 1], table, pad_key, pad_value, 0.5))


def test_torch_compile_fullgraph():
    q, k, v, table, pad_key, pad_value, leaves = make_inputs((2, 6, 5, 2, 3), (4, 4), torch.float32)

    def fn(q, k, v, table, pad_key, pad_value):
        return window_attention(q, k, v, (4, 4), (2, 2), table, None, pad_key, pad_value)

    with medmtl.backend("cpu"):
        compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
        got = compiled(q, k, v, table, pad_key, pad_value)
        got.square().sum().backward()
    expected = reference.window_attention(q, k, v, (4, 4), (2, 2), table, 3 ** -0.5, pad_key, pad_value)
    torch.testing.assert_close(got, expected)
    want = torch.autograd.grad(expected.square().sum(), leaves)
    for leaf, w in zip(leaves, want):
        torch.testing.assert_close(leaf.grad, w, rtol=1e-4, atol=1e-4)


@settings(max_examples=40, deadline=None)
@given(
    nd=st.sampled_from([2, 3]),
    data=st.data(),
    heads=st.integers(1, 3),
    hd=st.integers(1, 6),
    batch=st.integers(1, 2),
)
def test_property_matches_reference(nd, data, heads, hd, batch):
    limit = 12 if nd == 2 else 6
    size = data.draw(st.lists(st.integers(1, limit), min_size=nd, max_size=nd))
    window = data.draw(st.lists(st.integers(1, 6), min_size=nd, max_size=nd))
    shift = [data.draw(st.integers(0, w - 1)) for w in window]
    compare((batch, *size, heads, hd), tuple(window), tuple(shift), seed=data.draw(st.integers(0, 99)))


# --- bad input -------------------------------------------------------------------------------------------------------

def _good():
    q = torch.randn(1, 6, 6, 2, 4)
    return dict(q=q, k=q.clone(), v=q.clone(), window_size=(4, 4), shift_size=(2, 2),
                rel_pos_bias_table=torch.randn(49, 2))


@pytest.mark.parametrize("change, error, words", [
    (dict(k=torch.randn(1, 6, 5, 2, 4)), ValueError, "k must have the shape of q"),
    (dict(q=torch.randn(6, 6, 2, 4)), ValueError, "q must be (B, H, W, heads, head_dim)"),
    (dict(window_size=(4, 4, 4)), ValueError, "window_size must have 2 entries"),
    (dict(shift_size=(1,)), ValueError, "shift_size must have 2 entries"),
    (dict(shift_size=(4, 2)), ValueError, "shift_size entries must be in [0, window_size)"),
    (dict(shift_size=-1), ValueError, "shift_size entries must be in [0, window_size)"),
    (dict(window_size=0), ValueError, "window_size entries must be >= 1"),
    (dict(window_size=2.5), TypeError, "window_size must be an int"),
    (dict(rel_pos_bias_table=torch.randn(48, 2)), ValueError, "rel_pos_bias_table must have shape (49, 2)"),
    (dict(rel_pos_bias_table=torch.randn(49, 3)), ValueError, "rel_pos_bias_table must have shape (49, 2)"),
    (dict(q=torch.ones(1, 6, 6, 2, 4, dtype=torch.int64)), TypeError, "q must have a floating dtype"),
    (dict(v=torch.randn(1, 6, 6, 2, 4, dtype=torch.float64)), TypeError, "v must have the dtype of q"),
    (dict(k=torch.randn(1, 6, 6, 2, 4, device="meta")), ValueError, "k must be on the device of q"),
    (dict(pad_key=torch.randn(2, 3)), ValueError, "pad_key must have shape (2, 4)"),
    (dict(scale=float("nan")), ValueError, "scale must be a finite number"),
    (dict(q=torch.randn(1, 0, 6, 2, 4)), ValueError, "non-empty"),
])
def test_bad_input_names_the_argument(change, error, words):
    args = _good() | change
    if "q" in change and change["q"].shape[1:] != (6, 6, 2, 4):
        args["k"] = args["v"] = args["q"]
    with pytest.raises(error, match=words.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        window_attention(**args)


@pytest.mark.parametrize("args, words", [
    (lambda q, t, z: (q, q[..., :3], q, [4, 4], [2, 2], t, z, z, 0.5), "k must have the shape of q"),
    (lambda q, t, z: (q, q, q, [4], [2], t, z, z, 0.5), "window_size must have 2 entries"),
    (lambda q, t, z: (q, q, q, [4, 4], [4, 0], t, z, z, 0.5), "shift_size entries must be in"),
    (lambda q, t, z: (q, q, q, [4, 4], [2, 2], t[:5], z, z, 0.5), "rel_pos_bias_table must have shape"),
    (lambda q, t, z: (q, q, q, [4, 4], [2, 2], t, z[:1], z, 0.5), "pad_key must have shape"),
    (lambda q, t, z: (q.long(), q.long(), q.long(), [4, 4], [2, 2], t, z, z, 0.5), "floating dtype"),
])
def test_cpp_checks_guard_direct_calls(args, words):
    q, table, zeros = torch.randn(1, 6, 6, 2, 4), torch.randn(49, 2), torch.zeros(2, 4)
    with pytest.raises(RuntimeError, match=words):
        torch.ops.medmtl.window_attention(*args(q, table, zeros))

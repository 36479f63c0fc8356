"""Triton kernels of `window_attention` (installed as medmtl.kernels.window_attention).

The op: Swin shifted-window multi-head attention over token maps q, k, v
(B, *S, heads, hd), S = (H, W) or (D, H, W). The oracle is
medmtl.ops.reference.window_attention; the index math is that of
csrc/core/window_geometry.h (its header comment is authoritative):

    per spatial dim of size L, configured window W and shift s: w = L, t = 0 when
    L <= W, else w = W, t = s; padded size P = ceil(L / w) * w, count = P / w.
    Token r (row-major over w) of window n (row-major over count) sits at the
    shifted coordinate p = n * w + pos and comes from the map coordinate
    x = (p + t) mod P; x >= L is a padded token (key pad_key, value pad_value).
    With a shift, keys of another region are invisible: region_d(p) = 0 if
    t_d = 0, else 0 for p < P - w, 1 for p < P - t, 2 after.
    bias(i, j) = table[sum_d (pos_i,d - pos_j,d + W_d - 1) prod_{e > d} (2 W_e - 1), h].

Per window and head (N = prod w tokens): S_ij = scale q_i.k_j + bias(i, j), and
REGION_MASK (-100, Swin's additive mask) more for keys of another region; P = softmax_j S; out_i = sum_j P_ij v_j;
lse_i = logsumexp_j S_ij. 2-D maps run as 3-D ones with depth 1 (window 1, shift 0).

Flash-attention style: no padded, rolled or partitioned copy of the maps and no
N x N tensor in memory; rows are gathered by index arithmetic from the window
and in-window token index, the keys of a window are walked in blocks of BLOCK_N
with an online softmax, and the backward recomputes the scores from q, k and lse.

Kernels (all grids are 1-D, so no grid axis limit of 65535 is ever hit; "bw" is
batch * windows + window):
- window_attention_forward_kernel: program = (bw, head, BLOCK_M queries); loops
  over the window's keys in blocks of BLOCK_N: S = scale q k^T + bias on tl.dot,
  online softmax, acc += P v on tl.dot. Writes out and lse for the real queries.
- window_attention_backward_dq_kernel: program = (bw, head, BLOCK_M queries);
  Delta_i = sum(dO_i * O_i) (stored for the next kernel); over the key blocks,
  P = exp(S - lse), dP = dO v^T, dS = P (dP - Delta), dQ += dS k; and
  dtable[bias_row, h] += dS by tl.atomic_add into a float32 (float64)
  accumulator. Writes dq = scale dQ.
- window_attention_backward_dkv_kernel: program = (bw, head, BLOCK_N keys); over
  the query blocks (transposed products, S^T = k q^T), dV += P^T dO and
  dK += dS^T q. Writes dk, dv of the real keys; the dK, dV rows of padded keys
  are summed and tl.atomic_add-ed into the float32 (float64) accumulators of
  grad pad_key and grad pad_value (only by the programs that hold padded keys).
Each real token lies in exactly one window, so dq, dk and dv are written once,
without atomics, and are deterministic. grad table, grad pad_key and grad
pad_value are sums of atomic adds: NOT bitwise deterministic from run to run
(float addition order). The table accumulator has min(TABLE_COPIES, B * windows)
copies (program bw adds into copy bw % copies) to spread the atomic contention;
the host sums them.

Head dims are padded to BLOCK_D = 32 or 64, the next power of two >= 32 (tl.dot
needs dims >= 16), with masked loads: any head_dim from 1 to 64 (Swin and
SwinUNETR use 16 to 32; more raises a ValueError naming the other backends).
Each BLOCK_D is 9 more configurations to compile ahead of time, so head_dim 16
runs with BLOCK_D 32: the masked half costs little next to the exp and the bias
gather of every score. Partial blocks of queries and keys are masked everywhere.
One fixed launch configuration (BLOCK_M, BLOCK_N, num_warps, num_stages) per
(kernel, dtype, BLOCK_D), no autotune, in _CONFIGS; aot_kernels() lists them all.
They are the largest tiles that compile without register spills on sm_80 and
sm_90 (the ahead-of-time tests check it): the gathers (tokens by index
arithmetic, the bias by table row) cost one 64-bit address per tile element, so
the tiles are small, 16 x 16 to 32 x 16, and most configurations still need
130 - 250 registers per thread (2 - 3 blocks of 4 warps per SM; the
arithmetic is in docs/gpu_expectations.md, REGISTER_BUDGET_EXCEPTIONS lists
them). Float64 (interpreter only) takes 16 x 16: small tiles make the tests
cross block boundaries.

Float16/bfloat16 feed tl.dot as they are (P and dS are rounded to the input
dtype for their products) and accumulate in float32. Float32 takes IEEE float32
products (never TF32, whatever torch.backends.cuda.matmul.allow_tf32 says: one
configuration less to compile, and the accuracy of the reference); use
float16/bfloat16 for speed. Float64 computes in float64 and runs only on CPU
tensors in Triton's interpreter (the tests); on CUDA tensors it raises a
TypeError, so aot_kernels() lists float16, bfloat16 and float32 only. lse and
Delta are float32 (float64 for float64). scale is passed as a 1-element tensor
of that dtype (a Python float argument would be rounded to float32).

q, k, v may have any strides (each its own) as long as the head_dim stride is 1
(else they are copied); the outputs and gradients are contiguous.

Index assumption: the strides of q, k, v, heads * head_dim and the table's
size fit in int32 (as do the tensor sizes passed as ints); element offsets are
computed in int64.
"""

from __future__ import annotations

import contextlib
import itertools
import math

import torch
import triton
import triton.language as tl

from medmtl.kernels._index_limits import check_int32_span, sample_span

# (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel, dtype and BLOCK_D: queries x keys
# per tile (see the docstring). Float64 runs in the interpreter only (warps, stages unused).
_F16, _BF16, _F32, _F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
_CONFIGS = {
    "forward": {_F16: {32: (16, 16, 4, 1), 64: (16, 16, 4, 1)},
                _BF16: {32: (16, 16, 4, 1), 64: (16, 16, 4, 1)},
                _F32: {32: (32, 16, 4, 1), 64: (32, 16, 4, 1)},
                _F64: {32: (16, 16, 4, 1), 64: (16, 16, 4, 1)}},
    "backward_dq": {_F16: {32: (16, 16, 4, 1), 64: (16, 32, 4, 1)},
                    _BF16: {32: (16, 16, 4, 1), 64: (16, 16, 4, 1)},
                    _F32: {32: (16, 16, 4, 1), 64: (16, 16, 4, 1)},
                    _F64: {32: (16, 16, 4, 1), 64: (16, 16, 4, 1)}},
    "backward_dkv": {_F16: {32: (16, 16, 8, 1), 64: (16, 16, 4, 2)},
                     _BF16: {32: (32, 16, 4, 1), 64: (16, 16, 4, 2)},
                     _F32: {32: (16, 16, 4, 1), 64: (16, 16, 4, 1)},
                     _F64: {32: (16, 16, 4, 1), 64: (16, 16, 4, 1)}},
}
_BLOCK_DS = (32, 64)
MAX_HEAD_DIM = _BLOCK_DS[-1]
# Copies of the float32 grad-table accumulator (spread the atomic contention).
TABLE_COPIES = 8
# Swin's additive attention mask on the scores of keys of another shift region
# (the reference and timm add -100, not -inf; csrc/core/window_geometry.h kRegionMask).
REGION_MASK = tl.constexpr(-100.0)


# --------------------------------------------------------------------------
# Kernels


@triton.jit
def _tokens(blk, BLOCK: tl.constexpr, n0, n1, n2, N, w0, w1, w2, t0, t1, t2, P0, P1, P2, L0, L1, L2, W1, W2):
    """In-window tokens r = blk * BLOCK + [0, BLOCK) of window (n0, n1, n2) -> map coordinates
    (x0, x1, x2), in_window (r < N), real (in the window and inside the map), padded (in the
    window, outside the map), region label, and bias base sum_d pos_d prod_{e > d} (2 W_e - 1)."""
    r = blk * BLOCK + tl.arange(0, BLOCK)
    in_window = r < N
    pos2 = r % w2
    rest = r // w2
    pos1 = rest % w1
    pos0 = rest // w1
    p0 = n0 * w0 + pos0
    p1 = n1 * w1 + pos1
    p2 = n2 * w2 + pos2
    x0 = p0 + t0
    x0 = tl.where(x0 >= P0, x0 - P0, x0)
    x1 = p1 + t1
    x1 = tl.where(x1 >= P1, x1 - P1, x1)
    x2 = p2 + t2
    x2 = tl.where(x2 >= P2, x2 - P2, x2)
    inside = (x0 < L0) & (x1 < L1) & (x2 < L2)
    real = in_window & inside
    padded = in_window & (inside == 0)
    g0 = tl.where(t0 == 0, 0, tl.where(p0 < P0 - w0, 0, tl.where(p0 < P0 - t0, 1, 2)))
    g1 = tl.where(t1 == 0, 0, tl.where(p1 < P1 - w1, 0, tl.where(p1 < P1 - t1, 1, 2)))
    g2 = tl.where(t2 == 0, 0, tl.where(p2 < P2 - w2, 0, tl.where(p2 < P2 - t2, 1, 2)))
    label = (g0 * 3 + g1) * 3 + g2
    base = (pos0 * (2 * W1 - 1) + pos1) * (2 * W2 - 1) + pos2
    return x0, x1, x2, in_window, real, padded, label, base


@triton.jit
def _strided(b, x0, x1, x2, h, sb, s0, s1, s2, sh):
    """Element offset (int64) of head_dim 0 of token (b, x0, x1, x2), head h, in a strided map."""
    return (b.to(tl.int64) * sb + x0.to(tl.int64) * s0 + x1.to(tl.int64) * s1 + x2.to(tl.int64) * s2
            + h.to(tl.int64) * sh)


@triton.jit
def _gather(ptr, b, x0, x1, x2, h, sb, s0, s1, s2, sh, d, rows_ok, d_ok, TRANSPOSED: tl.constexpr):
    """Tokens (b, x0, x1, x2), head h, of a strided map: (BLOCK, BLOCK_D), or (BLOCK_D, BLOCK) when
    TRANSPOSED; 0 for the tokens not rows_ok and beyond head_dim (d_ok)."""
    off = _strided(b, x0, x1, x2, h, sb, s0, s1, s2, sh)
    if TRANSPOSED:
        rows = tl.load(ptr + off[None, :] + d[:, None], mask=rows_ok[None, :] & d_ok[:, None], other=0.0)
    else:
        rows = tl.load(ptr + off[:, None] + d[None, :], mask=rows_ok[:, None] & d_ok[None, :], other=0.0)
    return rows


@triton.jit
def _gather_keys(ptr, b, x0, x1, x2, h, sb, s0, s1, s2, sh, d, real, padded, d_ok, pad, TRANSPOSED: tl.constexpr):
    """_gather of keys (or values) of a window: the real tokens from the map, pad (BLOCK_D,) for the
    padded ones, 0 for the tokens outside the window."""
    rows = _gather(ptr, b, x0, x1, x2, h, sb, s0, s1, s2, sh, d, real, d_ok, TRANSPOSED)
    if TRANSPOSED:
        rows = tl.where(padded[None, :], pad[:, None], rows)
    else:
        rows = tl.where(padded[:, None], pad[None, :], rows)
    return rows


@triton.jit
def _head_row(ptr, h, head_dim, d, d_ok):
    """Row h of a contiguous (heads, head_dim) tensor (pad_key, pad_value), 0 beyond head_dim."""
    return tl.load(ptr + h * head_dim + d, mask=d_ok, other=0.0)


@triton.jit
def _flat(b, x0, x1, x2, h, heads, L0, L1, L2):
    """Row index (int64) of token (b, x0, x1, x2), head h, in a contiguous (B, L0, L1, L2, heads) map."""
    return (((b.to(tl.int64) * L0 + x0) * L1 + x1) * L2 + x2) * heads + h


@triton.jit
def _program(pid, blocks, heads, windows, count1, count2):
    """1-D program id -> (block, head, bw, batch, window coordinates n0, n1, n2)."""
    blk = pid % blocks
    rest = pid // blocks
    h = rest % heads
    bw = rest // heads
    b = bw // windows
    win = bw % windows
    n2 = win % count2
    n1 = (win // count2) % count1
    n0 = win // (count2 * count1)
    return blk, h, bw, b, n0, n1, n2


@triton.jit
def window_attention_forward_kernel(
    q_ptr, k_ptr, v_ptr,    # (B, L0, L1, L2, heads, hd), any strides with head_dim stride 1
    table_ptr,              # (heads, rows) contiguous: the bias table, transposed
    pad_k_ptr, pad_v_ptr,   # (heads, hd) contiguous
    scale_ptr,              # (1,) acc dtype
    out_ptr,                # (B, L0, L1, L2, heads, hd) contiguous, q's dtype
    lse_ptr,                # (B, L0, L1, L2, heads) contiguous, acc dtype
    sqb, sq0, sq1, sq2, sqh, skb, sk0, sk1, sk2, skh, svb, sv0, sv1, sv2, svh,
    heads, head_dim, q_blocks, N, windows, count1, count2,
    w0, w1, w2, t0, t1, t2, P0, P1, P2, L0, L1, L2, W1, W2, bias_c, rows,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Grid (B * windows * heads * q_blocks,): program = (bw, head, BLOCK_M queries of the window)."""
    qb, h, bw, b, n0, n1, n2 = _program(tl.program_id(0), q_blocks, heads, windows, count1, count2)
    acc_ty = lse_ptr.dtype.element_ty
    d = tl.arange(0, BLOCK_D)
    d_ok = d < head_dim
    scale = tl.load(scale_ptr)

    xq0, xq1, xq2, q_in, q_real, _, q_label, q_base = _tokens(
        qb, BLOCK_M, n0, n1, n2, N, w0, w1, w2, t0, t1, t2, P0, P1, P2, L0, L1, L2, W1, W2)
    q = _gather(q_ptr, b, xq0, xq1, xq2, h, sqb, sq0, sq1, sq2, sqh, d, q_real, d_ok, False)
    pad_k = _head_row(pad_k_ptr, h, head_dim, d, d_ok)
    pad_v = _head_row(pad_v_ptr, h, head_dim, d, d_ok)
    table = table_ptr + h.to(tl.int64) * rows

    m_i = tl.full([BLOCK_M], -1.0e30, acc_ty)
    l_i = tl.zeros([BLOCK_M], acc_ty)
    acc = tl.zeros([BLOCK_M, BLOCK_D], acc_ty)
    for kb in range(0, tl.cdiv(N, BLOCK_N)):
        xk0, xk1, xk2, k_in, k_real, k_pad, k_label, k_base = _tokens(
            kb, BLOCK_N, n0, n1, n2, N, w0, w1, w2, t0, t1, t2, P0, P1, P2, L0, L1, L2, W1, W2)
        kt = _gather_keys(k_ptr, b, xk0, xk1, xk2, h, skb, sk0, sk1, sk2, skh, d, k_real, k_pad, d_ok, pad_k,
                          True)                                                  # (BLOCK_D, BLOCK_N)
        s = tl.dot(q, kt, input_precision="ieee", out_dtype=acc_ty) * scale
        ok = q_in[:, None] & k_in[None, :]
        bias = tl.load(table + (q_base[:, None] - k_base[None, :] + bias_c), mask=ok, other=0.0)
        bias = bias.to(acc_ty) + tl.where(q_label[:, None] == k_label[None, :], 0.0, REGION_MASK)
        s = tl.where(ok, s + bias, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _gather_keys(v_ptr, b, xk0, xk1, xk2, h, svb, sv0, sv1, sv2, svh, d, k_real, k_pad, d_ok, pad_v,
                         False)                                                  # (BLOCK_N, BLOCK_D)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee", out_dtype=acc_ty)
        m_i = m_new

    l_safe = tl.where(l_i == 0, 1.0, l_i)   # rows outside the window or map only
    row = _flat(b, xq0, xq1, xq2, h, heads, L0, L1, L2)
    out = acc / l_safe[:, None]
    tl.store(out_ptr + row[:, None] * head_dim + d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=q_real[:, None] & d_ok[None, :])
    tl.store(lse_ptr + row, m_i + tl.log(l_safe), mask=q_real)


@triton.jit
def window_attention_backward_dq_kernel(
    q_ptr, k_ptr, v_ptr,    # (B, L0, L1, L2, heads, hd), any strides with head_dim stride 1
    table_ptr,              # (heads, rows) contiguous: the bias table, transposed
    pad_k_ptr, pad_v_ptr,   # (heads, hd) contiguous
    scale_ptr,              # (1,) acc dtype
    out_ptr, grad_out_ptr,  # (B, L0, L1, L2, heads, hd) contiguous, q's dtype
    lse_ptr,                # (B, L0, L1, L2, heads) contiguous, acc dtype
    delta_ptr,              # (B, L0, L1, L2, heads) contiguous, acc dtype: written, sum(dO * O)
    grad_q_ptr,             # (B, L0, L1, L2, heads, hd) contiguous, q's dtype
    grad_table_ptr,         # (copies, heads, rows) acc dtype, zeroed: atomic adds
    sqb, sq0, sq1, sq2, sqh, skb, sk0, sk1, sk2, skh, svb, sv0, sv1, sv2, svh,
    heads, head_dim, q_blocks, N, windows, count1, count2,
    w0, w1, w2, t0, t1, t2, P0, P1, P2, L0, L1, L2, W1, W2, bias_c, rows, copies,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Grid (B * windows * heads * q_blocks,): program = (bw, head, BLOCK_M queries of the window)."""
    qb, h, bw, b, n0, n1, n2 = _program(tl.program_id(0), q_blocks, heads, windows, count1, count2)
    acc_ty = lse_ptr.dtype.element_ty
    d = tl.arange(0, BLOCK_D)
    d_ok = d < head_dim
    scale = tl.load(scale_ptr)

    xq0, xq1, xq2, q_in, q_real, _, q_label, q_base = _tokens(
        qb, BLOCK_M, n0, n1, n2, N, w0, w1, w2, t0, t1, t2, P0, P1, P2, L0, L1, L2, W1, W2)
    q_mask = q_real[:, None] & d_ok[None, :]
    q = _gather(q_ptr, b, xq0, xq1, xq2, h, sqb, sq0, sq1, sq2, sqh, d, q_real, d_ok, False)
    row = _flat(b, xq0, xq1, xq2, h, heads, L0, L1, L2)
    do = tl.load(grad_out_ptr + row[:, None] * head_dim + d[None, :], mask=q_mask, other=0.0)
    o = tl.load(out_ptr + row[:, None] * head_dim + d[None, :], mask=q_mask, other=0.0)
    delta = tl.sum(do.to(acc_ty) * o.to(acc_ty), 1)
    tl.store(delta_ptr + row, delta, mask=q_real)
    lse = tl.load(lse_ptr + row, mask=q_real, other=0.0)
    pad_k = _head_row(pad_k_ptr, h, head_dim, d, d_ok)
    pad_v = _head_row(pad_v_ptr, h, head_dim, d, d_ok)
    table = table_ptr + h.to(tl.int64) * rows
    grad_table = grad_table_ptr + ((bw % copies) * heads + h).to(tl.int64) * rows

    dq = tl.zeros([BLOCK_M, BLOCK_D], acc_ty)
    for kb in range(0, tl.cdiv(N, BLOCK_N)):
        xk0, xk1, xk2, k_in, k_real, k_pad, k_label, k_base = _tokens(
            kb, BLOCK_N, n0, n1, n2, N, w0, w1, w2, t0, t1, t2, P0, P1, P2, L0, L1, L2, W1, W2)
        kt = _gather_keys(k_ptr, b, xk0, xk1, xk2, h, skb, sk0, sk1, sk2, skh, d, k_real, k_pad, d_ok, pad_k,
                          True)                                                  # (BLOCK_D, BLOCK_N)
        vt = _gather_keys(v_ptr, b, xk0, xk1, xk2, h, svb, sv0, sv1, sv2, svh, d, k_real, k_pad, d_ok, pad_v,
                          True)                                                  # (BLOCK_D, BLOCK_N)
        s = tl.dot(q, kt, input_precision="ieee", out_dtype=acc_ty) * scale
        ok = q_real[:, None] & k_in[None, :]
        bias_row = q_base[:, None] - k_base[None, :] + bias_c
        bias = tl.load(table + bias_row, mask=ok, other=0.0)
        bias = bias.to(acc_ty) + tl.where(q_label[:, None] == k_label[None, :], 0.0, REGION_MASK)
        p = tl.where(ok, tl.exp(s + bias - lse[:, None]), 0.0)
        dp = tl.dot(do, vt, input_precision="ieee", out_dtype=acc_ty)
        ds = p * (dp - delta[:, None])
        tl.atomic_add(grad_table + bias_row, ds, mask=ok, sem="relaxed")
        dq += tl.dot(ds.to(kt.dtype), tl.trans(kt), input_precision="ieee", out_dtype=acc_ty)

    tl.store(grad_q_ptr + row[:, None] * head_dim + d[None, :], (dq * scale).to(grad_q_ptr.dtype.element_ty),
             mask=q_mask)


@triton.jit
def window_attention_backward_dkv_kernel(
    q_ptr, k_ptr, v_ptr,    # (B, L0, L1, L2, heads, hd), any strides with head_dim stride 1
    table_ptr,              # (heads, rows) contiguous: the bias table, transposed
    pad_k_ptr, pad_v_ptr,   # (heads, hd) contiguous
    scale_ptr,              # (1,) acc dtype
    grad_out_ptr,           # (B, L0, L1, L2, heads, hd) contiguous, q's dtype
    lse_ptr, delta_ptr,     # (B, L0, L1, L2, heads) contiguous, acc dtype
    grad_k_ptr, grad_v_ptr,  # (B, L0, L1, L2, heads, hd) contiguous, q's dtype
    grad_pad_k_ptr, grad_pad_v_ptr,  # (heads, hd) acc dtype, zeroed: atomic adds
    sqb, sq0, sq1, sq2, sqh, skb, sk0, sk1, sk2, skh, svb, sv0, sv1, sv2, svh,
    heads, head_dim, k_blocks, N, windows, count1, count2,
    w0, w1, w2, t0, t1, t2, P0, P1, P2, L0, L1, L2, W1, W2, bias_c, rows,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Grid (B * windows * heads * k_blocks,): program = (bw, head, BLOCK_N keys of the window)."""
    kb, h, bw, b, n0, n1, n2 = _program(tl.program_id(0), k_blocks, heads, windows, count1, count2)
    acc_ty = lse_ptr.dtype.element_ty
    d = tl.arange(0, BLOCK_D)
    d_ok = d < head_dim
    scale = tl.load(scale_ptr)

    xk0, xk1, xk2, k_in, k_real, k_pad, k_label, k_base = _tokens(
        kb, BLOCK_N, n0, n1, n2, N, w0, w1, w2, t0, t1, t2, P0, P1, P2, L0, L1, L2, W1, W2)
    k_mask = k_real[:, None] & d_ok[None, :]
    k = _gather_keys(k_ptr, b, xk0, xk1, xk2, h, skb, sk0, sk1, sk2, skh, d, k_real, k_pad, d_ok,
                     _head_row(pad_k_ptr, h, head_dim, d, d_ok), False)         # (BLOCK_N, BLOCK_D)
    v = _gather_keys(v_ptr, b, xk0, xk1, xk2, h, svb, sv0, sv1, sv2, svh, d, k_real, k_pad, d_ok,
                     _head_row(pad_v_ptr, h, head_dim, d, d_ok), False)         # (BLOCK_N, BLOCK_D)
    table = table_ptr + h.to(tl.int64) * rows

    dk = tl.zeros([BLOCK_N, BLOCK_D], acc_ty)
    dv = tl.zeros([BLOCK_N, BLOCK_D], acc_ty)
    for qb in range(0, tl.cdiv(N, BLOCK_M)):
        xq0, xq1, xq2, q_in, q_real, _, q_label, q_base = _tokens(
            qb, BLOCK_M, n0, n1, n2, N, w0, w1, w2, t0, t1, t2, P0, P1, P2, L0, L1, L2, W1, W2)
        q_mask = q_real[:, None] & d_ok[None, :]
        q = _gather(q_ptr, b, xq0, xq1, xq2, h, sqb, sq0, sq1, sq2, sqh, d, q_real, d_ok, False)  # (BLOCK_M, BLOCK_D)
        row = _flat(b, xq0, xq1, xq2, h, heads, L0, L1, L2)
        do = tl.load(grad_out_ptr + row[:, None] * head_dim + d[None, :], mask=q_mask, other=0.0)
        lse = tl.load(lse_ptr + row, mask=q_real, other=0.0)
        delta = tl.load(delta_ptr + row, mask=q_real, other=0.0)
        # transposed tiles: keys x queries
        st = tl.dot(k, tl.trans(q), input_precision="ieee", out_dtype=acc_ty) * scale
        ok = k_in[:, None] & q_real[None, :]
        bias = tl.load(table + (q_base[None, :] - k_base[:, None] + bias_c), mask=ok, other=0.0)
        bias = bias.to(acc_ty) + tl.where(k_label[:, None] == q_label[None, :], 0.0, REGION_MASK)
        pt = tl.where(ok, tl.exp(st + bias - lse[None, :]), 0.0)
        dv += tl.dot(pt.to(do.dtype), do, input_precision="ieee", out_dtype=acc_ty)
        dpt = tl.dot(v, tl.trans(do), input_precision="ieee", out_dtype=acc_ty)
        dst = pt * (dpt - delta[None, :])
        dk += tl.dot(dst.to(q.dtype), q, input_precision="ieee", out_dtype=acc_ty)
    dk = dk * scale

    row = _flat(b, xk0, xk1, xk2, h, heads, L0, L1, L2)
    offs = row[:, None] * head_dim + d[None, :]
    tl.store(grad_k_ptr + offs, dk.to(grad_k_ptr.dtype.element_ty), mask=k_mask)
    tl.store(grad_v_ptr + offs, dv.to(grad_v_ptr.dtype.element_ty), mask=k_mask)
    if tl.sum(k_pad.to(tl.int32), 0) > 0:
        pad_rows = k_pad[:, None] & d_ok[None, :]
        tl.atomic_add(grad_pad_k_ptr + h * head_dim + d, tl.sum(tl.where(pad_rows, dk, 0.0), 0), mask=d_ok,
                      sem="relaxed")
        tl.atomic_add(grad_pad_v_ptr + h * head_dim + d, tl.sum(tl.where(pad_rows, dv, 0.0), 0), mask=d_ok,
                      sem="relaxed")


# --------------------------------------------------------------------------
# Host side


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _device_guard(device: torch.device):
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _block_d(head_dim: int) -> int:
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(f"window_attention: the triton backend supports head_dim <= {MAX_HEAD_DIM}, got "
                         f"{head_dim}; use the cuda, cpu or reference backend")
    return max(_BLOCK_DS[0], triton.next_power_of_2(head_dim))


def _blocks(kernel: str, dtype: torch.dtype, block_d: int) -> dict[str, int]:
    """The launch keywords of `kernel` ("forward", "backward_dq", "backward_dkv"): tile
    constexprs and, on the GPU, num_warps and num_stages."""
    block_m, block_n, num_warps, num_stages = _CONFIGS[kernel][dtype][block_d]
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=num_warps, num_stages=num_stages)


class _Geometry:
    """window_geometry.h's WindowGeometry for 3 dims (2-D: depth 1, window 1, shift 0)."""

    def __init__(self, q: torch.Tensor, window_size, shift_size):
        nd = q.dim() - 3
        if nd not in (2, 3):
            raise ValueError(f"window_attention: q must be (B, H, W, heads, hd) or (B, D, H, W, heads, hd), "
                             f"got shape {tuple(q.shape)}")
        if len(window_size) != nd or len(shift_size) != nd:
            raise ValueError(f"window_attention: window_size {list(window_size)} and shift_size "
                             f"{list(shift_size)} need {nd} entries")
        size = [1] * (3 - nd) + [int(s) for s in q.shape[1:-2]]
        cfg_w = [1] * (3 - nd) + [int(w) for w in window_size]
        cfg_s = [0] * (3 - nd) + [int(s) for s in shift_size]
        self.size, self.table_window = size, cfg_w
        self.window, self.shift, self.padded, self.count = [], [], [], []
        for L, W, s in zip(size, cfg_w, cfg_s):
            whole = L <= W
            w = (L if L > 0 else 1) if whole else W
            self.window.append(w)
            self.shift.append(0 if whole else s)
            self.count.append(-(-L // w))
            self.padded.append(self.count[-1] * w)
        self.tokens = math.prod(self.window)
        self.windows = math.prod(self.count)
        self.table_rows = math.prod(2 * W - 1 for W in cfg_w)
        W0, W1, W2 = cfg_w
        self.bias_c = ((W0 - 1) * (2 * W1 - 1) + (W1 - 1)) * (2 * W2 - 1) + (W2 - 1)

    def args(self) -> list[int]:
        """N, windows, count1, count2, w0..2, t0..2, P0..2, L0..2, W1, W2, bias_c, rows."""
        return [self.tokens, self.windows, self.count[1], self.count[2], *self.window, *self.shift,
                *self.padded, *self.size, self.table_window[1], self.table_window[2], self.bias_c,
                self.table_rows]


def _map(t: torch.Tensor) -> torch.Tensor:
    """(B, *S, heads, hd) as (B, L0, L1, L2, heads, hd), a view, head_dim stride 1."""
    if t.stride(-1) != 1:
        t = t.contiguous()
    return t.unsqueeze(1) if t.dim() == 5 else t


def _strides(t: torch.Tensor) -> list[int]:
    """Strides of batch, the three spatial dims and heads of a (B, L0, L1, L2, heads, hd) view."""
    return list(t.stride()[:5])


def _check_index_range(where: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, table: torch.Tensor) -> None:
    """The int32 index assumption (module docstring): the strides (the span of one
    batch item) of q, k, v and the table's size fit int32."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_int32_span(where, name, sample_span(t))
    check_int32_span(where, "table", table.numel(), "in all")


def _check_dtypes(q, k, v):
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise TypeError(f"window_attention: the triton backend takes float16, bfloat16, float32 or float64, "
                        f"got {q.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"window_attention: q, k, v must have one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dtype == torch.float64 and q.device.type == "cuda":
        raise TypeError("window_attention: the triton backend runs float64 only on CPU tensors (in Triton's "
                        "interpreter, for tests); on CUDA use float16, bfloat16 or float32, or the cuda or "
                        "reference backend for float64")


def window_attention_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window_size: list[int], shift_size: list[int],
    table: torch.Tensor, pad_key: torch.Tensor, pad_value: torch.Tensor, scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward of window_attention.

    Args:
        q, k, v: (B, *S, heads, hd), S = (H, W) or (D, H, W), one dtype, any strides.
        window_size, shift_size: the configured window and shift per spatial dim.
        table: (prod(2 * window - 1), heads) relative position bias.
        pad_key, pad_value: (heads, hd), key and value of the padded tokens.
        scale: multiplies q k^T.

    Returns:
        out (B, *S, heads, hd) contiguous in q's dtype, and lse (B, *S, heads) contiguous,
        float32 (float64 for float64): the log-sum-exp of each query's visible scores.
    """
    _check_dtypes(q, k, v)
    _check_index_range("window_attention", q, k, v, table)
    dtype, device = q.dtype, q.device
    acc_dtype = _acc_dtype(dtype)
    geo = _Geometry(q, window_size, shift_size)
    heads, head_dim = q.shape[-2:]
    out = torch.empty(q.shape, dtype=dtype, device=device)
    lse = torch.empty(q.shape[:-1], dtype=acc_dtype, device=device)
    if q.numel() == 0:
        return out, lse
    blocks = _blocks("forward", dtype, _block_d(head_dim))
    qm, km, vm = _map(q), _map(k), _map(v)
    table_t = table.to(dtype).t().contiguous()
    pad_key = pad_key.to(dtype).contiguous()
    pad_value = pad_value.to(dtype).contiguous()
    scale_t = torch.full((1,), scale, dtype=acc_dtype, device=device)
    q_blocks = triton.cdiv(geo.tokens, blocks["BLOCK_M"])
    grid = (q.shape[0] * geo.windows * heads * q_blocks,)
    with _device_guard(device):
        window_attention_forward_kernel[grid](
            qm, km, vm, table_t, pad_key, pad_value, scale_t, out, lse,
            *_strides(qm), *_strides(km), *_strides(vm),
            heads, head_dim, q_blocks, *geo.args(),
            **blocks,
        )
    return out, lse


def window_attention_backward(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
    lse: torch.Tensor, window_size: list[int], shift_size: list[int], table: torch.Tensor,
    pad_key: torch.Tensor, pad_value: torch.Tensor, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward of window_attention.

    Args:
        grad_out: (B, *S, heads, hd), gradient of the forward's out.
        q, k, v, window_size, shift_size, table, pad_key, pad_value, scale: the forward's arguments.
        out, lse: the forward's results.

    Returns:
        (grad_q, grad_k, grad_v, grad_table, grad_pad_key, grad_pad_value), contiguous, in the
        shapes and dtypes of q, k, v, table, pad_key, pad_value. grad_table, grad_pad_key and
        grad_pad_value are summed with atomic adds: not bitwise deterministic.
    """
    _check_dtypes(q, k, v)
    _check_index_range("window_attention_backward", q, k, v, table)
    dtype, device = q.dtype, q.device
    acc_dtype = _acc_dtype(dtype)
    geo = _Geometry(q, window_size, shift_size)
    B = q.shape[0]
    heads, head_dim = q.shape[-2:]
    grad_q = torch.empty(q.shape, dtype=dtype, device=device)
    grad_k = torch.empty(q.shape, dtype=dtype, device=device)
    grad_v = torch.empty(q.shape, dtype=dtype, device=device)
    if q.numel() == 0:
        return (grad_q, grad_k, grad_v, torch.zeros_like(table, memory_format=torch.contiguous_format),
                torch.zeros_like(pad_key, memory_format=torch.contiguous_format),
                torch.zeros_like(pad_value, memory_format=torch.contiguous_format))
    dq_blocks = _blocks("backward_dq", dtype, _block_d(head_dim))
    dkv_blocks = _blocks("backward_dkv", dtype, _block_d(head_dim))
    qm, km, vm = _map(q), _map(k), _map(v)
    grad_out = grad_out.to(dtype).contiguous()
    out = out.to(dtype).contiguous()
    lse = lse.to(acc_dtype).contiguous()
    table_t = table.to(dtype).t().contiguous()
    pad_key_c = pad_key.to(dtype).contiguous()
    pad_value_c = pad_value.to(dtype).contiguous()
    scale_t = torch.full((1,), scale, dtype=acc_dtype, device=device)
    delta = torch.empty(q.shape[:-1], dtype=acc_dtype, device=device)
    copies = max(1, min(TABLE_COPIES, B * geo.windows))
    grad_table_acc = torch.zeros((copies, heads, geo.table_rows), dtype=acc_dtype, device=device)
    grad_pad_k_acc = torch.zeros((heads, head_dim), dtype=acc_dtype, device=device)
    grad_pad_v_acc = torch.zeros((heads, head_dim), dtype=acc_dtype, device=device)
    strides = [*_strides(qm), *_strides(km), *_strides(vm)]
    q_blocks = triton.cdiv(geo.tokens, dq_blocks["BLOCK_M"])
    k_blocks = triton.cdiv(geo.tokens, dkv_blocks["BLOCK_N"])
    with _device_guard(device):
        window_attention_backward_dq_kernel[(B * geo.windows * heads * q_blocks,)](
            qm, km, vm, table_t, pad_key_c, pad_value_c, scale_t, out, grad_out, lse, delta, grad_q,
            grad_table_acc, *strides, heads, head_dim, q_blocks, *geo.args(), copies,
            **dq_blocks,
        )
        window_attention_backward_dkv_kernel[(B * geo.windows * heads * k_blocks,)](
            qm, km, vm, table_t, pad_key_c, pad_value_c, scale_t, grad_out, lse, delta, grad_k, grad_v,
            grad_pad_k_acc, grad_pad_v_acc, *strides, heads, head_dim, k_blocks, *geo.args(),
            **dkv_blocks,
        )
    grad_table = grad_table_acc.sum(0).t().to(table.dtype).contiguous()
    return (grad_q, grad_k, grad_v, grad_table, grad_pad_k_acc.to(pad_key.dtype),
            grad_pad_v_acc.to(pad_value.dtype))


# --------------------------------------------------------------------------
# Ahead-of-time compilation list (tests compile each for sm_80 and sm_90)

# (pointer dtype, accumulator dtype) of every GPU launch (float64 runs in the interpreter only).
_AOT_DTYPES = (("fp16", torch.float16, "fp32"), ("bf16", torch.bfloat16, "fp32"), ("fp32", torch.float32, "fp32"))
_STRIDES = tuple(f"s{t}{dim}" for t in "qkv" for dim in ("b", "0", "1", "2", "h"))
_GEOMETRY = ("N", "windows", "count1", "count2", "w0", "w1", "w2", "t0", "t1", "t2", "P0", "P1", "P2",
             "L0", "L1", "L2", "W1", "W2", "bias_c", "rows")


def aot_kernels() -> list[tuple[str, object, dict[str, str], dict[str, object]]]:
    """Every kernel of this module in every constexpr configuration the launchers use.

    Returns:
        [(name, jit_function, signature, constexprs)], for
        triton.compile(ASTSource(fn=jit_function, signature=signature, constexprs=constexprs)).
    """
    def inputs(dt, acc):
        return {"q_ptr": f"*{dt}", "k_ptr": f"*{dt}", "v_ptr": f"*{dt}", "table_ptr": f"*{dt}",
                "pad_k_ptr": f"*{dt}", "pad_v_ptr": f"*{dt}", "scale_ptr": f"*{acc}"}

    kernels = (
        ("forward", window_attention_forward_kernel,
         lambda dt, acc: {**inputs(dt, acc), "out_ptr": f"*{dt}", "lse_ptr": f"*{acc}"},
         ("heads", "head_dim", "q_blocks", *_GEOMETRY)),
        ("backward_dq", window_attention_backward_dq_kernel,
         lambda dt, acc: {**inputs(dt, acc), "out_ptr": f"*{dt}", "grad_out_ptr": f"*{dt}", "lse_ptr": f"*{acc}",
                          "delta_ptr": f"*{acc}", "grad_q_ptr": f"*{dt}", "grad_table_ptr": f"*{acc}"},
         ("heads", "head_dim", "q_blocks", *_GEOMETRY, "copies")),
        ("backward_dkv", window_attention_backward_dkv_kernel,
         lambda dt, acc: {**inputs(dt, acc), "grad_out_ptr": f"*{dt}", "lse_ptr": f"*{acc}",
                          "delta_ptr": f"*{acc}", "grad_k_ptr": f"*{dt}", "grad_v_ptr": f"*{dt}",
                          "grad_pad_k_ptr": f"*{acc}", "grad_pad_v_ptr": f"*{acc}"},
         ("heads", "head_dim", "k_blocks", *_GEOMETRY)),
    )
    entries = []
    for (kind, fn, pointers, ints), (dt, dtype, acc), block_d in itertools.product(
            kernels, _AOT_DTYPES, _BLOCK_DS):
        signature = {
            **pointers(dt, acc), **{name: "i32" for name in (*_STRIDES, *ints)},
            **{name: "constexpr" for name in ("BLOCK_M", "BLOCK_N", "BLOCK_D")},
        }
        entries.append((f"window_attention_{kind}_{dt}_d{block_d}", fn, signature, _blocks(kind, dtype, block_d)))
    return entries


# Every configuration may exceed the hot-kernel budget of 128 registers per thread (the
# gathers; docs/gpu_expectations.md), as long as two 4-warp blocks still fit an SM
# (tests/triton_aot.py checks it, and that none spills).
REGISTER_BUDGET_EXCEPTIONS = frozenset(entry[0] for entry in aot_kernels())
# Arguments a typical launch marks divisible by 16 besides the pointers (tests/triton_aot.py
# compiles the hot kernels so too): the strides, multiples of heads * head_dim.
AOT_ALIGNED_ARGS = _STRIDES

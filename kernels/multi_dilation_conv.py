"""Triton kernels of `multi_dilation_conv` (installed as medmtl.kernels.multi_dilation_conv).

The op: x (B, Cin, H, W), weight (n, Cout, Cin, 3, 3), dilations d_0 .. d_{n-1} >= 0.
Branch i is a 3x3 convolution at dilation d_i with padding d_i (output pixel (h, w),
tap (kh, kw) reads x at (h + (kh - 1) d_i, w + (kw - 1) d_i)); d_i == 0 is a 1x1
branch, the centre tap weight[i, :, :, 1, 1] only.
    "sum":    y = act(sum_i conv_i(x) + bias)            (B, Cout, H, W)
    "concat": y = cat_i act(conv_i(x) + bias_i)          (B, n * Cout, H, W), branch-major
The oracle is medmtl.ops.reference.multi_dilation_conv.

All three convolution kernels are direct convolutions on tl.dot: a program owns a
TILE_H x TILE_W tile of pixels (flattened into the M dimension of the dot) and a
block of channels, and walks the (branch, tap) pairs, then the reduced channels in
blocks. A tap whose shifted window lies entirely outside the map, for the whole
tile, only reads padding and is skipped (a scalar test per program and tap): at
dilations 12 and 18 on 14x14 or 28x28 maps that is most of the taps. Loads of
the taps that remain are masked at the borders (zero padding).

Kernels (all grids are 1-D, so no grid axis limit of 65535 is ever hit):
- multi_dilation_conv_forward_kernel: program = (group, batch, pixel tile, Cout
  block); acc[pixels, Cout] += x_shifted[pixels, Cin block] @ w[Cin block, Cout]
  over its branches' taps. "sum": one group, all branches in one accumulator;
  "concat": one group per branch (the branch is a grid axis). Epilogue: bias,
  ReLU, store.
- multi_dilation_conv_backward_prep_kernel: grad_pre = grad_output masked by the
  ReLU (torch's rule: zero where output <= 0), and one partial sum of grad_pre
  per program (plane, pixel block), reduced on the host to grad_bias.
- multi_dilation_conv_backward_input_kernel: the transposed convolution. Program =
  (batch, pixel tile, Cin block); acc[pixels, Cin] += grad_pre[pixels - offset,
  Cout block] @ w^T[Cout block, Cin] over all branches and taps, with the same
  skipping (the window shifted the other way).
- multi_dilation_conv_backward_weight_kernel: program = (branch, tap, Cin block,
  Cout block, split); the first four name the weight tile it computes; acc[Cin, Cout] += x_shifted[Cin, pixels]
  @ grad_pre[pixels, Cout] over the batch and the tiles of the rectangle of output
  pixels whose shifted pixel is inside the map (empty for taps that read only
  padding, and for the 8 outer taps of a 1x1 branch, which get zeros). The
  (batch, tile) pairs are dealt round-robin to `splits` programs that each write
  a partial weight gradient; the host sums the partials (deterministic, no atomics).

The weight is passed tap-major, (n, 3, 3, Cin, Cout) contiguous, so the weight
tiles of both orientations are loaded along Cout.

Float16/bfloat16 feed tl.dot as they are and accumulate in float32; float32
accumulates in float32, with TF32 dot products when PyTorch allows TF32 in
convolutions (torch.backends.cudnn.allow_tf32, as F.conv2d does), else IEEE;
float64 accumulates in float64. bias None is passed as a dummy with has_bias = 0;
relu is a runtime flag.

Index assumption: one batch item of every tensor of the op (C * H * W elements)
and the weight have fewer than 2^31 elements; batch offsets are computed in int64.
"""

from __future__ import annotations

import contextlib
import itertools

import torch
import triton
import triton.language as tl

from medmtl.kernels._index_limits import check_int32_span
from medmtl.ops._layout import laid_out_like, output_memory_format

# Pixel tile of every convolution kernel: TILE_H x TILE_W pixels, the M (or K) dimension of tl.dot.
TILE_H = 8
TILE_W = 8
# Channel blocks (tl.dot needs dimensions >= 16; the op serves the deep levels, hundreds of
# channels, fewer are masked), num_warps and num_stages per kernel, dtype and tl.dot
# precision: (BLOCK_CI, BLOCK_CO, num_warps, num_stages). The largest blocks that compile
# without register spills on sm_80 and sm_90, the forward within 128 registers per
# thread (the ahead-of-time tests check both; docs/gpu_expectations.md). Float32 with
# IEEE products and float64 run tl.dot as FMAs whose operands sit in registers, so
# they take half the channels, or twice the warps, of the 16-bit types.
_F16, _BF16, _F32, _F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
_CONFIGS = {
    "forward": {(_F16, "ieee"): (32, 64, 4, 3), (_BF16, "ieee"): (32, 64, 4, 3),
                (_F32, "tf32"): (16, 32, 8, 2), (_F32, "ieee"): (16, 16, 4, 2), (_F64, "ieee"): (16, 32, 8, 2)},
    "backward_input": {(_F16, "ieee"): (32, 64, 4, 3), (_BF16, "ieee"): (32, 64, 4, 3),
                       (_F32, "tf32"): (32, 32, 8, 3), (_F32, "ieee"): (16, 32, 4, 2),
                       (_F64, "ieee"): (32, 32, 8, 3)},
    "backward_weight": {(_F16, "ieee"): (32, 64, 4, 3), (_BF16, "ieee"): (32, 64, 4, 3),
                        (_F32, "tf32"): (32, 32, 8, 3), (_F32, "ieee"): (32, 32, 8, 3),
                        (_F64, "ieee"): (16, 32, 4, 2)},
}
PREP_BLOCK = 1024
# The weight gradient splits its (batch, tile) reduction so that about this many
# programs run per streaming multiprocessor (or in all, on the CPU interpreter).
WEIGHT_PROGRAMS_PER_SM = 4
WEIGHT_PROGRAMS_CPU = 16


# --------------------------------------------------------------------------
# Kernels


@triton.jit
def _window_hits(r0, r1, c0, c1, dh, dw, H, W):
    """Whether the pixel rectangle [r0, r1] x [c0, c1] shifted by (dh, dw) meets the map."""
    return (r0 + dh < H) & (r1 + dh >= 0) & (c0 + dw < W) & (c1 + dw >= 0)


@triton.jit
def _pixel_tile(pix_tile, tiles_w, H, W, TILE_H: tl.constexpr, TILE_W: tl.constexpr):
    """Pixels (h, w) of a tile flattened row-major, their mask, and the tile's clipped extent."""
    h0 = (pix_tile // tiles_w) * TILE_H
    w0 = (pix_tile % tiles_w) * TILE_W
    i = tl.arange(0, TILE_H * TILE_W)
    h = h0 + i // TILE_W
    w = w0 + i % TILE_W
    ok = (h < H) & (w < W)
    r1 = tl.minimum(h0 + TILE_H, H) - 1
    c1 = tl.minimum(w0 + TILE_W, W) - 1
    return h, w, ok, h0, r1, w0, c1


@triton.jit
def multi_dilation_conv_forward_kernel(
    x_ptr,        # (B, Cin, H, W) contiguous
    w_ptr,        # (n, 3, 3, Cin, Cout) contiguous: the weight, tap-major
    dil_ptr,      # (n,) int32 dilations
    bias_ptr,     # (C_total,) bias (read only when has_bias)
    out_ptr,      # (B, C_total, H, W)
    B, Cin, Cout, H, W,
    C_total,               # Cout ("sum") or n * Cout ("concat")
    branches_per_group,    # n ("sum": one group) or 1 ("concat": one group per branch)
    tiles_w, tiles_hw, co_blocks,
    has_bias, relu,
    ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    TILE_H: tl.constexpr, TILE_W: tl.constexpr, BLOCK_CI: tl.constexpr, BLOCK_CO: tl.constexpr,
):
    """Grid (groups * B * tiles_hw * co_blocks,): program = (group, b, pixel tile, Cout block)."""
    pid = tl.program_id(0)
    co_block = pid % co_blocks
    rest = pid // co_blocks
    pix_tile = rest % tiles_hw
    rest = rest // tiles_hw
    b = rest % B
    group = rest // B
    h, w, pix_ok, r0, r1, c0, c1 = _pixel_tile(pix_tile, tiles_w, H, W, TILE_H, TILE_W)
    co = co_block * BLOCK_CO + tl.arange(0, BLOCK_CO)
    co_ok = co < Cout
    ci_range = tl.arange(0, BLOCK_CI)
    HW = H * W
    x_batch = x_ptr + b.to(tl.int64) * Cin * HW

    acc = tl.zeros([TILE_H * TILE_W, BLOCK_CO], ACC_DTYPE)
    first = group * branches_per_group
    for br in range(first, first + branches_per_group):
        d = tl.load(dil_ptr + br)
        for t in range(9):
            dh = (t // 3 - 1) * d
            dw = (t % 3 - 1) * d
            # a 1x1 branch (d = 0) has its centre tap only; others skip taps reading only padding
            if ((d != 0) | (t == 4)) & _window_hits(r0, r1, c0, c1, dh, dw, H, W):
                hs = h + dh
                ws = w + dw
                in_ok = pix_ok & (hs >= 0) & (hs < H) & (ws >= 0) & (ws < W)
                x_pos = hs * W + ws
                w_tap = w_ptr + (br * 9 + t) * (Cin * Cout)
                for ci0 in range(0, Cin, BLOCK_CI):
                    ci = ci0 + ci_range
                    ci_ok = ci < Cin
                    xt = tl.load(x_batch + ci[None, :].to(tl.int64) * HW + x_pos[:, None],
                                 mask=in_ok[:, None] & ci_ok[None, :], other=0.0)
                    wt = tl.load(w_tap + ci[:, None] * Cout + co[None, :],
                                 mask=ci_ok[:, None] & co_ok[None, :], other=0.0)
                    acc = tl.dot(xt, wt, acc, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)

    channel = group * Cout + co          # output channel (and bias index)
    bias = tl.load(bias_ptr + channel, mask=co_ok & (has_bias != 0), other=0.0).to(ACC_DTYPE)
    acc += bias[None, :]
    acc = tl.where((relu != 0) & (acc < 0), 0.0, acc)   # NaN passes, as in torch.relu
    out_offs = (b.to(tl.int64) * C_total + channel[None, :]) * HW + (h * W + w)[:, None]
    tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=pix_ok[:, None] & co_ok[None, :])


@triton.jit
def multi_dilation_conv_backward_prep_kernel(
    grad_out_ptr,   # (B, C_total, H, W) contiguous
    out_ptr,        # (B, C_total, H, W) the forward's output (read only when relu)
    grad_pre_ptr,   # (B, C_total, H, W) gradient of the pre-activation, x's dtype
    part_bias_ptr,  # (B * C_total * blocks_per_plane,) acc dtype partial sums of grad_pre
    P, blocks_per_plane,
    relu,
    BLOCK: tl.constexpr,
):
    """Grid (B * C_total * blocks_per_plane,): program = BLOCK positions of one plane of P."""
    pid = tl.program_id(0)
    plane = pid // blocks_per_plane
    blk = pid % blocks_per_plane
    p = blk * BLOCK + tl.arange(0, BLOCK)
    mask = p < P
    offs = plane.to(tl.int64) * P + p
    g = tl.load(grad_out_ptr + offs, mask=mask, other=0.0)
    y = tl.load(out_ptr + offs, mask=mask & (relu != 0), other=1.0)
    g = tl.where(y <= 0, 0.0, g).to(g.dtype)   # torch.relu's backward: zero where y <= 0 (NaN passes)
    tl.store(grad_pre_ptr + offs, g, mask=mask)
    tl.store(part_bias_ptr + pid, tl.sum(g.to(part_bias_ptr.dtype.element_ty), axis=0))


@triton.jit
def multi_dilation_conv_backward_input_kernel(
    grad_pre_ptr,   # (B, C_total, H, W) contiguous
    w_ptr,          # (n, 3, 3, Cin, Cout) contiguous
    dil_ptr,        # (n,) int32
    grad_x_ptr,     # (B, Cin, H, W)
    B, Cin, Cout, H, W,
    C_total, n_branches,
    branch_stride,  # channel offset of branch i in grad_pre is i * branch_stride (0 "sum", Cout "concat")
    tiles_w, tiles_hw, ci_blocks,
    ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    TILE_H: tl.constexpr, TILE_W: tl.constexpr, BLOCK_CI: tl.constexpr, BLOCK_CO: tl.constexpr,
):
    """Grid (B * tiles_hw * ci_blocks,): program = (b, pixel tile, Cin block).

    x pixel q feeds output pixel q - offset through each tap: the tile gathers grad_pre
    there, masked where q - offset is outside the map."""
    pid = tl.program_id(0)
    ci_block = pid % ci_blocks
    rest = pid // ci_blocks
    pix_tile = rest % tiles_hw
    b = rest // tiles_hw
    h, w, pix_ok, r0, r1, c0, c1 = _pixel_tile(pix_tile, tiles_w, H, W, TILE_H, TILE_W)
    ci = ci_block * BLOCK_CI + tl.arange(0, BLOCK_CI)
    ci_ok = ci < Cin
    co_range = tl.arange(0, BLOCK_CO)
    HW = H * W
    g_batch = grad_pre_ptr + b.to(tl.int64) * C_total * HW

    acc = tl.zeros([TILE_H * TILE_W, BLOCK_CI], ACC_DTYPE)
    for br in range(0, n_branches):
        d = tl.load(dil_ptr + br)
        g_branch = g_batch + br * branch_stride * HW
        for t in range(9):
            dh = (t // 3 - 1) * d
            dw = (t % 3 - 1) * d
            if ((d != 0) | (t == 4)) & _window_hits(r0, r1, c0, c1, -dh, -dw, H, W):
                hs = h - dh
                ws = w - dw
                in_ok = pix_ok & (hs >= 0) & (hs < H) & (ws >= 0) & (ws < W)
                g_pos = hs * W + ws
                w_tap = w_ptr + (br * 9 + t) * (Cin * Cout)
                for co0 in range(0, Cout, BLOCK_CO):
                    co = co0 + co_range
                    co_ok = co < Cout
                    gt = tl.load(g_branch + co[None, :].to(tl.int64) * HW + g_pos[:, None],
                                 mask=in_ok[:, None] & co_ok[None, :], other=0.0)
                    wt = tl.load(w_tap + ci[None, :] * Cout + co[:, None],      # (Cout block, Cin block)
                                 mask=co_ok[:, None] & ci_ok[None, :], other=0.0)
                    acc = tl.dot(gt, wt, acc, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)

    offs = (b.to(tl.int64) * Cin + ci[None, :]) * HW + (h * W + w)[:, None]
    tl.store(grad_x_ptr + offs, acc.to(grad_x_ptr.dtype.element_ty), mask=pix_ok[:, None] & ci_ok[None, :])


@triton.jit
def multi_dilation_conv_backward_weight_kernel(
    x_ptr,          # (B, Cin, H, W) contiguous
    grad_pre_ptr,   # (B, C_total, H, W) contiguous
    dil_ptr,        # (n,) int32
    part_ptr,       # (splits, n, 3, 3, Cin, Cout) acc dtype: partial weight gradients
    B, Cin, Cout, H, W,
    C_total, n_branches, branch_stride,
    ci_blocks, co_blocks, splits,
    ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    TILE_H: tl.constexpr, TILE_W: tl.constexpr, BLOCK_CI: tl.constexpr, BLOCK_CO: tl.constexpr,
):
    """Grid (n * 9 * ci_blocks * co_blocks * splits,): program = (branch, tap, Cin block,
    Cout block, split); the split takes every splits-th (batch, tile) pair of the tap's
    valid rectangle."""
    pid = tl.program_id(0)
    split = pid % splits
    rest = pid // splits
    co_block = rest % co_blocks
    rest = rest // co_blocks
    ci_block = rest % ci_blocks
    rest = rest // ci_blocks
    t = rest % 9
    br = rest // 9
    d = tl.load(dil_ptr + br)
    dh = (t // 3 - 1) * d
    dw = (t % 3 - 1) * d
    # Output pixels whose tap reads inside the map: rows [h_lo, h_hi), columns [w_lo, w_hi).
    h_lo = tl.maximum(0, -dh)
    h_hi = tl.minimum(H, H - dh)
    w_lo = tl.maximum(0, -dw)
    w_hi = tl.minimum(W, W - dw)
    rect_tiles_h = tl.cdiv(tl.maximum(h_hi - h_lo, 0), TILE_H)
    rect_tiles_w = tl.cdiv(tl.maximum(w_hi - w_lo, 0), TILE_W)
    rect_tiles = rect_tiles_h * rect_tiles_w
    active = (d != 0) | (t == 4)                # the outer taps of a 1x1 branch get zeros
    items = tl.where(active, B * rect_tiles, 0)

    ci = ci_block * BLOCK_CI + tl.arange(0, BLOCK_CI)
    ci_ok = ci < Cin
    co = co_block * BLOCK_CO + tl.arange(0, BLOCK_CO)
    co_ok = co < Cout
    i = tl.arange(0, TILE_H * TILE_W)
    HW = H * W
    acc = tl.zeros([BLOCK_CI, BLOCK_CO], ACC_DTYPE)
    for item in range(split, items, splits):
        b = item // rect_tiles
        tile = item % rect_tiles
        h = h_lo + (tile // rect_tiles_w) * TILE_H + i // TILE_W
        w = w_lo + (tile % rect_tiles_w) * TILE_W + i % TILE_W
        ok = (h < h_hi) & (w < w_hi)
        xt = tl.load(x_ptr + (b.to(tl.int64) * Cin + ci[:, None]) * HW + ((h + dh) * W + w + dw)[None, :],
                     mask=ci_ok[:, None] & ok[None, :], other=0.0)                # (Cin block, pixels)
        gt = tl.load(grad_pre_ptr + (b.to(tl.int64) * C_total + br * branch_stride + co[None, :]) * HW
                     + (h * W + w)[:, None],
                     mask=ok[:, None] & co_ok[None, :], other=0.0)                 # (pixels, Cout block)
        acc = tl.dot(xt, gt, acc, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)

    part = part_ptr + ((split * n_branches + br) * 9 + t).to(tl.int64) * Cin * Cout
    tl.store(part + ci[:, None] * Cout + co[None, :], acc, mask=ci_ok[:, None] & co_ok[None, :])


# --------------------------------------------------------------------------
# Host side


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tl_acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _input_precision(dtype: torch.dtype) -> str:
    """tl.dot's precision: TF32 for float32 when PyTorch's convolutions may use it."""
    return "tf32" if dtype == torch.float32 and torch.backends.cudnn.allow_tf32 else "ieee"


def _blocks(kernel: str, dtype: torch.dtype, precision: str) -> dict:
    """Launch keywords of `kernel` ("forward", "backward_input", "backward_weight") for
    dtype and tl.dot precision: the tile constexprs, num_warps and num_stages."""
    block_ci, block_co, num_warps, num_stages = _CONFIGS[kernel][(dtype, precision)]
    return dict(TILE_H=TILE_H, TILE_W=TILE_W, BLOCK_CI=block_ci, BLOCK_CO=block_co, num_warps=num_warps,
                num_stages=num_stages)


def _device_guard(device: torch.device):
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _check_index_range(where: str, x: torch.Tensor, weight: torch.Tensor, combine: str) -> None:
    """The int32 index assumption (module docstring): one batch item of x and of the
    output, and the weight, fewer than 2^31 elements each."""
    B, Cin, H, W = x.shape
    n, Cout = weight.shape[:2]
    check_int32_span(where, "x", Cin * H * W)
    check_int32_span(where, "output", (n * Cout if combine == "concat" else Cout) * H * W)
    check_int32_span(where, "weight", weight.numel(), "in all")


def _tap_major(weight: torch.Tensor) -> torch.Tensor:
    """(n, Cout, Cin, 3, 3) -> (n, 3, 3, Cin, Cout) contiguous."""
    return weight.permute(0, 3, 4, 2, 1).contiguous()


def _dilations(dilations, device: torch.device) -> torch.Tensor:
    return torch.tensor([int(d) for d in dilations], dtype=torch.int32, device=device)


def _weight_splits(base_programs: int, max_items: int, device: torch.device) -> int:
    """How many programs share one weight tile's reduction over (batch, tile) pairs."""
    if device.type == "cuda":
        target = WEIGHT_PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        target = WEIGHT_PROGRAMS_CPU
    return max(1, min(triton.cdiv(target, base_programs), max_items))


def multi_dilation_conv_forward(
    x: torch.Tensor, weight: torch.Tensor, dilations: list[int], bias: torch.Tensor | None,
    combine: str, relu: bool,
) -> torch.Tensor:
    """Forward of multi_dilation_conv.

    Args:
        x: (B, Cin, H, W).
        weight: (n, Cout, Cin, 3, 3), x's dtype and device.
        dilations: n ints >= 0 (0: a 1x1 branch, weight[i, :, :, 1, 1] only).
        bias: None, or (Cout,) for "sum", (n * Cout,) for "concat".
        combine: "sum" or "concat".
        relu: apply ReLU after the bias (per branch for "concat").

    Returns:
        (B, Cout, H, W) for "sum", (B, n * Cout, H, W) for "concat", in x's dtype.
    """
    _check_index_range("multi_dilation_conv", x, weight, combine)
    out_format = output_memory_format(x)
    x = x.contiguous()
    B, Cin, H, W = x.shape
    n, Cout = weight.shape[:2]
    concat = combine == "concat"
    groups = n if concat else 1
    C_total = n * Cout if concat else Cout
    out = torch.empty((B, C_total, H, W), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out.contiguous(memory_format=out_format)
    w = _tap_major(weight.to(x.dtype))
    dil = _dilations(dilations, x.device)
    bias_arg = bias.contiguous() if bias is not None else out   # dummy, never read
    precision = _input_precision(x.dtype)
    blocks = _blocks("forward", x.dtype, precision)
    tiles_w = triton.cdiv(W, TILE_W)
    tiles_hw = triton.cdiv(H, TILE_H) * tiles_w
    co_blocks = triton.cdiv(Cout, blocks["BLOCK_CO"])
    with _device_guard(x.device):
        multi_dilation_conv_forward_kernel[(groups * B * tiles_hw * co_blocks,)](
            x, w, dil, bias_arg, out,
            B, Cin, Cout, H, W, C_total, 1 if concat else n,
            tiles_w, tiles_hw, co_blocks, int(bias is not None), int(relu),
            ACC_DTYPE=_tl_acc_dtype(x.dtype), INPUT_PRECISION=precision, **blocks,
        )
    return out.contiguous(memory_format=out_format)   # the kernel writes NCHW


def multi_dilation_conv_backward(
    grad_output: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, dilations: list[int],
    output: torch.Tensor, combine: str, relu: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward of multi_dilation_conv.

    Args:
        grad_output: gradient of the forward's output, its shape.
        x, weight, dilations, combine, relu: the forward's arguments.
        output: the forward's result (its sign gives the ReLU mask; unused without relu).

    Returns:
        (grad_x like x, grad_weight like weight (zeros at the 8 outer taps of 1x1
        branches), grad_bias (Cout,) for "sum" / (n * Cout,) for "concat": the sum of
        the pre-activation's gradient over batch and pixels), in x's dtype.
    """
    _check_index_range("multi_dilation_conv_backward", x, weight, combine)
    x_in, weight_in = x, weight
    x = x.contiguous()
    B, Cin, H, W = x.shape
    n, Cout = weight.shape[:2]
    dtype, device = x.dtype, x.device
    acc_dtype = _acc_dtype(dtype)
    concat = combine == "concat"
    C_total = n * Cout if concat else Cout
    grad_output = grad_output.to(dtype).contiguous()
    output = output.to(dtype).contiguous() if relu else grad_output   # not read without relu
    w = _tap_major(weight.to(dtype))
    dil = _dilations(dilations, device)
    P = H * W
    if B * P == 0:
        return torch.zeros_like(x_in), torch.zeros_like(weight_in), torch.zeros(C_total, dtype=dtype, device=device)
    acc_tl, precision = _tl_acc_dtype(dtype), _input_precision(dtype)
    tiles_w = triton.cdiv(W, TILE_W)
    tiles_hw = triton.cdiv(H, TILE_H) * tiles_w
    input_blocks = _blocks("backward_input", dtype, precision)
    weight_blocks = _blocks("backward_weight", dtype, precision)
    branch_stride = Cout if concat else 0
    with _device_guard(device):
        grad_pre = torch.empty_like(grad_output)
        prep_blocks = triton.cdiv(P, PREP_BLOCK)
        part_bias = torch.empty(B * C_total * prep_blocks, dtype=acc_dtype, device=device)
        multi_dilation_conv_backward_prep_kernel[(B * C_total * prep_blocks,)](
            grad_output, output, grad_pre, part_bias, P, prep_blocks, int(relu), BLOCK=PREP_BLOCK,
        )

        grad_x = torch.empty_like(x)
        ci_blocks = triton.cdiv(Cin, input_blocks["BLOCK_CI"])
        multi_dilation_conv_backward_input_kernel[(B * tiles_hw * ci_blocks,)](
            grad_pre, w, dil, grad_x,
            B, Cin, Cout, H, W, C_total, n, branch_stride, tiles_w, tiles_hw, ci_blocks,
            ACC_DTYPE=acc_tl, INPUT_PRECISION=precision, **input_blocks,
        )

        ci_blocks = triton.cdiv(Cin, weight_blocks["BLOCK_CI"])
        co_blocks = triton.cdiv(Cout, weight_blocks["BLOCK_CO"])
        base = n * 9 * ci_blocks * co_blocks
        splits = _weight_splits(base, B * tiles_hw, device)
        part_w = torch.empty((splits, n, 3, 3, Cin, Cout), dtype=acc_dtype, device=device)
        multi_dilation_conv_backward_weight_kernel[(base * splits,)](
            x, grad_pre, dil, part_w,
            B, Cin, Cout, H, W, C_total, n, branch_stride, ci_blocks, co_blocks, splits,
            ACC_DTYPE=acc_tl, INPUT_PRECISION=precision, **weight_blocks,
        )
    # deterministic reductions of the per-program partials
    grad_weight = part_w.sum(0).permute(0, 4, 3, 1, 2).to(dtype).contiguous()
    grad_bias = part_bias.view(B, C_total, prep_blocks).sum(dim=(0, 2)).to(dtype)
    return laid_out_like(grad_x, x_in), laid_out_like(grad_weight, weight_in), grad_bias


# --------------------------------------------------------------------------
# Ahead-of-time compilation list (tests compile each for sm_80 and sm_90)

# (pointer dtype, accumulator dtype, tl.dot input precision) of every launch; float32
# takes TF32 or IEEE products depending on torch.backends.cudnn.allow_tf32.
_AOT_DTYPES = (("fp16", tl.float32, "ieee"), ("bf16", tl.float32, "ieee"), ("fp32", tl.float32, "tf32"),
               ("fp32", tl.float32, "ieee"), ("fp64", tl.float64, "ieee"))


_TORCH_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "fp64": torch.float64}


def _acc_str(acc) -> str:
    return "fp64" if acc == tl.float64 else "fp32"


def aot_kernels() -> list[tuple[str, object, dict[str, str], dict[str, object]]]:
    """Every kernel of this module in every constexpr configuration the launchers use.

    Returns:
        [(name, jit_function, signature, constexprs)], for
        triton.compile(ASTSource(fn=jit_function, signature=signature, constexprs=constexprs)).
    """
    entries = []
    conv_kernels = (
        ("forward", multi_dilation_conv_forward_kernel,
         lambda dt, acc: {"x_ptr": f"*{dt}", "w_ptr": f"*{dt}", "dil_ptr": "*i32", "bias_ptr": f"*{dt}",
                          "out_ptr": f"*{dt}"},
         ("B", "Cin", "Cout", "H", "W", "C_total", "branches_per_group", "tiles_w", "tiles_hw", "co_blocks",
          "has_bias", "relu")),
        ("backward_input", multi_dilation_conv_backward_input_kernel,
         lambda dt, acc: {"grad_pre_ptr": f"*{dt}", "w_ptr": f"*{dt}", "dil_ptr": "*i32", "grad_x_ptr": f"*{dt}"},
         ("B", "Cin", "Cout", "H", "W", "C_total", "n_branches", "branch_stride", "tiles_w", "tiles_hw",
          "ci_blocks")),
        ("backward_weight", multi_dilation_conv_backward_weight_kernel,
         lambda dt, acc: {"x_ptr": f"*{dt}", "grad_pre_ptr": f"*{dt}", "dil_ptr": "*i32",
                          "part_ptr": f"*{_acc_str(acc)}"},
         ("B", "Cin", "Cout", "H", "W", "C_total", "n_branches", "branch_stride", "ci_blocks", "co_blocks",
          "splits")),
    )
    for (kind, fn, pointers, ints), (dt, acc, precision) in itertools.product(conv_kernels, _AOT_DTYPES):
        signature = {
            **pointers(dt, acc), **{name: "i32" for name in ints},
            **{name: "constexpr" for name in ("ACC_DTYPE", "INPUT_PRECISION", "TILE_H", "TILE_W",
                                              "BLOCK_CI", "BLOCK_CO")},
        }
        constexprs = {"ACC_DTYPE": acc, "INPUT_PRECISION": precision, **_blocks(kind, _TORCH_DTYPES[dt], precision)}
        name = f"multi_dilation_conv_{kind}_{dt}_{precision}"
        entries.append((name, fn, signature, constexprs))
    for dt in ("fp16", "bf16", "fp32", "fp64"):
        acc = "fp64" if dt == "fp64" else "fp32"
        signature = {"grad_out_ptr": f"*{dt}", "out_ptr": f"*{dt}", "grad_pre_ptr": f"*{dt}",
                     "part_bias_ptr": f"*{acc}", "P": "i32", "blocks_per_plane": "i32", "relu": "i32",
                     "BLOCK": "constexpr"}
        entries.append((f"multi_dilation_conv_backward_prep_{dt}", multi_dilation_conv_backward_prep_kernel,
                        signature, {"BLOCK": PREP_BLOCK}))
    return entries

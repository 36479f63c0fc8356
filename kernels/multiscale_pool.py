"""Triton kernels of `multiscale_pool` (installed as medmtl.kernels.multiscale_pool).

The op, for each feature level x (B, C, [D,] H, W) and each output size s:
    y = act(x * scale_c + shift_c)                     (act = ReLU or identity)
    out[:, cols] = adaptive_pool(y, s).flatten(1)      (avg or max, s^2 or s^3 bins)
with the columns of all (level, size) pairs concatenated, level by level, size
by size, channel-major. The oracle is medmtl.ops.reference.multiscale_pool.

Adaptive bins follow PyTorch (see csrc/core/adaptive_bins.h): along an axis of
length L cut into S bins, bin i covers [floor(i*L/S), ceil((i+1)*L/S)); bins may
overlap by one, and repeat positions when S > L. Position p lies in the bins
floor(p*S/L) .. ceil((p+1)*S/L) - 1, at most ceil(S/L) + 1 of them.

2-D levels are run as 3-D ones with D = 1 and one bin along D.

Kernels (all grids are 1-D, so no grid axis limit of 65535 is ever hit):
- multiscale_pool_forward_kernel: per (level, size), one program per BLOCK_BINS
  (plane, bin) rows; a (BLOCK_BINS, BLOCK_K) tile walks each row's bin, flattened
  row-major, BLOCK_K elements a step, with the affine and ReLU fused; a running
  per-element state (sum, or max value + position) is reduced once at the end. In
  max mode it also writes each bin's argmax (flat position within the plane),
  which backward recomputes with the same kernel. BLOCK_K fits the largest bin, so
  small bins (pyramid pooling) share a program and big ones (global pooling) loop.
- multiscale_pool_backward_gather_kernel: per (level, size), one program per BLOCK
  input elements; adds to a float32/float64 accumulator the gradient each position
  receives from the bins containing it (avg: g / count per bin; max: g where the
  bin's argmax is this position). Each launch owns its elements and launches run
  in stream order: deterministic, no atomics.
- multiscale_pool_backward_finish_kernel: per level, one program per BLOCK
  positions of a plane; applies the ReLU mask, writes grad_x = g * scale, and one
  partial sum per program of g * x (grad_scale) and g (grad_shift), which the
  host reduces with torch.sum (deterministic).

Float16/bfloat16/float32 accumulate in float32, float64 in float64. scale/shift
None are passed as ones/zeros. relu is a runtime flag (a select per element).

Index assumption: one plane (D*H*W elements) has fewer than 2^31 elements;
plane and row offsets are computed in int64.
"""

from __future__ import annotations

import contextlib
import itertools

import torch
import triton
import triton.language as tl

from medmtl.kernels._index_limits import check_int32_span

# Forward tiles (BLOCK_BINS, BLOCK_K) of 1024 elements: BLOCK_K is the smallest of these
# that holds the largest bin (else 1024, looping), BLOCK_BINS = 1024 // BLOCK_K.
FORWARD_TILE = 1024
FORWARD_BLOCK_KS = (4, 16, 64, 256, 1024)
GATHER_BLOCK = 256
# Warps of the gather: one element per thread (8 warps), where two per thread (4 warps)
# made ptxas spill 12 B per thread around the int64 index divisions' subroutine calls
# on sm_90; float64 spills at 8 warps and not at 4 (the ahead-of-time tests check it).
GATHER_WARPS = {torch.float64: 4}
GATHER_WARPS_DEFAULT = 8
FINISH_BLOCK = 1024

# Index given to masked-off lanes of the max reduction: larger than any position.
_NO_INDEX = tl.constexpr(2**31 - 1)


# --------------------------------------------------------------------------
# Kernels


@triton.jit
def _max_pool_combine(v1, i1, v2, i2):
    """Element-wise: which of (v1, i1) and (v2, i2) PyTorch's max pool keeps.

    PyTorch scans a bin in row-major order and takes a value that is larger than
    the running max or NaN. So: any NaN beats every number and the last NaN wins;
    among numbers the larger wins, and ties keep the first (smaller) position.
    This picks the maximum of a total order, hence is associative and commutative.
    """
    nan1 = v1 != v1
    nan2 = v2 != v2
    take1 = (nan1 & (~nan2 | (i1 > i2))) | (~nan1 & ~nan2 & ((v1 > v2) | ((v1 == v2) & (i1 < i2))))
    return tl.where(take1, v1, v2), tl.where(take1, i1, i2)


@triton.jit
def _adaptive_start(bin, length, bins):
    # floor(bin * length / bins)
    return (bin * length) // bins


@triton.jit
def _adaptive_end(bin, length, bins):
    # ceil((bin + 1) * length / bins)
    return ((bin + 1) * length + bins - 1) // bins


@triton.jit
def multiscale_pool_forward_kernel(
    x_ptr,        # (B, C, D, H, W) contiguous, one level
    scale_ptr,    # (sum_i C_i,) flat per-channel scale of all levels
    shift_ptr,    # (sum_i C_i,) flat per-channel shift
    out_ptr,      # (B, out_stride): this (level, size) writes columns out_col + c * num_bins + bin
    idx_ptr,      # (B * C * num_bins,) int32 argmax positions (max mode only; else unused)
    C, D, H, W,
    S_D, S,       # bins along D (1 for 2-D levels) and along H and W
    num_bins,     # S_D * S * S
    num_rows,     # B * C * num_bins: every (plane, bin) pair
    max_count,    # most elements in one bin (loop bound)
    out_stride, out_col, channel_offset,
    relu,         # 1: ReLU after the affine, 0: none
    IS_MAX: tl.constexpr, ACC_DTYPE: tl.constexpr,
    BLOCK_BINS: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Grid (cdiv(num_rows, BLOCK_BINS),): program = BLOCK_BINS (plane, bin) rows, each
    reduced over its bin's elements BLOCK_K at a time (tile (BLOCK_BINS, BLOCK_K))."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_BINS + tl.arange(0, BLOCK_BINS)   # plane * num_bins + bin
    row_ok = rows < num_rows
    plane = rows // num_bins                            # b * C + c
    bin = rows % num_bins                               # (bd, bh, bw) row-major
    b = plane // C
    c = plane % C
    bw = bin % S
    bh = (bin // S) % S
    bd = bin // (S * S)

    d0 = _adaptive_start(bd, D, S_D)
    h0 = _adaptive_start(bh, H, S)
    w0 = _adaptive_start(bw, W, S)
    nh = _adaptive_end(bh, H, S) - h0
    nw = _adaptive_end(bw, W, S) - w0
    nhw = nh * nw
    count = (_adaptive_end(bd, D, S_D) - d0) * nhw      # elements in each row's bin, >= 1

    scale = tl.load(scale_ptr + channel_offset + c, mask=row_ok, other=1.0).to(ACC_DTYPE)
    shift = tl.load(shift_ptr + channel_offset + c, mask=row_ok, other=0.0).to(ACC_DTYPE)
    x_plane = plane.to(tl.int64) * (D * H * W)          # offset of each row's plane
    cols = tl.arange(0, BLOCK_K)

    # Running state per tile element; element (r, j) sees bin r's elements j, j + BLOCK_K, ...
    if IS_MAX:
        best = tl.full([BLOCK_BINS, BLOCK_K], float("-inf"), ACC_DTYPE)
        best_pos = tl.full([BLOCK_BINS, BLOCK_K], _NO_INDEX, tl.int32)
    else:
        total = tl.zeros([BLOCK_BINS, BLOCK_K], ACC_DTYPE)
    for k0 in range(0, max_count, BLOCK_K):
        k = k0 + cols[None, :]                          # flat index within the bin, row-major (kd, kh, kw)
        mask = row_ok[:, None] & (k < count[:, None])
        kd = k // nhw[:, None]
        khw = k % nhw[:, None]
        kh = khw // nw[:, None]
        kw = khw % nw[:, None]
        pos = ((d0[:, None] + kd) * H + h0[:, None] + kh) * W + w0[:, None] + kw   # flat position in the plane
        x = tl.load(x_ptr + x_plane[:, None] + pos, mask=mask, other=0.0).to(ACC_DTYPE)
        y = x * scale[:, None] + shift[:, None]
        y = tl.where((relu != 0) & (y < 0), 0.0, y)     # NaN passes, as in torch.relu
        if IS_MAX:
            # Row-major order in the bin is increasing pos, so pos orders PyTorch's scan.
            y = tl.where(mask, y, float("-inf"))
            pos = tl.where(mask, pos, _NO_INDEX)
            best, best_pos = _max_pool_combine(best, best_pos, y, pos)
        else:
            total += tl.where(mask, y, 0.0)

    out_offs = b.to(tl.int64) * out_stride + out_col + c * num_bins + bin
    if IS_MAX:
        # Reduce each row with _max_pool_combine's order, from plain reductions:
        # the last NaN if any, else the first position of the largest value.
        is_nan = best != best
        any_nan = tl.max(is_nan.to(tl.int32), axis=1) > 0
        nan_pos = tl.max(tl.where(is_nan, best_pos, -1), axis=1)
        numbers = tl.where(is_nan, float("-inf"), best)
        vmax = tl.max(numbers, axis=1)
        max_pos = tl.min(tl.where(numbers == vmax[:, None], best_pos, _NO_INDEX), axis=1)
        arg = tl.where(any_nan, nan_pos, max_pos)
        # the winner's value, recomputed from x (keeps NaN payloads, avoids a NaN-aware max)
        value = tl.load(x_ptr + x_plane + arg, mask=row_ok, other=0.0).to(ACC_DTYPE) * scale + shift
        value = tl.where((relu != 0) & (value < 0), 0.0, value)
        tl.store(out_ptr + out_offs, value.to(out_ptr.dtype.element_ty), mask=row_ok)
        tl.store(idx_ptr + rows, arg, mask=row_ok)
    else:
        mean = tl.sum(total, axis=1) / count
        tl.store(out_ptr + out_offs, mean.to(out_ptr.dtype.element_ty), mask=row_ok)


@triton.jit
def multiscale_pool_backward_gather_kernel(
    grad_out_ptr,  # (B, out_stride) gradient of the op's output
    idx_ptr,       # (B * C * num_bins,) int32 argmax positions (max mode only; else unused)
    acc_ptr,       # (B * C * D * H * W,) float32/float64 gradient wrt act(y), accumulated
    C, D, H, W,
    S_D, S, num_bins,
    num_elements,  # B * C * D * H * W
    out_stride, out_col,
    KD, KH, KW,    # most bins containing one position along D, H, W (loop bounds)
    IS_MAX: tl.constexpr, BLOCK: tl.constexpr,
):
    """Grid (cdiv(num_elements, BLOCK),): program = BLOCK consecutive input elements."""
    pid = tl.program_id(0)
    e = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)   # flat element index in (B, C, D, H, W)
    ok_e = e < num_elements
    hw = H * W
    plane_size = D * hw
    plane = e // plane_size                                # b * C + c
    p = (e % plane_size).to(tl.int32)                      # flat position within the plane
    b = plane // C
    c = (plane % C).to(tl.int32)
    d = p // hw
    h = (p % hw) // W
    w = p % W
    # Bins containing each position: first(p) = floor(p*S/L) .. last(p) = ceil((p+1)*S/L) - 1.
    fd = (d * S_D) // D
    fh = (h * S) // H
    fw = (w * S) // W
    ld = _adaptive_end(d, S_D, D) - 1
    lh = _adaptive_end(h, S, H) - 1
    lw = _adaptive_end(w, S, W) - 1

    grad_row = b * out_stride + out_col + c * num_bins    # offset of bin 0 of this plane's channel
    idx_plane = plane * num_bins
    acc = tl.zeros([BLOCK], acc_ptr.dtype.element_ty)
    for i in range(0, KD):
        bd = fd + i
        ok_d = ok_e & (bd <= ld)
        nd = _adaptive_end(bd, D, S_D) - _adaptive_start(bd, D, S_D)
        for j in range(0, KH):
            bh = fh + j
            ok_dh = ok_d & (bh <= lh)
            ndh = nd * (_adaptive_end(bh, H, S) - _adaptive_start(bh, H, S))
            for k in range(0, KW):
                bw = fw + k
                ok = ok_dh & (bw <= lw)
                bin = (bd * S + bh) * S + bw
                g = tl.load(grad_out_ptr + grad_row + bin, mask=ok, other=0.0).to(acc_ptr.dtype.element_ty)
                if IS_MAX:
                    arg = tl.load(idx_ptr + idx_plane + bin, mask=ok, other=-1)
                    acc += tl.where(arg == p, g, 0.0)
                else:
                    count = ndh * (_adaptive_end(bw, W, S) - _adaptive_start(bw, W, S))
                    acc += tl.where(ok, g / tl.maximum(count, 1), 0.0)
    prev = tl.load(acc_ptr + e, mask=ok_e, other=0.0)
    tl.store(acc_ptr + e, prev + acc, mask=ok_e)


@triton.jit
def multiscale_pool_backward_finish_kernel(
    x_ptr,            # (B, C, D, H, W) contiguous, one level
    scale_ptr,        # (sum_i C_i,)
    shift_ptr,        # (sum_i C_i,)
    acc_ptr,          # (B * C * D * H * W,) float32/float64 gradient wrt act(y)
    grad_x_ptr,       # (B, C, D, H, W) output, features' dtype
    part_scale_ptr,   # (B * C * blocks_per_plane,) acc dtype: partial sums of g * x
    part_shift_ptr,   # (B * C * blocks_per_plane,) acc dtype: partial sums of g
    C, P, channel_offset, blocks_per_plane,
    relu,             # 1: ReLU after the affine, 0: none
    BLOCK: tl.constexpr,
):
    """Grid (B * C * blocks_per_plane,): program = BLOCK positions of one plane of P."""
    pid = tl.program_id(0)
    plane = pid // blocks_per_plane
    blk = pid % blocks_per_plane
    c = plane % C
    acc_ty = acc_ptr.dtype.element_ty
    p = blk * BLOCK + tl.arange(0, BLOCK)
    mask = p < P
    offs = plane.to(tl.int64) * P + p
    scale = tl.load(scale_ptr + channel_offset + c).to(acc_ty)
    shift = tl.load(shift_ptr + channel_offset + c).to(acc_ty)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(acc_ty)
    g = tl.load(acc_ptr + offs, mask=mask, other=0.0)
    g = tl.where((relu == 0) | (x * scale + shift > 0), g, 0.0)   # torch.relu's backward: y > 0 only
    tl.store(grad_x_ptr + offs, (g * scale).to(grad_x_ptr.dtype.element_ty), mask=mask)
    tl.store(part_scale_ptr + pid, tl.sum(g * x, axis=0))
    tl.store(part_shift_ptr + pid, tl.sum(g, axis=0))


# --------------------------------------------------------------------------
# Host side


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tl_acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _spatial(x: torch.Tensor) -> tuple[int, int, int]:
    """(D, H, W) of a 4-D (D = 1) or 5-D level."""
    return (1, *x.shape[2:]) if x.dim() == 4 else tuple(x.shape[2:])


def _max_bin_length(length: int, bins: int) -> int:
    """Most positions one bin covers along an axis."""
    return max(((i + 1) * length + bins - 1) // bins - (i * length) // bins for i in range(bins))


def _max_bins_containing(length: int, bins: int) -> int:
    """Most bins containing one position along an axis (<= ceil(bins / length) + 1)."""
    return max(((p + 1) * bins + length - 1) // length - (p * bins) // length for p in range(length))


def _forward_blocks(bin_elements: int) -> tuple[int, int]:
    """(BLOCK_BINS, BLOCK_K) of the forward tile for bins of at most bin_elements."""
    block_k = next((k for k in FORWARD_BLOCK_KS if bin_elements <= k), FORWARD_BLOCK_KS[-1])
    return FORWARD_TILE // block_k, block_k


def _affine(param: torch.Tensor | None, fill: float, channels: int, like: torch.Tensor) -> torch.Tensor:
    if param is None:
        return torch.full((channels,), fill, dtype=like.dtype, device=like.device)
    return param.contiguous()


def _device_guard(device: torch.device):
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _check_index_range(where: str, features: list[torch.Tensor], output_sizes: list[int]) -> None:
    """The int32 index assumption (module docstring): each plane, and each level's
    (plane, bin) rows for every size, fewer than 2^31."""
    for i, x in enumerate(features):
        D, H, W = _spatial(x)
        check_int32_span(where, f"features[{i}]", D * H * W, "per plane (D*H*W)")
        for s in output_sizes:
            bins = s ** (x.dim() - 2)
            check_int32_span(where, f"features[{i}] with output_sizes {s}", x.shape[0] * x.shape[1] * bins,
                             "in pooled rows (B*C*s^d)")


def _launch_forward(x, scale, shift, out, idx, out_col, channel_offset, size, is_max, relu):
    """Pools one contiguous level x to size^d bins into out[:, out_col:out_col + C * size^d]."""
    B, C = x.shape[:2]
    D, H, W = _spatial(x)
    s_d = size if x.dim() == 5 else 1
    num_bins = s_d * size * size
    num_rows = B * C * num_bins
    max_count = _max_bin_length(D, s_d) * _max_bin_length(H, size) * _max_bin_length(W, size)
    block_bins, block_k = _forward_blocks(max_count)
    multiscale_pool_forward_kernel[(triton.cdiv(num_rows, block_bins),)](
        x, scale, shift, out, idx,
        C, D, H, W, s_d, size, num_bins, num_rows, max_count,
        out.shape[1], out_col, channel_offset, int(relu),
        IS_MAX=is_max, ACC_DTYPE=_tl_acc_dtype(x.dtype), BLOCK_BINS=block_bins, BLOCK_K=block_k,
    )


def multiscale_pool_forward(
    features: list[torch.Tensor], output_sizes: list[int], mode: str,
    scale: torch.Tensor | None, shift: torch.Tensor | None, relu: bool,
) -> torch.Tensor:
    """Forward of multiscale_pool.

    Args:
        features: tensors (B, C_i, H_i, W_i) or all (B, C_i, D_i, H_i, W_i), one dtype and device.
        output_sizes: positive ints s; each gives s^d bins per channel.
        mode: "avg" or "max".
        scale, shift: None or flat (sum_i C_i,) per-channel affine (level i at offset sum_{j<i} C_j).
        relu: apply ReLU after the affine.

    Returns:
        (B, sum_i C_i * sum_s s^d) in the features' dtype.
    """
    _check_index_range("multiscale_pool", features, output_sizes)
    features = [x.contiguous() for x in features]
    first = features[0]
    dims = first.dim() - 2
    channels = sum(x.shape[1] for x in features)
    scale = _affine(scale, 1.0, channels, first)
    shift = _affine(shift, 0.0, channels, first)
    total = channels * sum(s ** dims for s in output_sizes)
    out = torch.empty((first.shape[0], total), dtype=first.dtype, device=first.device)
    is_max = mode == "max"
    out_col = channel_offset = 0
    with _device_guard(first.device):
        for x in features:
            C = x.shape[1]
            for size in output_sizes:
                num_bins = size ** dims
                # argmax positions are written in max mode (only backward reads them)
                idx = torch.empty(x.shape[0] * C * num_bins if is_max else 1, dtype=torch.int32, device=x.device)
                _launch_forward(x, scale, shift, out, idx, out_col, channel_offset, size, is_max, relu)
                out_col += C * num_bins
            channel_offset += C
    return out


def multiscale_pool_backward(
    grad_output: torch.Tensor, features: list[torch.Tensor], output_sizes: list[int], mode: str,
    scale: torch.Tensor | None, shift: torch.Tensor | None, relu: bool,
) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Backward of multiscale_pool.

    Args:
        grad_output: (B, sum_i C_i * sum_s s^d), gradient of the forward's output.
        features, output_sizes, mode, scale, shift, relu: the forward's arguments.

    Returns:
        (grads of features, each with its level's shape; grad_scale (sum_i C_i,);
        grad_shift (sum_i C_i,)), all in the features' dtype. grad_scale and grad_shift
        are computed with scale = 1, shift = 0 when those are None.
    """
    _check_index_range("multiscale_pool_backward", features, output_sizes)
    features = [x.contiguous() for x in features]
    grad_output = grad_output.contiguous()
    first = features[0]
    dtype, device = first.dtype, first.device
    acc_dtype = _acc_dtype(dtype)
    dims = first.dim() - 2
    channels = sum(x.shape[1] for x in features)
    scale = _affine(scale, 1.0, channels, first)
    shift = _affine(shift, 0.0, channels, first)
    is_max = mode == "max"
    no_index = torch.empty(1, dtype=torch.int32, device=device)
    grads, grad_scale, grad_shift = [], [], []
    out_col = channel_offset = 0
    with _device_guard(device):
        for x in features:
            B, C = x.shape[:2]
            D, H, W = _spatial(x)
            P = D * H * W
            acc = torch.zeros(B * C * P, dtype=acc_dtype, device=device)
            for size in output_sizes:
                s_d = size if dims == 3 else 1
                num_bins = s_d * size * size
                idx = no_index
                if is_max:
                    # Recompute the argmax of every bin (the output itself is discarded).
                    idx = torch.empty(B * C * num_bins, dtype=torch.int32, device=device)
                    scratch = torch.empty((B, C * num_bins), dtype=dtype, device=device)
                    _launch_forward(x, scale, shift, scratch, idx, 0, channel_offset, size, True, relu)
                multiscale_pool_backward_gather_kernel[(triton.cdiv(B * C * P, GATHER_BLOCK),)](
                    grad_output, idx, acc,
                    C, D, H, W, s_d, size, num_bins, B * C * P,
                    grad_output.shape[1], out_col,
                    _max_bins_containing(D, s_d), _max_bins_containing(H, size), _max_bins_containing(W, size),
                    IS_MAX=is_max, BLOCK=GATHER_BLOCK,
                    num_warps=GATHER_WARPS.get(dtype, GATHER_WARPS_DEFAULT),
                )
                out_col += C * num_bins
            grad_x = torch.empty_like(x)
            finish_blocks = triton.cdiv(P, FINISH_BLOCK)
            part_scale = torch.empty(B * C * finish_blocks, dtype=acc_dtype, device=device)
            part_shift = torch.empty_like(part_scale)
            multiscale_pool_backward_finish_kernel[(B * C * finish_blocks,)](
                x, scale, shift, acc, grad_x, part_scale, part_shift,
                C, P, channel_offset, finish_blocks, int(relu),
                BLOCK=FINISH_BLOCK,
            )
            grads.append(grad_x)
            # deterministic reduction of the per-program partials over batch and blocks
            grad_scale.append(part_scale.view(B, C, finish_blocks).sum(dim=(0, 2)))
            grad_shift.append(part_shift.view(B, C, finish_blocks).sum(dim=(0, 2)))
            channel_offset += C
    return grads, torch.cat(grad_scale).to(dtype), torch.cat(grad_shift).to(dtype)


# --------------------------------------------------------------------------
# Ahead-of-time compilation list (tests compile each for sm_80 and sm_90)

_AOT_DTYPES = {"fp16": tl.float32, "bf16": tl.float32, "fp32": tl.float32, "fp64": tl.float64}
_TORCH_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "fp64": torch.float64}


def aot_kernels() -> list[tuple[str, object, dict[str, str], dict[str, object]]]:
    """Every kernel of this module in every constexpr configuration the launchers use.

    Returns:
        [(name, jit_function, signature, constexprs)], for
        triton.compile(ASTSource(fn=jit_function, signature=signature, constexprs=constexprs)).
    """
    entries = []
    for (dt, acc), is_max, block_k in itertools.product(_AOT_DTYPES.items(), (False, True), FORWARD_BLOCK_KS):
        signature = {
            "x_ptr": f"*{dt}", "scale_ptr": f"*{dt}", "shift_ptr": f"*{dt}", "out_ptr": f"*{dt}",
            "idx_ptr": "*i32",
            **{name: "i32" for name in ("C", "D", "H", "W", "S_D", "S", "num_bins", "num_rows",
                                        "max_count", "out_stride", "out_col", "channel_offset", "relu")},
            "IS_MAX": "constexpr", "ACC_DTYPE": "constexpr",
            "BLOCK_BINS": "constexpr", "BLOCK_K": "constexpr",
        }
        constexprs = {"IS_MAX": is_max, "ACC_DTYPE": acc,
                      "BLOCK_BINS": FORWARD_TILE // block_k, "BLOCK_K": block_k}
        name = f"multiscale_pool_forward_{dt}_{'max' if is_max else 'avg'}_k{block_k}"
        entries.append((name, multiscale_pool_forward_kernel, signature, constexprs))
    for (dt, acc), is_max in itertools.product(_AOT_DTYPES.items(), (False, True)):
        acc_str = "fp64" if acc == tl.float64 else "fp32"
        signature = {
            "grad_out_ptr": f"*{dt}", "idx_ptr": "*i32", "acc_ptr": f"*{acc_str}",
            **{name: "i32" for name in ("C", "D", "H", "W", "S_D", "S", "num_bins", "num_elements",
                                        "out_stride", "out_col", "KD", "KH", "KW")},
            "IS_MAX": "constexpr", "BLOCK": "constexpr",
        }
        constexprs = {"IS_MAX": is_max, "BLOCK": GATHER_BLOCK,
                      "num_warps": GATHER_WARPS.get(_TORCH_DTYPES[dt], GATHER_WARPS_DEFAULT)}
        name = f"multiscale_pool_backward_gather_{dt}_{'max' if is_max else 'avg'}"
        entries.append((name, multiscale_pool_backward_gather_kernel, signature, constexprs))
    for dt, acc in _AOT_DTYPES.items():
        acc_str = "fp64" if acc == tl.float64 else "fp32"
        signature = {
            "x_ptr": f"*{dt}", "scale_ptr": f"*{dt}", "shift_ptr": f"*{dt}", "acc_ptr": f"*{acc_str}",
            "grad_x_ptr": f"*{dt}", "part_scale_ptr": f"*{acc_str}", "part_shift_ptr": f"*{acc_str}",
            **{name: "i32" for name in ("C", "P", "channel_offset", "blocks_per_plane", "relu")},
            "BLOCK": "constexpr",
        }
        constexprs = {"BLOCK": FINISH_BLOCK}
        name = f"multiscale_pool_backward_finish_{dt}"
        entries.append((name, multiscale_pool_backward_finish_kernel, signature, constexprs))
    return entries

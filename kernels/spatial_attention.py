"""Triton kernels of `spatial_attention` (installed as medmtl.kernels.spatial_attention).

The op: x (B, C, H, W), weight (1, 2, K, K) with K odd, r = K // 2:
    pooled = cat(mean_c x, max_c x)                          (B, 2, H, W)
    s      = conv2d(pooled, weight, padding=r)               (B, 1, H, W)
    gate   = sigmoid(s)
    out    = x * gate
The max over channels is torch.max(dim=1): the first maximal channel (the first
NaN, if any) is the argmax and gets the gradient. The oracle is
medmtl.ops.reference.spatial_attention.

Kernels (all grids are 1-D; the small per-pixel maps are float32, float64 for float64):
- spatial_attention_pool_kernel: program = (b, BLOCK pixels); one pass over the
  channels keeps the running sum, max and argmax of each pixel; writes the pooled
  map (mean, max) and, for the backward, the argmax (int32).
- spatial_attention_gate_kernel: program = (b, BLOCK pixels); the KxK
  convolution of the 2-channel pooled map (zero padding by masked loads) and the
  sigmoid: gate (B, H, W).
- spatial_attention_apply_kernel: program = (plane b * C + c, BLOCK pixels):
  out = x * gate.
Backward (the pooled map, argmax and gate are recomputed with the kernels above):
- spatial_attention_backward_gate_kernel: program = (b, BLOCK pixels);
  grad_s = (sum_c grad_out * x) * gate * (1 - gate).
- spatial_attention_backward_conv_kernel: program = (b, BLOCK pixels); the
  transposed KxK convolution of grad_s gives the gradient of the pooled map at the
  program's pixels, and the correlation of grad_s at those pixels with the shifted
  pooled map gives one partial weight gradient (2 K K values) per program; the host
  sums the partials (deterministic, no atomics).
- spatial_attention_backward_input_kernel: program = (plane, BLOCK pixels):
  grad_x = grad_out * gate + grad_mean / C + (c == argmax) * grad_max.

Float16/bfloat16/float32 compute in float32, float64 in float64. K is a runtime
argument (no recompilation per kernel size).

Index assumption: one (H, W) plane and one batch item (C * H * W) have fewer than
2^31 elements; batch and plane offsets are computed in int64.
"""

from __future__ import annotations

import contextlib
import itertools

import torch
import triton
import triton.language as tl

from medmtl.kernels._index_limits import check_int32_span
from medmtl.ops._layout import laid_out_like

POOL_BLOCK = 256
GATE_BLOCK = 256
APPLY_BLOCK = 1024
CONV_BLOCK = 256


# --------------------------------------------------------------------------
# Kernels


@triton.jit
def spatial_attention_pool_kernel(
    x_ptr,        # (B, C, H, W) contiguous
    pooled_ptr,   # (B, 2, H, W) acc dtype: channel mean, channel max
    arg_ptr,      # (B, H, W) int32 argmax channel (written when store_arg)
    C, P, blocks_per_image,
    store_arg,
    BLOCK: tl.constexpr,
):
    """Grid (B * blocks_per_image,): program = BLOCK pixels of one image, all channels."""
    pid = tl.program_id(0)
    b = pid // blocks_per_image
    p = (pid % blocks_per_image) * BLOCK + tl.arange(0, BLOCK)
    mask = p < P
    x_image = x_ptr + b.to(tl.int64) * C * P
    acc_ty = pooled_ptr.dtype.element_ty
    best = tl.load(x_image + p, mask=mask, other=0.0).to(acc_ty)
    total = best
    arg = tl.zeros([BLOCK], tl.int32)
    for c in range(1, C):
        v = tl.load(x_image + c * P + p, mask=mask, other=0.0).to(acc_ty)
        total += v
        # torch.max: a larger value wins, ties keep the first channel, the first NaN wins for good
        take = (v > best) | ((v != v) & (best == best))
        best = tl.where(take, v, best)
        arg = tl.where(take, c, arg)
    out = pooled_ptr + b.to(tl.int64) * 2 * P + p
    tl.store(out, total / C, mask=mask)
    tl.store(out + P, best, mask=mask)
    tl.store(arg_ptr + b.to(tl.int64) * P + p, arg, mask=mask & (store_arg != 0))


@triton.jit
def spatial_attention_gate_kernel(
    pooled_ptr,   # (B, 2, H, W) acc dtype
    w_ptr,        # (1, 2, K, K) contiguous, x's dtype
    gate_ptr,     # (B, H, W) acc dtype
    H, W, K, blocks_per_image,
    BLOCK: tl.constexpr,
):
    """Grid (B * blocks_per_image,): program = BLOCK pixels of one image."""
    pid = tl.program_id(0)
    b = pid // blocks_per_image
    P = H * W
    p = (pid % blocks_per_image) * BLOCK + tl.arange(0, BLOCK)
    mask = p < P
    h = p // W
    w = p % W
    r = K // 2
    acc_ty = gate_ptr.dtype.element_ty
    pooled = pooled_ptr + b.to(tl.int64) * 2 * P
    s = tl.zeros([BLOCK], acc_ty)
    for ch in range(2):
        for kh in range(K):
            hs = h + kh - r
            row_ok = mask & (hs >= 0) & (hs < H)
            for kw in range(K):
                ws = w + kw - r
                ok = row_ok & (ws >= 0) & (ws < W)
                v = tl.load(pooled + ch * P + hs * W + ws, mask=ok, other=0.0)
                s += v * tl.load(w_ptr + (ch * K + kh) * K + kw).to(acc_ty)
    gate = 1.0 / (1.0 + tl.exp(-s))
    tl.store(gate_ptr + b.to(tl.int64) * P + p, gate, mask=mask)


@triton.jit
def spatial_attention_apply_kernel(
    x_ptr,        # (B, C, H, W) contiguous
    gate_ptr,     # (B, H, W) acc dtype
    out_ptr,      # (B, C, H, W)
    C, P, blocks_per_plane,
    BLOCK: tl.constexpr,
):
    """Grid (B * C * blocks_per_plane,): program = BLOCK pixels of one (b, c) plane."""
    pid = tl.program_id(0)
    plane = pid // blocks_per_plane
    p = (pid % blocks_per_plane) * BLOCK + tl.arange(0, BLOCK)
    mask = p < P
    offs = plane.to(tl.int64) * P + p
    gate = tl.load(gate_ptr + (plane // C).to(tl.int64) * P + p, mask=mask, other=0.0)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(gate.dtype)
    tl.store(out_ptr + offs, (x * gate).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def spatial_attention_backward_gate_kernel(
    grad_out_ptr,  # (B, C, H, W) contiguous
    x_ptr,         # (B, C, H, W) contiguous
    gate_ptr,      # (B, H, W) acc dtype
    grad_s_ptr,    # (B, H, W) acc dtype: gradient of the gate's pre-activation
    C, P, blocks_per_image,
    BLOCK: tl.constexpr,
):
    """Grid (B * blocks_per_image,): program = BLOCK pixels of one image, all channels."""
    pid = tl.program_id(0)
    b = pid // blocks_per_image
    p = (pid % blocks_per_image) * BLOCK + tl.arange(0, BLOCK)
    mask = p < P
    acc_ty = grad_s_ptr.dtype.element_ty
    image = b.to(tl.int64) * C * P
    grad_gate = tl.zeros([BLOCK], acc_ty)
    for c in range(C):
        g = tl.load(grad_out_ptr + image + c * P + p, mask=mask, other=0.0).to(acc_ty)
        x = tl.load(x_ptr + image + c * P + p, mask=mask, other=0.0).to(acc_ty)
        grad_gate += g * x
    offs = b.to(tl.int64) * P + p
    gate = tl.load(gate_ptr + offs, mask=mask, other=0.0)
    tl.store(grad_s_ptr + offs, grad_gate * gate * (1.0 - gate), mask=mask)


@triton.jit
def spatial_attention_backward_conv_kernel(
    grad_s_ptr,       # (B, H, W) acc dtype
    pooled_ptr,       # (B, 2, H, W) acc dtype
    w_ptr,            # (1, 2, K, K) contiguous, x's dtype
    grad_pooled_ptr,  # (B, 2, H, W) acc dtype
    part_w_ptr,       # (B * blocks_per_image, 2 * K * K) acc dtype: partial weight gradients
    H, W, K, blocks_per_image,
    BLOCK: tl.constexpr,
):
    """Grid (B * blocks_per_image,): program = BLOCK pixels of one image.

    Forward: s[q] = sum_{ch, kh, kw} pooled[ch, q + (kh - r, kw - r)] w[ch, kh, kw]. So
    grad_pooled[ch, p] = sum grad_s[p - (kh - r, kw - r)] w[ch, kh, kw] (the transposed
    convolution) and grad_w[ch, kh, kw] = sum_q grad_s[q] pooled[ch, q + (kh - r, kw - r)]."""
    pid = tl.program_id(0)
    b = pid // blocks_per_image
    P = H * W
    p = (pid % blocks_per_image) * BLOCK + tl.arange(0, BLOCK)
    mask = p < P
    h = p // W
    w = p % W
    r = K // 2
    acc_ty = grad_s_ptr.dtype.element_ty
    grad_s = grad_s_ptr + b.to(tl.int64) * P
    pooled = pooled_ptr + b.to(tl.int64) * 2 * P
    g_here = tl.load(grad_s + p, mask=mask, other=0.0)
    part = part_w_ptr + pid.to(tl.int64) * 2 * K * K
    grad_mean = tl.zeros([BLOCK], acc_ty)
    grad_max = tl.zeros([BLOCK], acc_ty)
    for kh in range(K):
        dh = kh - r
        for kw in range(K):
            dw = kw - r
            w_mean = tl.load(w_ptr + kh * K + kw).to(acc_ty)
            w_max = tl.load(w_ptr + (K + kh) * K + kw).to(acc_ty)
            # transposed convolution: grad_s at p - (dh, dw)
            hs = h - dh
            ws = w - dw
            ok = mask & (hs >= 0) & (hs < H) & (ws >= 0) & (ws < W)
            g = tl.load(grad_s + hs * W + ws, mask=ok, other=0.0)
            grad_mean += g * w_mean
            grad_max += g * w_max
            # correlation: grad_s at p with pooled at p + (dh, dw)
            hs = h + dh
            ws = w + dw
            ok = mask & (hs >= 0) & (hs < H) & (ws >= 0) & (ws < W)
            v_mean = tl.load(pooled + hs * W + ws, mask=ok, other=0.0)
            v_max = tl.load(pooled + P + hs * W + ws, mask=ok, other=0.0)
            tl.store(part + kh * K + kw, tl.sum(g_here * v_mean, axis=0))
            tl.store(part + (K + kh) * K + kw, tl.sum(g_here * v_max, axis=0))
    out = grad_pooled_ptr + b.to(tl.int64) * 2 * P + p
    tl.store(out, grad_mean, mask=mask)
    tl.store(out + P, grad_max, mask=mask)


@triton.jit
def spatial_attention_backward_input_kernel(
    grad_out_ptr,     # (B, C, H, W) contiguous
    gate_ptr,         # (B, H, W) acc dtype
    grad_pooled_ptr,  # (B, 2, H, W) acc dtype
    arg_ptr,          # (B, H, W) int32 argmax channel
    grad_x_ptr,       # (B, C, H, W)
    C, P, blocks_per_plane,
    BLOCK: tl.constexpr,
):
    """Grid (B * C * blocks_per_plane,): program = BLOCK pixels of one (b, c) plane."""
    pid = tl.program_id(0)
    plane = pid // blocks_per_plane
    b = (plane // C).to(tl.int64)
    c = plane % C
    p = (pid % blocks_per_plane) * BLOCK + tl.arange(0, BLOCK)
    mask = p < P
    offs = plane.to(tl.int64) * P + p
    gate = tl.load(gate_ptr + b * P + p, mask=mask, other=0.0)
    g = tl.load(grad_out_ptr + offs, mask=mask, other=0.0).to(gate.dtype)
    grad_mean = tl.load(grad_pooled_ptr + b * 2 * P + p, mask=mask, other=0.0)
    grad_max = tl.load(grad_pooled_ptr + b * 2 * P + P + p, mask=mask, other=0.0)
    arg = tl.load(arg_ptr + b * P + p, mask=mask, other=-1)
    grad = g * gate + grad_mean / C + tl.where(arg == c, grad_max, 0.0)
    tl.store(grad_x_ptr + offs, grad.to(grad_x_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------
# Host side


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _device_guard(device: torch.device):
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _check_index_range(where: str, x: torch.Tensor) -> None:
    """The int32 index assumption (module docstring): one batch item (C*H*W) fewer than 2^31."""
    check_int32_span(where, "x", x.shape[1:].numel())


def _pool_and_gate(x: torch.Tensor, weight: torch.Tensor, store_arg: bool):
    """pooled (B, 2, H, W), argmax (B, H, W) int32 (unwritten unless store_arg), gate (B, H, W);
    x contiguous, the maps in the accumulation dtype."""
    B, C, H, W = x.shape
    P = H * W
    acc_dtype = _acc_dtype(x.dtype)
    pooled = torch.empty((B, 2, H, W), dtype=acc_dtype, device=x.device)
    arg = torch.empty((B, H, W) if store_arg else (1,), dtype=torch.int32, device=x.device)
    gate = torch.empty((B, H, W), dtype=acc_dtype, device=x.device)
    pool_blocks = triton.cdiv(P, POOL_BLOCK)
    spatial_attention_pool_kernel[(B * pool_blocks,)](
        x, pooled, arg, C, P, pool_blocks, int(store_arg), BLOCK=POOL_BLOCK,
    )
    gate_blocks = triton.cdiv(P, GATE_BLOCK)
    spatial_attention_gate_kernel[(B * gate_blocks,)](
        pooled, weight, gate, H, W, weight.shape[-1], gate_blocks, BLOCK=GATE_BLOCK,
    )
    return pooled, arg, gate


def spatial_attention_forward(x: torch.Tensor, weight: torch.Tensor, contiguous_output: bool = False) -> torch.Tensor:
    """Forward of spatial_attention.

    Args:
        x: (B, C, H, W).
        weight: (1, 2, K, K), K odd, x's dtype and device.
        contiguous_output: return the result NCHW-contiguous (else laid out as x).

    Returns:
        x * sigmoid(conv2d(cat(mean_c x, max_c x), weight, padding=K // 2)), (B, C, H, W), x's dtype.
    """
    _check_index_range("spatial_attention", x)
    x_in, x = x, x.contiguous()
    weight = weight.to(x.dtype).contiguous()
    B, C, H, W = x.shape
    P = H * W
    out = torch.empty_like(x)
    if x.numel() == 0:
        return out if contiguous_output else torch.empty_like(x_in)
    with _device_guard(x.device):
        _, _, gate = _pool_and_gate(x, weight, store_arg=False)
        apply_blocks = triton.cdiv(P, APPLY_BLOCK)
        spatial_attention_apply_kernel[(B * C * apply_blocks,)](
            x, gate, out, C, P, apply_blocks, BLOCK=APPLY_BLOCK,
        )
    return out if contiguous_output else laid_out_like(out, x_in)   # the kernels write NCHW


def spatial_attention_backward(
    grad_output: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Backward of spatial_attention.

    Args:
        grad_output: (B, C, H, W), gradient of the forward's output.
        x, weight: the forward's arguments.

    Returns:
        (grad_x like x, grad_weight (1, 2, K, K)), in x's dtype.
    """
    _check_index_range("spatial_attention_backward", x)
    x_in, weight_in, x = x, weight, x.contiguous()
    dtype = x.dtype
    weight = weight.to(dtype).contiguous()
    grad_output = grad_output.to(dtype).contiguous()
    B, C, H, W = x.shape
    K = weight.shape[-1]
    P = H * W
    if x.numel() == 0:
        return torch.zeros_like(x_in), torch.zeros_like(weight_in)
    acc_dtype = _acc_dtype(dtype)
    with _device_guard(x.device):
        pooled, arg, gate = _pool_and_gate(x, weight, store_arg=True)
        image_blocks = triton.cdiv(P, POOL_BLOCK)
        grad_s = torch.empty((B, H, W), dtype=acc_dtype, device=x.device)
        spatial_attention_backward_gate_kernel[(B * image_blocks,)](
            grad_output, x, gate, grad_s, C, P, image_blocks, BLOCK=POOL_BLOCK,
        )
        conv_blocks = triton.cdiv(P, CONV_BLOCK)
        grad_pooled = torch.empty((B, 2, H, W), dtype=acc_dtype, device=x.device)
        part_w = torch.empty((B * conv_blocks, 2 * K * K), dtype=acc_dtype, device=x.device)
        spatial_attention_backward_conv_kernel[(B * conv_blocks,)](
            grad_s, pooled, weight, grad_pooled, part_w, H, W, K, conv_blocks, BLOCK=CONV_BLOCK,
        )
        grad_x = torch.empty_like(x)
        apply_blocks = triton.cdiv(P, APPLY_BLOCK)
        spatial_attention_backward_input_kernel[(B * C * apply_blocks,)](
            grad_output, gate, grad_pooled, arg, grad_x, C, P, apply_blocks, BLOCK=APPLY_BLOCK,
        )
    # deterministic reduction of the per-program partials
    grad_weight = part_w.sum(0).view(1, 2, K, K).to(dtype)
    return laid_out_like(grad_x, x_in), laid_out_like(grad_weight, weight_in)


# --------------------------------------------------------------------------
# Ahead-of-time compilation list (tests compile each for sm_80 and sm_90)

_AOT_DTYPES = {"fp16": "fp32", "bf16": "fp32", "fp32": "fp32", "fp64": "fp64"}   # x dtype -> map dtype


def aot_kernels() -> list[tuple[str, object, dict[str, str], dict[str, object]]]:
    """Every kernel of this module in every constexpr configuration the launchers use.

    Returns:
        [(name, jit_function, signature, constexprs)], for
        triton.compile(ASTSource(fn=jit_function, signature=signature, constexprs=constexprs)).
    """
    kernels = (
        ("pool", spatial_attention_pool_kernel,
         lambda dt, acc: {"x_ptr": f"*{dt}", "pooled_ptr": f"*{acc}", "arg_ptr": "*i32"},
         ("C", "P", "blocks_per_image", "store_arg"), POOL_BLOCK),
        ("gate", spatial_attention_gate_kernel,
         lambda dt, acc: {"pooled_ptr": f"*{acc}", "w_ptr": f"*{dt}", "gate_ptr": f"*{acc}"},
         ("H", "W", "K", "blocks_per_image"), GATE_BLOCK),
        ("apply", spatial_attention_apply_kernel,
         lambda dt, acc: {"x_ptr": f"*{dt}", "gate_ptr": f"*{acc}", "out_ptr": f"*{dt}"},
         ("C", "P", "blocks_per_plane"), APPLY_BLOCK),
        ("backward_gate", spatial_attention_backward_gate_kernel,
         lambda dt, acc: {"grad_out_ptr": f"*{dt}", "x_ptr": f"*{dt}", "gate_ptr": f"*{acc}",
                          "grad_s_ptr": f"*{acc}"},
         ("C", "P", "blocks_per_image"), POOL_BLOCK),
        ("backward_conv", spatial_attention_backward_conv_kernel,
         lambda dt, acc: {"grad_s_ptr": f"*{acc}", "pooled_ptr": f"*{acc}", "w_ptr": f"*{dt}",
                          "grad_pooled_ptr": f"*{acc}", "part_w_ptr": f"*{acc}"},
         ("H", "W", "K", "blocks_per_image"), CONV_BLOCK),
        ("backward_input", spatial_attention_backward_input_kernel,
         lambda dt, acc: {"grad_out_ptr": f"*{dt}", "gate_ptr": f"*{acc}", "grad_pooled_ptr": f"*{acc}",
                          "arg_ptr": "*i32", "grad_x_ptr": f"*{dt}"},
         ("C", "P", "blocks_per_plane"), APPLY_BLOCK),
    )
    entries = []
    for (kind, fn, pointers, ints, block), (dt, acc) in itertools.product(kernels, _AOT_DTYPES.items()):
        signature = {**pointers(dt, acc), **{name: "i32" for name in ints}, "BLOCK": "constexpr"}
        entries.append((f"spatial_attention_{kind}_{dt}", fn, signature, {"BLOCK": block}))
    return entries

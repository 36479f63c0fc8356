"""Shifted-window multi-head attention (Swin), fused.

`window_attention` takes token maps q, k, v (B, *S, heads, head_dim), S = (H, W)
or (D, H, W), and computes what Swin's pad / roll / window partition /
softmax(q k^T + bias + mask) v / reverse / roll back / crop computes, with the
padding, shift, partition, bias gather and region mask done by index
arithmetic inside the kernels: no partitioned copies and no
(windows x heads x N x N) score tensor. The backward recomputes the scores
from q, k and the saved log-sum-exp of every query (flash-attention style).

Geometry, as MONAI and timm define it: where a dim's size is at most its
window, that dim uses the map size as window and no shift; the bias is always
read at the true relative offsets from the configured window's table.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from medmtl._extension import extension_loaded
from medmtl.ops import reference
from medmtl.ops._registration import check_like, check_tensor
from medmtl.ops.backends import register_op, resolve_backend

OP_NAME = "window_attention"

register_op(OP_NAME, ("reference", "cpu", "cuda", "triton"))


def window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window_size: int | Sequence[int],
    shift_size: int | Sequence[int],
    rel_pos_bias_table: torch.Tensor,
    scale: float | None = None,
    pad_key: torch.Tensor | None = None,
    pad_value: torch.Tensor | None = None,
) -> torch.Tensor:
    """Swin window attention of q, k, v (B, *S, heads, head_dim) -> (B, *S, heads, head_dim).

    window_size, shift_size: an int or one int per spatial dim, 0 <= shift < window.
    rel_pos_bias_table: (prod(2 * window - 1), heads), as in timm and MONAI.
    scale: multiplies q k^T; head_dim ** -0.5 when None.
    pad_key, pad_value: (heads, head_dim), the key and value of the tokens
    padded onto maps the window does not divide (zero when None; Swin pads its
    input before the qkv projection, so there they are the qkv bias's key and
    value parts).
    Any strides are accepted; the output is contiguous.
    """
    window, shift = _check_inputs(q, k, v, window_size, shift_size, rel_pos_bias_table, scale, pad_key, pad_value)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    chosen = resolve_backend(OP_NAME, q.device)
    if chosen == "reference":
        return reference.window_attention(q, k, v, window, shift, rel_pos_bias_table, scale, pad_key, pad_value)
    heads, head_dim = q.shape[-2:]
    if pad_key is None:
        pad_key = q.new_zeros(heads, head_dim)
    if pad_value is None:
        pad_value = q.new_zeros(heads, head_dim)
    op = torch.ops.medmtl.window_attention_triton if chosen == "triton" else torch.ops.medmtl.window_attention
    out, _ = op(q, k, v, window, shift, rel_pos_bias_table, pad_key, pad_value, float(scale))
    return out


def _per_dim(name: str, value: object, nd: int) -> list[int]:
    if isinstance(value, bool):
        raise TypeError(f"{OP_NAME}: {name} must be an int or {nd} ints, got {value!r}")
    if isinstance(value, int):
        return [value] * nd
    if not isinstance(value, Sequence) or not all([isinstance(x, int) and not isinstance(x, bool) for x in value]):
        raise TypeError(f"{OP_NAME}: {name} must be an int or a sequence of {nd} ints, got {value!r}")
    if len(value) != nd:
        raise ValueError(f"{OP_NAME}: {name} must have {nd} entries (one per spatial dim), got {len(value)}: "
                         f"{tuple(value)}")
    return list(value)


# List comprehensions, not generators, in the checks: torch.compile traces them.
def _check_inputs(q, k, v, window_size, shift_size, table, scale, pad_key, pad_value) -> tuple[list[int], list[int]]:
    op = OP_NAME
    check_tensor(op, "q", q)
    if q.dim() not in (5, 6):
        raise ValueError(f"{op}: q must be (B, H, W, heads, head_dim) or (B, D, H, W, heads, head_dim), "
                         f"got {q.dim()}-D of shape {tuple(q.shape)}")
    for name, t in (("k", k), ("v", v)):
        check_tensor(op, name, t)
        if t.shape != q.shape:
            raise ValueError(f"{op}: {name} must have the shape of q {tuple(q.shape)}, got {tuple(t.shape)}")
        check_like(op, name, t, q, "q")
    if any([s == 0 for s in q.shape[1:]]):
        raise ValueError(f"{op}: q must have non-empty spatial, head and head_dim dims, got {tuple(q.shape)}")
    nd = q.dim() - 3
    window = _per_dim("window_size", window_size, nd)
    shift = _per_dim("shift_size", shift_size, nd)
    if any([w < 1 for w in window]):
        raise ValueError(f"{op}: window_size entries must be >= 1, got {tuple(window)}")
    if any([not 0 <= s < w for s, w in zip(shift, window)]):
        raise ValueError(f"{op}: shift_size entries must be in [0, window_size), got shift {tuple(shift)} "
                         f"for window {tuple(window)}")
    heads, head_dim = q.shape[-2:]
    rows = math.prod([2 * w - 1 for w in window])
    check_tensor(op, "rel_pos_bias_table", table, 2)
    if tuple(table.shape) != (rows, heads):
        raise ValueError(f"{op}: rel_pos_bias_table must have shape ({rows}, {heads}) = (prod(2 * window - 1), "
                         f"heads), got {tuple(table.shape)}")
    check_like(op, "rel_pos_bias_table", table, q, "q")
    for name, t in (("pad_key", pad_key), ("pad_value", pad_value)):
        if t is None:
            continue
        check_tensor(op, name, t, 2)
        if tuple(t.shape) != (heads, head_dim):
            raise ValueError(f"{op}: {name} must have shape ({heads}, {head_dim}) = (heads, head_dim), "
                             f"got {tuple(t.shape)}")
        check_like(op, name, t, q, "q")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                              or not math.isfinite(scale)):
        raise ValueError(f"{op}: scale must be a finite number or None, got {scale!r}")
    return window, shift


def _lse_dtype(q: torch.Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _fake_forward(q, k, v, window_size, shift_size, table, pad_key, pad_value, scale):
    return q.new_empty(q.shape), q.new_empty(q.shape[:-1], dtype=_lse_dtype(q))


def _fake_backward(grad_out, q, k, v, out, lse, window_size, shift_size, table, pad_key, pad_value, scale):
    return (q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape), table.new_empty(table.shape),
            pad_key.new_empty(pad_key.shape), pad_value.new_empty(pad_value.shape))


def _setup_context(ctx, inputs, output):
    q, k, v, window_size, shift_size, table, pad_key, pad_value, scale = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, table, pad_key, pad_value, out, lse)
    ctx.geometry = (window_size, shift_size, scale)


def _make_backward(backward_op):
    def backward(ctx, grad_out, grad_lse):
        q, k, v, table, pad_key, pad_value, out, lse = ctx.saved_tensors
        window_size, shift_size, scale = ctx.geometry
        gq, gk, gv, gtable, gpk, gpv = backward_op(grad_out.contiguous(), q, k, v, out, lse, window_size,
                                                   shift_size, table, pad_key, pad_value, scale)
        return gq, gk, gv, None, None, gtable, gpk, gpv, None

    return backward


if extension_loaded() and hasattr(torch.ops.medmtl, "window_attention"):
    torch.library.register_fake("medmtl::window_attention")(_fake_forward)
    torch.library.register_fake("medmtl::window_attention_backward")(_fake_backward)
    torch.library.register_autograd("medmtl::window_attention",
                                    _make_backward(torch.ops.medmtl.window_attention_backward),
                                    setup_context=_setup_context)


@torch.library.custom_op("medmtl::window_attention_triton", mutates_args=())
def _window_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window_size: list[int],
                             shift_size: list[int], rel_pos_bias_table: torch.Tensor, pad_key: torch.Tensor,
                             pad_value: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    from medmtl.kernels import window_attention as kernels

    return kernels.window_attention_forward(q, k, v, window_size, shift_size, rel_pos_bias_table, pad_key,
                                            pad_value, scale)


@torch.library.custom_op("medmtl::window_attention_triton_backward", mutates_args=())
def _window_attention_triton_backward(
        grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
        lse: torch.Tensor, window_size: list[int], shift_size: list[int], rel_pos_bias_table: torch.Tensor,
        pad_key: torch.Tensor, pad_value: torch.Tensor,
        scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from medmtl.kernels import window_attention as kernels

    return kernels.window_attention_backward(grad_out, q, k, v, out, lse, window_size, shift_size,
                                             rel_pos_bias_table, pad_key, pad_value, scale)


_window_attention_triton.register_fake(_fake_forward)
_window_attention_triton_backward.register_fake(_fake_backward)
_window_attention_triton.register_autograd(
    _make_backward(torch.ops.medmtl.window_attention_triton_backward), setup_context=_setup_context)

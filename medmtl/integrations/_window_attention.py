"""The fused window attention shared by the timm and torchvision converters,
and the checks of a Swin attention's relative position index."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from medmtl.layers.window_attention import relative_position_index
from medmtl.ops.window_attention import window_attention


def attend(tokens: torch.Tensor, qkv: nn.Linear, heads: int, window: Sequence[int], shift: Sequence[int],
           table: torch.Tensor, scale: float) -> torch.Tensor:
    """Swin window attention of tokens (B, *S, C) before the output projection.

    qkv projection (C -> 3 * heads * head_dim), then medmtl's window_attention
    (padding to a multiple of the window, with padded tokens' key and value
    the qkv bias's parts, as Swin pads zeros before the projection; cyclic
    shift; region mask; bias from table (prod(2 * window - 1), heads)).
    Returns (B, *S, heads * head_dim).
    """
    q, k, v = qkv(tokens).unflatten(-1, (3, heads, -1)).unbind(-3)  # (B, *S, heads, head_dim) each
    pad_key = pad_value = None
    if qkv.bias is not None:
        _, pad_key, pad_value = qkv.bias.to(q.dtype).view(3, heads, -1).unbind(0)
    out = window_attention(q, k, v, list(window), list(shift), table.to(q.dtype), scale, pad_key, pad_value)
    return out.flatten(-2)


def index_reason(index: torch.Tensor, window: Sequence[int]) -> str | None:
    """None when index (N, N) or its flattening is the standard relative position
    index of window (the one the op reads by offsets), else why not."""
    expected = relative_position_index(window)
    if index.numel() != expected.numel() or not torch.equal(index.detach().cpu().reshape(expected.shape), expected):
        return (f"its relative_position_index is not the standard index of window {tuple(window)}: the bias "
                f"would not be read as the op reads it")
    return None


def table_reason(table: torch.Tensor, window: Sequence[int], heads: int) -> str | None:
    rows = math.prod(2 * w - 1 for w in window)
    if tuple(table.shape) != (rows, heads):
        return f"relative_position_bias_table has shape {tuple(table.shape)}, expected ({rows}, {heads})"
    return None


def window_reason(window: Sequence[int], shift: Sequence[int], nd: int) -> str | None:
    if len(window) != nd or len(shift) != nd or not all(isinstance(w, int) and w >= 1 for w in window) \
            or not all(isinstance(s, int) and 0 <= s < w for s, w in zip(shift, window)):
        return f"window {tuple(window)} / shift {tuple(shift)} are not {nd} ints with 0 <= shift < window"
    return None

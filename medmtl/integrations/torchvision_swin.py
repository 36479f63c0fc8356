"""torchvision swin_t / swin_s / swin_b: each ShiftedWindowAttention (v1) on
medmtl's fused window_attention op.

torchvision pads the map to a multiple of the window first and then shifts
(as the op does), and drops the shift of a dim whose padded size is at most
the window (so does the op); but it never shrinks the window to a smaller
map: it pads the map up to the window, padded tokens included. The converted
module pads such dims up to the window itself (zeros before the qkv
projection, as torchvision does) and crops afterwards.
ShiftedWindowAttentionV2 (cosine attention, log-spaced bias MLP) is not
converted.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import swin_transformer as tv_swin

from medmtl.integrations._window_attention import attend, index_reason, table_reason, window_reason


class FusedShiftedWindowAttention(tv_swin.ShiftedWindowAttention):
    """torchvision's ShiftedWindowAttention, x (B, H, W, C) -> (B, H, W, C), on
    medmtl's fused window attention."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, height, width, channels = x.shape
        pad_h, pad_w = (max(0, w - n) for n, w in zip((height, width), self.window_size))
        if pad_h or pad_w:
            x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
        out = attend(x, self.qkv, self.num_heads, self.window_size, self.shift_size,
                     self.relative_position_bias_table, (channels // self.num_heads) ** -0.5)
        if pad_h or pad_w:
            out = out[:, :height, :width]
        out = F.linear(out, self.proj.weight, self.proj.bias)
        return F.dropout(out, p=self.dropout, training=self.training)


def candidate(module: nn.Module) -> bool:
    return isinstance(module, tv_swin.ShiftedWindowAttention)


def converted(module: nn.Module) -> bool:
    return isinstance(module, FusedShiftedWindowAttention)


def check(module: nn.Module, path: str, modules: dict[str, nn.Module]) -> str | None:
    if isinstance(module, tv_swin.ShiftedWindowAttentionV2):
        return "Swin v2 attention (cosine similarity with a learned logit scale, continuous bias MLP)"
    if type(module) is not tv_swin.ShiftedWindowAttention:
        return f"a subclass of ShiftedWindowAttention ({type(module).__qualname__}): its forward may differ"
    for name in ("window_size", "shift_size", "num_heads", "attention_dropout", "dropout", "qkv", "proj",
                 "relative_position_bias_table", "relative_position_index"):
        if not hasattr(module, name):
            return f"it has no {name}: not the torchvision module the converter was written for"
    window, shift = list(module.window_size), list(module.shift_size)
    reason = window_reason(window, shift, 2)
    if reason:
        return reason
    if module.attention_dropout > 0:
        return f"attention dropout p={module.attention_dropout}: the fused kernels have no dropout on the probabilities"
    heads, qkv = module.num_heads, module.qkv
    if not isinstance(qkv, nn.Linear) or qkv.out_features != 3 * qkv.in_features or qkv.in_features % heads:
        return f"qkv is not a Linear(C, 3 C) with C a multiple of the {heads} heads"
    return table_reason(module.relative_position_bias_table, window, heads) or \
        index_reason(module.relative_position_index, window)


def probe_inputs(module: nn.Module) -> list[tuple]:
    """Maps 2 over the window (padded, shifted) and 2 under it (padded up to it)."""
    g = torch.Generator().manual_seed(0)
    dim = module.qkv.in_features
    return [(torch.randn(1, *[max(1, w + d) for w in module.window_size], dim, generator=g,
                         dtype=torch.float64),) for d in (2, -2)]


def convert(module: nn.Module) -> None:
    module.__class__ = FusedShiftedWindowAttention


def probe_key(module: nn.Module) -> tuple:
    return tuple(module.window_size), tuple(module.shift_size), module.qkv.bias is not None

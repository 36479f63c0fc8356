"""timm SwinTransformer (v1): each SwinTransformerBlock's window attention on
medmtl's fused window_attention op.

timm shifts its normed map first and pads it after (the original Swin and
MONAI pad first), and with always_partition it keeps a full window and its
shift even on maps no larger than the window. The fused op pads first, and
where a dim is at most the window it takes the map size as window and no
shift. The converted block reproduces timm's order exactly by placing the
tokens (one gather per dim that needs it) where timm's padded, shifted map
has them, on a map that is already a multiple of the window:

    M = roll(pad(roll(x, -s)), +s)   so that   roll(M, -s) = pad(roll(x, -s)),

which is what timm partitions; the op then pads nothing, and its output is
gathered back from the same positions. Where a dim has a shift and is at most
the window (timm rolls inside its single window; the op would not shift),
the block runs timm's own attention.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.models import swin_transformer as timm_swin
from torch import nn

from medmtl.integrations._window_attention import attend, index_reason, table_reason, window_reason


class FusedSwinTransformerBlock(timm_swin.SwinTransformerBlock):
    """timm's SwinTransformerBlock (x (B, H, W, C)) whose window attention runs
    on medmtl's fused op (timm's own where the op cannot shift as timm does)."""

    def _attn(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, H, W, C), normed -> (B, H, W, C), the window attention."""
        sizes = tuple(x.shape[1:3])
        window, shift = tuple(self.window_size), tuple(self.shift_size)
        static_mask = not getattr(self, "dynamic_mask", False) and any(shift)
        if any(s > 0 and n <= w for n, w, s in zip(sizes, window, shift)) or \
                (static_mask and sizes != tuple(self.input_resolution)):
            return super()._attn(x)  # the op cannot roll inside one window; a static mask of another size
        placed, back = x, []
        for dim, (n, w, s) in enumerate(zip(sizes, window, shift), start=1):
            # The op pads a dim itself (pad first = shift first when nothing is
            # shifted, or when nothing is padded), except below the window.
            if (s == 0 and n >= w) or n % w == 0:
                back.append(None)
                continue
            source, target = _placement(n, w, s, x.device)
            # One zero token at the end of the dim stands for every padded position.
            zero = [0, 0] * (x.dim() - 1 - dim) + [0, 1]
            placed = F.pad(placed, zero).index_select(dim, source)
            back.append(target)
        attn = self.attn
        out = attend(placed, attn.qkv, attn.num_heads, window, shift, attn.relative_position_bias_table, attn.scale)
        for dim, target in enumerate(back, start=1):
            if target is not None:
                out = out.index_select(dim, target)
        return attn.proj_drop(attn.proj(out))


def _placement(n: int, w: int, s: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(source, target) for one dim of size n, window w, shift s.

    source (P,), P = n rounded up to w: the position in x (n: the zero token)
    of each position i of the placed map M = roll(pad(roll(x, -s)), +s);
    target (n,): where x's position t sits in M, to gather the output back.
    """
    padded = math.ceil(n / w) * w
    j = (torch.arange(padded, device=device) - s) % padded  # M's i is the rolled-then-padded map's j
    source = torch.where(j < n, (j + s) % n, torch.full_like(j, n))
    target = ((torch.arange(n, device=device) - s) % n + s) % padded
    return source, target


def candidate(module: nn.Module) -> bool:
    return isinstance(module, timm_swin.SwinTransformerBlock)


def converted(module: nn.Module) -> bool:
    return isinstance(module, FusedSwinTransformerBlock)


def check(block: nn.Module, path: str, modules: dict[str, nn.Module]) -> str | None:
    if type(block) is not timm_swin.SwinTransformerBlock:
        return f"a subclass of timm's SwinTransformerBlock ({type(block).__qualname__}): its forward may differ"
    attn = getattr(block, "attn", None)
    if type(attn) is not timm_swin.WindowAttention:
        return f"its attn is {type(attn).__qualname__}, not timm's WindowAttention"
    for name in ("window_size", "shift_size", "input_resolution", "attn_mask", "norm1"):
        if not hasattr(block, name):
            return f"it has no {name}: not the timm block the converter was written for"
    window, shift = tuple(block.window_size), tuple(block.shift_size)
    reason = window_reason(window, shift, 2)
    if reason:
        return reason
    if tuple(attn.window_size) != window:
        return f"attn.window_size {tuple(attn.window_size)} differs from the block's {window}"
    if attn.attn_drop.p > 0:
        return f"attention dropout p={attn.attn_drop.p}: the fused kernels have no dropout on the probabilities"
    heads = attn.num_heads
    if not isinstance(attn.qkv, nn.Linear) or attn.qkv.out_features % (3 * heads):
        return "qkv is not a Linear to 3 * heads * head_dim"
    head_dim = attn.qkv.out_features // (3 * heads)
    if not math.isclose(attn.scale, head_dim ** -0.5):
        return f"scale {attn.scale} is not head_dim ** -0.5 (head_dim {head_dim})"
    if not getattr(block, "dynamic_mask", False) and \
            any(s > 0 and n <= w for n, w, s in zip(block.input_resolution, window, shift)):
        return (f"a shift {shift} on a {tuple(block.input_resolution)} map no larger than the window {window} "
                f"(always_partition): timm rolls inside its single window, the fused op does not shift there")
    return table_reason(attn.relative_position_bias_table, window, heads) or \
        index_reason(attn.relative_position_index, window)


def probe_inputs(block: nn.Module) -> list[tuple]:
    """Its input resolution (a static mask fits only it) and, with a dynamic
    mask, a map 2 over the window (padded, and shifted where it shifts)."""
    g = torch.Generator().manual_seed(0)
    dim = block.norm1.normalized_shape[0]
    sizes = [tuple(block.input_resolution)]
    if getattr(block, "dynamic_mask", False):
        sizes.append(tuple(w + 2 for w in block.window_size))
    return [(torch.randn(1, *size, dim, generator=g, dtype=torch.float64),) for size in sizes]


def convert(block: nn.Module) -> None:
    block.__class__ = FusedSwinTransformerBlock


def probe_key(block: nn.Module) -> tuple:
    return (tuple(block.window_size), tuple(block.shift_size), tuple(block.input_resolution),
            bool(getattr(block, "dynamic_mask", False)), block.attn.qkv.bias is not None)

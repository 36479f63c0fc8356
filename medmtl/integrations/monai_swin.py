"""MONAI SwinUNETR / SwinTransformer: each SwinTransformerBlock's window
attention on medmtl's WindowAttention (the fused window_attention op).

MONAI's block pads its normed input to a multiple of the window, shifts it,
partitions it into windows, attends with the mask its BasicLayer built from
the same window and shift, and reverses all of it; where a map dim is at most
the window, that dim takes the map size as window and no shift. The fused op
does all of that by index arithmetic. On a map smaller than the window MONAI
reads the bias through the first n x n entries of its relative_position_index;
the layer's bias_reading="monai" reproduces that reading.
"""

from __future__ import annotations

import math

import torch
from monai.networks.nets import swin_unetr as monai_swin
from torch import nn

from medmtl.integrations._window_attention import index_reason, table_reason, window_reason
from medmtl.layers.window_attention import WindowAttention


class FusedSwinTransformerBlock(monai_swin.SwinTransformerBlock):
    """MONAI's SwinTransformerBlock (x (B, D, H, W, C) or (B, H, W, C)) whose
    attention is a medmtl WindowAttention with MONAI's bias reading."""

    def forward_part1(self, x: torch.Tensor, mask_matrix: torch.Tensor | None) -> torch.Tensor:
        # mask_matrix is the region mask that MONAI's BasicLayer computes from
        # this block's window and shift (checked at conversion); the op builds
        # the same mask from the shift by index arithmetic.
        return self.attn(self.norm1(x))


def candidate(module: nn.Module) -> bool:
    return isinstance(module, monai_swin.SwinTransformerBlock)


def converted(module: nn.Module) -> bool:
    return isinstance(module, FusedSwinTransformerBlock)


def check(block: nn.Module, path: str, modules: dict[str, nn.Module]) -> str | None:
    if type(block) is not monai_swin.SwinTransformerBlock:
        return f"a subclass of MONAI's SwinTransformerBlock ({type(block).__qualname__}): its forward may differ"
    parent_path = path.rpartition(".")[0] if path else None
    parent = modules.get(parent_path) if parent_path is not None and "." in path else None
    layer = modules.get(parent_path.rpartition(".")[0]) if parent is not None else None
    if not isinstance(parent, nn.ModuleList) or type(layer) is not monai_swin.BasicLayer \
            or getattr(layer, "blocks", None) is not parent:
        return ("not a block of a MONAI BasicLayer: the attention mask is its caller's, and only BasicLayer's "
                "(Swin's region mask of this window and shift) is known")
    if getattr(layer, "use_hyena", False):
        return "its BasicLayer uses Hyena blocks"
    attn = getattr(block, "attn", None)
    if type(attn) is not monai_swin.WindowAttention:
        return f"its attn is {type(attn).__qualname__}, not MONAI's WindowAttention"
    for name in ("norm1", "norm2", "mlp", "drop_path", "window_size", "shift_size", "use_checkpoint"):
        if not hasattr(block, name):
            return f"it has no {name}: not the MONAI block the converter was written for"
    window, shift = tuple(block.window_size), tuple(block.shift_size)
    nd = len(window)
    reason = window_reason(window, shift, nd) if nd in (2, 3) else f"{nd}-D windows (2-D and 3-D are supported)"
    if reason:
        return reason
    if tuple(layer.window_size) != window or tuple(layer.shift_size) != tuple(w // 2 for w in window) \
            or shift not in (tuple(layer.shift_size), (0,) * nd):
        return (f"window {window} / shift {shift} differ from its BasicLayer's ({tuple(layer.window_size)}, "
                f"{tuple(layer.shift_size)}): the mask it is passed is not this block's region mask")
    if tuple(attn.window_size) != window:
        return f"attn.window_size {tuple(attn.window_size)} differs from the block's {window}"
    if attn.attn_drop.p > 0:
        return f"attention dropout p={attn.attn_drop.p}: the fused kernels have no dropout on the probabilities"
    dim, heads = attn.dim, attn.num_heads
    if dim % heads or not math.isclose(attn.scale, (dim // heads) ** -0.5):
        return f"dim {dim}, {heads} heads, scale {attn.scale}: not head_dim ** -0.5 with head_dim = dim / heads"
    if not (isinstance(attn.qkv, nn.Linear) and (attn.qkv.in_features, attn.qkv.out_features) == (dim, 3 * dim)
            and isinstance(attn.proj, nn.Linear) and (attn.proj.in_features, attn.proj.out_features) == (dim, dim)):
        return f"qkv / proj are not Linear({dim}, {3 * dim}) / Linear({dim}, {dim})"
    if "relative_position_index" in attn._non_persistent_buffers_set:
        return "its relative_position_index buffer is not persistent (MONAI's is)"
    return table_reason(attn.relative_position_bias_table, window, heads) or \
        index_reason(attn.relative_position_index, window)


def probe_inputs(block: nn.Module) -> list[tuple]:
    """Maps larger than the window by 2 (padded and shifted) and smaller by 2
    (MONAI's bias reading), with the mask MONAI's BasicLayer passes."""
    g = torch.Generator().manual_seed(0)
    window, dim = tuple(block.window_size), block.attn.dim
    out = []
    for size in ([w + 2 for w in window], [max(1, w - 2) for w in window]):
        use_window, use_shift = monai_swin.get_window_size(size, window, tuple(w // 2 for w in window))
        padded = [math.ceil(s / w) * w for s, w in zip(size, use_window)]
        mask = monai_swin.compute_mask(padded, use_window, use_shift, None).double()
        out.append((torch.randn(1, *size, dim, generator=g, dtype=torch.float64), mask))
    return out


def convert(block: nn.Module) -> None:
    attn = block.attn
    fused = WindowAttention(attn.dim, attn.num_heads, tuple(block.window_size), tuple(block.shift_size),
                            qkv_bias=attn.qkv.bias is not None, spatial_dims=len(block.window_size),
                            bias_reading="monai")
    # The original parameters and buffer, under the same names.
    fused.qkv, fused.proj, fused.proj_drop = attn.qkv, attn.proj, attn.proj_drop
    fused.relative_position_bias_table = attn.relative_position_bias_table
    fused.relative_position_index = attn.relative_position_index
    fused.train(attn.training)
    block.attn = fused
    block.__class__ = FusedSwinTransformerBlock


def probe_key(block: nn.Module) -> tuple:
    return tuple(block.window_size), tuple(block.shift_size), block.attn.qkv.bias is not None

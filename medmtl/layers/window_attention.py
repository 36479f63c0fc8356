"""WindowAttention: Swin's (shifted-)window multi-head self-attention with a
relative position bias, in 2-D and 3-D, on the fused window_attention op.

Weight-compatible with timm's and MONAI's WindowAttention: the state_dict
holds qkv.weight, qkv.bias, proj.weight, proj.bias and
relative_position_bias_table (prod(2 * window - 1), heads). MONAI's
checkpoints also carry the derived `relative_position_index` buffer; it is
accepted on load and dropped (with bias_reading="monai" it is kept, as MONAI
keeps it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from medmtl.ops import reference
from medmtl.ops.window_attention import window_attention


def _per_dim(name: str, value: int | Sequence[int], spatial_dims: int) -> tuple[int, ...]:
    if isinstance(value, int) and not isinstance(value, bool):
        return (value,) * spatial_dims
    if isinstance(value, Sequence) and len(value) == spatial_dims and \
            all(isinstance(x, int) and not isinstance(x, bool) for x in value):
        return tuple(value)
    raise ValueError(f"WindowAttention: {name} must be an int or {spatial_dims} ints (one per spatial dim), "
                     f"got {value!r}")


BIAS_READINGS = ("offsets", "monai")


def relative_position_index(window: Sequence[int]) -> torch.Tensor:
    """(N, N) long, N = prod(window): the table row of each (query, key) pair of
    a window, sum_i (r_i + window_i - 1) * prod_{j > i} (2 window_j - 1) of
    their relative offset r (Swin's, timm's and MONAI's index)."""
    coords = torch.stack(torch.meshgrid(*[torch.arange(w) for w in window], indexing="ij")).flatten(1)
    rel = coords[:, :, None] - coords[:, None, :]
    index = torch.zeros(rel.shape[1:], dtype=torch.long)
    for i, w in enumerate(window):
        index += (rel[i] + w - 1) * math.prod(2 * v - 1 for v in window[i + 1:])
    return index


class WindowAttention(nn.Module):
    """Window attention of x (B, H, W, C) or (B, D, H, W, C) -> the same shape.

    qkv projection, then Swin's pad to a multiple of the window, cyclic shift by
    -shift_size, windowed attention with relative position bias and the shifted
    windows' region mask, reverse, crop (all inside the fused op, by index
    arithmetic), then the output projection. Maps the window does not divide are
    padded at the end (padding first, then the shift, as the original Swin and
    MONAI do); padded tokens are zeros before the qkv projection, so their keys
    and values are the qkv bias's parts. Where a map dim is at most the window,
    that dim uses the map size and no shift, as timm and MONAI do.

    Args:
        dim: channels C.
        num_heads: heads; dim must be a multiple of it.
        window_size, shift_size: an int or one per spatial dim, 0 <= shift < window.
        qkv_bias: bias in the qkv projection.
        spatial_dims: 2 or 3.
        attn_drop: dropout on the attention probabilities; in training mode with
            attn_drop > 0 the plain PyTorch composition runs (the fused kernels
            have no dropout).
        proj_drop: dropout after the output projection.
        bias_reading: "offsets" (default) reads the bias at the true relative
            offsets everywhere. "monai" reproduces MONAI's WindowAttention on
            maps smaller than the window in some dim: there the window shrinks
            to n tokens and MONAI reads the bias of pair (i, j) from
            relative_position_index[i, j] of the configured window's index
            (its first n x n entries, not the offsets of the shrunk window);
            those calls run the plain PyTorch composition with that index.
            The layer then holds MONAI's persistent `relative_position_index`
            buffer, so its state_dict is MONAI's WindowAttention's.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int | Sequence[int],
        shift_size: int | Sequence[int] = 0,
        qkv_bias: bool = True,
        spatial_dims: int = 2,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        bias_reading: str = "offsets",
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"WindowAttention: spatial_dims must be 2 or 3, got {spatial_dims!r}")
        for name, value in (("dim", dim), ("num_heads", num_heads)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"WindowAttention: {name} must be a positive int, got {value!r}")
        if dim % num_heads:
            raise ValueError(f"WindowAttention: dim ({dim}) must be a multiple of num_heads ({num_heads}): "
                             f"head_dim = dim / num_heads")
        window = _per_dim("window_size", window_size, spatial_dims)
        shift = _per_dim("shift_size", shift_size, spatial_dims)
        if any(w < 1 for w in window):
            raise ValueError(f"WindowAttention: window_size entries must be >= 1, got {window}")
        if any(not 0 <= s < w for s, w in zip(shift, window)):
            raise ValueError(f"WindowAttention: shift_size entries must be in [0, window_size), got shift {shift} "
                             f"for window {window}")
        for name, p in (("attn_drop", attn_drop), ("proj_drop", proj_drop)):
            if not 0.0 <= p < 1.0:
                raise ValueError(f"WindowAttention: {name} must be in [0, 1), got {p!r}")
        if bias_reading not in BIAS_READINGS:
            raise ValueError(f"WindowAttention: bias_reading must be one of {BIAS_READINGS}, got {bias_reading!r}")
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.window_size = window
        self.shift_size = shift
        self.spatial_dims = spatial_dims
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros(math.prod(2 * w - 1 for w in window), num_heads))
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.bias_reading = bias_reading
        if bias_reading == "monai":
            self.register_buffer("relative_position_index", relative_position_index(window))

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, window_size={self.window_size}, "
                f"shift_size={self.shift_size}, spatial_dims={self.spatial_dims}"
                + (f", bias_reading={self.bias_reading!r}" if self.bias_reading != "offsets" else ""))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() != self.spatial_dims + 2 or x.shape[-1] != self.dim:
            layout = "(B, H, W, C)" if self.spatial_dims == 2 else "(B, D, H, W, C)"
            got = f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"WindowAttention: x must be {layout} with C = dim = {self.dim}, got {got}")
        heads, head_dim = self.num_heads, self.head_dim
        qkv = self.qkv(x).unflatten(-1, (3, heads, head_dim))
        q, k, v = qkv.unbind(-3)  # each (B, *S, heads, head_dim), strided views of qkv
        pad_key = pad_value = None
        if self.qkv.bias is not None:
            # Swin pads x with zeros before this projection: padded keys and values are the bias.
            _, pad_key, pad_value = self.qkv.bias.to(q.dtype).view(3, heads, head_dim).unbind(0)
        table = self.relative_position_bias_table.to(q.dtype)
        spatial = x.shape[1:-1]
        if self.bias_reading == "monai" and any(s < w for s, w in zip(spatial, self.window_size)):
            # MONAI's reading of a shrunk window's bias: the first n x n entries of its index.
            n = math.prod(min(s, w) for s, w in zip(spatial, self.window_size))
            out = reference.window_attention(q, k, v, self.window_size, self.shift_size, table, self.scale,
                                              pad_key, pad_value, attn_dropout=self.attn_drop.p if self.training
                                              else 0.0, bias_index=self.relative_position_index[:n, :n])
        elif self.training and self.attn_drop.p > 0:
            out = reference.window_attention(q, k, v, self.window_size, self.shift_size, table, self.scale,
                                              pad_key, pad_value, attn_dropout=self.attn_drop.p)
        else:
            out = window_attention(q, k, v, self.window_size, self.shift_size, table, self.scale, pad_key,
                                   pad_value)
        return self.proj_drop(self.proj(out.flatten(-2)))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # MONAI saves the (derived) relative position index as a buffer.
        if self.bias_reading == "offsets":
            state_dict.pop(prefix + "relative_position_index", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

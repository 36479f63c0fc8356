"""ResFormer's transformer branch: multi-scale patch embedding, Swin blocks on
medmtl's WindowAttention, convolutional patch merging, and the ECA channel
attention they use. Tokens are laid out (B, H, W, C) throughout."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from medmtl.layers import WindowAttention


class DropPath(nn.Module):
    """Stochastic depth: in training, zeroes a sample's residual branch with
    probability p and scales the kept ones by 1 / (1 - p)."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = torch.empty((x.shape[0],) + (1,) * (x.dim() - 1), dtype=x.dtype, device=x.device)
        return x * keep.bernoulli_(1.0 - self.p).div_(1.0 - self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class ECA(nn.Module):
    """Efficient channel attention with a residual: x * (1 + sigmoid(conv1d(mean(x)))).

    The channel descriptor (spatial mean) is convolved across channels by a
    k-tap 1-D kernel. x is (B, C, H, W) with channels_dim=1 or tokens
    (B, H, W, C) with channels_dim=-1; the output has x's shape.
    """

    def __init__(self, kernel_size: int = 3, channels_dim: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv1d(1, 1, kernel_size, padding=kernel_size // 2, bias=False)
        self.channels_dim = channels_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spatial = [d for d in range(1, x.dim()) if d != self.channels_dim % x.dim()]
        descriptor = x.mean(spatial)                                  # (B, C)
        gate = torch.sigmoid(self.conv(descriptor[:, None, :]))[:, 0]  # (B, C)
        shape = [x.shape[0]] + [1] * (x.dim() - 1)
        shape[self.channels_dim] = x.shape[self.channels_dim]
        return x * (1 + gate.view(shape))


def _stride2_conv(cin: int, cout: int, kernel: int) -> nn.Conv2d:
    # (kernel - 2) / 2 padding: every kernel size halves an even map exactly
    return nn.Conv2d(cin, cout, kernel, stride=2, padding=(kernel - 2) // 2)


def _split_channels(total: int, parts: int) -> list[int]:
    """ResFormer's split of an embedding over its parallel convolutions:
    halves down the list, the last two equal (64 over 4: 32, 16, 8, 8)."""
    sizes = [total // 2 ** (i + 1) for i in range(parts - 1)] + [total // 2 ** (parts - 1)]
    return sizes


class MultiScalePatchEmbed(nn.Module):
    """The image's multi-scale patch embedding: (B, C_in, H, W) -> tokens (B, H/2, W/2, dim).

    Parallel stride-2 convolutions with kernels 2, 4, 8, 16 (dim/2, dim/4,
    dim/8, dim/8 channels), concatenated, ECA, LayerNorm.
    """

    def __init__(self, in_channels: int, dim: int, patch_sizes: Sequence[int] = (2, 4, 8, 16)) -> None:
        super().__init__()
        sizes = _split_channels(dim, len(patch_sizes))
        self.projs = nn.ModuleList(_stride2_conv(in_channels, c, k) for c, k in zip(sizes, patch_sizes))
        self.eca = ECA(3, channels_dim=1)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.eca(torch.cat([proj(x) for proj in self.projs], 1))
        return self.norm(y.permute(0, 2, 3, 1))


class ConvPatchMerging(nn.Module):
    """ResFormer's patch merging: tokens (B, H, W, dim) -> (B, out_dim, H/2, W/2) (NCHW,
    to be added to the next ResNet stage's output).

    LayerNorm, then stride-2 convolutions with kernels 2 and 4 (out_dim/2
    channels each), concatenated, ECA.
    """

    def __init__(self, dim: int, out_dim: int, patch_sizes: Sequence[int] = (2, 4)) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        sizes = _split_channels(out_dim, len(patch_sizes))
        self.reductions = nn.ModuleList(_stride2_conv(dim, c, k) for c, k in zip(sizes, patch_sizes))
        self.eca = ECA(3, channels_dim=1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.norm(tokens).permute(0, 3, 1, 2)
        return self.eca(torch.cat([r(x) for r in self.reductions], 1))


class Mlp(nn.Module):
    """fc1 -> GELU -> dropout -> fc2 -> ECA over the channels -> dropout, on tokens (B, H, W, C).

    (The released ResFormer code applies its ECA to `view(B, C, H, W)` of the
    (B, N, C) tokens, a reinterpretation of memory; here the channels are the
    channels.)
    """

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)
        self.eca = ECA(3, channels_dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.eca(self.fc2(self.drop(self.act(self.fc1(x))))))


class SwinBlock(nn.Module):
    """Pre-norm Swin block on tokens (B, H, W, dim): x + attn(norm1(x)), then x + mlp(norm2(x)).

    The window attention (with its shift, padding and mask) is medmtl's fused
    WindowAttention; where the map is no larger than the window it attends
    over the whole map without a shift.
    """

    def __init__(self, dim: int, num_heads: int, window_size: int, shift_size: int, mlp_ratio: float = 4.0,
                 dropout: float = 0.0, drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, num_heads, window_size, shift_size, qkv_bias=True, proj_drop=dropout)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class SwinStage(nn.Module):
    """`depth` Swin blocks, plain and shifted (window / 2) windows in turn: tokens in, tokens out."""

    def __init__(self, dim: int, depth: int, num_heads: int, window_size: int, mlp_ratio: float,
                 dropout: float, drop_paths: Sequence[float]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            SwinBlock(dim, num_heads, window_size, 0 if i % 2 == 0 else window_size // 2, mlp_ratio, dropout,
                      drop_paths[i]) for i in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x

"""A compact residual U-Net: UMS-Rep's default representation backbone."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from medmtl.models.decoder import UpBlock
from medmtl.models.resnet import resnet_stage


class ResUNet(nn.Module):
    """x (B, in_channels, H, W), H and W multiples of 2^(levels - 1) ->
    (levels [(B, channels[i], H / 2^i, W / 2^i)], decoded (B, channels[0], H, W)).

    Encoder: a 3x3 conv stem, then residual stages (stride 1, then 2 each);
    decoder: transposed-conv up-blocks with the encoder's skips.
    """

    def __init__(self, in_channels: int, channels: Sequence[int], blocks: int = 1) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, channels[0], 3, padding=1, bias=False),
                                  nn.BatchNorm2d(channels[0]), nn.ReLU(inplace=True))
        self.down = nn.ModuleList(resnet_stage(channels[max(i - 1, 0)], c, blocks, 1 if i == 0 else 2)
                                  for i, c in enumerate(channels))
        self.up = nn.ModuleList(UpBlock(channels[i + 1], channels[i]) for i in reversed(range(len(channels) - 1)))
        self.multiple = 2 ** (len(channels) - 1)

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        y, levels = self.stem(x), []
        for stage in self.down:
            y = stage(y)
            levels.append(y)
        d = levels[-1]
        for block, skip in zip(self.up, reversed(levels[:-1])):
            d = block(d, skip)
        return levels, d

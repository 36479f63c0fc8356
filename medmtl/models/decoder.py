"""U-Net-style decoder blocks and the segmentation head."""

from __future__ import annotations

import torch
from torch import nn


class UpBlock(nn.Module):
    """(B, in_channels, H, W), skip (B, skip_channels, 2H, 2W) -> (B, out_channels, 2H, 2W).

    2x2 stride-2 transposed convolution to out_channels, concatenated with the
    skip, 3x3 convolution (with bias) -> BN -> ReLU (ResFormer's Decoder).
    """

    def __init__(self, in_channels: int, out_channels: int, skip_channels: int | None = None) -> None:
        super().__init__()
        skip_channels = out_channels if skip_channels is None else skip_channels
        self.up = nn.ConvTranspose2d(in_channels, out_channels, 2, stride=2)
        self.conv_bn_relu = nn.Sequential(nn.Conv2d(out_channels + skip_channels, out_channels, 3, padding=1),
                                          nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv_bn_relu(torch.cat([self.up(x), skip], 1))


class SegmentationHead(nn.Sequential):
    """(B, in_channels, H, W) -> logits (B, classes, H * scale, W * scale): bilinear
    upsampling (align_corners=True, as ResFormer) then a 1x1 convolution without bias."""

    def __init__(self, in_channels: int, classes: int, scale: int = 2) -> None:
        layers = [nn.Upsample(scale_factor=scale, mode="bilinear", align_corners=True)] if scale > 1 else []
        super().__init__(*layers, nn.Conv2d(in_channels, classes, 1, bias=False))

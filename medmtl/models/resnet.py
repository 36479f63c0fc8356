"""ResNet basic blocks and stages, with torchvision's module names, so that
torchvision's resnet18/34 weights load by key (load_resnet_stages)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn


class BasicBlock(nn.Module):
    """ResNet's basic block: (B, inplanes, H, W) -> (B, planes, H / stride, W / stride).

    conv3x3 (stride) -> BN -> ReLU -> conv3x3 -> BN, plus the identity (or a
    strided 1x1 conv + BN where the shape changes), then ReLU. Names as
    torchvision's BasicBlock: conv1, bn1, conv2, bn2, downsample.{0,1}.
    """

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


def resnet_stage(inplanes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
    """`blocks` basic blocks, the first with the stride: (B, inplanes, H, W) -> (B, planes, H/s, W/s)."""
    return nn.Sequential(BasicBlock(inplanes, planes, stride),
                         *[BasicBlock(planes, planes) for _ in range(blocks - 1)])


# ResNet-34's four stages and torchvision's names for them.
RESNET34_BLOCKS = (3, 4, 6, 3)
_TORCHVISION_STEM = ("conv1.weight", "bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var",
                     "bn1.num_batches_tracked")


def load_resnet_stages(target: nn.Module, state_dict: Mapping[str, torch.Tensor],
                       prefix: str = "") -> dict[str, list[str]]:
    """Copies a torchvision ResNet state_dict (resnet18/34 layout) into `target`,
    whose stem is `{prefix}conv1`/`{prefix}bn1` and stages `{prefix}layer1..4`.

    Every key whose name and shape match is copied; returns {"used": [...],
    "skipped": [...]} naming torchvision's keys (fc.*, and any key of another
    shape -- e.g. conv1 for a 1-channel input, or a 7x7 stride-2 stem's weight
    is kept only where the shapes agree).
    """
    if not isinstance(state_dict, Mapping) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise TypeError(f"load_resnet: state_dict must be a mapping of names to tensors "
                        f"(torchvision's resnet34().state_dict()), got {type(state_dict).__name__}")
    if not any(k.startswith("layer1.") for k in state_dict):
        raise ValueError("load_resnet: state_dict has no 'layer1.*' keys; expected torchvision's ResNet layout "
                         f"(got keys such as {list(state_dict)[:3]})")
    own = target.state_dict()
    used, skipped = [], []
    updates = {}
    for key, value in state_dict.items():
        mine = prefix + key
        if mine in own and own[mine].shape == value.shape:
            updates[mine] = value
            used.append(key)
        else:
            skipped.append(key)
    with torch.no_grad():
        for key, value in updates.items():
            own[key].copy_(value)
    return {"used": used, "skipped": skipped}

"""FT-MTL-Net's feature transfer between task branches."""

from __future__ import annotations

import torch
from torch import nn

TRANSFERS = ("sum", "concat", None)


class FeatureTransfer(nn.Module):
    """Mixes the task branches' features of one stage: n maps (B, C, h, w) -> n maps.

    "sum": branch b receives f_b + sum over the other branches o of a 1x1
    convolution T_ob(f_o); the convolutions start at zero, so training starts
    from the parallel branches and learns what to transfer.
    "concat": branch b receives ReLU(BN(1x1 conv of the concatenation of all
    branches' features)).
    """

    def __init__(self, channels: int, branches: int, mode: str) -> None:
        super().__init__()
        self.mode = mode
        self.branches = branches
        if mode == "sum":
            self.transfers = nn.ModuleDict({
                f"{o}_to_{b}": nn.Conv2d(channels, channels, 1, bias=False)
                for b in range(branches) for o in range(branches) if o != b})
            for conv in self.transfers.values():
                nn.init.zeros_(conv.weight)
        else:
            self.mixes = nn.ModuleList(
                nn.Sequential(nn.Conv2d(branches * channels, channels, 1, bias=False), nn.BatchNorm2d(channels),
                              nn.ReLU(inplace=True)) for _ in range(branches))

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        if self.mode == "sum":
            return [f + sum(self.transfers[f"{o}_to_{b}"](features[o]) for o in range(self.branches) if o != b)
                    for b, f in enumerate(features)]
        joined = torch.cat(features, 1)
        return [mix(joined) for mix in self.mixes]

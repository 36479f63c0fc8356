"""FT-MTL-Net (Gao et al., 2020): a shared encoder and task branches for
classification, detection and segmentation that exchange features after
every branch stage (the paper's "feature transfer"); transfer=None gives the
parallel-branches baseline the paper argues against.

    image -> encoder levels e1..e4 (strides 2, 4, 8, 16)
    every branch: f = e4; for each stage j: f = UpBlock_j(f, e_{4-j-1}); then
                  transfer across branches (sum / concat / none)
    seg: bilinear x4, 1x1 conv; det: CenterNet head at stride 4;
    cls: MultiScalePool(e4 and the cls branch's stages) -> MLP
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from medmtl.layers import MultiScalePool
from medmtl.models import _checks as check
from medmtl.models.base import MultiTaskModel
from medmtl.models.decoder import SegmentationHead, UpBlock
from medmtl.models.detection import CenterNetHead, decode_detections
from medmtl.models.registry import register_model
from medmtl.models.resnet import resnet_stage
from medmtl.models.transfer import TRANSFERS, FeatureTransfer

NAME = "FTMTLNet"


class ConvEncoder(nn.Module):
    """x (B, in_channels, H, W) -> levels [(B, channels[i], H / 2^(i+1), W / 2^(i+1))]:
    a stride-2 3x3 conv stem, then residual stages (the first at stride 1)."""

    def __init__(self, in_channels: int, channels: Sequence[int], blocks: Sequence[int]) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, channels[0], 3, stride=2, padding=1, bias=False),
                                  nn.BatchNorm2d(channels[0]), nn.ReLU(inplace=True))
        self.stages = nn.ModuleList(
            resnet_stage(channels[max(i - 1, 0)], c, n, 1 if i == 0 else 2)
            for i, (c, n) in enumerate(zip(channels, blocks)))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        y, levels = self.stem(x), []
        for stage in self.stages:
            y = stage(y)
            levels.append(y)
        return levels


class FTMTLNet(MultiTaskModel):
    """FT-MTL-Net: x (B, in_channels, H, W), H and W multiples of 16 ->
    {"cls": (B, num_classes), "det": {"heatmap": (B, det_classes, H/4, W/4), "size", "offset":
    (B, 2, H/4, W/4)}, "seg": (B, seg_classes, H, W)}.

    Args:
        in_channels, seg_classes, num_classes: as the other models.
        det_classes: detection classes (heatmap channels).
        channels: the encoder's four level widths; encoder_blocks: residual blocks per level.
        branch_channels: the widths of the branches' two stages (stride 8, then 4).
        transfer: "sum", "concat" or None (parallel branches, no transfer).
        dropout: before the classifier.
        tasks: a subset of ("cls", "det", "seg").
    """

    all_tasks = ("cls", "det", "seg")
    det_stride = 4

    def __init__(self, in_channels: int = 1, seg_classes: int = 2, num_classes: int = 2, det_classes: int = 1,
                 channels: Sequence[int] = (32, 64, 128, 256), encoder_blocks: Sequence[int] = (1, 2, 2, 2),
                 branch_channels: Sequence[int] = (128, 64), transfer: str | None = "sum", dropout: float = 0.0,
                 cls_hidden: int = 128, tasks: Sequence[str] = ("cls", "det", "seg")) -> None:
        super().__init__()
        self.in_channels = check.positive_int(NAME, "in_channels", in_channels)
        self.seg_classes = check.positive_int(NAME, "seg_classes", seg_classes)
        self.num_classes = check.positive_int(NAME, "num_classes", num_classes)
        self.det_classes = check.positive_int(NAME, "det_classes", det_classes)
        channels = check.int_tuple(NAME, "channels", channels, 4)
        encoder_blocks = check.int_tuple(NAME, "encoder_blocks", encoder_blocks, 4)
        branch_channels = check.int_tuple(NAME, "branch_channels", branch_channels, 2)
        self.transfer = check.choice(NAME, "transfer", transfer, TRANSFERS)
        check.probability(NAME, "dropout", dropout)
        check.positive_int(NAME, "cls_hidden", cls_hidden)
        self.tasks = check.tasks_subset(NAME, tasks, self.all_tasks)
        self.channels, self.branch_channels = channels, branch_channels

        self.encoder = ConvEncoder(in_channels, channels, encoder_blocks)
        skips = (channels[2], channels[1])  # stride 8, then 4
        self.branches = nn.ModuleDict({
            task: nn.ModuleList(UpBlock(c_in, c_out, skip) for c_in, c_out, skip in
                                zip((channels[3],) + branch_channels[:-1], branch_channels, skips))
            for task in self.tasks})
        self.transfers = nn.ModuleList(
            FeatureTransfer(c, len(self.tasks), transfer) if transfer and len(self.tasks) > 1 else nn.Identity()
            for c in branch_channels)
        if "seg" in self.tasks:
            self.seg_head = SegmentationHead(branch_channels[-1], seg_classes, scale=self.det_stride)
        if "det" in self.tasks:
            self.det_head = CenterNetHead(branch_channels[-1], det_classes)
        if "cls" in self.tasks:
            self.cls_pool = MultiScalePool([channels[3], *branch_channels])
            self.cls_head = nn.Sequential(nn.Linear(self.cls_pool.out_features, cls_hidden), nn.ReLU(inplace=True),
                                          nn.Dropout(dropout), nn.Linear(cls_hidden, num_classes))

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x -> the shared encoder's four levels (B, channels[i], H / 2^(i+1), W / 2^(i+1))."""
        check.image_batch(NAME, x, self.in_channels, 16)
        return self.encoder(x)

    def forward(self, x: torch.Tensor) -> dict:
        levels = self.forward_features(x)
        features = [levels[3]] * len(self.tasks)
        stages = []                                     # per stage: the branches' features after transfer
        for j, (skip, transfer) in enumerate(zip((levels[2], levels[1]), self.transfers)):
            features = [self.branches[t][j](f, skip) for t, f in zip(self.tasks, features)]
            if isinstance(transfer, FeatureTransfer):
                features = transfer(features)
            stages.append(dict(zip(self.tasks, features)))
        out = {}
        if "cls" in self.tasks:
            out["cls"] = self.cls_head(self.cls_pool([levels[3]] + [s["cls"] for s in stages]))
        if "det" in self.tasks:
            out["det"] = self.det_head(stages[-1]["det"])
        if "seg" in self.tasks:
            out["seg"] = self.seg_head(stages[-1]["seg"])
        return out

    def decode_detections(self, det: dict[str, torch.Tensor], score_threshold: float = 0.3,
                          max_detections: int = 100) -> list[dict[str, torch.Tensor]]:
        """out["det"] -> per image {"boxes": (K, 4) xyxy in input pixels, "scores": (K,), "labels": (K,)}."""
        return decode_detections(det, self.det_stride, score_threshold, max_detections)

    def part_paths(self) -> dict[str, list[str]]:
        return {"encoder": ["encoder"], "transfer": ["transfers"]}

    def head_paths(self) -> dict[str, list[str]]:
        own = {"cls": ["cls_pool", "cls_head"], "det": ["det_head"], "seg": ["seg_head"]}
        return {t: [f"branches.{t}"] + own[t] for t in self.tasks}


@register_model
def ft_mtl_net(**kwargs) -> FTMTLNet:
    """FT-MTL-Net (Gao et al. 2020): classification, detection and segmentation with feature transfer."""
    return FTMTLNet(**kwargs)

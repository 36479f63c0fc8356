"""UMS-Rep (Zamzmi et al., 2021): one modality-specific representation,
learned first by self-supervised denoising, then shared by task heads for
denoising, segmentation and classification.

    representation: an encoder-decoder (a residual U-Net, or ResFormerMTL's
                    encoder, DFE skips and decoder) -> full-resolution features
    denoise: image + 1x1 conv(features)          (the stage-1 pretext task)
    seg:     3x3 conv-BN-ReLU, 1x1 conv           -> (B, seg_classes, H, W)
    cls:     MultiScalePool(the encoder's two deepest levels) -> MLP

Modes: in "pretrain" forward returns only {"denoise"}; in "finetune" every
task of `tasks`. freeze_representation() keeps the representation fixed (the
"independent" fine-tuning strategy); representation_parameters() and
head_parameters(task) give the optimizer groups of the other strategies.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from medmtl.layers import MultiScalePool
from medmtl.models import _checks as check
from medmtl.models.base import MultiTaskModel
from medmtl.models.registry import register_model
from medmtl.models.resformer import ResFormerMTL
from medmtl.models.resunet import ResUNet

NAME = "UMSRep"
BACKBONES = ("resunet", "resformer")
MODES = ("pretrain", "finetune")


class ResFormerRepresentation(nn.Module):
    """ResFormerMTL's encoder, DFE skips and decoder as a representation:
    x -> (encoder levels, features (B, channels[0], H, W)) (the decoder's
    H/2 output upsampled bilinearly x2)."""

    def __init__(self, in_channels: int, img_size: int, channels: Sequence[int], **kwargs) -> None:
        super().__init__()
        body = ResFormerMTL(in_channels=in_channels, img_size=img_size, channels=channels, tasks=("seg",), **kwargs)
        self.encoder, self.dfe, self.decoder = body.encoder, body.dfe, body.decoder
        self.multiple = 16

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        skips = self.encoder(x)
        enhanced = [dfe(s) for dfe, s in zip(self.dfe, skips)]
        d = enhanced[3]
        for block, skip in zip(self.decoder, reversed(enhanced[:3])):
            d = block(d, skip)
        return skips, F.interpolate(d, scale_factor=2, mode="bilinear", align_corners=True)


class UMSRep(MultiTaskModel):
    """UMS-Rep: x (B, in_channels, H, W) -> {"denoise": (B, in_channels, H, W)} in pretrain mode;
    {"denoise", "seg": (B, seg_classes, H, W), "cls": (B, num_classes)} (those in `tasks`) in finetune mode.

    Args:
        in_channels, seg_classes, num_classes: as the other models.
        backbone: "resunet" (default; H, W multiples of 8) or "resformer" (multiples of 16).
        channels: the backbone's level widths (4 levels).
        img_size: for the "resformer" backbone's window (img_size // 16).
        dropout: before the classifier.
        backbone_kwargs: further ResFormerMTL arguments for the "resformer" backbone
            (depths, num_heads, dfe_variant, ...).
        tasks: a subset of ("denoise", "seg", "cls") served in finetune mode.
        mode: "pretrain" or "finetune" (see set_mode).
    """

    all_tasks = ("denoise", "seg", "cls")

    def __init__(self, in_channels: int = 1, seg_classes: int = 2, num_classes: int = 2,
                 backbone: str = "resunet", channels: Sequence[int] = (32, 64, 128, 256), img_size: int = 224,
                 dropout: float = 0.0, backbone_kwargs: dict | None = None,
                 tasks: Sequence[str] = ("denoise", "seg", "cls"), mode: str = "finetune") -> None:
        super().__init__()
        self.in_channels = check.positive_int(NAME, "in_channels", in_channels)
        self.seg_classes = check.positive_int(NAME, "seg_classes", seg_classes)
        self.num_classes = check.positive_int(NAME, "num_classes", num_classes)
        self.backbone_name = check.choice(NAME, "backbone", backbone, BACKBONES)
        channels = check.int_tuple(NAME, "channels", channels, 4)
        check.probability(NAME, "dropout", dropout)
        self.tasks = check.tasks_subset(NAME, tasks, self.all_tasks)
        if backbone_kwargs is not None and not isinstance(backbone_kwargs, dict):
            raise ValueError(f"{NAME}: backbone_kwargs must be a dict or None, got {type(backbone_kwargs).__name__}")
        if backbone == "resunet":
            if backbone_kwargs:
                raise ValueError(f"{NAME}: backbone_kwargs apply to backbone='resformer' only, got {backbone_kwargs}")
            self.representation = ResUNet(in_channels, channels)
        else:
            self.representation = ResFormerRepresentation(in_channels, img_size, channels, **(backbone_kwargs or {}))
        c0 = channels[0]
        self.heads = nn.ModuleDict()
        # The denoising head always exists: it is the representation's pretext task.
        self.heads["denoise"] = nn.Conv2d(c0, in_channels, 1)
        if "seg" in self.tasks:
            self.heads["seg"] = nn.Sequential(nn.Conv2d(c0, c0, 3, padding=1, bias=False), nn.BatchNorm2d(c0),
                                              nn.ReLU(inplace=True), nn.Conv2d(c0, seg_classes, 1))
        if "cls" in self.tasks:
            pool = MultiScalePool([channels[3], channels[2]])
            self.heads["cls"] = nn.ModuleDict({"pool": pool, "mlp": nn.Sequential(
                nn.Dropout(dropout), nn.Linear(pool.out_features, 64), nn.ReLU(inplace=True),
                nn.Linear(64, num_classes))})
        self.mode = "finetune"
        self.set_mode(mode)

    # -- modes and parameter groups

    def set_mode(self, mode: str) -> UMSRep:
        """"pretrain": forward returns only {"denoise"}; "finetune": every task in `tasks`."""
        self.mode = check.choice(NAME, "mode", mode, MODES)
        return self

    def pretrain(self) -> UMSRep:
        return self.set_mode("pretrain")

    def finetune(self) -> UMSRep:
        return self.set_mode("finetune")

    @property
    def active_tasks(self) -> tuple[str, ...]:
        return ("denoise",) if self.mode == "pretrain" else self.tasks

    def representation_parameters(self) -> Iterator[nn.Parameter]:
        return self.representation.parameters()

    def head_parameters(self, task: str) -> Iterator[nn.Parameter]:
        if task not in self.heads:
            raise ValueError(f"{NAME}: head_parameters: task must be one of {tuple(self.heads)}, got {task!r}")
        return self.heads[task].parameters()

    def freeze_representation(self, frozen: bool = True) -> UMSRep:
        """Stops (or restarts) gradients to the representation; a frozen
        representation also keeps its BatchNorm statistics (eval mode) when the
        model trains."""
        self.representation.requires_grad_(not frozen)
        self._frozen = bool(frozen)
        self.train(self.training)
        return self

    @property
    def representation_frozen(self) -> bool:
        return getattr(self, "_frozen", False)

    def train(self, mode: bool = True) -> UMSRep:
        super().train(mode)
        if self.representation_frozen:
            self.representation.eval()
        return self

    def trainable_parameters(self) -> dict[str, int]:
        """Trainable parameters of the representation and of each head that the current mode uses."""
        counts = {"representation": sum(p.numel() for p in self.representation_parameters() if p.requires_grad)}
        for task in self.active_tasks:
            counts[task] = sum(p.numel() for p in self.head_parameters(task) if p.requires_grad)
        return counts

    # -- forward

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x -> the representation's encoder levels (finest first)."""
        check.image_batch(NAME, x, self.in_channels, self.representation.multiple)
        return self.representation(x)[0]

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        check.image_batch(NAME, x, self.in_channels, self.representation.multiple)
        levels, features = self.representation(x)
        out = {}
        for task in self.active_tasks:
            if task == "denoise":
                out["denoise"] = x + self.heads["denoise"](features)
            elif task == "seg":
                out["seg"] = self.heads["seg"](features)
            else:
                head = self.heads["cls"]
                out["cls"] = head["mlp"](head["pool"]([levels[3], levels[2]]))
        return out

    def part_paths(self) -> dict[str, list[str]]:
        return {"representation": ["representation"]}

    def head_paths(self) -> dict[str, list[str]]:
        return {t: [f"heads.{t}"] for t in self.active_tasks}

    def summary_notes(self) -> list[str]:
        counts = self.trainable_parameters()
        return [f"mode {self.mode}{' (representation frozen)' if self.representation_frozen else ''}: trainable "
                + ", ".join(f"{k} {v:,}" for k, v in counts.items())]


@register_model
def ums_rep(**kwargs) -> UMSRep:
    """UMS-Rep (Zamzmi et al. 2021): a denoising-pretrained shared representation with task heads."""
    return UMSRep(**kwargs)

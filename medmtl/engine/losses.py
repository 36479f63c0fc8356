"""Per-task losses and their multi-task weighting.

    seg:     soft Dice + focal (gamma 2) over softmax classes, or Dice + CE
             (MONAI's DiceFocalLoss / DiceCELoss); sigmoid Dice + focal for one class
    cls:     multi-label soft-margin with class weights (ResFormer), BCE, or CE
    denoise: L1 or MSE to the clean image
    det:     CenterNet's penalty-reduced focal loss on the heatmap + L1 on size
             and offset at the box centres
    weighting: fixed weights (ResFormer: seg 1, cls 0.25) or learned
             uncertainty weighting (Kendall et al. 2018):
             sum_t exp(-s_t) L_t + s_t, with s_t = log sigma_t^2 learned
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

SEG_LOSSES = ("dice_focal", "dice_ce")
CLS_LOSSES = ("soft_margin", "bce", "ce")
DENOISE_LOSSES = ("l1", "mse")


class SegmentationLoss(nn.Module):
    """logits (B, K, H, W), mask (B, H, W) int64 -> scalar. K = 1: the mask's
    nonzero pixels are the foreground (sigmoid); K > 1: softmax over classes."""

    def __init__(self, kind: str = "dice_focal") -> None:
        super().__init__()
        from monai.losses import DiceCELoss, DiceFocalLoss

        if kind not in SEG_LOSSES:
            raise ValueError(f"SegmentationLoss: kind must be one of {SEG_LOSSES}, got {kind!r}")
        self.kind = kind
        common = dict(smooth_nr=1e-5, smooth_dr=1e-5)
        self.multi = (DiceFocalLoss(softmax=True, to_onehot_y=True, gamma=2.0, **common) if kind == "dice_focal"
                      else DiceCELoss(softmax=True, to_onehot_y=True, **common))
        self.single = (DiceFocalLoss(sigmoid=True, gamma=2.0, **common) if kind == "dice_focal"
                       else DiceCELoss(sigmoid=True, **common))

    def forward(self, logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if logits.dim() != 4 or mask.shape != (logits.shape[0], *logits.shape[2:]):
            raise ValueError(f"SegmentationLoss: expected logits (B, K, H, W) and mask (B, H, W), got "
                             f"{tuple(logits.shape)} and {tuple(mask.shape)}")
        logits = logits.float()
        if logits.shape[1] == 1:
            return self.single(logits, (mask > 0).float()[:, None])
        return self.multi(logits, mask[:, None].long())


class ClassificationLoss(nn.Module):
    """logits (B, L), labels (B, L) 0/1 (or (B,) class indices for "ce") -> scalar."""

    def __init__(self, kind: str = "soft_margin", class_weights: Sequence[float] | None = None) -> None:
        super().__init__()
        if kind not in CLS_LOSSES:
            raise ValueError(f"ClassificationLoss: kind must be one of {CLS_LOSSES}, got {kind!r}")
        self.kind = kind
        weight = None if class_weights is None else torch.as_tensor(class_weights, dtype=torch.float32)
        self.register_buffer("weight", weight)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        if self.kind == "ce":
            target = labels.argmax(1) if labels.dim() == 2 else labels.long()
            return F.cross_entropy(logits, target, weight=self.weight)
        if labels.shape != logits.shape:
            raise ValueError(f"ClassificationLoss: labels must have the logits' shape {tuple(logits.shape)}, "
                             f"got {tuple(labels.shape)}")
        if self.kind == "soft_margin":
            return F.multilabel_soft_margin_loss(logits, labels.float(), weight=self.weight)
        return F.binary_cross_entropy_with_logits(logits, labels.float(), pos_weight=self.weight)


def denoising_loss(output: torch.Tensor, clean: torch.Tensor, kind: str = "l1") -> torch.Tensor:
    if kind not in DENOISE_LOSSES:
        raise ValueError(f"denoising_loss: kind must be one of {DENOISE_LOSSES}, got {kind!r}")
    if output.shape != clean.shape:
        raise ValueError(f"denoising_loss: output {tuple(output.shape)} and clean {tuple(clean.shape)} differ")
    return (F.l1_loss if kind == "l1" else F.mse_loss)(output.float(), clean.float())


def detection_loss(det: Mapping[str, torch.Tensor], targets: Mapping[str, torch.Tensor],
                   size_weight: float = 0.1) -> torch.Tensor:
    """CenterNet: focal loss on the heatmap logits against Gaussian targets
    (alpha 2, beta 4; positives are the cells equal to 1), normalised by the
    number of boxes, + size_weight * L1(size) + L1(offset) at the box centres
    (targets from medmtl.models.encode_targets)."""
    heat = det["heatmap"].float()
    target = targets["heatmap"]
    p = torch.sigmoid(heat).clamp(1e-4, 1 - 1e-4)
    positive = target.eq(1).float()
    pos_loss = -torch.log(p) * (1 - p) ** 2 * positive
    neg_loss = -torch.log(1 - p) * p ** 2 * (1 - target) ** 4 * (1 - positive)
    count = positive.sum().clamp_min(1)
    mask = targets["mask"]
    centres = mask.sum().clamp_min(1)
    size_l1 = (F.l1_loss(det["size"].float(), targets["size"], reduction="none") * mask).sum() / centres
    offset_l1 = (F.l1_loss(det["offset"].float(), targets["offset"], reduction="none") * mask).sum() / centres
    return (pos_loss.sum() + neg_loss.sum()) / count + size_weight * size_l1 + offset_l1


class MultiTaskLoss(nn.Module):
    """Weighs the tasks' losses: {task: loss} -> (total, {task: loss value}).

    weights: a dict of fixed weights (missing tasks weigh 1), or "uncertainty":
    a learned log-variance s_t per task, total = sum exp(-s_t) L_t + s_t (its
    parameters go to the optimizer with the model's).
    """

    def __init__(self, tasks: Sequence[str], weights: Mapping[str, float] | str | None = None) -> None:
        super().__init__()
        self.tasks = tuple(tasks)
        self.uncertainty = weights == "uncertainty"
        if self.uncertainty:
            self.log_vars = nn.ParameterDict({t: nn.Parameter(torch.zeros(())) for t in self.tasks})
            self.weights = {}
        else:
            if weights is not None and (not isinstance(weights, Mapping) or any(
                    not isinstance(v, (int, float)) or v < 0 for v in weights.values())):
                raise ValueError(f"MultiTaskLoss: weights must be 'uncertainty' or a dict of non-negative numbers, "
                                 f"got {weights!r}")
            self.weights = {t: float((weights or {}).get(t, 1.0)) for t in self.tasks}

    def forward(self, losses: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        total = 0.0
        for task, value in losses.items():
            if self.uncertainty:
                s = self.log_vars[task]
                total = total + torch.exp(-s) * value + s
            else:
                total = total + self.weights.get(task, 1.0) * value
        return total, {t: float(v.detach()) for t, v in losses.items()}


class TaskLosses(nn.Module):
    """The losses of a model's tasks against a batch (medmtl.data's collate format):
    outputs {task: ...}, batch {"mask", "labels", "clean", "boxes", "box_labels"} -> {task: loss}."""

    def __init__(self, seg: str = "dice_focal", cls: str = "soft_margin", class_weights=None,
                 denoise: str = "l1", det_classes: int | None = None, det_stride: int = 4) -> None:
        super().__init__()
        self.seg = SegmentationLoss(seg)
        self.cls = ClassificationLoss(cls, class_weights)
        self.denoise_kind = denoise
        self.det_classes, self.det_stride = det_classes, det_stride

    def forward(self, outputs: Mapping, batch: Mapping) -> dict[str, torch.Tensor]:
        losses = {}
        for task, out in outputs.items():
            if task == "seg":
                losses[task] = self.seg(out, batch["mask"])
            elif task == "cls":
                losses[task] = self.cls(out, batch["labels"])
            elif task == "denoise":
                losses[task] = denoising_loss(out, batch["clean"], self.denoise_kind)
            elif task == "det":
                from medmtl.models.detection import encode_targets

                heat = out["heatmap"]
                # box labels 1..K (0 is background in the masks) -> heatmap channels 0..K-1
                targets = encode_targets(batch["boxes"], [b - 1 for b in batch["box_labels"]], heat.shape[1],
                                         tuple(heat.shape[2:]), self.det_stride)
                losses[task] = detection_loss(out, targets)
        return losses

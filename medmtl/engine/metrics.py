"""Evaluation metrics per task, from MONAI and torchmetrics.

    seg:     Dice, Jaccard and HD95 per foreground class and their mean (MONAI)
    cls:     accuracy, sensitivity, specificity (at 0.5) and AUC per label, and
             their macro averages (torchmetrics)
    denoise: PSNR and SSIM against the clean image (torchmetrics, data range 1)
    det:     mAP at IoU 0.5 (torchmetrics, faster-coco-eval backend)

MetricAccumulator takes batches (update) and returns one flat dict of floats
(compute): keys such as "dice_1", "dice_mean", "auc_macro", "psnr", "map50".
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F


class MetricAccumulator:
    """Accumulates a model's outputs against batches and computes the metrics.

    tasks: the tasks to score; seg_classes: classes of the masks (background 0
    included); label_names: the classification labels' names (for the keys).
    """

    def __init__(self, tasks: Sequence[str], seg_classes: int = 2, label_names: Sequence[str] | None = None,
                 det_stride: int = 4, decode=None) -> None:
        self.tasks = tuple(tasks)
        self.seg_classes = seg_classes
        self.label_names = list(label_names) if label_names is not None else None
        self.decode = decode  # model.decode_detections, for "det"
        self._seg_pred, self._seg_true = [], []
        self._cls_logits, self._cls_true = [], []
        self._den_out, self._den_true = [], []
        self._det_pred, self._det_true = [], []

    def update(self, outputs: Mapping, batch: Mapping) -> None:
        if "seg" in self.tasks and "seg" in outputs:
            logits = outputs["seg"].detach().float()
            pred = (logits[:, 0] > 0).long() if logits.shape[1] == 1 else logits.argmax(1)
            self._seg_pred.append(pred.cpu())
            self._seg_true.append(batch["mask"].cpu())
        if "cls" in self.tasks and "cls" in outputs:
            self._cls_logits.append(outputs["cls"].detach().float().cpu())
            self._cls_true.append(batch["labels"].cpu())
        if "denoise" in self.tasks and "denoise" in outputs:
            self._den_out.append(outputs["denoise"].detach().float().cpu())
            self._den_true.append(batch["clean"].cpu())
        if "det" in self.tasks and "det" in outputs and self.decode is not None:
            self._det_pred += self.decode({k: v.detach() for k, v in outputs["det"].items()}, score_threshold=0.05)
            self._det_true += [{"boxes": b.cpu(), "labels": (lb - 1).cpu()} for b, lb in
                               zip(batch["boxes"], batch["box_labels"])]

    _STATE = ("_seg_pred", "_seg_true", "_cls_logits", "_cls_true", "_den_out", "_den_true", "_det_pred",
              "_det_true")

    def state(self) -> dict[str, list]:
        """What update() has collected (CPU tensors), for gathering across processes."""
        return {name: getattr(self, name) for name in self._STATE}

    def merge(self, states: Sequence[Mapping[str, list]]) -> None:
        """Replaces the collected outputs by those of `states` (every process's
        state(), this one's included), in order."""
        for name in self._STATE:
            setattr(self, name, [item for state in states for item in state[name]])

    def compute(self) -> dict[str, float]:
        metrics = {}
        if self._seg_pred:
            metrics.update(segmentation_metrics(torch.cat(self._seg_pred), torch.cat(self._seg_true),
                                                self.seg_classes))
        if self._cls_logits:
            metrics.update(classification_metrics(torch.cat(self._cls_logits), torch.cat(self._cls_true),
                                                   self.label_names))
        if self._den_out:
            metrics.update(denoising_metrics(torch.cat(self._den_out), torch.cat(self._den_true)))
        if self._det_pred:
            metrics.update(detection_metrics(self._det_pred, self._det_true))
        return metrics


def segmentation_metrics(pred: torch.Tensor, true: torch.Tensor, classes: int) -> dict[str, float]:
    """pred, true (N, H, W) class indices -> Dice, Jaccard and HD95 (pixels) per
    foreground class (averaged over the images where the class is present in
    either map) and their means over the classes."""
    from monai.metrics import compute_dice, compute_hausdorff_distance, compute_iou

    classes = max(classes, 2)
    p = F.one_hot(pred.long(), classes).permute(0, 3, 1, 2).float()
    t = F.one_hot(true.long(), classes).permute(0, 3, 1, 2).float()
    present = (p[:, 1:].flatten(2).sum(-1) + t[:, 1:].flatten(2).sum(-1)) > 0   # (N, classes - 1)
    dice = compute_dice(p, t, include_background=False, ignore_empty=False)
    iou = compute_iou(p, t, include_background=False, ignore_empty=False)
    both = (p[:, 1:].flatten(2).sum(-1) > 0) & (t[:, 1:].flatten(2).sum(-1) > 0)
    with warnings.catch_warnings():
        # Empty classes give inf distances, which are excluded below (only images with the class
        # in both prediction and truth count); MONAI warns about each of them.
        warnings.filterwarnings("ignore", message=".*all 0, this may result in nan/inf distance")
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy", category=FutureWarning)
        hd = compute_hausdorff_distance(p, t, include_background=False, percentile=95)
    out = {}
    for k in range(1, classes):
        sel = present[:, k - 1]
        out[f"dice_{k}"] = dice[sel, k - 1].mean().item() if sel.any() else float("nan")
        out[f"jaccard_{k}"] = iou[sel, k - 1].mean().item() if sel.any() else float("nan")
        hsel = both[:, k - 1]
        out[f"hd95_{k}"] = hd[hsel, k - 1].mean().item() if hsel.any() else float("nan")
    for name in ("dice", "jaccard", "hd95"):
        values = [out[f"{name}_{k}"] for k in range(1, classes) if not math.isnan(out[f"{name}_{k}"])]
        out[f"{name}_mean"] = sum(values) / len(values) if values else float("nan")
    return out


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor,
                           names: Sequence[str] | None = None) -> dict[str, float]:
    """logits, labels (N, L) -> accuracy, sensitivity, specificity, F1, MCC (probability
    >= 0.5) and AUC per label (by name or index) and their macro averages."""
    from torchmetrics.functional.classification import binary_auroc, binary_f1_score, binary_matthews_corrcoef

    probs = torch.sigmoid(logits)
    pred, true = probs >= 0.5, labels >= 0.5
    names = list(names) if names is not None else [str(i) for i in range(labels.shape[1])]
    out, per = {}, {"accuracy": [], "sensitivity": [], "specificity": [], "f1": [], "mcc": [], "auc": []}
    for j, name in enumerate(names):
        tp = (pred[:, j] & true[:, j]).sum().item()
        tn = (~pred[:, j] & ~true[:, j]).sum().item()
        pos, neg = true[:, j].sum().item(), (~true[:, j]).sum().item()
        values = {"accuracy": (tp + tn) / max(pos + neg, 1),
                  "sensitivity": tp / pos if pos else float("nan"),
                  "specificity": tn / neg if neg else float("nan"),
                  "f1": float(binary_f1_score(probs[:, j], true[:, j].long()).item()),
                  "mcc": float(binary_matthews_corrcoef(probs[:, j], true[:, j].long()).item()),
                  "auc": binary_auroc(probs[:, j], true[:, j].long()).item() if pos and neg else float("nan")}
        for key, value in values.items():
            out[f"{key}_{name}"] = value
            per[key].append(value)
    for key, values in per.items():
        finite = [v for v in values if not math.isnan(v)]
        out[f"{key}_macro"] = sum(finite) / len(finite) if finite else float("nan")
    return out


def denoising_metrics(output: torch.Tensor, clean: torch.Tensor) -> dict[str, float]:
    """output, clean (N, C, H, W) in [0, 1] -> PSNR (dB) and SSIM."""
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    output = output.clamp(0, 1)
    return {"psnr": peak_signal_noise_ratio(output, clean, data_range=1.0).item(),
            "ssim": structural_similarity_index_measure(output, clean, data_range=1.0).item()}


def detection_metrics(predictions: list[dict], targets: list[dict]) -> dict[str, float]:
    """torchvision-format predictions and targets per image -> mAP at IoU 0.5 ("map50")."""
    from torchmetrics.detection import MeanAveragePrecision

    metric = MeanAveragePrecision(iou_thresholds=[0.5], backend="faster_coco_eval")
    metric.update([{k: v.cpu() for k, v in p.items()} for p in predictions], targets)
    return {"map50": metric.compute()["map_50"].item()}

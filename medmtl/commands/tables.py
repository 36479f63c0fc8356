"""Markdown tables of metrics, as the commands print them.

    print(metrics_tables(metrics, label_names=("cyst", "nodule", "plaque")))
"""

from __future__ import annotations

import math
from collections.abc import Sequence

SEG_METRICS = (("dice", "Dice"), ("jaccard", "Jaccard (IoU)"), ("hd95", "HD95 (px)"))
CLS_METRICS = (("auc", "AUC"), ("accuracy", "accuracy"), ("sensitivity", "sensitivity"),
               ("specificity", "specificity"), ("f1", "F1"), ("mcc", "MCC"))
SCALARS = (("loss", "loss"), ("psnr", "PSNR (dB)"), ("ssim", "SSIM"), ("map50", "mAP@0.5"))


def fmt(value, digits: int = 3) -> str:
    if isinstance(value, float) and math.isnan(value):
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def markdown(header: Sequence[str], rows: Sequence[Sequence], align_first_left: bool = True) -> str:
    lines = ["| " + " | ".join(header) + " |",
             "|" + ("---|" if align_first_left else "---:|") + "---:|" * (len(header) - 1)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def metrics_tables(metrics: dict, label_names: Sequence[str] | None = None,
                   class_names: Sequence[str] | None = None) -> str:
    """Segmentation (per class and mean), classification (per label and macro) and the
    scalar metrics present in `metrics`, as markdown tables."""
    parts = []
    classes = sorted(int(k.split("_")[1]) for k in metrics if k.startswith("dice_") and k[5:].isdigit())
    if classes:
        names = [class_names[c - 1] if class_names and c - 1 < len(class_names) else f"class {c}" for c in classes]
        rows = [[label] + [metrics.get(f"{key}_{c}", float("nan")) for c in classes] + [metrics[f"{key}_mean"]]
                for key, label in SEG_METRICS if f"{key}_mean" in metrics]
        parts.append(markdown(["segmentation", *names, "mean"], rows))
    if "auc_macro" in metrics:
        labels = list(label_names) if label_names else sorted(
            k[len("auc_"):] for k in metrics if k.startswith("auc_") and k != "auc_macro")
        rows = [[label] + [metrics.get(f"{key}_{n}", float("nan")) for n in labels] + [metrics[f"{key}_macro"]]
                for key, label in CLS_METRICS if f"{key}_macro" in metrics]
        parts.append(markdown(["classification", *labels, "macro"], rows))
    scalars = [(label, metrics[key]) for key, label in SCALARS if key in metrics]
    scalars += [(k, v) for k, v in metrics.items() if k.endswith("loss") and k != "loss"]
    if scalars:
        parts.append(markdown(["metric", "value"], scalars))
    return "\n\n".join(parts)

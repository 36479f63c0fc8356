"""progress.png (loss and metric curves) and overlays of predictions on images."""

from __future__ import annotations

import math
from pathlib import Path

import torch


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path) -> Path:
    """Writes the figure to path (creating its folder) and closes it."""
    plt = _pyplot()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_progress(history: list[dict], path: Path, monitor: str | None = None) -> Path:
    """history: one dict per epoch ("epoch", "train_loss", "val_loss", metrics) -> a PNG
    with the losses on the left and the validation metrics in [0, 1] on the right."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    epochs = [row["epoch"] for row in history]
    for key in ("train_loss", "val_loss"):
        points = [(e, row[key]) for e, row in zip(epochs, history) if _finite(row.get(key))]
        if points:
            left.plot(*zip(*points), marker="o", label=key.replace("_", " "))
    left.set_xlabel("epoch")
    left.set_ylabel("loss")
    left.legend()
    shown = [k for k in ("dice_mean", "jaccard_mean", "auc_macro", "accuracy_macro", "ssim", "map50")
             if any(_finite(row.get(k)) for row in history)]
    if monitor and monitor not in shown and any(_finite(row.get(monitor)) for row in history):
        shown.append(monitor)
    for key in shown:
        points = [(e, row[key]) for e, row in zip(epochs, history) if _finite(row.get(key))]
        right.plot(*zip(*points), marker="o", label=key)
    right.set_xlabel("epoch")
    right.set_ylabel("validation metric")
    if shown:
        right.legend()
    return _save(fig, path)


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


# class 1..3 colours (RGB), the background transparent
COLOURS = [(0.95, 0.25, 0.2), (0.2, 0.8, 0.3), (0.25, 0.5, 1.0), (1.0, 0.8, 0.1), (0.8, 0.3, 0.9)]


def save_overlay(image: torch.Tensor, path: Path, pred_mask: torch.Tensor | None = None,
                 true_mask: torch.Tensor | None = None, boxes: torch.Tensor | None = None,
                 box_labels: torch.Tensor | None = None, true_boxes: torch.Tensor | None = None,
                 title: str = "") -> Path:
    """image (C, H, W); pred_mask / true_mask (H, W) class indices; boxes (K, 4) xyxy.
    Left: the image with the ground truth (mask outlines, dashed boxes); right:
    the prediction filled in its class colours, with predicted boxes."""
    plt = _pyplot()
    img = image.detach().float().cpu()
    img = img[0] if img.shape[0] == 1 else img.permute(1, 2, 0)
    lo, hi = img.min(), img.max()
    img = ((img - lo) / (hi - lo).clamp_min(1e-8)).numpy()
    fig, axes = plt.subplots(1, 2, figsize=(6.4, 3.4))
    for ax, which in zip(axes, ("ground truth", "prediction")):
        ax.imshow(img, cmap="gray" if img.ndim == 2 else None)
        ax.set_title(which, fontsize=9)
        ax.axis("off")
    if true_mask is not None:
        for k in range(1, int(true_mask.max()) + 1):
            if (true_mask == k).any():
                axes[0].contour((true_mask == k).numpy(), levels=[0.5], colors=[COLOURS[(k - 1) % len(COLOURS)]],
                                linewidths=1)
    if pred_mask is not None:
        rgba = torch.zeros(*pred_mask.shape, 4)
        for k in range(1, int(pred_mask.max()) + 1):
            rgba[pred_mask == k] = torch.tensor([*COLOURS[(k - 1) % len(COLOURS)], 0.45])
        axes[1].imshow(rgba.numpy())
    for ax, bxs, style in ((axes[0], true_boxes, "--"), (axes[1], boxes, "-")):
        if bxs is None:
            continue
        for i, (x1, y1, x2, y2) in enumerate(bxs.tolist()):
            k = int(box_labels[i]) if (box_labels is not None and ax is axes[1]) else 1
            ax.add_patch(plt.Rectangle((x1 - 0.5, y1 - 0.5), x2 - x1, y2 - y1, fill=False, linestyle=style,
                                       edgecolor=COLOURS[(k - 1) % len(COLOURS)], linewidth=1))
    if title:
        fig.suptitle(title, fontsize=9)
    return _save(fig, path)

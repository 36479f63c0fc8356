"""An anchor-free (CenterNet-style) detection head and its decoder.

The head predicts, on a feature map of stride s, a per-class centre heatmap
(logits; sigmoid gives the probability that a box of that class is centred
in the cell), the box size (width, height) in input pixels / s, and the
centre's sub-cell offset (x, y) in cells. decode_detections turns the maps
into boxes in input pixels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class CenterNetHead(nn.Module):
    """(B, in_channels, h, w) -> {"heatmap": (B, classes, h, w) logits, "size": (B, 2, h, w),
    "offset": (B, 2, h, w)}; the heatmap's bias starts at -2.19 (sigmoid 0.1), as CenterNet."""

    def __init__(self, in_channels: int, classes: int, hidden: int = 64) -> None:
        super().__init__()

        def branch(out):
            return nn.Sequential(nn.Conv2d(in_channels, hidden, 3, padding=1), nn.ReLU(inplace=True),
                                 nn.Conv2d(hidden, out, 1))

        self.heatmap = branch(classes)
        self.size = branch(2)
        self.offset = branch(2)
        nn.init.constant_(self.heatmap[-1].bias, -2.19)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"heatmap": self.heatmap(x), "size": self.size(x), "offset": self.offset(x)}


def decode_detections(det: dict[str, torch.Tensor], stride: int, score_threshold: float = 0.3,
                      max_detections: int = 100) -> list[dict[str, torch.Tensor]]:
    """Dense maps -> per image {"boxes": (K, 4) xyxy in input pixels, "scores": (K,), "labels": (K,)}.

    A detection is a heatmap cell that is the maximum of its 3x3 neighbourhood
    (CenterNet's max-pool suppression) with sigmoid score >= score_threshold;
    the best max_detections per image are kept, best first. A box's centre is
    (cell + offset + 0.5) * stride pixels and its sides size * stride pixels.
    """
    if not isinstance(det, dict) or not {"heatmap", "size", "offset"} <= set(det):
        raise ValueError("decode_detections: det must be a dict with 'heatmap', 'size' and 'offset' maps, got "
                         f"{sorted(det) if isinstance(det, dict) else type(det).__name__}")
    heat, size, offset = det["heatmap"], det["size"], det["offset"]
    if heat.dim() != 4 or size.shape != (heat.shape[0], 2, *heat.shape[2:]) or offset.shape != size.shape:
        raise ValueError(f"decode_detections: expected heatmap (B, classes, h, w), size and offset (B, 2, h, w), "
                         f"got {tuple(heat.shape)}, {tuple(size.shape)}, {tuple(offset.shape)}")
    if isinstance(stride, bool) or not isinstance(stride, int) or stride <= 0:
        raise ValueError(f"decode_detections: stride must be a positive int, got {stride!r}")
    if not 0.0 <= score_threshold <= 1.0:
        raise ValueError(f"decode_detections: score_threshold must be in [0, 1], got {score_threshold!r}")
    if isinstance(max_detections, bool) or not isinstance(max_detections, int) or max_detections <= 0:
        raise ValueError(f"decode_detections: max_detections must be a positive int, got {max_detections!r}")
    scores = torch.sigmoid(heat.detach().float())
    peaks = scores * (F.max_pool2d(scores, 3, stride=1, padding=1) == scores)
    batch, classes, h, w = scores.shape
    results = []
    for b in range(batch):
        flat = peaks[b].flatten()
        k = min(max_detections, flat.numel())
        top, index = flat.topk(k)
        keep = top >= score_threshold
        top, index = top[keep], index[keep]
        labels = index // (h * w)
        cell = index % (h * w)
        ys, xs = (cell // w).float(), (cell % w).float()
        off = offset[b].detach().float().flatten(1)[:, cell]               # (2, K)
        wh = size[b].detach().float().flatten(1)[:, cell].clamp_min(0)    # (2, K)
        cx = (xs + off[0] + 0.5) * stride
        cy = (ys + off[1] + 0.5) * stride
        half_w, half_h = wh[0] * stride / 2, wh[1] * stride / 2
        boxes = torch.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], 1)
        results.append({"boxes": boxes, "scores": top, "labels": labels})
    return results


def encode_targets(boxes: list[torch.Tensor], labels: list[torch.Tensor], classes: int, map_size: tuple[int, int],
                   stride: int) -> dict[str, torch.Tensor]:
    """Ground-truth boxes (per image (K, 4) xyxy pixels) -> the head's target maps:
    {"heatmap": (B, classes, h, w) Gaussian peaks in [0, 1], "size": (B, 2, h, w),
    "offset": (B, 2, h, w), "mask": (B, 1, h, w) 1 at each box's centre cell}.

    The Gaussian's radius follows the box size (sigma = max(w, h) / 6 cells,
    at least 0.5): the inverse of decode_detections.
    """
    h, w = map_size
    batch = len(boxes)
    device = boxes[0].device if batch else torch.device("cpu")
    heat = torch.zeros(batch, classes, h, w, device=device)
    size = torch.zeros(batch, 2, h, w, device=device)
    offset = torch.zeros(batch, 2, h, w, device=device)
    mask = torch.zeros(batch, 1, h, w, device=device)
    ys = torch.arange(h, device=device, dtype=torch.float32)[:, None]
    xs = torch.arange(w, device=device, dtype=torch.float32)[None, :]
    for b, (bx, lb) in enumerate(zip(boxes, labels)):
        for (x1, y1, x2, y2), label in zip(bx.float().tolist(), lb.tolist()):
            cx, cy = (x1 + x2) / 2 / stride - 0.5, (y1 + y2) / 2 / stride - 0.5
            ix, iy = min(max(int(round(cx)), 0), w - 1), min(max(int(round(cy)), 0), h - 1)
            bw, bh = (x2 - x1) / stride, (y2 - y1) / stride
            sigma = max(max(bw, bh) / 6, 0.5)
            gauss = torch.exp(-((xs - ix) ** 2 + (ys - iy) ** 2) / (2 * sigma ** 2))
            heat[b, label] = torch.maximum(heat[b, label], gauss)
            size[b, :, iy, ix] = torch.tensor([bw, bh], device=device)
            offset[b, :, iy, ix] = torch.tensor([cx - ix, cy - iy], device=device)
            mask[b, 0, iy, ix] = 1
    return {"heatmap": heat, "size": size, "offset": offset, "mask": mask}

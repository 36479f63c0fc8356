"""SyntheticLesions: the built-in multi-task dataset, deterministic from its seed.

Each image has a shaded, textured background (a random intensity ramp, blurred
noise blobs at two scales, fine grain) and 0-2 lesions of each of three kinds:

    class 1 "cyst":    round to oval, darker than its surroundings, smooth
                       inside, a sharp rim (radius 10-16% of the image)
    class 2 "nodule":  small and round, brighter, speckled inside, a soft edge
                       (radius 5-8%)
    class 3 "plaque":  an elongated chain of overlapping blobs, striped texture
                       at about the background's level (length 25-40%)

Contrast is relative to the local background, whose shading spans more than
any lesion's contrast, so no global intensity threshold separates a kind
(tests/test_synthetic_lesions.py measures the best threshold rule per class).
Masks hold one class per kind, labels are the kinds present in the mask, and
each lesion has a box (the extent of its mask pixels). With `noise` set the
image is a noisy copy (Gaussian, Poisson or speckle) of the clean image,
which the sample carries as "clean" (the denoising target).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

KINDS = ("cyst", "nodule", "plaque")
NOISES = ("gaussian", "poisson", "speckle")


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur of (H, W) with reflection at the edges."""
    radius = max(1, int(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-t ** 2 / (2 * sigma ** 2))
    k = k / k.sum()
    y = F.pad(x[None, None], (radius, radius, radius, radius), mode="reflect")
    y = F.conv2d(y, k.view(1, 1, 1, -1))
    return F.conv2d(y, k.view(1, 1, -1, 1))[0, 0]


def _rand(g: torch.Generator, low: float = 0.0, high: float = 1.0) -> float:
    return low + (high - low) * torch.rand((), generator=g).item()


class SyntheticLesions(Dataset):
    """n images of (channels, img_size, img_size) with masks, labels, boxes and
    (with noise) clean targets. Sample i depends only on (seed, i).

    Args:
        n: number of images.
        img_size: side in pixels (>= 32).
        seed: the dataset's seed; datasets with different seeds do not share images.
        channels: 1 (grayscale) or 3 (RGB: a per-image tint, lesions not told apart by colour).
        noise: None (image = clean) or "gaussian", "poisson", "speckle", "mixed"
            (one of the three per image); the sample then carries "clean".
        noise_level: the noise's strength (Gaussian sigma / speckle sigma; Poisson
            peak counts 1 / noise_level^2).
        cache: keep each sample once made (about 50 KB at 64 px): epochs after the
            first read them from memory.

    Sample: {"image": (C, S, S) float32 in about [0, 1], "mask": (S, S) int64 in
    0..3, "labels": (3,) float32, "boxes": (K, 4) float32 xyxy pixels (x2, y2
    exclusive), "box_labels": (K,) int64 in 1..3, ["clean": (C, S, S)], "name"}.
    """

    seg_classes = len(KINDS) + 1
    num_labels = len(KINDS)
    label_names = KINDS
    class_names = KINDS  # mask classes 1..3
    tasks = ("seg", "cls", "det", "denoise")

    def __init__(self, n: int, img_size: int = 64, seed: int = 0, channels: int = 1, noise: str | None = None,
                 noise_level: float = 0.1, cache: bool = True) -> None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"SyntheticLesions: n must be a non-negative int, got {n!r}")
        if isinstance(img_size, bool) or not isinstance(img_size, int) or img_size < 32:
            raise ValueError(f"SyntheticLesions: img_size must be an int >= 32, got {img_size!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"SyntheticLesions: seed must be a non-negative int, got {seed!r}")
        if channels not in (1, 3):
            raise ValueError(f"SyntheticLesions: channels must be 1 or 3, got {channels!r}")
        if noise is not None and noise not in NOISES + ("mixed",):
            raise ValueError(f"SyntheticLesions: noise must be None or one of {NOISES + ('mixed',)}, got {noise!r}")
        if isinstance(noise_level, bool) or not isinstance(noise_level, (int, float)) or not 0 < noise_level < 1:
            raise ValueError(f"SyntheticLesions: noise_level must be in (0, 1), got {noise_level!r}")
        self.n, self.img_size, self.seed, self.channels = n, img_size, seed, channels
        self.noise, self.noise_level = noise, float(noise_level)
        self._cache: dict[int, dict] | None = {} if cache else None

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> dict:
        if not -self.n <= index < self.n:
            raise IndexError(f"SyntheticLesions: index {index} out of range for {self.n} images")
        index %= self.n
        if self._cache is not None and index in self._cache:
            return dict(self._cache[index])
        sample = self._make(index)
        if self._cache is not None:
            self._cache[index] = sample
        return dict(sample)

    def _make(self, index: int) -> dict:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        size = self.img_size
        clean, mask, boxes, box_labels = self._render(g, size)
        if self.channels == 3:
            tint = 0.75 + 0.5 * torch.rand(3, generator=g)
            grain = 0.02 * torch.randn(3, size, size, generator=g)
            image = (clean[None] * tint[:, None, None] + grain).clamp(0, 1)
        else:
            image = clean[None]
        labels = torch.tensor([float((mask == k + 1).any()) for k in range(len(KINDS))])
        sample = {"image": image.float(), "mask": mask, "labels": labels,
                  "boxes": torch.tensor(boxes, dtype=torch.float32).view(-1, 4),
                  "box_labels": torch.tensor(box_labels, dtype=torch.int64), "name": f"synthetic_{index:05d}"}
        if self.noise is not None:
            kind = NOISES[int(torch.randint(3, (), generator=g))] if self.noise == "mixed" else self.noise
            sample["clean"] = sample["image"]
            sample["image"] = self._add_noise(sample["image"], kind, g)
            sample["noise"] = kind
        return sample

    # -- rendering

    def _background(self, g: torch.Generator, size: int) -> torch.Tensor:
        yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
        angle = _rand(g, 0, 2 * math.pi)
        ramp = (xx * math.cos(angle) + yy * math.sin(angle)) * _rand(g, 0.12, 0.22)
        coarse = _blur(torch.randn(size, size, generator=g), size / 8)
        fine = _blur(torch.randn(size, size, generator=g), size / 40)
        coarse = coarse / coarse.std().clamp_min(1e-6)
        fine = fine / fine.std().clamp_min(1e-6)
        return _rand(g, 0.4, 0.6) + ramp + 0.08 * coarse + 0.03 * fine

    def _render(self, g: torch.Generator, size: int):
        image = self._background(g, size)
        mask = torch.zeros(size, size, dtype=torch.int64)
        yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                                indexing="ij")
        local = _blur(image, size / 10)  # the background level lesions are drawn against
        counts = [int(torch.multinomial(torch.tensor([0.4, 0.4, 0.2]), 1, generator=g)) for _ in KINDS]
        lesions = [k for k, c in enumerate(counts) for _ in range(c)]
        lesions = [lesions[i] for i in torch.randperm(len(lesions), generator=g).tolist()]
        regions = []
        for kind in lesions:
            for _ in range(20):  # a place that does not touch earlier lesions
                shape = self._shape(kind, g, size, yy, xx)
                if shape.any() and not (shape & (mask > 0)).any() and not _touches(shape, mask):
                    break
            else:
                continue
            image = self._paint(kind, shape, image, local, g, yy, xx, size)
            mask[shape] = kind + 1
            regions.append((kind, shape))
        boxes, box_labels = [], []
        for kind, shape in regions:
            rows, cols = shape.any(1).nonzero().flatten(), shape.any(0).nonzero().flatten()
            boxes.append([cols[0].item(), rows[0].item(), cols[-1].item() + 1, rows[-1].item() + 1])
            box_labels.append(kind + 1)
        return image.clamp(0, 1), mask, boxes, box_labels

    def _shape(self, kind: int, g, size: int, yy, xx) -> torch.Tensor:
        margin = 0.12 * size
        cy, cx = _rand(g, margin, size - margin), _rand(g, margin, size - margin)
        if kind == 0:  # cyst: an oval
            r = _rand(g, 0.10, 0.16) * size
            a, t = _rand(g, 0.7, 1.0), _rand(g, 0, math.pi)
            u = (xx - cx) * math.cos(t) + (yy - cy) * math.sin(t)
            v = -(xx - cx) * math.sin(t) + (yy - cy) * math.cos(t)
            return (u / r) ** 2 + (v / (a * r)) ** 2 <= 1
        if kind == 1:  # nodule: a small disc
            r = _rand(g, 0.05, 0.08) * size
            return (xx - cx) ** 2 + (yy - cy) ** 2 <= r ** 2
        # plaque: overlapping blobs along a bent line
        length, t = _rand(g, 0.25, 0.40) * size, _rand(g, 0, math.pi)
        bend = _rand(g, -0.5, 0.5)
        shape = torch.zeros_like(xx, dtype=torch.bool)
        for s in torch.linspace(-0.5, 0.5, 7).tolist():
            px = cx + s * length * math.cos(t) - bend * s * s * length * math.sin(t)
            py = cy + s * length * math.sin(t) + bend * s * s * length * math.cos(t)
            r = _rand(g, 0.03, 0.05) * size
            shape |= (xx - px) ** 2 + (yy - py) ** 2 <= r ** 2
        return shape

    def _paint(self, kind, shape, image, local, g, yy, xx, size):
        soft = _blur(shape.float(), size / 64 if kind == 0 else size / 40)
        if kind == 0:    # darker, smooth: pull towards a level below the local background
            target = local - _rand(g, 0.18, 0.26)
            return image * (1 - soft) + target * soft
        if kind == 1:    # brighter, speckled
            speckle = 0.06 * torch.randn(size, size, generator=g)
            return image + soft * (_rand(g, 0.16, 0.24) + speckle)
        # plaque: stripes across the local level
        t = _rand(g, 0, math.pi)
        period = _rand(g, 0.06, 0.09) * size
        stripes = torch.sin(2 * math.pi * (xx * math.cos(t) + yy * math.sin(t)) / period)
        return image * (1 - soft) + (local + 0.12 * stripes + 0.05) * soft

    def _add_noise(self, clean: torch.Tensor, kind: str, g: torch.Generator) -> torch.Tensor:
        s = self.noise_level
        if kind == "gaussian":
            noisy = clean + s * torch.randn(clean.shape, generator=g)
        elif kind == "poisson":
            peak = 1.0 / s ** 2
            noisy = torch.poisson(clean.clamp_min(0) * peak, generator=g) / peak
        else:
            noisy = clean * (1 + s * torch.randn(clean.shape, generator=g))
        return noisy.float()


def _touches(shape: torch.Tensor, mask: torch.Tensor) -> bool:
    """Whether shape comes within 2 pixels of a lesion already in the mask."""
    grown = F.max_pool2d(shape.float()[None, None], 5, stride=1, padding=2)[0, 0] > 0
    return bool((grown & (mask > 0)).any())

"""Joint transforms of sample dicts: image, mask, boxes (and clean) move together.

Each transform is a callable `t(sample, generator=None) -> sample` on the
sample contract of medmtl.data (see collate.py): "image" (C, H, W) float32,
optional "mask" (H, W) int64, "clean" (C, H, W) float32, "boxes" (K, 4)
float32 xyxy in pixel-edge coordinates (pixel (i, j) covers x in [j, j+1),
y in [i, i+1); x2, y2 exclusive) with "box_labels" (K,) int64. Other keys
pass through. The input dict is not modified; a new dict is returned.

Randomness comes from a torch.Generator: the one passed to the call, else the
one given at construction (a Generator, or an int seed for a new one), else
torch's global generator. The same seed gives the same transforms.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

__all__ = ["Compose", "Resize", "RandomFlip", "RandomRotate", "NormalizeIntensity"]


def _check_sample(sample, who: str) -> tuple[int, int]:
    """Check the sample's keys and shapes; return its (H, W)."""
    if not isinstance(sample, dict):
        raise TypeError(f"{who}: sample must be a dict, got {type(sample).__name__}")
    image = sample.get("image")
    if not isinstance(image, torch.Tensor) or image.dim() != 3 or not image.is_floating_point():
        got = f"{type(image).__name__} {tuple(image.shape)} {image.dtype}" if isinstance(image, torch.Tensor) \
            else type(image).__name__
        raise ValueError(f"{who}: sample['image'] must be a floating (C, H, W) tensor, got {got}")
    h, w = image.shape[1:]
    if "mask" in sample:
        m = sample["mask"]
        if not isinstance(m, torch.Tensor) or tuple(m.shape) != (h, w) or m.is_floating_point():
            got = f"{tuple(m.shape)} {m.dtype}" if isinstance(m, torch.Tensor) else type(m).__name__
            raise ValueError(f"{who}: sample['mask'] must be an integer ({h}, {w}) tensor like the image, got {got}")
    if "clean" in sample:
        c = sample["clean"]
        if not isinstance(c, torch.Tensor) or c.shape != image.shape:
            got = tuple(c.shape) if isinstance(c, torch.Tensor) else type(c).__name__
            raise ValueError(f"{who}: sample['clean'] must have the image's shape {tuple(image.shape)}, got {got}")
    if ("boxes" in sample) != ("box_labels" in sample):
        raise ValueError(f"{who}: sample must have both 'boxes' and 'box_labels' or neither, got keys {sorted(sample)}")
    if "boxes" in sample:
        b, lab = sample["boxes"], sample["box_labels"]
        if not isinstance(b, torch.Tensor) or b.dim() != 2 or b.shape[1] != 4:
            got = tuple(b.shape) if isinstance(b, torch.Tensor) else type(b).__name__
            raise ValueError(f"{who}: sample['boxes'] must be a (K, 4) tensor, got {got}")
        if not isinstance(lab, torch.Tensor) or tuple(lab.shape) != (b.shape[0],):
            got = tuple(lab.shape) if isinstance(lab, torch.Tensor) else type(lab).__name__
            raise ValueError(f"{who}: sample['box_labels'] must be a ({b.shape[0]},) tensor, got {got}")
    return int(h), int(w)


def _make_generator(generator, who: str) -> torch.Generator | None:
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    if isinstance(generator, int) and not isinstance(generator, bool):
        return torch.Generator().manual_seed(generator)
    raise TypeError(f"{who}: generator must be a torch.Generator, an int seed or None, got {type(generator).__name__}")


def _uniform(g: torch.Generator | None) -> float:
    return float(torch.rand((), generator=g))


def _check_p(p, who: str) -> float:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
        raise ValueError(f"{who}: p must be a probability in [0, 1], got {p!r}")
    return float(p)


class _Random:
    """Holds the construction-time generator of a random transform."""

    def __init__(self, generator, who: str):
        self._who = who
        self.generator = _make_generator(generator, who)

    def _gen(self, generator) -> torch.Generator | None:
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"{self._who}: generator must be a torch.Generator or None, got {type(generator).__name__}")
        return generator if generator is not None else self.generator


class Compose:
    """Apply transforms in order: Compose([Resize(128), RandomFlip(), ...])(sample, generator=None).

    The per-call generator is passed to every transform that takes one
    (every medmtl transform does); plain callables get the sample only.
    """

    def __init__(self, transforms: Sequence[Callable]):
        if not isinstance(transforms, (list, tuple)) or not all(callable(t) for t in transforms):
            raise TypeError(f"Compose: transforms must be a list of callables, got {transforms!r}")
        self.transforms = list(transforms)

    def __call__(self, sample: dict, generator: torch.Generator | None = None) -> dict:
        for t in self.transforms:
            sample = t(sample, generator=generator) if _takes_generator(t) else t(sample)
        return sample

    def __repr__(self) -> str:
        return f"Compose({self.transforms!r})"


def _takes_generator(fn) -> bool:
    import inspect
    if isinstance(fn, (Compose, Resize, RandomFlip, RandomRotate, NormalizeIntensity)):
        return True
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "generator" or p.kind is p.VAR_KEYWORD for p in params)


class Resize:
    """Resize to `size` (int: square, or (H, W)): image and clean bilinear
    (antialiased when shrinking), mask nearest (pixel centres), boxes scaled
    by (W'/W, H'/H)."""

    def __init__(self, size: int | Sequence[int]):
        if isinstance(size, int) and not isinstance(size, bool):
            size = (size, size)
        if (not isinstance(size, (list, tuple)) or len(size) != 2
                or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size)):
            raise ValueError(f"Resize: size must be a positive int or a pair (H, W) of positive ints, got {size!r}")
        self.size = (int(size[0]), int(size[1]))

    def __call__(self, sample: dict, generator: torch.Generator | None = None) -> dict:
        h, w = _check_sample(sample, "Resize")
        out = dict(sample)
        nh, nw = self.size
        if (nh, nw) == (h, w):
            return out
        for key in ("image", "clean"):
            if key in out:
                x = out[key]
                out[key] = F.interpolate(x[None].float(), size=(nh, nw), mode="bilinear", align_corners=False,
                                         antialias=True)[0].to(x.dtype)
        if "mask" in out:
            m = out["mask"]
            out["mask"] = F.interpolate(m[None, None].float(), size=(nh, nw), mode="nearest-exact")[0, 0].to(m.dtype)
        if "boxes" in out:
            scale = torch.tensor([nw / w, nh / h, nw / w, nh / h], dtype=out["boxes"].dtype)
            out["boxes"] = out["boxes"] * scale
        return out

    def __repr__(self) -> str:
        return f"Resize({self.size})"


class RandomFlip(_Random):
    """Flip each axis in `axes` with probability p: "h" mirrors left-right
    (the W axis), "v" top-bottom (the H axis). One draw per axis, in order."""

    def __init__(self, p: float = 0.5, axes: Sequence[str] = ("h", "v"), generator=None):
        super().__init__(generator, "RandomFlip")
        self.p = _check_p(p, "RandomFlip")
        if isinstance(axes, str):
            axes = (axes,)
        if not isinstance(axes, (list, tuple)) or not axes or any(a not in ("h", "v") for a in axes):
            raise ValueError(f"RandomFlip: axes must be a non-empty sequence of 'h' and 'v', got {axes!r}")
        self.axes = tuple(axes)

    def __call__(self, sample: dict, generator: torch.Generator | None = None) -> dict:
        h, w = _check_sample(sample, "RandomFlip")
        g = self._gen(generator)
        out = dict(sample)
        for axis in self.axes:
            if _uniform(g) < self.p:
                out = _flip(out, axis, h, w)
        return out

    def __repr__(self) -> str:
        return f"RandomFlip(p={self.p}, axes={self.axes})"


def _flip(sample: dict, axis: str, h: int, w: int) -> dict:
    out = dict(sample)
    for key in ("image", "clean", "mask"):
        if key in out:
            out[key] = torch.flip(out[key], dims=(-1,) if axis == "h" else (-2,))
    if "boxes" in out:
        b = out["boxes"]
        if axis == "h":
            out["boxes"] = torch.stack([w - b[:, 2], b[:, 1], w - b[:, 0], b[:, 3]], dim=1)
        else:
            out["boxes"] = torch.stack([b[:, 0], h - b[:, 3], b[:, 2], h - b[:, 1]], dim=1)
    return out


class RandomRotate(_Random):
    """With probability p, rotate by an angle drawn uniformly from
    [-degrees, degrees] (or from (low, high) when `degrees` is a pair),
    counter-clockwise on screen, about the image centre, keeping the size.

    Image and clean bilinear, mask nearest; pixels from outside are 0. Each
    box becomes the axis-aligned box enclosing its rotated corners, clipped to
    the image; boxes left with no area (rotated out of the image) are dropped
    with their labels.
    """

    def __init__(self, degrees: float | Sequence[float] = 25, p: float = 0.5, generator=None):
        super().__init__(generator, "RandomRotate")
        self.p = _check_p(p, "RandomRotate")
        if isinstance(degrees, (int, float)) and not isinstance(degrees, bool):
            if degrees < 0:
                raise ValueError(f"RandomRotate: degrees must be >= 0 or a pair (low, high), got {degrees!r}")
            degrees = (-float(degrees), float(degrees))
        if (not isinstance(degrees, (list, tuple)) or len(degrees) != 2
                or not all(isinstance(d, (int, float)) for d in degrees) or degrees[0] > degrees[1]):
            raise ValueError(f"RandomRotate: degrees must be a number >= 0 or a pair (low, high) with low <= high, "
                             f"got {degrees!r}")
        self.degrees = (float(degrees[0]), float(degrees[1]))

    def __call__(self, sample: dict, generator: torch.Generator | None = None) -> dict:
        _check_sample(sample, "RandomRotate")
        g = self._gen(generator)
        if _uniform(g) >= self.p:
            return dict(sample)
        low, high = self.degrees
        return rotate(sample, low + (high - low) * _uniform(g))

    def __repr__(self) -> str:
        return f"RandomRotate(degrees={self.degrees}, p={self.p})"


def rotate(sample: dict, angle: float) -> dict:
    """Rotate a sample by `angle` degrees counter-clockwise on screen (see RandomRotate)."""
    h, w = _check_sample(sample, "rotate")
    if isinstance(angle, bool) or not isinstance(angle, (int, float)) or not math.isfinite(angle):
        raise ValueError(f"rotate: angle must be a finite number of degrees, got {angle!r}")
    c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    # Content moves by p' - ctr = M (p - ctr), M = [[c, s], [-s, c]] in (x, y) with y down. grid_sample
    # needs the inverse M^T in normalised coordinates (u = 2x/W - 1, align_corners=False).
    theta = torch.tensor([[[c, -s * h / w, 0.0], [s * w / h, c, 0.0]]], dtype=torch.float32)
    grid = F.affine_grid(theta, [1, 1, h, w], align_corners=False)
    out = dict(sample)
    for key in ("image", "clean"):
        if key in out:
            x = out[key]
            out[key] = F.grid_sample(x[None].float(), grid, mode="bilinear", padding_mode="zeros",
                                     align_corners=False)[0].to(x.dtype)
    if "mask" in out:
        m = out["mask"]
        out["mask"] = F.grid_sample(m[None, None].float(), grid, mode="nearest", padding_mode="zeros",
                                    align_corners=False)[0, 0].round().to(m.dtype)
    if "boxes" in out:
        b = out["boxes"].float()
        xs = torch.stack([b[:, 0], b[:, 2], b[:, 2], b[:, 0]], dim=1) - w / 2
        ys = torch.stack([b[:, 1], b[:, 1], b[:, 3], b[:, 3]], dim=1) - h / 2
        rx, ry = c * xs + s * ys + w / 2, -s * xs + c * ys + h / 2
        nb = torch.stack([rx.min(1).values.clamp(0, w), ry.min(1).values.clamp(0, h),
                          rx.max(1).values.clamp(0, w), ry.max(1).values.clamp(0, h)], dim=1)
        keep = (nb[:, 2] > nb[:, 0]) & (nb[:, 3] > nb[:, 1])
        out["boxes"] = nb[keep].to(out["boxes"].dtype)
        out["box_labels"] = out["box_labels"][keep]
    return out


class NormalizeIntensity:
    """Per image: subtract the mean and divide by the standard deviation
    (MONAI's monai.transforms.NormalizeIntensity on "image"), over the nonzero
    pixels only when `nonzero`, per channel when `channel_wise`; a zero std
    divides by 1. A "clean" target gets the same map as its image (the
    image's statistics, on the pixels where the image is nonzero when
    `nonzero`), so the denoising target stays consistent with the input."""

    def __init__(self, nonzero: bool = False, channel_wise: bool = False):
        for name, v in (("nonzero", nonzero), ("channel_wise", channel_wise)):
            if not isinstance(v, bool):
                raise TypeError(f"NormalizeIntensity: {name} must be a bool, got {v!r}")
        self.nonzero, self.channel_wise = nonzero, channel_wise

    def __call__(self, sample: dict, generator: torch.Generator | None = None) -> dict:
        _check_sample(sample, "NormalizeIntensity")
        from monai.transforms import NormalizeIntensity as MonaiNormalizeIntensity

        out = dict(sample)
        image = sample["image"]
        norm = MonaiNormalizeIntensity(nonzero=self.nonzero, channel_wise=self.channel_wise, dtype=image.dtype)
        out["image"] = _plain(norm(image.clone()))
        if "clean" in sample:
            out["clean"] = self._same_map(image, sample["clean"])
        return out

    def _same_map(self, image: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
        groups = [(image[i], clean[i]) for i in range(image.shape[0])] if self.channel_wise else [(image, clean)]
        outs = []
        for img, cl in groups:
            sel = img != 0 if self.nonzero else torch.ones_like(img, dtype=torch.bool)
            if not sel.any():
                outs.append(cl.clone())
                continue
            vals = img[sel].float()
            mean, std = vals.mean(), vals.std(unbiased=False)
            std = std if std != 0 else torch.ones(())
            outs.append(torch.where(sel, (cl - mean) / std, cl).to(cl.dtype))
        return torch.stack(outs) if self.channel_wise else outs[0]

    def __repr__(self) -> str:
        return f"NormalizeIntensity(nonzero={self.nonzero}, channel_wise={self.channel_wise})"


def _plain(x) -> torch.Tensor:
    """A MONAI MetaTensor (or array) as a plain torch.Tensor."""
    if hasattr(x, "as_tensor"):
        return x.as_tensor()
    return torch.as_tensor(x)

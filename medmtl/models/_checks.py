"""Argument checks shared by the model constructors: each error names the
model, the argument, what it expected and what it got."""

from __future__ import annotations

from collections.abc import Sequence


def positive_int(owner: str, name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{owner}: {name} must be a positive int, got {value!r}")
    return value


def non_negative_int(owner: str, name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{owner}: {name} must be a non-negative int, got {value!r}")
    return value


def probability(owner: str, name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{owner}: {name} must be a float in [0, 1), got {value!r}")
    return float(value)


def int_tuple(owner: str, name: str, value, length: int | None = None, minimum: int = 1) -> tuple[int, ...]:
    """A sequence of ints >= minimum (of the given length, if any), as a tuple."""
    ok = isinstance(value, Sequence) and not isinstance(value, str) and len(value) > 0 and all(
        isinstance(v, int) and not isinstance(v, bool) and v >= minimum for v in value)
    if not ok or (length is not None and len(value) != length):
        what = f"{length} ints" if length is not None else "a non-empty sequence of ints"
        raise ValueError(f"{owner}: {name} must be {what} >= {minimum}, got {value!r}")
    return tuple(int(v) for v in value)


def choice(owner: str, name: str, value, options: Sequence):
    if value not in options:
        raise ValueError(f"{owner}: {name} must be one of {tuple(options)}, got {value!r}")
    return value


def tasks_subset(owner: str, value, available: Sequence[str]) -> tuple[str, ...]:
    """The requested tasks, in the model's order; each must be one of `available`."""
    if isinstance(value, str) or not isinstance(value, Sequence) or not value or \
            any(t not in available for t in value) or len(set(value)) != len(value):
        raise ValueError(f"{owner}: tasks must be a non-empty subset of {tuple(available)} without repeats, "
                         f"got {value!r}")
    return tuple(t for t in available if t in value)


def image_batch(owner: str, x, in_channels: int, multiple: int):
    """x must be a floating (B, in_channels, H, W) tensor with H and W multiples of `multiple`."""
    import torch

    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{owner}: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4 or x.shape[1] != in_channels:
        raise ValueError(f"{owner}: x must be (B, in_channels={in_channels}, H, W), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{owner}: x must be a floating-point tensor, got {x.dtype}")
    h, w = x.shape[-2:]
    if h % multiple or w % multiple or h == 0 or w == 0:
        raise ValueError(f"{owner}: x's height and width must be positive multiples of {multiple}, "
                         f"got {h} x {w}")

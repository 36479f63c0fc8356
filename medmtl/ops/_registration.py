"""Helpers shared by the op modules: tensor argument checks with uniform messages."""

from __future__ import annotations

import torch


def check_tensor(op: str, name: str, t: object, dims: int | None = None) -> torch.Tensor:
    """A floating tensor of `dims` dimensions, else TypeError/ValueError naming `name`."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a tensor, got {type(t).__name__}")
    if not t.dtype.is_floating_point:
        raise TypeError(f"{op}: {name} must have a floating dtype, got {t.dtype}")
    if dims is not None and t.dim() != dims:
        raise ValueError(f"{op}: {name} must be {dims}-D, got {t.dim()}-D of shape {tuple(t.shape)}")
    return t


def check_like(op: str, name: str, t: torch.Tensor, ref: torch.Tensor, ref_name: str) -> None:
    """Same dtype and device as `ref`."""
    if t.dtype != ref.dtype:
        raise TypeError(f"{op}: {name} must have the dtype of {ref_name} ({ref.dtype}), got {t.dtype}")
    if t.device != ref.device:
        raise ValueError(f"{op}: {name} must be on the device of {ref_name} ({ref.device}), got {t.device}")

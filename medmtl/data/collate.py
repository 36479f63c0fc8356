"""Batching of sample dicts (the contract shared by every medmtl dataset).

A sample is a dict with "image" (C, H, W) float32 and optionally "mask" (H, W)
int64, "labels" (num_labels,) float32, "clean" (C, H, W) float32, "boxes"
(K, 4) float32 xyxy pixels with "box_labels" (K,) int64, and "name" str.
"""

from __future__ import annotations

import torch

STACKED_KEYS = ("image", "mask", "labels", "clean")
LISTED_KEYS = ("boxes", "box_labels")


def collate_samples(samples: list[dict]) -> dict:
    """Batch a list of samples for a DataLoader (`collate_fn=collate_samples`).

    Returns a dict with the same keys: "image" (B, C, H, W), "mask" (B, H, W),
    "labels" (B, num_labels), "clean" (B, C, H, W) stacked; "boxes" a list of B
    (K_i, 4) tensors and "box_labels" a list of B (K_i,) tensors (K_i may
    differ per image); "name" a list of B str; any other key a list of its B
    values. Raises ValueError naming the key when the samples disagree on
    their keys or on the shape of a stacked tensor.
    """
    if not isinstance(samples, (list, tuple)):
        raise TypeError(f"collate_samples: samples must be a list of dicts, got {type(samples).__name__}")
    if len(samples) == 0:
        raise ValueError("collate_samples: samples must be a non-empty list of dicts, got an empty list")
    for i, s in enumerate(samples):
        if not isinstance(s, dict):
            raise TypeError(f"collate_samples: samples[{i}] must be a dict, got {type(s).__name__}")
    keys = set(samples[0])
    for i, s in enumerate(samples[1:], start=1):
        if set(s) != keys:
            diff = sorted(keys.symmetric_difference(s))
            raise ValueError(f"collate_samples: samples[{i}] and samples[0] have different keys: "
                             f"key {diff[0]!r} is in one and not the other (keys {sorted(s)} vs {sorted(keys)})")
    batch: dict = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        if key in STACKED_KEYS:
            batch[key] = _stack(key, values)
        elif key in LISTED_KEYS:
            batch[key] = _tensor_list(key, values)
        elif key == "name":
            for i, v in enumerate(values):
                if not isinstance(v, str):
                    raise TypeError(f"collate_samples: samples[{i}]['name'] must be a str, got {type(v).__name__}")
            batch[key] = list(values)
        else:
            batch[key] = list(values)
    if "boxes" in batch and "box_labels" in batch:
        for i, (b, lab) in enumerate(zip(batch["boxes"], batch["box_labels"])):
            if b.dim() != 2 or b.shape[1] != 4 or lab.dim() != 1 or lab.shape[0] != b.shape[0]:
                raise ValueError(f"collate_samples: samples[{i}] 'boxes' must be (K, 4) and 'box_labels' (K,), "
                                 f"got {tuple(b.shape)} and {tuple(lab.shape)}")
    return batch


def _stack(key: str, values: list) -> torch.Tensor:
    for i, v in enumerate(values):
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"collate_samples: samples[{i}][{key!r}] must be a torch.Tensor, got {type(v).__name__}")
        if v.shape != values[0].shape or v.dtype != values[0].dtype:
            raise ValueError(f"collate_samples: key {key!r} has shape {tuple(v.shape)} ({v.dtype}) in samples[{i}] "
                             f"but {tuple(values[0].shape)} ({values[0].dtype}) in samples[0]; resize the samples "
                             f"to one size (medmtl.data.Resize) before batching")
    return torch.stack(values)


def _tensor_list(key: str, values: list) -> list[torch.Tensor]:
    for i, v in enumerate(values):
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"collate_samples: samples[{i}][{key!r}] must be a torch.Tensor, got {type(v).__name__}")
    return list(values)

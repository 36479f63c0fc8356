"""ModelSummary: parameters per part and per task head, multiply-adds per task.

Multiply-adds are counted by torch.utils.flop_counter on a forward pass under
the `reference` backend (plain PyTorch ops, which the counter knows; the fused
ops compute the same products), at batch 1: a task's count is the shared parts'
plus its own head's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_parameters(module: nn.Module | None, trainable_only: bool = False) -> int:
    if module is None:
        return 0
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


@dataclass
class ModelSummary:
    """What model.summary(img_size) returns; str() gives the table."""

    name: str
    img_size: tuple[int, int]
    parts: dict[str, int]                      # shared part -> parameters
    heads: dict[str, int]                      # task -> parameters of its head
    macs: dict[str, int]                       # task -> multiply-adds at batch 1
    total_parameters: int
    trainable_parameters: int
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        h, w = self.img_size
        lines = [f"{self.name} at {h} x {w}, batch 1",
                 f"{'part':<28}{'parameters':>14}"]
        lines += [f"{name:<28}{count:>14,}" for name, count in self.parts.items()]
        lines += [f"{'head: ' + task:<28}{count:>14,}" for task, count in self.heads.items()]
        lines.append(f"{'total':<28}{self.total_parameters:>14,}")
        lines.append(f"{'trainable':<28}{self.trainable_parameters:>14,}")
        lines.append(f"{'task':<28}{'multiply-adds':>14}")
        lines += [f"{task:<28}{macs / 1e9:>13.2f}G" for task, macs in self.macs.items()]
        lines += self.notes
        return "\n".join(lines)


def _module_flops(model: nn.Module, x: torch.Tensor) -> dict[str, int]:
    """FLOPs per module path (relative to model, "" for the whole) of model(x)."""
    from medmtl.ops.backends import backend

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), backend("reference"), counter:
        model(x)
    root = type(model).__name__
    flops = {}
    for name, ops in counter.get_flop_counts().items():
        if name == "Global":
            flops[""] = sum(ops.values())
        elif name == root or name.startswith(root + "."):
            flops[name[len(root) + 1:]] = sum(ops.values())
    return flops


def _flops_under(flops: dict[str, int], path: str) -> int:
    """FLOPs of the module at `path` and everything below it. The counter
    credits each op to every module around it, but only to modules that were
    called (a ModuleList is not): so sum the outermost counted modules under path."""
    inside = [k for k in flops if k and (k == path or k.startswith(path + "."))]
    outermost = [k for k in inside if not any(k != o and k.startswith(o + ".") for o in inside)]
    return sum(flops[k] for k in outermost)


def summarize(model: nn.Module, img_size, parts: dict[str, list[str]], heads: dict[str, list[str]],
              notes: list[str] | None = None) -> ModelSummary:
    """parts and heads map a name (a task for heads) to the model's submodule paths it owns."""
    if isinstance(img_size, int):
        img_size = (img_size, img_size)
    if not (isinstance(img_size, (tuple, list)) and len(img_size) == 2 and
            all(isinstance(s, int) and s > 0 for s in img_size)):
        raise ValueError(f"summary: img_size must be an int or (H, W) of positive ints, got {img_size!r}")

    def params(paths):
        return sum(count_parameters(model.get_submodule(p)) for p in paths if p)

    was_training = model.training
    model.eval()
    try:
        first = next(model.parameters())
        x = torch.zeros(1, model.in_channels, *img_size, dtype=first.dtype, device=first.device)
        flops = _module_flops(model, x)
    finally:
        model.train(was_training)
    head_paths = {p for paths in heads.values() for p in paths}
    shared = flops.get("", 0) - sum(_flops_under(flops, p) for p in head_paths)
    macs = {task: (shared + sum(_flops_under(flops, p) for p in paths)) // 2 for task, paths in heads.items()}
    return ModelSummary(
        name=type(model).__name__, img_size=tuple(img_size),
        parts={name: params(paths) for name, paths in parts.items()},
        heads={task: params(paths) for task, paths in heads.items()},
        macs=macs, total_parameters=count_parameters(model),
        trainable_parameters=count_parameters(model, trainable_only=True), notes=list(notes or []))

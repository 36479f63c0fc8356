"""UMS-Rep's two stages and its fine-tuning strategies (PAPERS.md section 2).

Stage 1, pretrain_representation: the representation learns by denoising
(the dataset's "image" is noisy and "clean" the target; e.g.
SyntheticLesions(noise="mixed")), only the denoising head on top.

Stage 2, finetune(strategy):
    independent  the representation frozen; each task's head trained on its
                 own, one after the other (one representation serves all)
    alternating  representation trainable; the tasks take turns batch by batch
    joint        representation trainable; one summed loss
    separate     the baseline: one model per task, from scratch (make_model()),
                 each trained on its task alone

Every run records its training time and trainable parameters beside its
validation metrics, as the paper reports compute beside accuracy.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path

from torch import nn

from medmtl.engine.trainer import TrainConfig, Trainer

STRATEGIES = ("independent", "alternating", "joint", "separate")


def _trainable(parameters) -> int:
    return sum(p.numel() for p in parameters if p.requires_grad)


def _run(model, train_set, val_set, out_dir, config, tasks, parameters=None) -> dict:
    start = time.perf_counter()
    trainer = Trainer(model, train_set, val_set, out_dir, config, tasks=tasks, parameters=parameters)
    params = list(parameters) if parameters is not None else [p for p in model.parameters() if p.requires_grad]
    history = trainer.fit()
    seconds = time.perf_counter() - start
    metrics = {k: v for k, v in history[-1].items() if k not in ("epoch", "lr", "seconds")}
    return {"tasks": list(tasks), "seconds": seconds, "trainable_parameters": _trainable(params), **metrics}


def pretrain_representation(model: nn.Module, train_set, val_set=None, out_dir="runs/ums_rep/pretrain",
                            config: TrainConfig | None = None) -> dict:
    """Stage 1: trains model's representation and denoising head on denoising (model.pretrain())."""
    model.pretrain().freeze_representation(False)
    config = dataclasses.replace(config or TrainConfig(), loss_weights=None, monitor="val_loss")
    parameters = list(model.representation_parameters()) + list(model.head_parameters("denoise"))
    return _run(model, train_set, val_set, Path(out_dir), config, ("denoise",), parameters)


def finetune(model: nn.Module, strategy: str, train_set, val_set=None, out_dir="runs/ums_rep",
             config: TrainConfig | None = None, make_model: Callable[[], nn.Module] | None = None) -> list[dict]:
    """Stage 2 under `strategy` (see the module docstring); returns one record per
    run: {"strategy", "tasks", "seconds", "trainable_parameters", metrics...}."""
    if strategy not in STRATEGIES:
        raise ValueError(f"finetune: strategy must be one of {STRATEGIES}, got {strategy!r}")
    config = dataclasses.replace(config or TrainConfig(), loss_weights=None)
    out_dir = Path(out_dir) / strategy
    tasks = tuple(model.tasks)
    records = []
    if strategy in ("alternating", "joint"):
        model.finetune().freeze_representation(False)
        parameters = list(model.representation_parameters()) + [p for t in tasks for p in model.head_parameters(t)]
        run = _run(model, train_set, val_set, out_dir, dataclasses.replace(config, task_schedule=strategy), tasks,
                   parameters)
        records.append(run)
    elif strategy == "independent":
        model.finetune().freeze_representation(True)
        for task in tasks:
            records.append(_run(model, train_set, val_set, out_dir / task, config, (task,),
                                list(model.head_parameters(task))))
    else:
        if make_model is None:
            raise ValueError("finetune: strategy 'separate' needs make_model, a function returning a fresh model")
        for task in tasks:
            fresh = make_model().finetune()
            records.append(_run(fresh, train_set, val_set, out_dir / task, config, (task,)))
    return [{"strategy": strategy, **r} for r in records]

"""Trainer: trains and evaluates a multi-task model on medmtl.data samples.

    trainer = Trainer(model, train_set, val_set, out_dir="runs/demo", config=TrainConfig(epochs=20))
    history = trainer.fit()            # or fit(resume=True) after an interruption
    metrics = trainer.evaluate(test_set, out_dir="runs/demo/test")

The recipe is ResFormer's: AdamW, poly learning-rate decay (power 0.9) per
step, fixed task weights (seg 1, cls 0.25) unless given (or "uncertainty").
Every `val_every` epochs it evaluates, appends a row to metrics.csv, and
writes checkpoint_last.pth (model, optimizer, scheduler, loss weights, epoch,
RNG states, config, history) and checkpoint_best.pth (by config.monitor),
both atomically. Each epoch's batch order comes from (seed, epoch), and the
RNG states are restored on resume, so a resumed run repeats the
uninterrupted run's losses exactly. At the end: progress.png and overlays of
the validation predictions.

Under torchrun (medmtl.engine.distributed) the model is wrapped in
DistributedDataParallel, config.batch_size stays the global batch (each
process takes its shards of it), validation is split across the processes and
its metrics computed over all of them, and only process 0 writes files.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Subset

import medmtl
from medmtl.data.collate import collate_samples
from medmtl.engine import distributed as dist
from medmtl.engine.checkpoint import load_checkpoint, rng_state, save_atomic, set_rng_state
from medmtl.engine.losses import MultiTaskLoss, TaskLosses
from medmtl.engine.metrics import MetricAccumulator
from medmtl.engine.plots import plot_progress, save_overlay

SCHEDULES = ("joint", "alternating")
OPTIMIZERS = ("adamw", "sgd")
LOWER_IS_BETTER = ("loss", "val_loss", "hd95_mean")


@dataclass
class TrainConfig:
    """How to train.

    batch_size: samples per optimizer step over all processes (each of N
        processes takes batch_size / (N x accumulate_steps) per micro-batch).
    accumulate_steps: micro-batches whose gradients are summed per step.
    monitor: the validation metric that picks checkpoint_best (higher is
        better, except losses and HD95).
    init_from: a checkpoint whose model weights start the run (every tensor
        whose name and shape match; e.g. UMS-Rep's pretraining run).
    sync_batchnorm: with several processes on GPUs, BatchNorm statistics over
        every process's micro-batch (torch.nn.SyncBatchNorm).
    optimizer: "adamw" (ResFormer's) or "sgd" (Nesterov momentum 0.99, nnU-Net's).
    class_weights: per-label weights of the classification loss, or "balanced":
        n_negative / n_positive of each label in the training set (rare labels weigh more),
        scaled to mean 1.
    """

    epochs: int = 20
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 3e-5
    poly_power: float = 0.9
    grad_clip: float | None = 5.0
    amp: bool = False
    seed: int = 0
    val_every: int = 1
    monitor: str = "val_loss"
    loss_weights: dict | str | None = field(default_factory=lambda: {"seg": 1.0, "cls": 0.25})
    seg_loss: str = "dice_focal"
    cls_loss: str = "soft_margin"
    class_weights: list | str | None = None
    denoise_loss: str = "l1"
    task_schedule: str = "joint"
    backend: str | None = None
    overlays: int = 4
    progress_bar: bool = True
    accumulate_steps: int = 1
    num_workers: int = 0
    init_from: str | None = None
    sync_batchnorm: bool = False
    optimizer: str = "adamw"

    def check(self) -> None:
        for name in ("epochs", "batch_size", "val_every", "accumulate_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"TrainConfig: {name} must be a positive int, got {value!r}")
        if not self.lr > 0:
            raise ValueError(f"TrainConfig: lr must be positive, got {self.lr!r}")
        if self.task_schedule not in SCHEDULES:
            raise ValueError(f"TrainConfig: task_schedule must be one of {SCHEDULES}, got {self.task_schedule!r}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"TrainConfig: grad_clip must be positive or None, got {self.grad_clip!r}")
        if isinstance(self.class_weights, str) and self.class_weights != "balanced":
            raise ValueError(f"TrainConfig: class_weights must be a list of numbers, 'balanced' or None, got "
                             f"{self.class_weights!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"TrainConfig: optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if isinstance(self.num_workers, bool) or not isinstance(self.num_workers, int) or self.num_workers < 0:
            raise ValueError(f"TrainConfig: num_workers must be a non-negative int, got {self.num_workers!r}")


def _to_device(batch: dict, device) -> dict:
    moved = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            moved[key] = value.to(device)
        elif isinstance(value, list) and value and isinstance(value[0], torch.Tensor):
            moved[key] = [v.to(device) for v in value]
        else:
            moved[key] = value
    return moved


class Trainer:
    """Trains `model` on train_set (medmtl.data samples) and evaluates it on val_set.

    tasks: the model outputs to train and score (default: the model's tasks,
        or its active tasks for UMS-Rep).
    parameters: what the optimizer updates (default: every parameter that
        requires a gradient, and the uncertainty weights if any).
    train_set: None makes a Trainer that only evaluates (fit raises).
    metadata: written into both checkpoints as "metadata" (the command puts
        the resolved run config and the label names there).
    """

    def __init__(self, model: nn.Module, train_set: Dataset | None, val_set: Dataset | None = None,
                 out_dir: str | Path = "runs/train", config: TrainConfig | None = None,
                 tasks: Sequence[str] | None = None, parameters: Iterable[nn.Parameter] | None = None,
                 device: str | torch.device = "cpu", metadata: dict | None = None) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"Trainer: model must be an nn.Module, got {type(model).__name__}")
        if train_set is not None and len(train_set) == 0:
            raise ValueError("Trainer: train_set must be a non-empty dataset (or None to only evaluate)")
        self.metadata = dict(metadata or {})
        self.config = config or TrainConfig()
        self.config.check()
        self.device = torch.device(device)
        self.world, self.rank = dist.world_size(), dist.rank()
        self.is_main = self.rank == 0
        self.model = model.to(self.device)
        if self.config.init_from:
            load_matching_weights(self.model, self.config.init_from)
        if self.config.sync_batchnorm and self.world > 1:
            self.model = dist.convert_sync_batchnorm(self.model, self.device)
        self.train_set, self.val_set = train_set, val_set
        self.out_dir = Path(out_dir)
        available = getattr(model, "active_tasks", getattr(model, "tasks", None))
        self.tasks = tuple(tasks) if tasks is not None else tuple(available)
        if available is not None and any(t not in available for t in self.tasks):
            raise ValueError(f"Trainer: tasks must be among the model's {tuple(available)}, got {self.tasks}")
        class_weights = self.config.class_weights
        if class_weights == "balanced":
            class_weights = balanced_label_weights(train_set) if train_set is not None else None
        self.losses = TaskLosses(self.config.seg_loss, self.config.cls_loss, class_weights,
                                 self.config.denoise_loss, det_stride=getattr(model, "det_stride", 4))
        self.weighting = MultiTaskLoss(self.tasks, self.config.loss_weights).to(self.device)
        params = list(parameters) if parameters is not None else [p for p in model.parameters() if p.requires_grad]
        params += list(self.weighting.parameters())
        if not params:
            raise ValueError("Trainer: nothing to train (no parameter requires a gradient)")
        self.network = self.model
        if self.world > 1:
            # Heads of tasks a step does not train (alternating schedule, UMS-Rep's
            # inactive heads) get no gradient: DDP must be told to look for them.
            unused = self.config.task_schedule == "alternating" or set(self.tasks) != set(available or self.tasks)
            self.network = DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=unused)
        if self.config.optimizer == "sgd":
            self.optimizer = torch.optim.SGD(params, lr=self.config.lr, momentum=0.99, nesterov=True,
                                             weight_decay=self.config.weight_decay)
        else:
            self.optimizer = torch.optim.AdamW(params, lr=self.config.lr, weight_decay=self.config.weight_decay)
        per_epoch = len(self._train_sampler(1)) if train_set is not None else self.config.accumulate_steps
        steps = self.config.epochs * math.ceil(per_epoch / self.config.accumulate_steps)
        power = self.config.poly_power
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: max(0.0, 1 - step / steps) ** power)
        self.history: list[dict] = []
        self.epoch = 0
        self.best = None

    # -- the backend the fused layers run on

    def _backend(self):
        name = self.config.backend
        if name is None:
            from medmtl._extension import extension_loaded

            name = "cpu" if self.device.type == "cpu" and extension_loaded() else "auto"
        return medmtl.backend(name)

    def _autocast(self):
        if not self.config.amp:
            return torch.autocast(self.device.type, enabled=False)
        dtype = torch.bfloat16 if self.device.type == "cpu" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    # -- training

    def _train_sampler(self, epoch: int) -> dist.ShardedBatchSampler:
        return dist.ShardedBatchSampler(len(self.train_set), self.config.batch_size, self.config.seed, epoch,
                                        self.world, self.rank, self.config.accumulate_steps)

    def _loader(self, dataset: Dataset, epoch: int | None) -> DataLoader:
        """epoch None: evaluation batches in order (this process's share of
        dataset); else this process's training micro-batches of `epoch`."""
        workers = self.config.num_workers
        if epoch is None:
            if self.world > 1:
                dataset = Subset(dataset, range(self.rank, len(dataset), self.world))
            return DataLoader(dataset, batch_size=self.config.batch_size, shuffle=False, collate_fn=collate_samples,
                              num_workers=workers)
        if hasattr(self.train_set, "set_epoch"):
            self.train_set.set_epoch(epoch)
        return DataLoader(dataset, batch_sampler=self._train_sampler(epoch), collate_fn=collate_samples,
                          num_workers=workers)

    def _outputs_for(self, outputs: dict, step: int) -> dict:
        if self.config.task_schedule == "alternating":
            task = self.tasks[step % len(self.tasks)]
            return {task: outputs[task]}
        return {t: outputs[t] for t in self.tasks}

    def train_epoch(self, epoch: int) -> dict[str, float]:
        """One epoch; returns the mean training losses over every process's samples."""
        self.network.train()
        totals, count = {}, 0
        accumulate = self.config.accumulate_steps
        loader = self._loader(self.train_set, epoch)
        bar = _progress(loader, f"epoch {epoch}/{self.config.epochs}", self.config.progress_bar and self.is_main)
        micro = 0
        for index, batch in enumerate(bar):
            # A kept partial last batch (one process, no accumulation) is a step of its own.
            step, micro = index // accumulate, index % accumulate
            last_micro = micro == accumulate - 1
            batch = _to_device(batch, self.device)
            if micro == 0:
                self.optimizer.zero_grad(set_to_none=True)
            sync = last_micro or self.world == 1
            with self._backend(), self._autocast(), (contextlib.nullcontext() if sync else self.network.no_sync()):
                outputs = self.network(batch["image"])
                losses = self.losses(self._outputs_for(outputs, step), batch)
                total, parts = self.weighting(losses)
                if not torch.isfinite(total):
                    raise FloatingPointError(f"Trainer: the loss became {total.item()} at epoch {epoch}, step "
                                             f"{step} (task losses {parts}); lower lr or enable grad_clip")
                (total / accumulate).backward()
            n = batch["image"].shape[0]
            count += n
            totals["loss"] = totals.get("loss", 0.0) + total.item() * n
            for task, value in parts.items():
                totals[f"loss_{task}"] = totals.get(f"loss_{task}", 0.0) + value * n
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{totals['loss'] / count:.4f}")
            if not last_micro:
                continue
            dist.average_gradients(self.weighting.parameters())
            if self.config.grad_clip:
                nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
            self.optimizer.step()
            self.scheduler.step()
        keys = sorted(totals)
        summed = dist.all_reduce_sum([totals[k] for k in keys] + [count], self.device)
        return {f"train_{k}": v / summed[-1] for k, v in zip(keys, summed)}

    def fit(self, resume: bool = False, stop_after_epoch: int | None = None) -> list[dict]:
        """Trains for config.epochs epochs (from the last checkpoint's epoch with resume=True);
        returns the history (one dict per epoch). stop_after_epoch: stop once that epoch of
        the schedule is done (a time-limited job; fit(resume=True) continues it exactly)."""
        if self.train_set is None:
            raise ValueError("Trainer.fit: this Trainer was made without a train_set (evaluation only)")
        if stop_after_epoch is not None and (isinstance(stop_after_epoch, bool) or not isinstance(
                stop_after_epoch, int) or stop_after_epoch < 1):
            raise ValueError(f"Trainer.fit: stop_after_epoch must be a positive int or None, got {stop_after_epoch!r}")
        if self.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "config.json").write_text(json.dumps(dataclasses.asdict(self.config), indent=1))
        if resume and (self.out_dir / "checkpoint_last.pth").is_file():
            self.load(self.out_dir / "checkpoint_last.pth")
        last = self.config.epochs if stop_after_epoch is None else min(stop_after_epoch, self.config.epochs)
        for epoch in range(self.epoch + 1, last + 1):
            start = time.perf_counter()
            row = {"epoch": epoch, **self.train_epoch(epoch), "lr": self.optimizer.param_groups[0]["lr"]}
            if self.val_set is not None and (epoch % self.config.val_every == 0 or epoch == self.config.epochs):
                row.update(self.evaluate(self.val_set, prefix_loss="val_"))
            row["seconds"] = time.perf_counter() - start
            self.history.append(row)
            self.epoch = epoch
            self._save_checkpoints(row)
        if last < self.config.epochs:
            dist.barrier()
            return self.history
        if self.is_main and self.history:
            plot_progress(self.history, self.out_dir / "progress.png", self.config.monitor)
        if self.is_main and self.val_set is not None and self.config.overlays:
            self.save_overlays(self.val_set, self.out_dir / "overlays", self.config.overlays)
        dist.barrier()
        return self.history

    # -- evaluation

    @torch.no_grad()
    def predict(self, batch: dict) -> dict:
        self.model.eval()
        with self._backend(), self._autocast():
            return self.model(_to_device(batch, self.device)["image"])

    @torch.no_grad()
    def evaluate(self, dataset: Dataset, out_dir: str | Path | None = None, prefix_loss: str = "") -> dict:
        """Metrics of the model on dataset (and its mean loss as "{prefix_loss}loss");
        with out_dir, also written to metrics.json and metrics.csv there."""
        labels = getattr(dataset, "label_names", None)
        accumulator = MetricAccumulator(self.tasks, getattr(dataset, "seg_classes", getattr(self.model, "seg_classes",
                                                                                            2)),
                                        labels, decode=getattr(self.model, "decode_detections", None))
        dist.broadcast_buffers(self.model)
        total, count = 0.0, 0
        for batch in self._loader(dataset, None):
            batch = _to_device(batch, self.device)
            outputs = self.predict(batch)
            outputs = {t: outputs[t] for t in self.tasks}
            loss, _ = self.weighting(self.losses(outputs, batch))
            n = batch["image"].shape[0]
            total, count = total + float(loss) * n, count + n
            accumulator.update(outputs, batch)
        total, count = dist.all_reduce_sum([total, count], self.device)
        accumulator.merge(dist.all_gather_objects(accumulator.state()))
        metrics = {f"{prefix_loss}loss": total / max(count, 1), **accumulator.compute()}
        if out_dir is not None and self.is_main:
            out = Path(out_dir)
            out.mkdir(parents=True, exist_ok=True)
            (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
            with open(out / "metrics.csv", "w", newline="") as f:
                writer = csv.writer(f)
                writer.writerow(["metric", "value"])
                writer.writerows(metrics.items())
        return metrics

    @torch.no_grad()
    def save_overlays(self, dataset: Dataset, out_dir: Path, count: int) -> list[Path]:
        paths = []
        for i in range(min(count, len(dataset))):
            sample = dataset[i]
            batch = collate_samples([sample])
            outputs = self.predict(batch)
            pred_mask = boxes = labels = None
            if "seg" in outputs:
                seg = outputs["seg"][0].float()
                pred_mask = (seg[0] > 0).long() if seg.shape[0] == 1 else seg.argmax(0)
            if "det" in outputs and hasattr(self.model, "decode_detections"):
                det = self.model.decode_detections({k: v for k, v in outputs["det"].items()}, 0.3)[0]
                boxes, labels = det["boxes"], det["labels"] + 1
            title = sample.get("name", str(i))
            if "cls" in outputs:
                probs = torch.sigmoid(outputs["cls"][0].float()).tolist()
                title += "  p=" + ", ".join(f"{p:.2f}" for p in probs)
            paths.append(save_overlay(sample["image"], out_dir / f"{sample.get('name', i)}.png", pred_mask.cpu()
                                      if pred_mask is not None else None, sample.get("mask"),
                                      boxes.cpu() if boxes is not None else None, labels,
                                      sample.get("boxes"), title))
        return paths

    # -- checkpoints

    def state(self) -> dict:
        """The training state; collective under torchrun (every process's RNG state is gathered)."""
        rngs = dist.all_gather_objects(rng_state())
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "weighting": self.weighting.state_dict(),
                "epoch": self.epoch, "rng": rngs[0], "rng_per_process": rngs,
                "config": dataclasses.asdict(self.config), "history": self.history, "best": self.best,
                "metadata": self.metadata}

    def load(self, path: str | Path) -> None:
        """Restores a checkpoint_last.pth (model, optimizer, scheduler, epoch, RNG, history)."""
        state = load_checkpoint(path)
        missing = {"model", "optimizer", "scheduler", "epoch", "rng"} - set(state)
        if missing:
            raise ValueError(f"Trainer.load: {path} is not a training checkpoint (missing {sorted(missing)})")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.weighting.load_state_dict(state.get("weighting", {}))
        self.epoch, self.history, self.best = state["epoch"], list(state.get("history", [])), state.get("best")
        per_process = state.get("rng_per_process") or [state["rng"]]
        set_rng_state(per_process[self.rank] if len(per_process) == self.world else state["rng"])

    def _save_checkpoints(self, row: dict) -> None:
        """metrics.csv, checkpoint_best.pth and checkpoint_last.pth (process 0 writes; every
        process takes part, as the RNG states are gathered)."""
        state = self.state()
        if self.is_main:
            self._write_csv()
        monitor = self.config.monitor
        value = row.get(monitor)
        if isinstance(value, float) and math.isfinite(value):
            better = self.best is None or (value < self.best if monitor in LOWER_IS_BETTER or
                                           monitor.endswith("loss") else value > self.best)
            if better:
                self.best = value
                state["best"] = value
                if self.is_main:
                    save_atomic({"model": self.model.state_dict(), "epoch": self.epoch, "monitor": monitor,
                                 "value": value, "config": dataclasses.asdict(self.config),
                                 "metadata": self.metadata},
                                self.out_dir / "checkpoint_best.pth")
        if self.is_main:
            save_atomic(state, self.out_dir / "checkpoint_last.pth")

    def _write_csv(self) -> None:
        columns = list(dict.fromkeys(k for row in self.history for k in row))
        with open(self.out_dir / "metrics.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(self.history)


def balanced_label_weights(dataset: Dataset) -> list[float]:
    """n_negative / n_positive per label over dataset's samples (a label without
    positives or negatives weighs 1), scaled to mean 1."""
    matrix = dataset.label_matrix() if hasattr(dataset, "label_matrix") else \
        torch.stack([dataset[i]["labels"] for i in range(len(dataset))])
    positives = (matrix >= 0.5).sum(0).double()
    negatives = matrix.shape[0] - positives
    weights = torch.where((positives > 0) & (negatives > 0), negatives / positives.clamp_min(1), 1.0)
    return (weights / weights.mean()).tolist()


def load_matching_weights(model: nn.Module, path: str | Path) -> list[str]:
    """Copies into model every tensor of the checkpoint at path (its "model" entry, or
    the file itself as a state_dict) whose name and shape match; returns their names.
    Raises when nothing matches (a checkpoint of another model)."""
    state = load_checkpoint(path)
    state = state.get("model", state) if isinstance(state, dict) else state
    own = model.state_dict()
    matched = {k: v for k, v in state.items() if k in own and tuple(own[k].shape) == tuple(v.shape)}
    if not matched:
        raise ValueError(f"init_from: no tensor of {path} matches the model by name and shape "
                         f"(checkpoint keys like {sorted(state)[:3]}, model keys like {sorted(own)[:3]})")
    model.load_state_dict(matched, strict=False)
    return sorted(matched)


def _progress(iterable, description: str, enabled: bool):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=description, leave=False, dynamic_ncols=True)

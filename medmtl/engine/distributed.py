"""Multi-process training on torch.distributed (launched by torchrun).

    torchrun --nproc-per-node 2 -m medmtl train --config configs/resformer_mtl.yaml

`init_from_environment()` joins the process group torchrun describes in the
environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT): gloo for CPU
tensors, NCCL for CUDA. Without those variables everything here is the
single-process identity, so the Trainer has one code path.

Batches: `train.batch_size` is the global batch of one optimizer step. It is
cut into world_size x accumulate_steps equal shards; process r takes shards
r*A .. r*A + A - 1 as its A micro-batches. So N processes reach the weights
one process reaches with the same global batch and accumulate_steps = N
(BatchNorm then sees the same micro-batches in both), to float tolerance.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Sampler


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def is_main_process() -> bool:
    return rank() == 0


def init_from_environment(backend: str | None = None) -> torch.device:
    """Joins torchrun's process group when WORLD_SIZE > 1 is set; returns this
    process's device (cuda:LOCAL_RANK when CUDA is available, else cpu).

    backend: None picks nccl with CUDA and gloo without."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if world <= 1 or dist.is_initialized():
        return device
    if backend not in (None, "gloo", "nccl"):
        raise ValueError(f"init_from_environment: backend must be None, 'gloo' or 'nccl', got {backend!r}")
    if backend == "nccl" and device.type != "cuda":
        raise ValueError("init_from_environment: backend 'nccl' needs CUDA GPUs; this process has none "
                         "(use 'gloo' or leave it unset)")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend or ("nccl" if device.type == "cuda" else "gloo"))
    return device


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sums each value over the processes (float64)."""
    if not is_distributed():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def all_gather_objects(obj) -> list:
    """[obj of process 0, obj of process 1, ...] (picklable objects)."""
    if not is_distributed():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_buffers(model: nn.Module) -> None:
    """Gives every process process 0's buffers (BatchNorm running statistics),
    so that evaluation and checkpoints agree across processes."""
    if not is_distributed():
        return
    for buffer in model.buffers():
        dist.broadcast(buffer, 0)


def average_gradients(parameters) -> None:
    """All-reduce mean of the gradients of parameters outside the DDP module
    (the learned loss weights)."""
    if not is_distributed():
        return
    for p in parameters:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad.div_(world_size())


def convert_sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """BatchNorm layers -> torch's SyncBatchNorm (statistics over every process's
    micro-batch). torch's SyncBatchNorm runs on GPUs only."""
    if device.type != "cuda":
        raise ValueError("train.sync_batchnorm: SyncBatchNorm needs CUDA tensors (torch implements it for GPUs "
                         "only); on the CPU set train.sync_batchnorm: false (each process normalises its own "
                         "micro-batch, as accumulate_steps does in one process)")
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


class ShardedBatchSampler(Sampler[list[int]]):
    """Per-process micro-batches of a shuffled epoch (see the module docstring).

    n: dataset length; batch_size: the global batch per optimizer step; the
    epoch's order is torch.randperm(n) seeded by (seed, epoch), the same in
    every process. Yields this process's accumulate micro-batches of each
    step in turn. With shards > 1 an incomplete last global batch is dropped
    (its shards could not be equal); with one shard it is kept.
    """

    def __init__(self, n: int, batch_size: int, seed: int, epoch: int, world: int = 1, rank: int = 0,
                 accumulate: int = 1) -> None:
        shards = world * accumulate
        if batch_size % shards:
            raise ValueError(f"train.batch_size must be divisible by the number of processes x "
                             f"train.accumulate_steps ({world} x {accumulate} = {shards}), got {batch_size}")
        if not 0 <= rank < world:
            raise ValueError(f"ShardedBatchSampler: rank must be in [0, {world}), got {rank}")
        self.n, self.batch_size, self.seed, self.epoch = n, batch_size, seed, epoch
        self.world, self.rank, self.accumulate, self.shards = world, rank, accumulate, shards
        self.micro = batch_size // shards
        full = n // batch_size
        self.steps = full if shards > 1 or n % batch_size == 0 else full + 1
        if self.steps == 0:
            raise ValueError(f"train.batch_size ({batch_size}) is larger than the training set ({n} samples); "
                             f"with {shards} shards no full batch remains")

    def order(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def __iter__(self) -> Iterator[list[int]]:
        order = self.order()
        for step in range(self.steps):
            batch = order[step * self.batch_size:(step + 1) * self.batch_size]
            if len(batch) < self.batch_size:  # the kept last partial batch (one shard only)
                yield batch
                continue
            for m in range(self.accumulate):
                shard = self.rank * self.accumulate + m
                yield batch[shard * self.micro:(shard + 1) * self.micro]

    def __len__(self) -> int:
        return self.steps * self.accumulate if self.shards > 1 else self.steps

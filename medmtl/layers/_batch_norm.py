"""BatchNorm as a per-channel affine map, for layers that fold it into a fused op."""

from __future__ import annotations

import torch
from torch import nn


def batch_norm_as_affine(norm: nn.modules.batchnorm._BatchNorm, x: torch.Tensor):
    """(scale, shift) with norm(x) == x * scale + shift per channel.

    Uses the batch statistics where BatchNorm would (training, or no running
    statistics) and then updates the running statistics as BatchNorm does.
    Gradients flow into x through the batch statistics, and into norm's weight
    and bias. A training nn.SyncBatchNorm in a process group of several
    processes takes the statistics of every process's batch, as it would itself.
    """
    weight = norm.weight if norm.affine else torch.ones(x.shape[1], device=x.device)
    bias = norm.bias if norm.affine else torch.zeros(x.shape[1], device=x.device)
    use_batch_stats = norm.training or norm.running_mean is None
    if use_batch_stats:
        count = x.numel() // x.shape[1]
        if norm.training and count <= 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got input size "
                             f"{list(x.shape)}")
        update = norm.training and norm.track_running_stats
        factor = 0.0
        if update:
            # BatchNorm's rule: momentum None means a cumulative average over batches.
            norm.num_batches_tracked.add_(1)
            factor = 1.0 / float(norm.num_batches_tracked) if norm.momentum is None else norm.momentum
        if _synchronised(norm):
            mean, invstd = _synced_moments(norm, x, update, factor)
        else:
            mean, invstd = _BatchMoments.apply(x, norm.eps, norm.running_mean if update else None,
                                               norm.running_var if update else None, factor)
    else:
        mean, invstd = norm.running_mean, torch.rsqrt(norm.running_var + norm.eps)
    scale = weight * invstd
    return scale, bias - mean * scale


def _synchronised(norm) -> bool:
    if not (isinstance(norm, nn.SyncBatchNorm) and norm.training):
        return False
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size(norm.process_group) > 1


def _synced_moments(norm, x: torch.Tensor, update: bool, factor: float):
    """(mean, invstd) over every process's x (differentiable all-reduces: the backward
    sums the gradients of all processes' losses, as SyncBatchNorm's does); the
    variance is taken about the global mean, so it does not cancel catastrophically."""
    from torch.distributed.nn.functional import all_reduce

    group = norm.process_group or torch.distributed.group.WORLD
    dims = [0] + list(range(2, x.dim()))
    xs = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    local = torch.cat([xs.sum(dims), xs.new_full((1,), x.numel() // x.shape[1])])
    total = all_reduce(local, group=group)
    count = total[-1]
    mean = total[:-1] / count
    shape = (1, -1) + (1,) * (x.dim() - 2)
    var = all_reduce((xs - mean.view(shape)).square().sum(dims), group=group) / count
    if update:
        with torch.no_grad():
            unbiased = var * count / (count - 1).clamp_min(1)
            norm.running_mean.lerp_(mean.to(norm.running_mean.dtype), factor)
            norm.running_var.lerp_(unbiased.to(norm.running_var.dtype), factor)
    return mean, torch.rsqrt(var + norm.eps)


class _BatchMoments(torch.autograd.Function):
    """x (B, C, *) -> (mean, invstd), each (C,): the batch mean and 1 / sqrt(var + eps)
    over all but the channel dim, in float32 or float64.

    The forward is ATen's batch-norm statistics (fast on NCHW and channels-last,
    numerically stable, and they update running_mean / running_var in place as
    BatchNorm does; var_mean was 4-7x slower). Eager uses
    batch_norm_update_stats; under torch.compile, which has no fake kernel for
    it, the batch norm itself, whose normalised output is dropped. Only x is
    saved, which the caller keeps anyway.
    """

    @staticmethod
    def forward(ctx, x, eps, running_mean, running_var, momentum):
        if torch.compiler.is_compiling():
            _, mean, invstd = torch.ops.aten.native_batch_norm(x, None, None, running_mean, running_var, True,
                                                              momentum, eps)
        else:
            mean, var = torch.batch_norm_update_stats(x, running_mean, running_var, momentum)
            invstd = torch.rsqrt(var + eps)
        ctx.save_for_backward(x, mean, invstd)
        return mean, invstd

    @staticmethod
    def backward(ctx, grad_mean, grad_invstd):
        # d mean / dx = 1/N; d invstd / dx = -invstd^3 (x - mean) / N, so
        # grad_x = (grad_mean - grad_invstd invstd^3 (x - mean)) / N = a + b x per channel.
        x, mean, invstd = ctx.saved_tensors
        count = x.numel() // x.shape[1]
        grad_mean = torch.zeros_like(mean) if grad_mean is None else grad_mean
        grad_invstd = torch.zeros_like(invstd) if grad_invstd is None else grad_invstd
        b = -grad_invstd * invstd.pow(3) / count
        a = grad_mean / count - b * mean
        shape = (1, -1) + (1,) * (x.dim() - 2)
        grad_x = torch.addcmul(a.view(shape).to(x.dtype), x, b.view(shape).to(x.dtype))
        return grad_x, None, None, None, None

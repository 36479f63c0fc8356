"""BatchNorm as a per-channel affine map, for layers that fold it into a fused op."""

from __future__ import annotations

import torch
from torch import nn


def batch_norm_as_affine(norm: nn.modules.batchnorm._BatchNorm, x: torch.Tensor):
    """(scale, shift) with norm(x) == x * scale + shift per channel.

    Uses the batch statistics where BatchNorm would (training, or no running
    statistics) and then updates the running statistics as BatchNorm does.
    """
    weight = norm.weight if norm.affine else torch.ones(x.shape[1], device=x.device)
    bias = norm.bias if norm.affine else torch.zeros(x.shape[1], device=x.device)
    use_batch_stats = norm.training or norm.running_mean is None
    if use_batch_stats:
        dims = [0] + list(range(2, x.dim()))
        count = x.numel() // x.shape[1]
        if norm.training and count <= 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got input size "
                             f"{list(x.shape)}")
        var, mean = torch.var_mean(x.float() if x.dtype in (torch.float16, torch.bfloat16) else x,
                                   dim=dims, correction=0)
        if norm.training and norm.track_running_stats:
            update_running_stats(norm, mean.detach(), var.detach() * count / max(count - 1, 1))
    else:
        mean, var = norm.running_mean, norm.running_var
    scale = weight * torch.rsqrt(var + norm.eps)
    return scale, bias - mean * scale


@torch.no_grad()
def update_running_stats(norm: nn.modules.batchnorm._BatchNorm, mean: torch.Tensor, unbiased_var: torch.Tensor):
    # BatchNorm's rule: momentum None means a cumulative average over batches.
    norm.num_batches_tracked.add_(1)
    factor = 1.0 / float(norm.num_batches_tracked) if norm.momentum is None else norm.momentum
    norm.running_mean.lerp_(mean.to(norm.running_mean.dtype), factor)
    norm.running_var.lerp_(unbiased_var.to(norm.running_var.dtype), factor)

"""MultiScalePool: BatchNorm -> activation -> adaptive pooling of several
feature levels to several sizes, concatenated, on the fused op."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from medmtl.ops.multiscale_pool import check_pool_options, multiscale_pool

_BATCH_NORM = {2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


class MultiScalePool(nn.Module):
    """Pools feature levels (B, C_i, *spatial_i) to (B, sum_i C_i * sum_s s^d).

    With `norm=True` each level has a BatchNorm under `norms.{i}` (the state_dict
    of a plain `nn.ModuleList` of BatchNorms). In eval mode the norms are folded
    into the fused op's per-channel scale and shift; in train mode the batch
    statistics are computed in one reduction, the running statistics updated as
    BatchNorm does, and the normalisation still happens inside the fused op.

    Args:
        in_channels: channels of each level, in the order the levels are passed.
        output_sizes: an int s or a sequence of them (s^d bins per channel each).
        mode: "avg" or "max".
        norm: a BatchNorm per level before the activation.
        activation: None or "relu".
        spatial_dims: 2 for (B, C, H, W) levels, 3 for (B, C, D, H, W).
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        output_sizes: int | Sequence[int] = (1,),
        mode: str = "avg",
        norm: bool = True,
        activation: str | None = "relu",
        spatial_dims: int = 2,
    ) -> None:
        super().__init__()
        if isinstance(in_channels, int) or not isinstance(in_channels, Sequence) or not in_channels \
                or any(isinstance(c, bool) or not isinstance(c, int) or c <= 0 for c in in_channels):
            raise ValueError(f"MultiScalePool: in_channels must be a non-empty sequence of positive ints "
                             f"(one per level), got {in_channels!r}")
        sizes = check_pool_options(output_sizes, mode, activation, "MultiScalePool")
        if spatial_dims not in _BATCH_NORM:
            raise ValueError(f"MultiScalePool: spatial_dims must be 2 or 3, got {spatial_dims!r}")
        self.in_channels = list(in_channels)
        self.output_sizes = sizes
        self.mode = mode
        self.activation = activation
        self.spatial_dims = spatial_dims
        self.norms = nn.ModuleList(_BATCH_NORM[spatial_dims](c) for c in in_channels) if norm else None

    @property
    def out_features(self) -> int:
        return sum(self.in_channels) * sum(s**self.spatial_dims for s in self.output_sizes)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """features: one (B, C_i, *spatial_i) tensor per level -> (B, out_features)."""
        if isinstance(features, torch.Tensor) or not isinstance(features, Sequence):
            raise TypeError(f"MultiScalePool: features must be a list or tuple of tensors, got "
                            f"{type(features).__name__}")
        if len(features) != len(self.in_channels):
            raise ValueError(f"MultiScalePool: expected {len(self.in_channels)} feature levels, "
                             f"got {len(features)}")
        for i, (x, c) in enumerate(zip(features, self.in_channels)):
            if not isinstance(x, torch.Tensor) or x.dim() != self.spatial_dims + 2 or x.shape[1] != c:
                got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
                raise ValueError(f"MultiScalePool: features[{i}] must have shape (B, {c}, "
                                 f"{', '.join('*' * self.spatial_dims)}), got {got}")
        scale = shift = None
        if self.norms is not None:
            affine = [_batch_norm_as_affine(norm, x) for norm, x in zip(self.norms, features)]
            scale = [a[0].to(x.dtype) for a, x in zip(affine, features)]
            shift = [a[1].to(x.dtype) for a, x in zip(affine, features)]
        return multiscale_pool(features, self.output_sizes, self.mode, scale, shift, self.activation)

    def extra_repr(self) -> str:
        return (f"in_channels={self.in_channels}, output_sizes={self.output_sizes}, mode={self.mode!r}, "
                f"activation={self.activation!r}, spatial_dims={self.spatial_dims}")


def _batch_norm_as_affine(norm: nn.modules.batchnorm._BatchNorm, x: torch.Tensor):
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
            _update_running_stats(norm, mean.detach(), var.detach() * count / max(count - 1, 1))
    else:
        mean, var = norm.running_mean, norm.running_var
    scale = weight * torch.rsqrt(var + norm.eps)
    return scale, bias - mean * scale


@torch.no_grad()
def _update_running_stats(norm: nn.modules.batchnorm._BatchNorm, mean: torch.Tensor, unbiased_var: torch.Tensor):
    # BatchNorm's rule: momentum None means a cumulative average over batches.
    norm.num_batches_tracked.add_(1)
    factor = 1.0 / float(norm.num_batches_tracked) if norm.momentum is None else norm.momentum
    norm.running_mean.lerp_(mean.to(norm.running_mean.dtype), factor)
    norm.running_var.lerp_(unbiased_var.to(norm.running_var.dtype), factor)

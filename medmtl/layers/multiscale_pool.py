"""MultiScalePool: BatchNorm -> activation -> adaptive pooling of several
feature levels to several sizes, concatenated, on the fused op."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from medmtl.layers._batch_norm import batch_norm_as_affine
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
            affine = [batch_norm_as_affine(norm, x) for norm, x in zip(self.norms, features)]
            scale = [a[0].to(x.dtype) for a, x in zip(affine, features)]
            shift = [a[1].to(x.dtype) for a, x in zip(affine, features)]
        return multiscale_pool(features, self.output_sizes, self.mode, scale, shift, self.activation)

    def extra_repr(self) -> str:
        return (f"in_channels={self.in_channels}, output_sizes={self.output_sizes}, mode={self.mode!r}, "
                f"activation={self.activation!r}, spatial_dims={self.spatial_dims}")

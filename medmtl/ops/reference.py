"""Plain PyTorch compositions of medmtl's ops: the oracle every kernel is tested against.

Keep these the obvious composition of torch functions, never a copy of a
kernel's algorithm.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

_ADAPTIVE_POOL = {
    (2, "avg"): F.adaptive_avg_pool2d,
    (2, "max"): F.adaptive_max_pool2d,
    (3, "avg"): F.adaptive_avg_pool3d,
    (3, "max"): F.adaptive_max_pool3d,
}


def multiscale_pool(
    features: Sequence[torch.Tensor],
    output_sizes: Sequence[int],
    mode: str,
    scale: Sequence[torch.Tensor] | None,
    shift: Sequence[torch.Tensor] | None,
    activation: str | None,
) -> torch.Tensor:
    """For each level: x * scale + shift, activation, adaptive pooling to each
    size, flattened; all concatenated level by level -> (B, sum_i C_i * sum_s s^d)."""
    pooled = []
    for i, x in enumerate(features):
        channel_shape = (1, -1) + (1,) * (x.dim() - 2)
        if scale is not None:
            x = x * scale[i].view(channel_shape)
        if shift is not None:
            x = x + shift[i].view(channel_shape)
        if activation == "relu":
            x = torch.relu(x)
        pool = _ADAPTIVE_POOL[(x.dim() - 2, mode)]
        for size in output_sizes:
            pooled.append(pool(x, size).flatten(1))
    return torch.cat(pooled, dim=1)

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


def multi_dilation_conv(
    x: torch.Tensor,
    weight: torch.Tensor,
    dilations: Sequence[int],
    bias: torch.Tensor | None,
    combine: str,
    relu: bool,
) -> torch.Tensor:
    """Parallel 3x3 convolutions of x, one per dilation, combined.

    x (B, Cin, H, W); weight (n, Cout, Cin, 3, 3), branch i at dilation
    dilations[i] with padding dilations[i] (a dilation of 0 is a 1x1 branch
    using the centre weight[i, :, :, 1, 1]).
    combine "sum":    act(sum_i conv_i(x) + bias), bias (Cout,) -> (B, Cout, H, W)
    combine "concat": cat_i act(conv_i(x) + bias_i), bias (n*Cout,) -> (B, n*Cout, H, W)
    act is ReLU when relu, else the identity.
    """
    outputs = []
    for i, d in enumerate(dilations):
        if d == 0:
            outputs.append(F.conv2d(x, weight[i, :, :, 1:2, 1:2]))
        else:
            outputs.append(F.conv2d(x, weight[i], padding=d, dilation=d))
    cout = weight.shape[1]
    if combine == "sum":
        y = torch.stack(outputs).sum(0)
        if bias is not None:
            y = y + bias.view(1, cout, 1, 1)
    else:
        y = torch.cat(outputs, 1)
        if bias is not None:
            y = y + bias.view(1, -1, 1, 1)
    return torch.relu(y) if relu else y


def spatial_attention(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x * sigmoid(conv2d(cat([mean_c(x), max_c(x)]), weight, padding=K // 2)).

    x (B, C, H, W); weight (1, 2, K, K), K odd; the max over channels takes the
    first maximal channel (torch.max(dim=1)).
    """
    pooled = torch.cat([x.mean(1, keepdim=True), torch.max(x, dim=1, keepdim=True).values], 1)
    gate = torch.sigmoid(F.conv2d(pooled, weight, padding=weight.shape[-1] // 2))
    return x * gate

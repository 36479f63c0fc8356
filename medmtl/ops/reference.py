"""Plain PyTorch compositions of medmtl's ops: the oracle every kernel is tested against.

Keep these the obvious composition of torch functions, never a copy of a
kernel's algorithm.
"""

from __future__ import annotations

import math
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


def spatial_attention(x: torch.Tensor, weight: torch.Tensor, contiguous_output: bool = False) -> torch.Tensor:
    """x * sigmoid(conv2d(cat([mean_c(x), max_c(x)]), weight, padding=K // 2)).

    x (B, C, H, W); weight (1, 2, K, K), K odd; the max over channels takes the
    first maximal channel (torch.max(dim=1)). contiguous_output: return it
    NCHW-contiguous.
    """
    pooled = torch.cat([x.mean(1, keepdim=True), torch.max(x, dim=1, keepdim=True).values], 1)
    gate = torch.sigmoid(F.conv2d(pooled, weight, padding=weight.shape[-1] // 2))
    out = x * gate
    return out.contiguous() if contiguous_output else out


def window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window_size: Sequence[int],
    shift_size: Sequence[int],
    rel_pos_bias_table: torch.Tensor,
    scale: float,
    pad_key: torch.Tensor | None = None,
    pad_value: torch.Tensor | None = None,
    attn_dropout: float = 0.0,
    sdpa: bool = False,
    bias_index: torch.Tensor | None = None,
) -> torch.Tensor:
    """Shifted-window multi-head attention over a token map, as Swin computes it.

    q, k, v (B, *S, heads, hd) with S = (H, W) or (D, H, W); window_size and
    shift_size one int per spatial dim. Returns (B, *S, heads, hd).

    Steps: where a dim's size is at most its window, that dim uses the map size
    as window and no shift (as MONAI and timm do). Pad the map at the end to a
    multiple of the window (padded tokens take pad_key / pad_value, zero when
    None), roll by -shift, partition into windows, softmax(scale q k^T + bias
    + mask) v per window and head, un-partition, roll back, crop. The bias of
    query i and key j is rel_pos_bias_table[index(r_i - r_j)] where r are the
    in-window positions and index runs over the configured window's offsets
    (table rows prod(2 * window - 1)). With a shift, keys from another region
    of the shifted map get -100, as in Swin. attn_dropout > 0 drops attention
    probabilities (training only; the fused kernels have no dropout).
    sdpa=True computes each window's attention with
    F.scaled_dot_product_attention, bias + mask passed as attn_mask (the same
    composition on PyTorch's fused attention; a benchmark provider).
    bias_index (N, N) long, N the tokens of the effective window: the table
    row of each (query, key) pair instead of the true relative offsets
    (MONAI's reading on maps smaller than the window, index[:N, :N] of the
    configured window's index).
    """
    spatial = tuple(q.shape[1:-2])
    nd = len(spatial)
    heads, hd = q.shape[-2], q.shape[-1]
    batch = q.shape[0]
    win = [s if s <= w else w for s, w in zip(spatial, window_size)]
    shift = [0 if s <= w else t for s, w, t in zip(spatial, window_size, shift_size)]
    padded = [-(-s // w) * w for s, w in zip(spatial, win)]

    def pad_map(t: torch.Tensor, fill: torch.Tensor | None) -> torch.Tensor:
        out = t.new_zeros((batch, *padded, heads, hd))
        if fill is not None:
            out[:] = fill
        out[(slice(None),) + tuple(slice(0, s) for s in spatial)] = t
        return out

    def partition(t: torch.Tensor) -> torch.Tensor:
        # (B, *P, h, c) -> (B * windows, h, N, c)
        h, c = t.shape[-2:]
        shape = [batch]
        for p, w in zip(padded, win):
            shape += [p // w, w]
        t = t.reshape(*shape, h, c)
        window_dims = [1 + 2 * i for i in range(nd)]
        inner_dims = [2 + 2 * i for i in range(nd)]
        t = t.permute(0, *window_dims, *inner_dims, 2 * nd + 1, 2 * nd + 2)
        return t.reshape(-1, math.prod(win), h, c).transpose(1, 2)

    def unpartition(t: torch.Tensor) -> torch.Tensor:
        # (B * windows, heads, N, hd) -> (B, *P, heads, hd)
        counts = [p // w for p, w in zip(padded, win)]
        t = t.transpose(1, 2).reshape(batch, *counts, *win, heads, hd)
        order = [0]
        for i in range(nd):
            order += [1 + i, 1 + nd + i]
        t = t.permute(*order, 2 * nd + 1, 2 * nd + 2)
        return t.reshape(batch, *padded, heads, hd)

    dims = tuple(range(1, nd + 1))

    def _unpartition_roll_crop(out: torch.Tensor) -> torch.Tensor:
        out = unpartition(out)
        if any(shift):
            out = torch.roll(out, shifts=list(shift), dims=dims)
        return out[(slice(None),) + tuple(slice(0, s) for s in spatial)]

    maps = [pad_map(q, None), pad_map(k, pad_key), pad_map(v, pad_value)]
    if any(shift):
        maps = [torch.roll(t, shifts=[-s for s in shift], dims=dims) for t in maps]
    qw, kw, vw = (partition(t) for t in maps)

    # Relative position bias from the configured window's table.
    coords = torch.stack(torch.meshgrid(*[torch.arange(w) for w in win], indexing="ij")).flatten(1)
    rel = coords[:, :, None] - coords[:, None, :]  # (nd, N, N)
    index = torch.zeros(rel.shape[1:], dtype=torch.long)
    for i in range(nd):
        stride = math.prod(2 * w - 1 for w in window_size[i + 1:])
        index += (rel[i] + window_size[i] - 1) * stride
    if bias_index is not None:
        if tuple(bias_index.shape) != tuple(index.shape):
            raise ValueError(f"window_attention: bias_index must have shape {tuple(index.shape)} (N, N) for the "
                             f"effective window {tuple(win)}, got {tuple(bias_index.shape)}")
        index = bias_index
    bias = rel_pos_bias_table[index.to(q.device)].permute(2, 0, 1)  # (heads, N, N)

    additive = bias.expand(qw.shape[0], -1, -1, -1)
    if any(shift):
        label = torch.zeros(padded, dtype=torch.long, device=q.device)
        for i, (p, w, s) in enumerate(zip(padded, win, shift)):
            if s == 0:
                continue
            region = torch.zeros(p, dtype=torch.long, device=q.device)
            region[p - w:p - s] = 1
            region[p - s:] = 2
            label = label * 3 + region.view([-1 if j == i else 1 for j in range(nd)])
        lw = partition(label.view(1, *padded, 1, 1).expand(batch, *padded, 1, 1))[:, 0, :, 0]
        mask = (lw[:, :, None] != lw[:, None, :]).to(q.dtype) * -100.0  # (B*windows, N, N)
        additive = additive + mask[:, None]
    if sdpa:
        out = F.scaled_dot_product_attention(qw, kw, vw, attn_mask=additive, dropout_p=attn_dropout, scale=scale)
        return _unpartition_roll_crop(out)
    scores = scale * qw @ kw.transpose(-2, -1) + additive
    probs = torch.softmax(scores, dim=-1)
    if attn_dropout > 0:
        probs = F.dropout(probs, attn_dropout, training=True)
    return _unpartition_roll_crop(probs @ vw)

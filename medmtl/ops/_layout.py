"""The memory layouts the ops promise (csrc/layout.h says the same for C++).

multi_dilation_conv's output is channels-last when x is; every gradient of an
input is laid out as torch.empty_like(input), which is what the fake kernels
return, so eager and torch.compile see the same strides.
"""

from __future__ import annotations

import torch


def is_channels_last(x: torch.Tensor) -> bool:
    """x is dense channels-last (and not also plain contiguous, as with C == 1)."""
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def output_memory_format(x: torch.Tensor) -> torch.memory_format:
    """The memory format of an op's output computed from x."""
    return torch.channels_last if is_channels_last(x) else torch.contiguous_format


# Rows per band when copying channels-last to NCHW.
_ROWS = 16


def contiguous_by_rows(t: torch.Tensor) -> torch.Tensor:
    """t as an NCHW-contiguous tensor, a channels-last t copied a band of rows at a
    time: PyTorch's one-shot copy strides across all C planes per pixel and was
    3.6x slower at 64 x 112 x 112 (cache misses on every write). Differentiable
    (the gradient passes through, as .contiguous()'s does)."""
    if t.is_contiguous() or t.dim() != 4:
        return t.contiguous()
    return _ContiguousByRows.apply(t)


class _ContiguousByRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t):
        out = torch.empty(t.shape, dtype=t.dtype, device=t.device)
        for row in range(0, t.shape[2], _ROWS):
            out[:, :, row:row + _ROWS] = t[:, :, row:row + _ROWS]
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad


def laid_out_like(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """t in the layout torch.empty_like(like) gives (no copy when it already is)."""
    if t.stride() == torch.empty_like(like, device="meta").stride():
        return t
    if like.is_contiguous():
        return contiguous_by_rows(t)
    return torch.empty_like(like).copy_(t)


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


def laid_out_like(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """t in the layout torch.empty_like(like) gives (no copy when it already is)."""
    if t.stride() == like.stride() and like.is_contiguous() == t.is_contiguous():
        return t
    if like.is_contiguous():
        return t.contiguous()
    return torch.empty_like(like).copy_(t)

"""The memory layouts the ops promise (csrc/layout.h says the same for C++).

multi_dilation_conv's output is channels-last when x is; every gradient of an
input is laid out as torch.empty_like(input), which is what the fake kernels
return, so eager and torch.compile see the same strides.
"""

from __future__ import annotations

import torch

from medmtl._extension import extension_loaded


def is_channels_last(x: torch.Tensor) -> bool:
    """x is dense channels-last (and not also plain contiguous, as with C == 1)."""
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def output_memory_format(x: torch.Tensor) -> torch.memory_format:
    """The memory format of an op's output computed from x."""
    return torch.channels_last if is_channels_last(x) else torch.contiguous_format


def relayout(t: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """t (B, C, H, W) laid out channels-last or NCHW-contiguous (t itself when it
    already is). Differentiable: the gradient comes back laid out as t.

    With the extension, medmtl::relayout transposes CPU floating tensors in
    tiles (csrc/cpu/relayout_cpu.cpp): at 64 x 112 x 112, 1.4x faster into
    channels-last than PyTorch's copy and 8x faster out of it (PyTorch's
    copy strides across all C planes per pixel there)."""
    if not isinstance(t, torch.Tensor) or t.dim() != 4:
        shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"relayout: t must be a 4-D tensor (B, C, H, W), got {shape}")
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    if t.is_contiguous(memory_format=memory_format):
        return t
    if extension_loaded():
        return torch.ops.medmtl.relayout(t, channels_last)
    return t.contiguous(memory_format=memory_format)


def contiguous_nchw(t: torch.Tensor) -> torch.Tensor:
    """t as an NCHW-contiguous tensor (relayout for 4-D t)."""
    return relayout(t, False) if t.dim() == 4 else t.contiguous()


def _fake_relayout(x, channels_last):
    return torch.empty_like(x, memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def _relayout_setup_context(ctx, inputs, output):
    x, _ = inputs
    ctx.input_layout = torch.empty_like(x, device="meta")  # the strides x's gradient takes


def _relayout_backward(ctx, grad):
    like = ctx.input_layout
    if like.is_contiguous():
        return relayout(grad, False), None
    if like.is_contiguous(memory_format=torch.channels_last):
        return relayout(grad, True), None
    return torch.empty_like(like, device=grad.device).copy_(grad), None


if extension_loaded() and hasattr(torch.ops.medmtl, "relayout"):
    torch.library.register_fake("medmtl::relayout")(_fake_relayout)
    torch.library.register_autograd("medmtl::relayout", _relayout_backward, setup_context=_relayout_setup_context)


def laid_out_like(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """t in the layout torch.empty_like(like) gives (no copy when it already is)."""
    if t.stride() == torch.empty_like(like, device="meta").stride():
        return t
    if like.is_contiguous():
        return contiguous_nchw(t)
    return torch.empty_like(like).copy_(t)


"""Spatial attention gate: x * sigmoid(conv(cat(mean_c x, max_c x))), fused.

The channel mean and max of every pixel come from one pass over x, the KxK
convolution runs on that 2-channel map, and the gate multiplies x in a second
pass, instead of PyTorch's mean, max, cat, conv, sigmoid and multiply.
"""

from __future__ import annotations

import torch

from medmtl._extension import extension_loaded
from medmtl.ops import reference
from medmtl.ops._layout import output_memory_format
from medmtl.ops._registration import check_like, check_tensor
from medmtl.ops.backends import register_op, resolve_backend

OP_NAME = "spatial_attention"

register_op(OP_NAME, ("reference", "cpu", "cuda", "triton"))


def spatial_attention(x: torch.Tensor, weight: torch.Tensor, contiguous_output: bool = False) -> torch.Tensor:
    """x (B, C, H, W) gated by sigmoid(conv2d(cat(mean_c x, max_c x), weight, padding=K // 2)).

    weight: (1, 2, K, K), K odd (7 in CBAM and ResFormerMTL). Returns (B, C, H, W),
    laid out as x, or NCHW-contiguous when contiguous_output (a channels-last x
    is then transposed as it is gated, with no separate conversion pass).
    """
    _check_inputs(x, weight, contiguous_output)
    chosen = resolve_backend(OP_NAME, x.device)
    if chosen == "reference":
        return reference.spatial_attention(x, weight, contiguous_output)
    op = torch.ops.medmtl.spatial_attention_triton if chosen == "triton" else torch.ops.medmtl.spatial_attention
    return op(x, weight, contiguous_output)


def _check_inputs(x, weight, contiguous_output) -> None:
    op = OP_NAME
    if not isinstance(contiguous_output, bool):
        raise TypeError(f"{op}: contiguous_output must be a bool, got {type(contiguous_output).__name__}")
    check_tensor(op, "x", x, 4)
    check_tensor(op, "weight", weight, 4)
    check_like(op, "weight", weight, x, "x")
    k = weight.shape[-1]
    if weight.shape[:2] != (1, 2) or weight.shape[2] != k or k % 2 == 0:
        raise ValueError(f"{op}: weight must have shape (1, 2, K, K) with K odd, got {tuple(weight.shape)}")
    if any(s == 0 for s in x.shape[1:]):
        raise ValueError(f"{op}: x must have non-empty channel and spatial dimensions, got {tuple(x.shape)}")


def _fake_forward(x, weight, contiguous_output=False):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device) if contiguous_output else torch.empty_like(x)


def _fake_backward(grad_output, x, weight):
    return torch.empty_like(x), torch.empty_like(weight)


def _setup_context(ctx, inputs, output):
    x, weight = inputs[:2]
    ctx.save_for_backward(x, weight)


def _make_backward(backward_op):
    def backward(ctx, grad_output):
        x, weight = ctx.saved_tensors
        grad_x, grad_weight = backward_op(grad_output.contiguous(memory_format=output_memory_format(x)), x, weight)
        return grad_x, grad_weight, None

    return backward


if extension_loaded() and hasattr(torch.ops.medmtl, "spatial_attention"):
    torch.library.register_fake("medmtl::spatial_attention")(_fake_forward)
    torch.library.register_fake("medmtl::spatial_attention_backward")(_fake_backward)
    torch.library.register_autograd("medmtl::spatial_attention",
                                    _make_backward(torch.ops.medmtl.spatial_attention_backward),
                                    setup_context=_setup_context)


@torch.library.custom_op("medmtl::spatial_attention_triton", mutates_args=())
def _spatial_attention_triton(x: torch.Tensor, weight: torch.Tensor, contiguous_output: bool = False) -> torch.Tensor:
    from medmtl.kernels import spatial_attention as kernels

    return kernels.spatial_attention_forward(x, weight, contiguous_output)


@torch.library.custom_op("medmtl::spatial_attention_triton_backward", mutates_args=())
def _spatial_attention_triton_backward(grad_output: torch.Tensor, x: torch.Tensor,
                                       weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from medmtl.kernels import spatial_attention as kernels

    return kernels.spatial_attention_backward(grad_output, x, weight)


_spatial_attention_triton.register_fake(_fake_forward)
_spatial_attention_triton_backward.register_fake(_fake_backward)
_spatial_attention_triton.register_autograd(
    _make_backward(torch.ops.medmtl.spatial_attention_triton_backward), setup_context=_setup_context)

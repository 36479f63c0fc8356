"""Parallel dilated 3x3 convolutions of one input as one op (the dilated
feature enhancement branches of ResFormerMTL).

Each branch is a 3x3 convolution at its own dilation d (padding d, so the map
keeps its size); a dilation of 0 is a 1x1 branch. The branches are summed
("sum", then bias and activation) or concatenated ("concat", each with its own
bias slice and activation). Taps that read only padding are skipped (at
dilations 12 and 18 on 14x14 or 28x28 maps most taps do): per tile in the CUDA
and Triton kernels; on the CPU, maps under 40x40 run one GEMM per tap over the
positions where it reads the map (unless the batch has more than 1024 pixels
and the taps mostly read the map), and the others run oneDNN's convolutions
(which skip such taps themselves) channels-last, a branch that reads the map
only through its centre as a 1x1 GEMM.

The CPU kernel reads the weight in place when Cin is innermost
(weight.permute(0, 1, 3, 4, 2) contiguous; DilatedFeatureEnhancement stores
its weights so) and copies it otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from medmtl._extension import _C, extension_loaded
from medmtl.ops import reference
from medmtl.ops._layout import output_memory_format
from medmtl.ops._registration import check_like, check_tensor
from medmtl.ops.backends import register_op, resolve_backend

OP_NAME = "multi_dilation_conv"
COMBINES = ("sum", "concat")

register_op(OP_NAME, ("reference", "cpu", "cuda", "triton"))


def multi_dilation_conv(
    x: torch.Tensor,
    weight: torch.Tensor,
    dilations: Sequence[int],
    bias: torch.Tensor | None = None,
    combine: str = "sum",
    activation: str | None = None,
) -> torch.Tensor:
    """Parallel dilated convolutions of x, summed or concatenated.

    Args:
        x: (B, Cin, H, W).
        weight: (n, Cout, Cin, 3, 3), branch i's kernel (only [:, :, 1, 1] for a 1x1 branch).
        dilations: n ints >= 0; 0 makes branch i a 1x1 convolution.
        bias: None, or (Cout,) for "sum", (n * Cout,) for "concat".
        combine: "sum" -> (B, Cout, H, W); "concat" -> (B, n * Cout, H, W), branch-major.
        activation: None or "relu", applied after the bias (per branch for "concat").
    """
    dilations = _check_inputs(x, weight, dilations, bias, combine, activation)
    chosen = resolve_backend(OP_NAME, x.device)
    relu = activation == "relu"
    if chosen == "reference":
        return reference.multi_dilation_conv(x, weight, dilations, bias, combine, relu)
    op = torch.ops.medmtl.multi_dilation_conv_triton if chosen == "triton" else torch.ops.medmtl.multi_dilation_conv
    return op(x, weight, dilations, bias, combine, relu)


# The cpu backend's choice between its tap GEMMs and oneDNN, channels-last
# (uses_tap_gemms in csrc/cpu/multi_dilation_conv_cpu.cpp): maps of at least
# CPU_CHANNELS_LAST_PIXELS pixels go to oneDNN, and so do smaller ones when
# the batch has more than CPU_TAP_GEMM_PIXELS pixels and the off-centre taps
# read the map on at least CPU_TAP_GEMM_DENSITY of their positions.
CPU_CHANNELS_LAST_PIXELS = 40 * 40
CPU_TAP_GEMM_PIXELS = 1024
CPU_TAP_GEMM_DENSITY = 0.4


def off_centre_density(dilations: Sequence[int], height: int, width: int) -> float:
    """The fraction of the off-centre tap positions of all branches that read
    an H x W map (0 when every branch is 1x1, dilation 0)."""
    read = taps = 0
    for d in dilations:
        if d == 0:
            continue
        for dy in (-d, 0, d):
            for dx in (-d, 0, d):
                if dy or dx:
                    read += max(0, height - abs(dy)) * max(0, width - abs(dx))
                    taps += 1
    return read / (taps * height * width) if taps else 0.0


def prefers_channels_last(x: torch.Tensor, dilations: Sequence[int]) -> bool:
    """Whether the backend that would run multi_dilation_conv(x, ., dilations)
    convolves x channels-last. A layer that runs several ops on x then converts
    it once and stays channels-last (every op keeps x's layout) instead of
    converting per call."""
    if resolve_backend(OP_NAME, x.device) != "cpu" or x.dim() != 4:
        return False
    batch, _, height, width = x.shape
    if height * width >= CPU_CHANNELS_LAST_PIXELS:
        return True
    return (batch * height * width > CPU_TAP_GEMM_PIXELS
            and off_centre_density(dilations, height, width) >= CPU_TAP_GEMM_DENSITY)


def weight_cache_info() -> tuple[int, int, int]:
    """(transforms held, their bytes, budget in bytes) of the cpu backend's cache
    of Winograd kernel transforms (csrc/cpu/derived_weight_cache.h): an
    inference weight (one that takes no gradient) seen a second time keeps
    its transform while it lives unchanged (by its version counter), up to
    the budget (MEDMTL_WEIGHT_CACHE_MB, default 1024; 0 turns it off), least
    recently used dropped first."""
    return tuple(_C.weight_cache_info()) if extension_loaded() else (0, 0, 0)


def _check_inputs(x, weight, dilations, bias, combine, activation) -> list[int]:
    op = OP_NAME
    check_tensor(op, "x", x, 4)
    check_tensor(op, "weight", weight, 5)
    check_like(op, "weight", weight, x, "x")
    n, cout, cin = weight.shape[:3]
    if weight.shape[3:] != (3, 3) or n == 0 or cout == 0:
        raise ValueError(f"{op}: weight must have shape (n, Cout, Cin, 3, 3) with n, Cout >= 1, "
                         f"got {tuple(weight.shape)}")
    if cin != x.shape[1]:
        raise ValueError(f"{op}: weight's Cin ({cin}) must equal x's channels ({x.shape[1]}); "
                         f"x has shape {tuple(x.shape)}, weight {tuple(weight.shape)}")
    if any(s == 0 for s in x.shape[1:]):
        raise ValueError(f"{op}: x must have non-empty channel and spatial dimensions, got {tuple(x.shape)}")
    if isinstance(dilations, (int, torch.Tensor)) or not isinstance(dilations, Sequence) \
            or any(isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in dilations):
        raise ValueError(f"{op}: dilations must be a sequence of ints >= 0 (0: a 1x1 branch), got {dilations!r}")
    if len(dilations) != n:
        raise ValueError(f"{op}: dilations must have one entry per branch of weight ({n}), got {len(dilations)}")
    if combine not in COMBINES:
        raise ValueError(f"{op}: combine must be 'sum' or 'concat', got {combine!r}")
    if activation not in (None, "relu"):
        raise ValueError(f"{op}: activation must be None or 'relu', got {activation!r}")
    if bias is not None:
        check_tensor(op, "bias", bias, 1)
        check_like(op, "bias", bias, x, "x")
        expected = cout if combine == "sum" else n * cout
        if bias.shape[0] != expected:
            raise ValueError(f"{op}: bias must have length {expected} for combine={combine!r}, "
                             f"got {bias.shape[0]}")
    return [int(d) for d in dilations]


# --------------------------------------------------------------------------
# torch.library: fake kernels and autograd for the C++/CUDA op (schema in
# csrc/ops.cpp) and the Triton op (defined here).

def _fake_forward(x, weight, dilations, bias, combine, relu):
    channels = weight.shape[1] * (weight.shape[0] if combine == "concat" else 1)
    out = x.new_empty((x.shape[0], channels, x.shape[2], x.shape[3]))
    return out.contiguous(memory_format=output_memory_format(x))


def _fake_backward(grad_output, x, weight, dilations, output, combine, relu):
    return torch.empty_like(x), torch.empty_like(weight), grad_output.new_empty((grad_output.shape[1],))


def _setup_context(ctx, inputs, output):
    x, weight, dilations, bias, combine, relu = inputs
    ctx.config = (list(dilations), combine, relu, bias is not None)
    # The output is needed only for the ReLU's mask: without ReLU it is not kept.
    ctx.save_for_backward(x, weight, output if relu else None)


def _make_backward(backward_op):
    def backward(ctx, grad_output):
        dilations, combine, relu, has_bias = ctx.config
        x, weight, output = ctx.saved_tensors
        grad_output = grad_output.contiguous(memory_format=output_memory_format(x))
        grad_x, grad_weight, grad_bias = backward_op(grad_output, x, weight, dilations,
                                                     output if relu else grad_output, combine, relu)
        return grad_x, grad_weight, None, grad_bias if has_bias else None, None, None

    return backward


if extension_loaded() and hasattr(torch.ops.medmtl, "multi_dilation_conv"):
    torch.library.register_fake("medmtl::multi_dilation_conv")(_fake_forward)
    torch.library.register_fake("medmtl::multi_dilation_conv_backward")(_fake_backward)
    torch.library.register_autograd("medmtl::multi_dilation_conv",
                                    _make_backward(torch.ops.medmtl.multi_dilation_conv_backward),
                                    setup_context=_setup_context)


@torch.library.custom_op("medmtl::multi_dilation_conv_triton", mutates_args=())
def _multi_dilation_conv_triton(x: torch.Tensor, weight: torch.Tensor, dilations: list[int],
                                bias: torch.Tensor | None, combine: str, relu: bool) -> torch.Tensor:
    from medmtl.kernels import multi_dilation_conv as kernels

    return kernels.multi_dilation_conv_forward(x, weight, dilations, bias, combine, relu)


@torch.library.custom_op("medmtl::multi_dilation_conv_triton_backward", mutates_args=())
def _multi_dilation_conv_triton_backward(
    grad_output: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, dilations: list[int],
    output: torch.Tensor, combine: str, relu: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from medmtl.kernels import multi_dilation_conv as kernels

    return kernels.multi_dilation_conv_backward(grad_output, x, weight, dilations, output, combine, relu)


_multi_dilation_conv_triton.register_fake(_fake_forward)
_multi_dilation_conv_triton_backward.register_fake(_fake_backward)
_multi_dilation_conv_triton.register_autograd(
    _make_backward(torch.ops.medmtl.multi_dilation_conv_triton_backward), setup_context=_setup_context)

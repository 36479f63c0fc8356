"""Fused multi-scale pooling: per-channel affine, activation and adaptive
pooling to several sizes of several feature levels, in one pass over each.

It is the ResFormerMTL classification head (BN -> ReLU -> global average pool
of the deepest levels, concatenated) and pyramid pooling (sizes 1, 2, 3, 6).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from medmtl._extension import extension_loaded
from medmtl.ops import reference
from medmtl.ops.backends import register_op, resolve_backend

OP_NAME = "multiscale_pool"
MODES = ("avg", "max")
# Bins per channel (sum over output_sizes of s^d) must be fewer than 2^31, as in
# the C++ checks (csrc/multiscale_pool_checks.h): the kernels index a channel's
# bins in int32, and s*s*s must not overflow on the way. Each s alone is at most
# 46340 (s^2 < 2^31), checked before the spatial dims are known.
MAX_BINS_PER_CHANNEL = 2**31 - 1
MAX_OUTPUT_SIZE = 46340
ACTIVATIONS = (None, "relu")

register_op(OP_NAME, ("reference", "cpu", "cuda", "triton"))


def multiscale_pool(
    features: Sequence[torch.Tensor],
    output_sizes: int | Sequence[int] = (1,),
    mode: str = "avg",
    scale: Sequence[torch.Tensor] | None = None,
    shift: Sequence[torch.Tensor] | None = None,
    activation: str | None = None,
) -> torch.Tensor:
    """Pools every level of `features` to every size in `output_sizes`.

    Args:
        features: tensors (B, C_i, H_i, W_i), or all (B, C_i, D_i, H_i, W_i); any sizes,
            one dtype (floating) and one device.
        output_sizes: an int s or a sequence of them; each gives s^d bins per channel.
        mode: "avg" or "max" adaptive pooling.
        scale, shift: None, or one 1-D tensor of length C_i per level: the pooled
            values are of act(x * scale_i + shift_i) (an eval-mode BatchNorm folded).
        activation: None or "relu", applied after the affine.

    Returns:
        (B, sum_i C_i * sum_s s^d): for each level in order, for each size in order,
        adaptive_pool(act(x_i * scale_i + shift_i), s).flatten(1).
    """
    features, sizes = _check_inputs(features, output_sizes, mode, scale, shift, activation)
    chosen = resolve_backend(OP_NAME, features[0].device)
    if chosen == "reference":
        return reference.multiscale_pool(features, sizes, mode, scale, shift, activation)
    flat_scale = torch.cat(list(scale)) if scale is not None else None
    flat_shift = torch.cat(list(shift)) if shift is not None else None
    op = torch.ops.medmtl.multiscale_pool_triton if chosen == "triton" else torch.ops.medmtl.multiscale_pool
    return op(features, sizes, mode, flat_scale, flat_shift, activation == "relu")


def _check_inputs(features, output_sizes, mode, scale, shift, activation):
    if isinstance(features, torch.Tensor) or not isinstance(features, Sequence):
        raise TypeError(
            f"multiscale_pool: features must be a list or tuple of tensors, got {type(features).__name__}"
            + (" (wrap a single tensor in a list)" if isinstance(features, torch.Tensor) else ""))
    features = list(features)
    if not features:
        raise ValueError("multiscale_pool: features must be a non-empty list of tensors, got an empty list")
    for i, x in enumerate(features):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"multiscale_pool: features[{i}] must be a tensor, got {type(x).__name__}")
    first = features[0]
    if first.dim() not in (4, 5):
        raise ValueError(
            f"multiscale_pool: features[0] must be 4-D (B, C, H, W) or 5-D (B, C, D, H, W), "
            f"got {first.dim()}-D of shape {tuple(first.shape)}")
    for i, x in enumerate(features):
        if x.dim() != first.dim():
            raise ValueError(f"multiscale_pool: features[{i}] must be {first.dim()}-D like features[0], "
                             f"got {x.dim()}-D of shape {tuple(x.shape)}")
        if not x.dtype.is_floating_point:
            raise TypeError(f"multiscale_pool: features[{i}] must have a floating dtype, got {x.dtype}")
        if x.dtype != first.dtype:
            raise TypeError(f"multiscale_pool: features[{i}] must have the dtype of features[0] "
                            f"({first.dtype}), got {x.dtype}")
        if x.device != first.device:
            raise ValueError(f"multiscale_pool: features[{i}] must be on the device of features[0] "
                             f"({first.device}), got {x.device}")
        if x.shape[0] != first.shape[0]:
            raise ValueError(f"multiscale_pool: features[{i}] must have the batch size of features[0] "
                             f"({first.shape[0]}), got {x.shape[0]}")
        if any(n == 0 for n in x.shape[1:]):
            raise ValueError(f"multiscale_pool: features[{i}] must have non-empty channel and spatial "
                             f"dimensions, got shape {tuple(x.shape)}")
    sizes = check_pool_options(output_sizes, mode, activation, "multiscale_pool")
    bins = sum(s ** (first.dim() - 2) for s in sizes)
    if bins > MAX_BINS_PER_CHANNEL:
        raise ValueError(f"multiscale_pool: output_sizes must give at most {MAX_BINS_PER_CHANNEL} bins per channel "
                         f"(the sum of s^{first.dim() - 2}), got {output_sizes!r} ({bins} bins)")
    for name, param in (("scale", scale), ("shift", shift)):
        if param is None:
            continue
        if isinstance(param, torch.Tensor) or not isinstance(param, Sequence) or len(param) != len(features):
            raise ValueError(f"multiscale_pool: {name} must be None or a list of {len(features)} 1-D tensors "
                             f"(one per level), got {type(param).__name__}"
                             + (f" of length {len(param)}" if isinstance(param, Sequence) else ""))
        for i, (p, x) in enumerate(zip(param, features)):
            if not isinstance(p, torch.Tensor) or p.dim() != 1 or p.shape[0] != x.shape[1]:
                got = f"shape {tuple(p.shape)}" if isinstance(p, torch.Tensor) else type(p).__name__
                raise ValueError(f"multiscale_pool: {name}[{i}] must be 1-D of length {x.shape[1]} "
                                 f"(the channels of features[{i}]), got {got}")
            if p.dtype != first.dtype:
                raise TypeError(f"multiscale_pool: {name}[{i}] must have the features' dtype {first.dtype}, "
                                f"got {p.dtype}")
            if p.device != first.device:
                raise ValueError(f"multiscale_pool: {name}[{i}] must be on the features' device "
                                 f"{first.device}, got {p.device}")
    return features, sizes


def check_pool_options(output_sizes, mode, activation, where: str) -> list[int]:
    """Checks the pooling options (shared with the layer); returns the sizes as a list."""
    sizes = [output_sizes] if isinstance(output_sizes, int) and not isinstance(output_sizes, bool) else output_sizes
    if (not isinstance(sizes, Sequence) or not sizes
            or any(isinstance(s, bool) or not isinstance(s, int) or s <= 0 for s in sizes)):
        raise ValueError(f"{where}: output_sizes must be a positive int or a non-empty sequence "
                         f"of them, got {output_sizes!r}")
    if any(s > MAX_OUTPUT_SIZE for s in sizes):
        raise ValueError(f"{where}: output_sizes must each be at most {MAX_OUTPUT_SIZE} (s^2 bins per channel "
                         f"must fit int32), got {output_sizes!r}")
    if mode not in MODES:
        raise ValueError(f"{where}: mode must be 'avg' or 'max', got {mode!r}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"{where}: activation must be None or 'relu', got {activation!r}")
    return [int(s) for s in sizes]


# --------------------------------------------------------------------------
# torch.library registration: fake kernels and autograd for the C++/CUDA op
# (schema in csrc/ops.cpp) and the Triton op (defined here).

def _output_columns(features: Sequence[torch.Tensor], output_sizes: Sequence[int]) -> int:
    d = features[0].dim() - 2
    return sum(x.shape[1] for x in features) * sum(s ** d for s in output_sizes)


def _fake_forward(features, output_sizes, mode, scale, shift, relu):
    return features[0].new_empty((features[0].shape[0], _output_columns(features, output_sizes)))


def _fake_backward(grad_output, features, output_sizes, mode, scale, shift, relu):
    channels = sum(x.shape[1] for x in features)
    grads = [torch.empty_like(x) for x in features]
    return grads, grad_output.new_empty((channels,)), grad_output.new_empty((channels,))


def _setup_context(ctx, inputs, output):
    features, output_sizes, mode, scale, shift, relu = inputs
    ctx.config = (list(output_sizes), mode, relu, len(features))
    ctx.has_scale, ctx.has_shift = scale is not None, shift is not None
    ctx.save_for_backward(*features, scale, shift)


def _make_backward(backward_op):
    def backward(ctx, grad_output):
        output_sizes, mode, relu, n = ctx.config
        saved = ctx.saved_tensors
        features, scale, shift = list(saved[:n]), saved[n], saved[n + 1]
        grads, grad_scale, grad_shift = backward_op(
            grad_output.contiguous(), features, output_sizes, mode, scale, shift, relu)
        return (list(grads), None, None, grad_scale if ctx.has_scale else None,
                grad_shift if ctx.has_shift else None, None)

    return backward


if extension_loaded() and hasattr(torch.ops.medmtl, "multiscale_pool"):
    torch.library.register_fake("medmtl::multiscale_pool")(_fake_forward)
    torch.library.register_fake("medmtl::multiscale_pool_backward")(_fake_backward)
    torch.library.register_autograd(
        "medmtl::multiscale_pool",
        _make_backward(torch.ops.medmtl.multiscale_pool_backward),
        setup_context=_setup_context,
    )


@torch.library.custom_op("medmtl::multiscale_pool_triton", mutates_args=())
def _multiscale_pool_triton(
    features: list[torch.Tensor], output_sizes: list[int], mode: str,
    scale: torch.Tensor | None, shift: torch.Tensor | None, relu: bool,
) -> torch.Tensor:
    from medmtl.kernels import multiscale_pool as kernels

    return kernels.multiscale_pool_forward(features, output_sizes, mode, scale, shift, relu)


@torch.library.custom_op("medmtl::multiscale_pool_triton_backward", mutates_args=())
def _multiscale_pool_triton_backward(
    grad_output: torch.Tensor, features: list[torch.Tensor], output_sizes: list[int], mode: str,
    scale: torch.Tensor | None, shift: torch.Tensor | None, relu: bool,
) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    from medmtl.kernels import multiscale_pool as kernels

    return kernels.multiscale_pool_backward(grad_output, features, output_sizes, mode, scale, shift, relu)


_multiscale_pool_triton.register_fake(_fake_forward)
_multiscale_pool_triton_backward.register_fake(_fake_backward)
_multiscale_pool_triton.register_autograd(
    _make_backward(torch.ops.medmtl.multiscale_pool_triton_backward), setup_context=_setup_context)

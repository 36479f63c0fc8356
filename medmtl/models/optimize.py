"""optimize(model): a copy of a model prepared for CPU inference.

    fast = medmtl.optimize(model, example_input=x)       # float32, same outputs
    fast16 = medmtl.optimize(model, dtype=torch.bfloat16, example_input=x)
    fast16.optimize_report   # what bfloat16 changes on x

What it does, on a deep copy (the original is not modified):
  - eval mode, parameters without gradients, and the weights frozen from
    here on: the fused layers (and converted torchvision ASPPs) reuse their
    eval folds and Winograd transforms across calls (layer.freeze()); do not
    write to the copy's weights afterwards (through `.data` such writes are
    not seen), or call unfreeze() on its layers first;
  - every BatchNorm that directly follows a convolution is folded into it
    (w' = w * s, b' = (b - mean) * s + beta, s = gamma / sqrt(var + eps)):
    inside nn.Sequential (order explicit), and in the blocks whose order is
    known (medmtl's and torchvision's ResNet blocks and stems). medmtl's
    fused layers fold their own BatchNorms in eval mode and are left whole;
  - weights in channels-last memory format where the model convolves
    (oneDNN's preferred layout on the CPU);
  - with example_input, two untimed forwards warm the fused layers' cached
    folds and Winograd transforms, and the report compares the result with
    the original's;
  - dtype=torch.bfloat16 converts the weights and wraps the model so that
    floating inputs are cast in and outputs cast back to float32 (for CPUs
    with AVX512-BF16 / AMX).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from medmtl.layers import DilatedFeatureEnhancement, MultiScalePool
from medmtl.layers._fold_cache import FoldCacheMixin

# Layers that fold their own BatchNorms in eval mode: left whole.
_SELF_FOLDING = (DilatedFeatureEnhancement, MultiScalePool)
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def fold_batch_norm(conv: nn.Module, bn: nn.Module) -> None:
    """Folds bn (eval statistics) into conv in place: conv(x) then equals bn(conv(x))."""
    if bn.running_mean is None or conv.weight.shape[0] != bn.num_features:
        raise ValueError(f"fold_batch_norm: cannot fold {bn} (running statistics needed) into {conv}")
    with torch.no_grad():
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps) if bn.affine else \
            1 / torch.sqrt(bn.running_var + bn.eps)
        shift = bn.bias if bn.affine else torch.zeros_like(scale)
        bias = conv.bias if conv.bias is not None else torch.zeros_like(scale)
        weight = conv.weight * scale.view(-1, *([1] * (conv.weight.dim() - 1)))
        conv.weight = nn.Parameter(weight.contiguous(memory_format=_layout_of(conv.weight)))
        conv.bias = nn.Parameter((bias - bn.running_mean) * scale + shift)


def _layout_of(t: torch.Tensor):
    return torch.channels_last if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and \
        not t.is_contiguous() else torch.contiguous_format


def _known_pairs(module: nn.Module) -> list[tuple[str, str]]:
    """(conv, bn) attribute pairs of blocks whose forward applies bn right after conv."""
    from medmtl.models.resformer import ResFormerEncoder
    from medmtl.models.resnet import BasicBlock

    name = f"{type(module).__module__}.{type(module).__qualname__}"
    if isinstance(module, BasicBlock) or name in ("torchvision.models.resnet.BasicBlock",):
        return [("conv1", "bn1"), ("conv2", "bn2")]
    if name == "torchvision.models.resnet.Bottleneck":
        return [("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")]
    if isinstance(module, ResFormerEncoder) or name == "torchvision.models.resnet.ResNet":
        return [("conv1", "bn1")]
    return []


def fold_batch_norms(model: nn.Module) -> int:
    """Folds every BatchNorm that directly follows a convolution (see the module
    docstring) in place, replacing it by nn.Identity; returns how many."""
    folded = 0

    def visit(module: nn.Module) -> None:
        nonlocal folded
        if isinstance(module, _SELF_FOLDING):
            return
        if isinstance(module, nn.Sequential):
            names = list(module._modules)
            for a, b in zip(names, names[1:]):
                conv, bn = module._modules[a], module._modules[b]
                if isinstance(conv, _CONVS) and isinstance(bn, _NORMS) and bn.running_mean is not None:
                    fold_batch_norm(conv, bn)
                    module._modules[b] = nn.Identity()
                    folded += 1
        for conv_name, bn_name in _known_pairs(module):
            conv, bn = getattr(module, conv_name, None), getattr(module, bn_name, None)
            if isinstance(conv, _CONVS) and isinstance(bn, _NORMS) and bn.running_mean is not None:
                fold_batch_norm(conv, bn)
                setattr(module, bn_name, nn.Identity())
                folded += 1
        for child in module.children():
            visit(child)

    visit(model)
    return folded


class CastingWrapper(nn.Module):
    """Runs `module` in `dtype`: floating inputs are cast in, floating outputs
    (tensors, and tensors in dicts, lists and tuples) are cast back to
    float32. Attributes not found here are looked up on the module."""

    def __init__(self, module: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.module = module
        self.dtype = dtype

    def forward(self, *args, **kwargs):
        cast_in = _map_tensors(lambda t: t.to(self.dtype) if t.is_floating_point() else t)
        cast_out = _map_tensors(lambda t: t.float() if t.is_floating_point() else t)
        return cast_out(self.module(*cast_in(args), **cast_in(kwargs)))

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("module"), name)


def _map_tensors(fn):
    def apply(value):
        if isinstance(value, torch.Tensor):
            return fn(value)
        if isinstance(value, dict):
            return {k: apply(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(apply(v) for v in value)
        return value
    return apply


def _compare(reference, got) -> dict[str, float]:
    """Max absolute difference per output, and for segmentation logits the
    fraction of pixels with the same argmax."""
    report = {}

    def walk(prefix, a, b):
        if isinstance(a, torch.Tensor):
            report[f"{prefix}max_abs_diff"] = (a.float() - b.float()).abs().max().item() if a.numel() else 0.0
            if prefix.startswith("seg") and a.dim() == 4:
                report[f"{prefix}argmax_agreement"] = (a.argmax(1) == b.argmax(1)).float().mean().item()
        elif isinstance(a, dict):
            for k in a:
                walk(f"{prefix}{k}.", a[k], b[k])
        elif isinstance(a, (list, tuple)):
            for i, (x, y) in enumerate(zip(a, b)):
                walk(f"{prefix}{i}.", x, y)

    walk("", reference, got)
    return report


def optimize(model: nn.Module, dtype: torch.dtype = torch.float32, example_input: torch.Tensor | None = None,
             channels_last: bool = True) -> nn.Module:
    """A copy of `model` prepared for CPU inference (see the module docstring).

    model: any nn.Module (medmtl's models, torchvision's, your own).
    dtype: torch.float32 (default) or torch.bfloat16.
    example_input: a batch the model takes; when given, the copy is warmed on
        it and `optimize_report` on the returned module holds the comparison
        with the original (max_abs_diff per output, segmentation argmax agreement).
    channels_last: store 4-D weights channels-last.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"optimize: model must be an nn.Module, got {type(model).__name__}")
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"optimize: dtype must be torch.float32 or torch.bfloat16, got {dtype!r}")
    if example_input is not None and not isinstance(example_input, torch.Tensor):
        raise TypeError(f"optimize: example_input must be a tensor or None, got {type(example_input).__name__}")
    fast = copy.deepcopy(model).eval()
    folded = fold_batch_norms(fast)
    fast.requires_grad_(False)
    for module in fast.modules():
        if isinstance(module, FoldCacheMixin):
            module.freeze()
    if channels_last and any(isinstance(m, nn.Conv2d) for m in fast.modules()):
        fast = fast.to(memory_format=torch.channels_last)
    if dtype != torch.float32:
        fast = CastingWrapper(fast.to(dtype), dtype).eval()
    report = {"batch_norms_folded": folded, "dtype": str(dtype).replace("torch.", "")}
    if example_input is not None:
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                expected = model(example_input)
                for _ in range(2):  # the second call finds the cached folds and transforms
                    got = fast(example_input)
        finally:
            model.train(was_training)
        report.update(_compare(expected, got))
    fast.optimize_report = report
    return fast

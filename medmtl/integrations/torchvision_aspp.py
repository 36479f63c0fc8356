"""torchvision DeepLabV3's ASPP: the 1x1 and dilated 3x3 conv-BN-ReLU branches
as one medmtl multi_dilation_conv.

Eval mode folds each branch's BatchNorm into its convolution and runs all
branches as one op ("concat", bias and ReLU per branch), skipping the taps
that read only padding (at rates 12, 24, 36 on a 28x28 map most do); the
projection's BatchNorm folds into its 1x1 convolution. Train mode runs each
dilated convolution through the op and every BatchNorm as it is (batch
statistics, running-statistic updates). In both modes the pooling branch,
constant over the map, enters the projection as a per-sample bias
(W_pool @ pooled), so the (B, 5 * 256, H, W) concatenation is never built:
torchvision's bilinear upsampling of a 1x1 map is that broadcast.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.segmentation import deeplabv3 as tv_deeplab

from medmtl.layers._fold_cache import FoldCacheMixin
from medmtl.ops._layout import relayout
from medmtl.ops.multi_dilation_conv import multi_dilation_conv, prefers_channels_last


class FusedASPP(FoldCacheMixin, tv_deeplab.ASPP):
    """torchvision's ASPP, x (B, Cin, H, W) -> (B, 256, H, W), its branches on
    medmtl's multi_dilation_conv."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branches, pooling = list(self.convs[:-1]), self.convs[-1]
        dilations = [0] + [branch[0].dilation[0] for branch in branches[1:]]
        pooled = x
        for mod in pooling:  # (B, 256, 1, 1): average pool, 1x1 conv, BN, ReLU
            pooled = mod(pooled)
        work = relayout(x, channels_last=True) if prefers_channels_last(x, dilations) else x
        project_conv, project_bn, project_relu, project_drop = self.project
        width = branches[0][0].out_channels * len(branches)
        w_branches = project_conv.weight[:, :width, 0, 0]
        w_pool = project_conv.weight[:, width:, 0, 0]
        if self.training or any(bn.running_mean is None for bn in self._norms()):
            parts = []
            for branch, d in zip(branches, dilations):
                conv, bn, relu = branch
                raw = conv(work) if d == 0 else multi_dilation_conv(work, conv.weight[None], [d], None, "sum")
                parts.append(relu(bn(raw)))
            y = torch.cat(parts, 1)
            z = F.conv2d(y, w_branches[:, :, None, None]) + (pooled.flatten(1) @ w_pool.t())[:, :, None, None]
            out = project_drop(project_relu(project_bn(z)))
        else:
            weight, bias, p_scale, p_shift = self._folded(x)
            y = multi_dilation_conv(work, weight, dilations, bias, "concat", "relu")
            per_sample = pooled.flatten(1) @ (w_pool * p_scale[:, None]).t() + p_shift  # (B, 256)
            z = F.conv2d(y, (w_branches * p_scale[:, None])[:, :, None, None])
            out = project_drop(torch.relu_(z.add_(per_sample[:, :, None, None])))
        return relayout(out, channels_last=False) if work is not x else out

    def _norms(self) -> list[nn.BatchNorm2d]:
        return [m for m in self.modules() if isinstance(m, nn.BatchNorm2d)]

    def _folded(self, x: torch.Tensor):
        """(weight (n, 256, Cin, 3, 3) with Cin innermost, bias (n * 256,),
        projection BN scale, shift), in x's dtype: each branch's BatchNorm
        folded into its convolution. Made on every call, or reused while the
        module is frozen (freeze(), medmtl.optimize: FoldCacheMixin), so the op
        sees the same weight tensor again (the fold of 2048 input channels is 75 MB)."""
        return self._cached_fold(x, "aspp", lambda: self._fold(x.dtype))

    def _fold(self, dtype: torch.dtype):
        weights, biases = [], []
        for branch in self.convs[:-1]:
            conv, bn = branch[0], branch[1]
            scale, shift = _bn_affine(bn)
            w = conv.weight * scale[:, None, None, None]
            if w.shape[-1] == 1:  # the 1x1 branch as the centre tap of a 3x3 kernel
                w = F.pad(w, (1, 1, 1, 1))
            weights.append(w)
            biases.append(shift)
        # Cin innermost: the layout the cpu backend reads in place.
        weight = torch.stack(weights).permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)
        p_scale, p_shift = _bn_affine(self.project[1])
        return weight.to(dtype), torch.cat(biases).to(dtype), p_scale.to(dtype), p_shift.to(dtype)


def _bn_affine(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) with bn(v) = v * scale + shift per channel (running statistics)."""
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.affine:
        scale = bn.weight * scale
    return scale, (bn.bias if bn.affine else 0) - bn.running_mean * scale


def candidate(module: nn.Module) -> bool:
    return isinstance(module, tv_deeplab.ASPP)


def converted(module: nn.Module) -> bool:
    return isinstance(module, FusedASPP)


def _conv_reason(name: str, conv: nn.Module, kernel: int, dilation: int, in_channels: int | None) -> str | None:
    if type(conv) is not nn.Conv2d or conv.kernel_size != (kernel, kernel) or conv.stride != (1, 1) \
            or conv.groups != 1 or conv.bias is not None or conv.padding_mode != "zeros" \
            or conv.dilation != (dilation, dilation) or conv.padding != (dilation if kernel == 3 else 0,) * 2 \
            or (in_channels is not None and conv.in_channels != in_channels):
        return (f"{name} is not a bias-free Conv2d {kernel}x{kernel} at dilation {dilation} with 'same' zero "
                f"padding, stride 1, groups 1 (got {conv})")
    return None


def _conv_bn_relu_reason(name: str, seq: nn.Module, kernel: int, in_channels: int | None) -> str | None:
    if not isinstance(seq, nn.Sequential) or len(seq) != 3 or type(seq[1]) is not nn.BatchNorm2d \
            or type(seq[2]) is not nn.ReLU:
        return f"{name} is not Conv2d -> BatchNorm2d -> ReLU"
    conv = seq[0]
    dilation = conv.dilation[0] if kernel == 3 and isinstance(conv, nn.Conv2d) else 1
    return _conv_reason(f"{name}.0", conv, kernel, dilation, in_channels)


def check(module: nn.Module, path: str, modules: dict[str, nn.Module]) -> str | None:
    if type(module) is not tv_deeplab.ASPP:
        return f"a subclass of ASPP ({type(module).__qualname__}): its forward may differ"
    convs, project = getattr(module, "convs", None), getattr(module, "project", None)
    if not isinstance(convs, nn.ModuleList) or len(convs) < 2 or not isinstance(project, nn.Sequential):
        return "no convs ModuleList / project Sequential: not the torchvision ASPP the converter was written for"
    first = convs[0]
    if type(first) is not nn.Sequential:
        return "convs.0 is not a Sequential"
    reason = _conv_bn_relu_reason("convs.0", first, 1, None)
    if reason:
        return reason
    cin, cout = first[0].in_channels, first[0].out_channels
    for i, branch in enumerate(convs[1:-1], start=1):
        if type(branch) is not tv_deeplab.ASPPConv:
            return f"convs.{i} is {type(branch).__qualname__}, not ASPPConv"
        reason = _conv_bn_relu_reason(f"convs.{i}", branch, 3, cin)
        if reason:
            return reason
        if branch[0].out_channels != cout:
            return f"convs.{i} has {branch[0].out_channels} output channels, convs.0 {cout}"
    pooling = convs[-1]
    if type(pooling) is not tv_deeplab.ASPPPooling or len(pooling) != 4 \
            or type(pooling[0]) is not nn.AdaptiveAvgPool2d or pooling[0].output_size not in (1, (1, 1)) \
            or _conv_reason(f"convs.{len(convs) - 1}.1", pooling[1], 1, 1, cin) \
            or type(pooling[2]) is not nn.BatchNorm2d or type(pooling[3]) is not nn.ReLU:
        return "the last branch is not ASPPPooling(AdaptiveAvgPool2d(1), Conv2d 1x1, BatchNorm2d, ReLU)"
    if len(project) != 4 or _conv_reason("project.0", project[0], 1, 1, cout * len(convs)) \
            or type(project[1]) is not nn.BatchNorm2d or type(project[2]) is not nn.ReLU \
            or type(project[3]) is not nn.Dropout:
        return "project is not Conv2d 1x1 -> BatchNorm2d -> ReLU -> Dropout"
    if pooling[1].out_channels != cout or project[0].out_channels != cout:
        return "the pooling branch or the projection has another width than the branches"
    return None


def probe_inputs(module: nn.Module) -> list[tuple]:
    """A 9x10 map (smaller than the large rates, as DeepLabV3's 28x28 is), batch 2."""
    g = torch.Generator().manual_seed(0)
    cin = module.convs[0][0].in_channels
    return [(torch.randn(2, cin, 9, 10, generator=g, dtype=torch.float64),)]


def convert(module: nn.Module) -> None:
    module.__class__ = FusedASPP


def probe_key(module: nn.Module) -> tuple:
    return tuple(branch[0].dilation for branch in module.convs[1:-1]), module.convs[0][0].in_channels

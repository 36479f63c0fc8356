"""DilatedFeatureEnhancement (DFE): ResFormerMTL's refinement of a skip connection.

Parallel 3x3 convolutions at several dilations over the same map, normalised,
activated and fused, then spatial attention. Its state_dict is exactly that of
the plain composition of torch.nn modules below, so weights move both ways.

variant="sum" (the paper's three branches):
    branches.{i} = Conv3x3(dilation d_i) -> BN -> Conv1x1 -> BN
    y = relu(sum_i branches.i(x))
variant="concat" (the authors' released code):
    branches.0 = Conv1x1 -> BN -> ReLU; branches.{i>=1} = Conv3x3(d_i) -> BN -> ReLU
    y = relu(fuse(cat_i branches.i(x)) + shortcut(x)),
    fuse = Conv3x3 -> BN, shortcut = Conv1x1 -> BN
spatial_attention=True: y * sigmoid(attention(cat(mean_c y, max_c y))), attention = Conv7x7(2 -> 1).

Eval mode folds the BatchNorms (and, for "sum", the 1x1 convolutions) into one
multi-dilation convolution that skips padding-only taps, on every call unless
the layer is frozen: `layer.freeze()` (or medmtl.optimize(model)) declares the
weights frozen from here on, and eval then reuses the fold (and the cpu
backend its Winograd transforms); unfreeze() or train() undoes it (see
medmtl/layers/_fold_cache.py). Train mode runs
each branch's convolution through the op (a branch whose off-centre taps read
only padding becomes a 1x1 GEMM) and the BatchNorms as BatchNorm does (batch
statistics, running-statistic updates). For "concat" the fuse convolution is
the op too (one branch at dilation 1), in both modes.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import torch
from torch import nn

from medmtl.layers._batch_norm import batch_norm_as_affine
from medmtl.layers._fold_cache import FoldCacheMixin
from medmtl.ops._layout import relayout
from medmtl.ops.multi_dilation_conv import multi_dilation_conv, prefers_channels_last
from medmtl.ops.spatial_attention import spatial_attention

VARIANTS = ("sum", "concat")


class DilatedFeatureEnhancement(FoldCacheMixin, nn.Module):
    """(B, C_in, H, W) -> (B, C_out, H, W).

    Args:
        in_channels: C_in.
        out_channels: C_out (default C_in).
        dilations: one positive int per dilated branch (default 6, 12, 18).
        variant: "sum" or "concat" (see the module docstring).
        spatial_attention: gate the output with a 7x7 spatial attention.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int | None = None,
        dilations: Sequence[int] = (6, 12, 18),
        variant: str = "sum",
        spatial_attention: bool = True,
    ) -> None:
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"DilatedFeatureEnhancement: {name} must be a positive int, got {value!r}")
        if isinstance(dilations, (int, torch.Tensor)) or not isinstance(dilations, Sequence) or not dilations \
                or any(isinstance(d, bool) or not isinstance(d, int) or d <= 0 for d in dilations):
            raise ValueError(f"DilatedFeatureEnhancement: dilations must be a non-empty sequence of positive ints, "
                             f"got {dilations!r}")
        if variant not in VARIANTS:
            raise ValueError(f"DilatedFeatureEnhancement: variant must be 'sum' or 'concat', got {variant!r}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.dilations = [int(d) for d in dilations]
        self.variant = variant
        c_in, c = in_channels, out_channels
        if variant == "sum":
            self.branches = nn.ModuleList(
                nn.Sequential(nn.Conv2d(c_in, c, 3, padding=d, dilation=d, bias=False), nn.BatchNorm2d(c),
                              nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c))
                for d in self.dilations)
        else:
            self.branches = nn.ModuleList(
                [nn.Sequential(nn.Conv2d(c_in, c, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU())]
                + [nn.Sequential(nn.Conv2d(c_in, c, 3, padding=d, dilation=d, bias=False), nn.BatchNorm2d(c),
                                 nn.ReLU()) for d in self.dilations])
            self.fuse = nn.Sequential(nn.Conv2d((len(self.dilations) + 1) * c, c, 3, padding=1, bias=False),
                                      nn.BatchNorm2d(c))
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c, 1, bias=False), nn.BatchNorm2d(c))
        self.attention = nn.Conv2d(2, 1, 7, padding=3, bias=False) if spatial_attention else None
        # The 3x3 convolutions that run through multi_dilation_conv store their
        # weights with Cin innermost (channels-last), the layout in which the
        # cpu backend's tap GEMMs read them in place; loading a state_dict
        # copies into them and keeps it.
        convolutions = [branch[0] for branch in self.branches] + ([self.fuse[0]] if variant == "concat" else [])
        for conv in convolutions:
            conv.weight = nn.Parameter(conv.weight.detach().contiguous(memory_format=torch.channels_last))

    def extra_repr(self) -> str:
        return (f"in_channels={self.in_channels}, out_channels={self.out_channels}, dilations={self.dilations}, "
                f"variant={self.variant!r}, spatial_attention={self.attention is not None}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, in_channels, H, W) -> (B, out_channels, H, W)."""
        self._check_input(x)
        folded = not self.training and all(bn.running_mean is not None for bn in self._norms())
        if folded:
            params = self._folded_parameters(self._fold_sum if self.variant == "sum" else self._fold_concat, x)
        # Where the backend convolves channels-last, the whole layer runs
        # channels-last (BatchNorm, 1x1 convolutions and the ops keep the
        # layout), so x is converted once rather than at every op.
        # The dilations that decide it: the folded sum's, or the concat's dense fuse.
        dilations = self.dilations if self.variant == "sum" else [1]
        work = relayout(x, channels_last=True) if prefers_channels_last(x, dilations) else x
        if self.variant == "sum":
            y = self._sum_folded(work, *params) if folded else self._sum_train(work)
        else:
            y = self._concat_folded(work, *params) if folded else self._concat_train(work)
        # Converted back to NCHW at the end when x was not channels-last: by
        # the attention as it gates, else by relayout.
        to_nchw = work is not x
        if self.attention is not None:
            return spatial_attention(y, self.attention.weight, contiguous_output=to_nchw)
        return relayout(y, channels_last=False) if to_nchw else y

    # -- train mode: the dilated convolutions as one op, BatchNorm as BatchNorm does

    def _branch_convolutions(self, x: torch.Tensor, with_pointwise: bool) -> list[torch.Tensor]:
        """Each branch's raw convolution of x through multi_dilation_conv (one call per
        branch: each output feeds its own BatchNorm, so nothing is concatenated and split)."""
        dilations = ([0] if with_pointwise else []) + self.dilations
        return [multi_dilation_conv(x, self._as_3x3(branch[0].weight)[None], [d], None, "sum")
                for branch, d in zip(self.branches, dilations)]

    def _sum_train(self, x: torch.Tensor) -> torch.Tensor:
        raw = self._branch_convolutions(x, with_pointwise=False)
        total = None
        for (_, bn1, pointwise, bn2), r in zip(self.branches, raw):
            # bn1 folded into the 1x1 convolution, with bn1's batch statistics:
            # P (r * s + t) = (P diag(s)) r + P t, so bn1's output is never stored.
            scale, shift = batch_norm_as_affine(bn1, r)
            mix = pointwise.weight[:, :, 0, 0]
            z = nn.functional.conv2d(r, (mix * scale.to(r.dtype))[:, :, None, None], mix @ shift.to(r.dtype))
            y = bn2(z)
            # In place: no backward needs bn2's output or the running sum.
            total = y if total is None else total.add_(y)
        return torch.relu_(total)

    def _concat_train(self, x: torch.Tensor) -> torch.Tensor:
        raw = self._branch_convolutions(x, with_pointwise=True)
        # Each branch's ReLU (branches.{i}.2) applied once, to the concatenation.
        branches = _ConcatReLU.apply(*[branch[1](r) for branch, r in zip(self.branches, raw)])
        fuse_conv, fuse_bn = self.fuse
        fused = fuse_bn(multi_dilation_conv(branches, fuse_conv.weight[None], [1], None, "sum"))
        return torch.relu(fused + self.shortcut(x))

    # -- eval mode: BatchNorms (and for "sum" the 1x1 convolutions) folded

    def _folded_parameters(self, fold, x: torch.Tensor):
        """fold() (the folded weights) in x's dtype: made on every call, or reused
        while frozen (FoldCacheMixin._cached_fold)."""
        return self._cached_fold(x, fold.__name__, lambda: _to_dtype(fold(), x.dtype))

    def _sum_folded(self, x: torch.Tensor, weights: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return multi_dilation_conv(x, weights, self.dilations, bias, "sum", "relu")

    def _fold_sum(self) -> tuple[torch.Tensor, torch.Tensor]:
        weights, bias = [], 0
        for branch in self.branches:
            conv, bn1, pointwise, bn2 = branch
            s1, b1 = _bn_affine(bn1)
            s2, b2 = _bn_affine(bn2)
            # bn2(P (bn1(conv x))) = (s2 P s1) conv x + s2 P b1 + b2: a linear map of conv x.
            mix = s2[:, None] * pointwise.weight[:, :, 0, 0] * s1[None, :]
            weights.append(torch.einsum("oc,cikl->oikl", mix, conv.weight))
            bias = bias + s2 * (pointwise.weight[:, :, 0, 0] @ b1) + b2
        return _cin_innermost(torch.stack(weights)), bias

    def _concat_folded(self, x: torch.Tensor, weights: torch.Tensor, bias: torch.Tensor, fuse, shortcut) -> torch.Tensor:
        branches = multi_dilation_conv(x, weights, [0] + self.dilations, bias, "concat", "relu")
        fused = multi_dilation_conv(branches, fuse[0], [1], fuse[1], "sum")
        residual = nn.functional.conv2d(x, shortcut[0], shortcut[1])
        return torch.relu_(fused.add_(residual))

    def _fold_concat(self):
        weights, biases = [], []
        for branch in self.branches:
            scale, shift = _bn_affine(branch[1])
            weights.append(self._as_3x3(branch[0].weight) * scale[:, None, None, None])
            biases.append(shift)
        fuse_weight, fuse_bias = _fold_conv_bn(self.fuse)
        return (_cin_innermost(torch.stack(weights)), torch.cat(biases), (_cin_innermost(fuse_weight[None]), fuse_bias),
                _fold_conv_bn(self.shortcut))

    # -- helpers

    def _norms(self) -> list[nn.BatchNorm2d]:
        return [m for m in self.modules() if isinstance(m, nn.BatchNorm2d)]

    @staticmethod
    def _as_3x3(weight: torch.Tensor) -> torch.Tensor:
        """A (Cout, Cin, 1, 1) kernel as the centre of a 3x3 one, stored with Cin
        innermost (3x3 kernels pass through)."""
        if weight.shape[-1] == 3:
            return weight
        kernel = weight.new_zeros(weight.shape[0], 3, 3, weight.shape[1]).permute(0, 3, 1, 2)
        kernel[:, :, 1, 1] = weight[:, :, 0, 0]
        return kernel

    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"DilatedFeatureEnhancement: x must be a tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"DilatedFeatureEnhancement: x must be 4-D (B, C, H, W), got {x.dim()}-D of shape "
                             f"{tuple(x.shape)}")
        if x.shape[1] != self.in_channels:
            raise ValueError(f"DilatedFeatureEnhancement: x must have {self.in_channels} channels (in_channels), "
                             f"got {x.shape[1]} (shape {tuple(x.shape)})")
        if not x.dtype.is_floating_point:
            raise TypeError(f"DilatedFeatureEnhancement: x must have a floating dtype, got {x.dtype}")
        weight = self.branches[0][0].weight
        if x.device != weight.device:
            raise ValueError(f"DilatedFeatureEnhancement: x is on {x.device} but the layer's weights are on "
                             f"{weight.device}")


def _bn_affine(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) with bn(v) == v * scale + shift per channel, from the running statistics."""
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.affine:
        scale = bn.weight * scale
    shift = -bn.running_mean * scale + (bn.bias if bn.affine else 0)
    return scale, shift


def _cin_innermost(weight: torch.Tensor) -> torch.Tensor:
    """(n, Cout, Cin, 3, 3) weights stored with Cin innermost (the cpu backend's
    layout: every tap a GEMM operand as it is, so the cached fold is not
    copied on every call)."""
    return weight.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)


def _to_dtype(folded, dtype: torch.dtype):
    """The tensors of a fold (nested tuples) in dtype, strides kept."""
    if isinstance(folded, torch.Tensor):
        return folded.to(dtype)
    return tuple(_to_dtype(part, dtype) for part in folded)


def _fold_conv_bn(block: nn.Sequential) -> tuple[torch.Tensor, torch.Tensor]:
    """Conv -> eval BatchNorm as one convolution's (weight, bias)."""
    conv, bn = block
    scale, shift = _bn_affine(bn)
    return conv.weight * scale[:, None, None, None], shift


class _ConcatReLU(torch.autograd.Function):
    """relu(cat(parts, 1)) that saves only where its result passes gradients,
    as bits. The parts (the branches' BatchNorm outputs) are freed once
    concatenated, where a ReLU per part would keep a second copy of the
    concatenation until the backward; the result is released when the fuse
    convolution's backward is done with it, before this backward runs; and
    the masks take 1/32 of the result's bytes (together 43 MB of the concat
    variant's 112x112 training peak). Each part's gradient comes back dense
    in the part's layout: BatchNorm's backward on a channel slice of the
    concatenation's gradient was 8x slower."""

    @staticmethod
    def forward(ctx, *parts: torch.Tensor) -> torch.Tensor:
        out = torch.cat(parts, 1).relu_()
        # torch.relu's backward zeroes the gradient where the output is <= 0
        # (NaN passes); relu(p) <= 0 exactly where p <= 0. One mask per part,
        # in the part's memory order, so each unpacks on its own.
        ctx.save_for_backward(*[_pack_bits(_storage_order(p.le(0).logical_not_())) for p in parts])
        ctx.shapes = [p.shape for p in parts]
        ctx.channels_last = [_is_channels_last(p) for p in parts]
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, ...]:
        grads = []
        widths = [shape[1] for shape in ctx.shapes]
        for g, packed, shape, channels_last in zip(grad.split(widths, 1), ctx.saved_tensors, ctx.shapes,
                                                   ctx.channels_last):
            # 1.0 where the gradient passes, else 0.0, in the part's layout.
            keep = _unpack_bits(packed, shape.numel(), g.dtype)
            if channels_last:
                B, C, H, W = shape
                keep = keep.view(B, H, W, C).permute(0, 3, 1, 2)
            else:
                keep = keep.view(shape)
            part = torch.empty(shape, dtype=g.dtype, device=g.device,
                               memory_format=torch.channels_last if channels_last else torch.contiguous_format)
            # g where keep > 0.5, else 0: torch.relu's own backward kernel (a
            # NaN gradient is zeroed where the output was <= 0), 3.5x faster
            # than torch.where on a bool condition.
            grads.append(torch.ops.aten.threshold_backward.grad_input(g, keep, 0.5, grad_input=part))
        return tuple(grads)


def _is_channels_last(t: torch.Tensor) -> bool:
    return t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def _storage_order(t: torch.Tensor) -> torch.Tensor:
    """t's elements as a flat view in memory order (t contiguous or channels-last)."""
    return t.permute(0, 2, 3, 1).reshape(-1) if _is_channels_last(t) else t.reshape(-1)


# Bits of 8 bool bytes read as one little-endian int64: multiplied by this,
# flag k (byte k) lands on bit 56 + k and every other product on a bit of its
# own below 56, so no carry reaches the top byte.
_GATHER_FLAGS = 0x0102040810204080


def _pack_bits(flags: torch.Tensor) -> torch.Tensor:
    """(N,) bool -> (ceil(N / 8),) uint8, bit k of byte i = flags[8 i + k];
    overwrites flags."""
    pad = -flags.numel() % 8
    if pad:
        flags = torch.cat([flags, flags.new_zeros(pad)])
    if sys.byteorder != "little":
        weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=flags.device)
        return (flags.view(-1, 8).to(torch.uint8) * weights).sum(1, dtype=torch.uint8)
    # In place: flags is the caller's scratch (no more temporaries at the peak).
    words = flags.contiguous().view(torch.uint8).view(torch.int64)
    return words.mul_(_GATHER_FLAGS).bitwise_right_shift_(56).to(torch.uint8)


def _unpack_bits(packed: torch.Tensor, count: int, dtype: torch.dtype = torch.bool) -> torch.Tensor:
    """The inverse of _pack_bits: (count,) of dtype (bool, or 0 / 1 values)."""
    values = torch.arange(256, device=packed.device)
    flags = ((values[:, None] >> torch.arange(8, device=packed.device)) & 1).to(dtype)  # (256, 8)
    if dtype == torch.bool and sys.byteorder == "little":
        # Each byte value's 8 flags as one int64: one gather per 8 flags.
        return flags.view(torch.int64).view(-1).index_select(0, packed.long()).view(torch.bool)[:count]
    return flags.index_select(0, packed.long()).view(-1)[:count]

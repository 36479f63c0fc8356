"""DilatedFeatureEnhancement cases: ResFormerMTL's four skip levels at 224 px,
batch 2, dilations (6, 12, 18), both variants, eval forward and train
forward + backward. Reference = the plain torch.nn composition."""

from __future__ import annotations

import copy

import torch
from torch import nn

import medmtl
from benchmarks.case import Case
from medmtl.layers import DilatedFeatureEnhancement

LEVELS = [(64, 112), (128, 56), (256, 28), (512, 14)]
DILATIONS = (6, 12, 18)
BATCH = 2


class PlainDFE(nn.Module):
    """The composition the layer replaces, on the layer's own modules."""

    def __init__(self, layer: DilatedFeatureEnhancement):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        m = self.layer
        if m.variant == "sum":
            y = torch.relu(sum(branch(x) for branch in m.branches))
        else:
            y = torch.relu(m.fuse(torch.cat([branch(x) for branch in m.branches], 1)) + m.shortcut(x))
        pooled = torch.cat([y.mean(1, keepdim=True), y.max(1, keepdim=True)[0]], 1)
        return y * torch.sigmoid(m.attention(pooled))


def plain_copy(layer: DilatedFeatureEnhancement) -> PlainDFE:
    """The composition on a deep copy of the layer's modules, every parameter in
    PyTorch's default (contiguous) layout, as a user's plain model has it (the
    layer stores its branch convolutions channels-last, which would change
    which oneDNN path the reference takes)."""
    plain = copy.deepcopy(layer)
    for module in plain.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            setattr(module, name, nn.Parameter(param.detach().contiguous(), requires_grad=param.requires_grad))
    return PlainDFE(plain)


def _inputs(channels, size, variant, training):
    def make():
        torch.manual_seed(0)
        layer = DilatedFeatureEnhancement(channels, channels, DILATIONS, variant).train(training)
        x = torch.randn(BATCH, channels, size, size)
        return dict(layer=layer, plain=plain_copy(layer).train(training), x=x,
                    bytes=x.numel() * x.element_size())
    return make


def _step(module, x, training):
    if not training:
        return lambda: module(x)

    def run():
        x.requires_grad_(True)
        module(x).sum().backward()
    return run


def _providers(training):
    def reference(inputs):
        return _step(inputs["plain"], inputs["x"], training)

    def compiled(inputs):
        return _step(torch.compile(inputs["plain"]), inputs["x"], training)

    def medmtl_cpu(inputs):
        step = _step(inputs["layer"], inputs["x"], training)

        def run():
            with medmtl.backend("cpu"):
                return step()
        return run

    return {"reference": reference, "compile(reference)": compiled, "medmtl cpu": medmtl_cpu}


CASES = [
    Case(f"dfe_{variant}_{'train' if training else 'eval'}", f"C{c}_{s}x{s}", _inputs(c, s, variant, training),
         f"DFE variant={variant}, {'train forward+backward' if training else 'eval forward'}, "
         f"(B, C, H, W) = ({BATCH}, {c}, {s}, {s}), dilations {DILATIONS}",
         _providers(training), rounds=15, inference=not training,
         group=f"dfe_{variant}_{'train' if training else 'eval'}")
    for variant in ("sum", "concat") for training in (False, True) for c, s in LEVELS
]

"""multiscale_pool cases: the ResFormer classification head and pyramid pooling."""

from __future__ import annotations

import torch

import medmtl
from benchmarks.case import Case
from medmtl.ops import multiscale_pool, reference


def _levels(shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    features = [torch.randn(*s, generator=g) for s in shapes]
    scale = [torch.rand(s[1], generator=g) + 0.5 for s in shapes]
    shift = [torch.randn(s[1], generator=g) * 0.1 for s in shapes]
    return features, scale, shift


def _pool_inputs(shapes, sizes):
    def make():
        features, scale, shift = _levels(shapes)
        return dict(features=features, scale=scale, shift=shift, sizes=sizes,
                    bytes=sum(x.numel() * x.element_size() for x in features))
    return make


def _pool_reference(inputs):
    return lambda: reference.multiscale_pool(inputs["features"], inputs["sizes"], "avg", inputs["scale"],
                                             inputs["shift"], "relu")


def _pool_compiled_reference(inputs):
    compiled = torch.compile(reference.multiscale_pool, fullgraph=True)
    return lambda: compiled(inputs["features"], inputs["sizes"], "avg", inputs["scale"], inputs["shift"], "relu")


def _pool_backend(name):
    def provider(inputs):
        def run():
            with medmtl.backend(name):
                return multiscale_pool(inputs["features"], inputs["sizes"], "avg", inputs["scale"],
                                       inputs["shift"], "relu")
        return run
    return provider


def _copy_of_inputs(inputs):
    """A plain copy of the same bytes: the bandwidth yardstick."""
    src = torch.cat([x.flatten() for x in inputs["features"]])
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)


POOL_PROVIDERS = {
    "reference": _pool_reference,
    "compile(reference)": _pool_compiled_reference,
    "medmtl cpu": _pool_backend("cpu"),
    "copy": _copy_of_inputs,
}

CASES = [
    Case("multiscale_pool", "resformer_head",
         _pool_inputs([(8, 256, 28, 28), (8, 512, 14, 14)], (1,)),
         "ResFormer classification head: BN+ReLU+GAP of (256, 28x28) and (512, 14x14), batch 8",
         POOL_PROVIDERS),
    Case("multiscale_pool", "pyramid_pooling",
         _pool_inputs([(2, 64, 112, 112), (2, 128, 56, 56), (2, 256, 28, 28), (2, 512, 14, 14)], (1, 2, 3, 6)),
         "BN+ReLU+pyramid pooling (1, 2, 3, 6) of the four encoder levels at 224 px, batch 2",
         POOL_PROVIDERS),
]

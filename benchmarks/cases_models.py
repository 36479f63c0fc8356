"""Whole-model cases: ResFormerMTL at 224 px, batch 2 (the released
configuration), inference and one training step (forward, backward of a
loss over both tasks, AdamW step), and the machine's float32 GEMM rate.

Providers: the model on the reference backend ("reference"), torch.compile
of it ("compile(reference)"), the model on the cpu backend ("medmtl cpu"),
and for inference medmtl.optimize(model) in float32 and bfloat16
("medmtl optimize", "medmtl optimize bf16"). Each case's `flops` (counted by
torch.utils.flop_counter: the forward, or 3x it for a training step) gives
the report's GFLOP/s, comparable with the "sgemm" case's.
"""

from __future__ import annotations

import copy

import torch

import medmtl
from benchmarks.case import Case
from medmtl.models import create_model

SIZE, BATCH = 224, 2


def _forward_flops(model, x) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), medmtl.backend("reference"), counter:
        model(x)
    return counter.get_total_flops()


def _inputs(training):
    def make():
        torch.manual_seed(0)
        model = create_model("resformer_mtl", seg_classes=4, num_classes=3, img_size=SIZE).train(training)
        x = torch.randn(BATCH, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
        flops = _forward_flops(model.eval(), x) * (3 if training else 1)
        model.train(training)
        return dict(model=model, x=x, training=training, flops=flops)
    return make


def _loss(out):
    return out["seg"].float().square().mean() + out["cls"].float().square().mean()


def _step(model, x, training, backend):
    if not training:
        def infer():
            with medmtl.backend(backend):
                return model(x)
        return infer
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)

    def train():
        optimizer.zero_grad(set_to_none=True)
        with medmtl.backend(backend):
            loss = _loss(model(x))
        loss.backward()
        optimizer.step()
    return train


def _providers(training):
    def eager(inputs):
        return _step(copy.deepcopy(inputs["model"]), inputs["x"], training, "reference")

    def compiled(inputs):
        model = copy.deepcopy(inputs["model"])
        with medmtl.backend("reference"):
            # static shapes: with dynamic ones inductor fails on this model's training graph
            return _step(torch.compile(model, dynamic=False), inputs["x"], training, "reference")

    def medmtl_cpu(inputs):
        return _step(copy.deepcopy(inputs["model"]), inputs["x"], training, "cpu")

    providers = {"reference": eager, "compile(reference)": compiled, "medmtl cpu": medmtl_cpu}
    if not training:
        def optimized(dtype):
            def make(inputs):
                fast = medmtl.optimize(inputs["model"], dtype=dtype, example_input=inputs["x"])
                return _step(fast, inputs["x"], False, "cpu")
            return make
        providers["medmtl optimize"] = optimized(torch.float32)
        providers["medmtl optimize bf16"] = optimized(torch.bfloat16)
    return providers


def _sgemm_inputs():
    n = 2048
    g = torch.Generator().manual_seed(0)
    return dict(a=torch.randn(n, n, generator=g), b=torch.randn(n, n, generator=g), flops=2 * n ** 3)


CASES = [
    Case("sgemm", "2048^3", _sgemm_inputs, "float32 matrix product 2048 x 2048 x 2048: the machine's GEMM rate",
         {"torch.mm": lambda inputs: lambda: torch.mm(inputs["a"], inputs["b"])}, rounds=10),
] + [
    Case(f"resformer_mtl_{'train' if training else 'infer'}", f"{SIZE}px_b{BATCH}", _inputs(training),
         f"ResFormerMTL (56.3 M parameters), batch {BATCH} at {SIZE} px; "
         + ("training step: forward, backward, AdamW" if training else "inference"),
         _providers(training), rounds=3 if training else 5, inference=not training)
    for training in (False, True)
]

"""window_attention cases: ResFormerMTL's Swin stages at 224 px, batch 2
(stage 1: C 64 on 112x112 with 2 heads, stage 2: C 128 on 56x56 with 4 heads,
window 14, shifted by 7) and SwinUNETR's first stage in 3-D (C 48 on 32^3
tokens, 3 heads, window 7, shifted by 3; 32 is not a multiple of 7, so the map
is padded). q, k, v are the strided slices of one qkv tensor, as the layer
hands them over. Forward, and forward + backward to q, k, v, the bias table
and the pad key/value.

Providers: the reference composition (pad, roll, partition, softmax), the same
with F.scaled_dot_product_attention taking bias + mask as attn_mask,
torch.compile of the reference, and the medmtl cpu kernels."""

from __future__ import annotations

import math

import torch

import medmtl
from benchmarks.case import Case
from medmtl.ops import reference, window_attention

BATCH = 2
STAGES = [
    # name, spatial, channels, heads, window, shift
    ("stage1_C64_112x112", (112, 112), 64, 2, (14, 14), (7, 7)),
    ("stage2_C128_56x56", (56, 56), 128, 4, (14, 14), (7, 7)),
    ("swinunetr3d_C48_32^3", (32, 32, 32), 48, 3, (7, 7, 7), (3, 3, 3)),
]


def _inputs(spatial, channels, heads, window, shift, training):
    def make():
        g = torch.Generator().manual_seed(0)
        hd = channels // heads
        qkv = torch.randn(BATCH, *spatial, 3, heads, hd, generator=g).requires_grad_(training)
        table = (torch.randn(math.prod(2 * w - 1 for w in window), heads, generator=g) * 0.02).requires_grad_(training)
        pad_key, pad_value = (torch.randn(heads, hd, generator=g).requires_grad_(training) for _ in range(2))
        args = (*qkv.unbind(-3), window, shift, table, hd**-0.5, pad_key, pad_value)
        return dict(args=args, bytes=4 * qkv.numel() * qkv.element_size() // 3)
    return make


def _step(fn, args, training):
    if not training:
        return lambda: fn(*args)

    def run():
        fn(*args).sum().backward()
    return run


def _sdpa(*args):
    return reference.window_attention(*args, sdpa=True)


def _providers(training):
    def eager(inputs):
        return _step(reference.window_attention, inputs["args"], training)

    def sdpa(inputs):
        return _step(_sdpa, inputs["args"], training)

    def compiled(inputs):
        return _step(torch.compile(reference.window_attention), inputs["args"], training)

    def medmtl_cpu(inputs):
        step = _step(window_attention, inputs["args"], training)

        def run():
            with medmtl.backend("cpu"):
                return step()
        return run

    return {"reference": eager, "reference sdpa": sdpa, "compile(reference)": compiled, "medmtl cpu": medmtl_cpu}


CASES = [
    Case(f"window_attention_{'fwd_bwd' if training else 'fwd'}", name,
         _inputs(spatial, channels, heads, window, shift, training),
         f"window attention {'forward+backward' if training else 'forward'}, batch {BATCH}, map {spatial}, "
         f"C {channels}, {heads} heads, window {window}, shift {shift}",
         _providers(training), rounds=5, inference=not training)
    for training in (False, True) for name, spatial, channels, heads, window, shift in STAGES
]

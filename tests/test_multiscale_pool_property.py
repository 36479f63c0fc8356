"""Property tests: for drawn shapes, sizes and options, the cpu backend equals the reference."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import medmtl
from medmtl.ops import multiscale_pool
from tests.conftest import requires_extension

pytestmark = requires_extension


@st.composite
def pooling_problems(draw):
    dims = draw(st.sampled_from([2, 3]))
    batch = draw(st.integers(1, 3))
    levels = []
    for _ in range(draw(st.integers(1, 3))):
        channels = draw(st.integers(1, 5))
        side = st.integers(1, 12 if dims == 2 else 6)
        levels.append((batch, channels, *[draw(side) for _ in range(dims)]))
    sizes = draw(st.lists(st.integers(1, 8), min_size=1, max_size=4))
    return dict(shapes=levels, sizes=sizes, mode=draw(st.sampled_from(["avg", "max"])),
                activation=draw(st.sampled_from([None, "relu"])), affine=draw(st.booleans()),
                channels_last=draw(st.booleans()), seed=draw(st.integers(0, 2**16)))


@settings(max_examples=80, deadline=None)
@given(problem=pooling_problems())
def test_cpu_equals_reference(problem):
    g = torch.Generator().manual_seed(problem["seed"])
    features = []
    for shape in problem["shapes"]:
        x = torch.randn(*shape, generator=g, dtype=torch.float64)
        if problem["channels_last"]:
            x = x.to(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
        features.append(x.requires_grad_())
    scale = shift = None
    if problem["affine"]:
        scale = [torch.randn(x.shape[1], generator=g, dtype=torch.float64).requires_grad_() for x in features]
        shift = [torch.randn(x.shape[1], generator=g, dtype=torch.float64).requires_grad_() for x in features]
    params = features + (scale + shift if scale else [])
    results = {}
    for backend in ("reference", "cpu"):
        with medmtl.backend(backend):
            out = multiscale_pool(features, problem["sizes"], problem["mode"], scale, shift, problem["activation"])
        grad = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
        results[backend] = (out, torch.autograd.grad(out, params, grad))
    torch.testing.assert_close(results["cpu"][0], results["reference"][0])
    for got, expected in zip(results["cpu"][1], results["reference"][1]):
        torch.testing.assert_close(got, expected)

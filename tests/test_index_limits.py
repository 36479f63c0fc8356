"""Inputs beyond the kernels' index range get a ValueError naming the argument,
instead of a wrapped-around int32 offset (no 8 GB tensors: the Triton launchers'
limit is lowered for the test, and multiscale_pool's output_sizes bound is
checked before anything is allocated)."""

from __future__ import annotations

import re

import pytest
import torch

import medmtl
from medmtl.ops import multiscale_pool
from tests.conftest import requires_extension, requires_triton, triton_device

LIMIT = 1000  # elements; the real one is 2^31


@pytest.fixture
def small_limit(monkeypatch):
    from medmtl.kernels import _index_limits

    monkeypatch.setattr(_index_limits, "INT32_LIMIT", LIMIT)


def test_limit_is_2_to_the_31():
    from medmtl.kernels._index_limits import INT32_LIMIT, check_int32_span, sample_span

    assert INT32_LIMIT == 2**31
    check_int32_span("op", "x", 2**31 - 1)
    with pytest.raises(ValueError, match=r"op: x spans 2147483648 elements per sample"):
        check_int32_span("op", "x", 2**31)
    # the span of one sample follows the strides, expanded or transposed
    big = torch.zeros(1, 1, 1).expand(3, 2**16, 2**15)
    assert sample_span(big) == 2**31
    assert sample_span(torch.zeros(2, 4, 5).transpose(1, 2)) == 20
    assert sample_span(torch.zeros(2, 6, 5)[:, ::2]) == 25


@requires_triton
@pytest.mark.parametrize("levels,words", [
    ([(2, 3, 4, 4), (2, 3, 40, 30)], "features[1] spans 1200 elements per plane"),
    ([(2, 3, 4, 5, 6)], "features[0] with output_sizes 9 spans 4374 elements in pooled rows"),  # 2 * 3 * 9^3
])
def test_triton_multiscale_pool_names_the_level(small_limit, levels, words):
    features = [torch.randn(shape, device=triton_device()) for shape in levels]
    with medmtl.backend("triton"), pytest.raises(ValueError, match=re.escape(f"multiscale_pool: {words}")):
        multiscale_pool(features, (1, 9))


@requires_triton
@pytest.mark.parametrize("cin,cout,n,combine,name", [(12, 2, 1, "sum", "x"), (2, 12, 1, "sum", "output"), (4, 4, 8, "sum", "weight"),
                                                     (2, 4, 3, "concat", "output")])
def test_triton_multi_dilation_conv_names_the_tensor(small_limit, cin, cout, n, combine, name):
    device = triton_device()
    x = torch.randn(1, cin, 10, 10, device=device)  # 100 pixels per channel
    weight = torch.randn(n, cout, cin, 3, 3, device=device)
    with medmtl.backend("triton"), pytest.raises(ValueError, match=rf"multi_dilation_conv: {name} spans"):
        medmtl.ops.multi_dilation_conv(x, weight, [1] * n, None, combine)


@requires_triton
def test_triton_spatial_attention_names_x(small_limit):
    x = torch.randn(2, 11, 10, 10, device=triton_device())
    with medmtl.backend("triton"), pytest.raises(ValueError, match=r"spatial_attention: x spans 1100 elements"):
        medmtl.ops.spatial_attention(x, torch.randn(1, 2, 7, 7, device=x.device))


@requires_triton
@pytest.mark.parametrize("arg", ["q", "k", "v"])
def test_triton_window_attention_names_the_tensor(small_limit, arg):
    device = triton_device()
    shapes = {"q": (1, 7, 7, 2, 8), "k": (1, 7, 7, 2, 8), "v": (1, 7, 7, 2, 8)}
    # a strided view of 2x the map for `arg`: its sample spans 1568 + elements
    tensors = {a: torch.randn(s, device=device) for a, s in shapes.items()}
    tensors[arg] = torch.randn(1, 14, 7, 2, 8, device=device)[:, ::2]
    table = torch.randn(13 * 13, 2, device=device)
    with medmtl.backend("triton"), pytest.raises(ValueError, match=rf"window_attention: {arg} spans"):
        medmtl.ops.window_attention(tensors["q"], tensors["k"], tensors["v"], 7, 0, table)


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton", "auto"])
@pytest.mark.parametrize("sizes,dims,words", [
    ((1, 46341), 2, "output_sizes must each be at most 46340"),
    # 1290^3 = 2146689000 bins alone fit; with 645^3 and 2^3 more, not
    ((1290, 645, 2), 3, "output_sizes must give at most 2147483647 bins per channel"),
    ((2**40,), 2, "output_sizes must each be at most"),
])
def test_multiscale_pool_output_sizes_upper_bound(backend, sizes, dims, words):
    x = torch.randn((1, 1) + (2,) * dims)
    with medmtl.backend(backend), pytest.raises(ValueError, match=words):
        multiscale_pool([x], sizes)


@requires_extension
@pytest.mark.parametrize("dims,sizes,words", [
    (2, [46341], "output_sizes must each be at most 46340"),
    (3, [1290, 645, 2], "bins per channel"),
    (2, [2**40], "output_sizes must each be at most"),  # s * s would overflow int64
])
def test_compiled_op_bounds_output_sizes(dims, sizes, words):
    x = torch.randn((1, 1) + (2,) * dims)
    with pytest.raises(RuntimeError, match=words):
        torch.ops.medmtl.multiscale_pool([x], sizes, "avg", None, None, False)

"""The cpu backend's cache of Winograd kernel transforms (csrc/cpu/derived_weight_cache.h):
an inference weight (no gradient) seen a second time keeps its transform, and
then a dense 3x3 on a small map takes the tiles (in stages, few tiles). The
cache must never give a stale answer: an in-place write, a freed weight, a
weight that takes a gradient or an inference tensor each go around it."""

from __future__ import annotations

import gc
import os
import subprocess
import sys

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import medmtl
from medmtl.layers import DilatedFeatureEnhancement
from medmtl.ops import multi_dilation_conv
from medmtl.ops.multi_dilation_conv import weight_cache_info
from tests.conftest import requires_extension
from tests.test_dilated_feature_enhancement import PlainDFE

pytestmark = requires_extension


def _inputs(batch, cin, cout, hw, n=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cin, *hw, generator=g, dtype=torch.float64)
    weight = torch.randn(n, cout, cin, 3, 3, generator=g, dtype=torch.float64) / 30
    bias = torch.randn(cout, generator=g, dtype=torch.float64)
    return x, weight, bias


def _cpu(x, weight, dilations, bias, combine="sum", activation="relu"):
    with medmtl.backend("cpu"):
        return multi_dilation_conv(x, weight, dilations, bias, combine, activation)


def _reference(x, weight, dilations, bias, combine="sum", activation="relu"):
    with medmtl.backend("reference"):
        return multi_dilation_conv(x, weight, dilations, bias, combine, activation)


def _gemm_ops(fn) -> int:
    """How many of ATen's GEMMs and convolutions fn ran (the Winograd tiles call BLAS directly)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    names = [e.name for e in prof.events()]
    return sum(n in ("aten::mm", "aten::addmm", "aten::addmm_") or "convolution" in n for n in names)


def _entries() -> int:
    gc.collect()
    return weight_cache_info()[0]


# A dense 3x3 on small maps: tap GEMMs unless the transform is cached. 2 x 14 x
# 14 has 32 tiles (2.8x fewer multiply-adds than the taps); 3 x 13 x 11 has
# partial tiles on both axes. Both run in stages (the kernel outweighs the tiles).
SMALL_MAPS = [((2, 128, 64), (14, 14)), ((3, 128, 128), (13, 11))]


@pytest.mark.parametrize("channels,hw", SMALL_MAPS)
def test_second_call_takes_the_cached_transform(channels, hw):
    batch, cin, cout = channels
    x, weight, bias = _inputs(batch, cin, cout, hw)
    expected = _reference(x, weight, [1], bias)
    before = _entries()
    # First sighting: the tap GEMMs, nothing cached.
    assert _gemm_ops(lambda: _cpu(x, weight, [1], bias)) > 0
    assert _entries() == before
    torch.testing.assert_close(_cpu(x, weight, [1], bias), expected, atol=1e-10, rtol=1e-10)
    # Seen before: the tiles with the kernel's transform, kept.
    assert _entries() == before + 1
    assert _gemm_ops(lambda: _cpu(x, weight, [1], bias)) == 0
    third = _cpu(x, weight, [1], bias)
    torch.testing.assert_close(third, expected, atol=1e-10, rtol=1e-10)
    assert _entries() == before + 1
    del weight
    assert _entries() == before  # the entry goes with its weight


def test_cached_concat_branches_and_layouts():
    """A concat whose dilated branches take cached tiles on a small map (the
    1x1 branch is a GEMM into its slice), from NCHW, channels-last and strided x."""
    x, weight, _ = _inputs(2, 128, 64, (14, 14), n=3)
    bias = torch.randn(3 * 64, dtype=torch.float64)
    dilations = [0, 1, 1]
    for layout in ("contiguous", "channels_last", "strided"):
        xl = {"contiguous": x, "channels_last": x.contiguous(memory_format=torch.channels_last),
              "strided": torch.cat([x, x], 3)[..., ::2]}[layout]
        expected = _reference(xl, weight, dilations, bias, "concat")
        for _ in range(3):
            got = _cpu(xl, weight, dilations, bias, "concat")
            torch.testing.assert_close(got, expected, atol=1e-10, rtol=1e-10)
            assert got.is_contiguous(memory_format=torch.channels_last if layout == "channels_last"
                                     else torch.contiguous_format)


def test_in_place_write_is_seen():
    x, weight, bias = _inputs(2, 128, 64, (14, 14))
    before = _entries()
    for _ in range(2):
        _cpu(x, weight, [1], bias)
    assert _entries() == before + 1
    with torch.no_grad():
        weight[0, :, :, 1, 1] += 1.0  # through a view: the version counter is shared
    expected = _reference(x, weight, [1], bias)
    torch.testing.assert_close(_cpu(x, weight, [1], bias), expected, atol=1e-10, rtol=1e-10)
    assert _entries() == before  # the stale transform went with the first call after the write
    for _ in range(2):
        torch.testing.assert_close(_cpu(x, weight, [1], bias), expected, atol=1e-10, rtol=1e-10)
    weight.copy_(torch.randn_like(weight) / 30)
    expected = _reference(x, weight, [1], bias)
    for _ in range(2):
        torch.testing.assert_close(_cpu(x, weight, [1], bias), expected, atol=1e-10, rtol=1e-10)


def test_write_through_data_is_seen():
    """A write the version counter does not see (through .data, as an EMA update
    makes) changes the values, and the cached transform is not used: each entry
    keeps a copy of the weight and a hit must equal it."""
    x, weight, bias = _inputs(2, 128, 64, (14, 14))
    before = _entries()
    for _ in range(2):
        _cpu(x, weight, [1], bias)
    assert _entries() == before + 1
    assert _gemm_ops(lambda: _cpu(x, weight, [1], bias)) == 0  # the cached tiles
    version = weight._version
    weight.data.mul_(0.5).add_(torch.randn_like(weight) / 60)
    assert weight._version == version
    expected = _reference(x, weight, [1], bias)
    for _ in range(3):
        torch.testing.assert_close(_cpu(x, weight, [1], bias), expected, atol=1e-10, rtol=1e-10)
    assert _entries() == before + 1  # re-derived in place of the stale one


def test_weights_that_take_gradients_or_are_inference_tensors_are_not_cached():
    x, weight, bias = _inputs(2, 128, 64, (14, 14))
    before = _entries()
    trained = weight.clone().requires_grad_()
    for _ in range(3):
        out = _cpu(x, trained, [1], bias)
    torch.testing.assert_close(out, _reference(x, weight, [1], bias), atol=1e-10, rtol=1e-10)
    assert _entries() == before
    with torch.inference_mode():
        frozen = weight.clone()
        for _ in range(3):
            out = _cpu(x, frozen, [1], bias)
    assert _entries() == before
    torch.testing.assert_close(out, _reference(x, weight, [1], bias), atol=1e-10, rtol=1e-10)


def test_fresh_weights_every_call_are_not_cached():
    """A weight made afresh on every call (a fold inside a compiled graph) is
    never seen twice, so its transform is neither used from nor put in the cache."""
    x, weight, bias = _inputs(2, 128, 64, (14, 14))
    before = _entries()
    for _ in range(3):
        assert _gemm_ops(lambda: _cpu(x, weight * 1.0, [1], bias)) > 0  # the tap GEMMs each time
    assert _entries() == before


def test_budget_from_the_environment():
    """MEDMTL_WEIGHT_CACHE_MB bounds the cache: 0 turns it off; at 3 MB a second
    2.4 MB transform pushes out the least recently used; at 1 MB it does not
    fit, so the small map stays on the tap GEMMs (rather than transforming
    the kernel on every call). Every answer stays right."""
    script = """
import gc, torch, medmtl  # noqa
from torch.profiler import profile
from medmtl.ops import multi_dilation_conv
from medmtl.ops.multi_dilation_conv import weight_cache_info
x = torch.randn(2, 128, 14, 14, dtype=torch.float64)
weights = [torch.randn(1, 64, 128, 3, 3, dtype=torch.float64) / 30 for _ in range(2)]
with medmtl.backend("cpu"):
    for w in weights + weights:
        for _ in range(2):
            with profile() as prof:
                got = multi_dilation_conv(x, w, [1], None, "sum")
            expected = torch.nn.functional.conv2d(x, w[0], padding=1)
            assert torch.allclose(got, expected, atol=1e-10, rtol=1e-10)
        gc.collect()
        taps = any(e.name in ("aten::mm", "aten::addmm") for e in prof.events())
        print(*weight_cache_info(), int(taps))
"""
    env = dict(os.environ)
    results = {}
    for budget in ("0", "1", "3"):
        env["MEDMTL_WEIGHT_CACHE_MB"] = budget
        run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr
        results[budget] = [tuple(int(v) for v in line.split()) for line in run.stdout.splitlines()]
    assert results["0"] == [(0, 0, 0, 1)] * 4
    assert results["1"] == [(0, 0, 1 << 20, 1)] * 4
    transform_bytes = 36 * 128 * 64 * 8
    assert results["3"] == [(1, transform_bytes, 3 << 20, 0)] * 4


def test_layer_eval_with_cached_transforms_follows_its_parameters():
    """The frozen concat DFE's fuse (256 -> 64 on 2 x 14 x 14) takes cached tiles
    from its second eval call; a changed running statistic or loaded state_dict
    refolds, and the answer follows."""
    torch.manual_seed(0)
    layer = DilatedFeatureEnhancement(64, 64, (6, 12, 18), "concat").double().eval().freeze()
    plain = PlainDFE(layer).eval()
    x = torch.randn(2, 64, 14, 14, dtype=torch.float64)
    before = _entries()
    with torch.no_grad(), medmtl.backend("cpu"):
        for _ in range(3):
            torch.testing.assert_close(layer(x), plain(x), atol=1e-9, rtol=1e-9)
        assert _entries() == before + 1
        layer.fuse[1].running_mean.add_(0.5)
        plain.layer.fuse[1].running_mean.add_(0.5)
        for _ in range(2):
            torch.testing.assert_close(layer(x), plain(x), atol=1e-9, rtol=1e-9)
        other = DilatedFeatureEnhancement(64, 64, (6, 12, 18), "concat").double().eval()
        layer.load_state_dict(other.state_dict())
        for _ in range(2):
            torch.testing.assert_close(layer(x), PlainDFE(other).eval()(x), atol=1e-9, rtol=1e-9)
    layer.train()  # drops the eval fold, and its transform with the next op call
    x.requires_grad_()
    with medmtl.backend("cpu"):
        layer(x).sum().backward()
    assert _entries() == before


def test_concurrent_calls_share_the_cache_safely():
    """Threads calling with the same and with different inference weights at
    once (the cache is shared behind a mutex) each get their own right answer."""
    from concurrent.futures import ThreadPoolExecutor

    x, _, bias = _inputs(2, 128, 64, (14, 14))
    weights = [_inputs(2, 128, 64, (14, 14), seed=s)[1] for s in (1, 2)]
    expected = [_reference(x, w, [1], bias) for w in weights]

    def worker(k):
        for _ in range(4):
            got = _cpu(x, weights[k % 2], [1], bias)
            torch.testing.assert_close(got, expected[k % 2], atol=1e-10, rtol=1e-10)
        return True

    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(worker, range(8)))

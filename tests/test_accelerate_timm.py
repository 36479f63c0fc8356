"""accelerate() on timm's SwinTransformer (v1) against the original with the
same weights: the default 224 px model, a size that needs padding (timm
shifts before it pads), a dynamic-size model, and always_partition."""

from __future__ import annotations

import pytest
import torch

import medmtl
from tests.accelerate_common import assert_same, assert_state_dict_both_ways, randomize_
from tests.conftest import requires_extension

timm = pytest.importorskip("timm")
timm_swin = pytest.importorskip("timm.models.swin_transformer")

pytestmark = requires_extension

SMALL = dict(embed_dim=24, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8))


def swin(seed=0, **kwargs):
    torch.manual_seed(seed)
    return randomize_(timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, **kwargs), seed)


@pytest.mark.parametrize("train", [False, True])
def test_default_size(train):
    # Swin-T's layout at 224 px (56, 28, 14, 7 token maps, window 7) with narrower channels;
    # drop_path_rate 0.1 in train mode: DropPath draws the same masks in both models.
    model = swin(img_size=224, drop_path_rate=0.1 if train else 0.0, **SMALL)
    assert_same(model, torch.randn(1, 3, 224, 224), train=train, min_converted=8)


def test_state_dict_both_ways():
    model = swin(**SMALL)
    fused = medmtl.accelerate(model)
    assert_state_dict_both_ways(model, fused)


def test_padded_size_float64():
    # 100 px: 25, 12 (padded to 14, shifted: timm rolls before it pads), 6 and 3 (window shrinks).
    model = swin(img_size=100, **SMALL)
    rows = medmtl.accelerated_modules(medmtl.accelerate(model))
    assert all(r.converted for r in rows), [str(r) for r in rows]
    assert_same(model, torch.randn(2, 3, 100, 100), dtype=torch.float64, train=True, min_converted=8)


def test_dynamic_size_model():
    """strict_img_size=False: the mask is made at run time; any size, and the
    shifted blocks fall back to timm's own attention where a map is at most the window."""
    model = swin(img_size=112, strict_img_size=False, **SMALL)
    for size in ((112, 112), (92, 120), (40, 36)):
        assert_same(model, torch.randn(1, 3, *size), dtype=torch.float64, min_converted=8)


def test_always_partition_small_maps_left_alone():
    """always_partition keeps window 7 and shift 3 on the 7x7 (and smaller) maps:
    timm rolls inside its single window there, which the op does not do."""
    model = swin(img_size=112, always_partition=True, **SMALL)
    fused = medmtl.accelerate(model)
    rows = medmtl.accelerated_modules(fused)
    skipped = [r for r in rows if not r.converted]
    assert skipped and all("single window" in r.reason for r in skipped)
    assert all(type(fused.get_submodule(r.path)) is timm_swin.SwinTransformerBlock for r in skipped)
    assert_same(model, torch.randn(1, 3, 112, 112), dtype=torch.float64, min_converted=4)


def test_attention_dropout_left_alone():
    model = swin(attn_drop_rate=0.1, **SMALL)
    rows = medmtl.accelerated_modules(medmtl.accelerate(model))
    assert rows and not any(r.converted for r in rows)
    assert all("attention dropout" in r.reason for r in rows)

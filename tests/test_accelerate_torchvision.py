"""accelerate() on torchvision's swin_t (ShiftedWindowAttention) and
DeepLabV3's ASPP against the originals with the same weights."""

from __future__ import annotations

import pytest
import torch

import medmtl
from tests.accelerate_common import assert_same, assert_state_dict_both_ways, converted_count, randomize_
from tests.conftest import requires_extension

torchvision = pytest.importorskip("torchvision")
tv_swin = pytest.importorskip("torchvision.models.swin_transformer")
tv_deeplab = pytest.importorskip("torchvision.models.segmentation.deeplabv3")

pytestmark = requires_extension


def swin_small(seed=0, **kwargs):
    """swin_t's layout (patch 4, window 7, depths 2-2-6-2 cut to 2-2-2-2) with narrow channels."""
    torch.manual_seed(seed)
    model = tv_swin.SwinTransformer(patch_size=[4, 4], embed_dim=24, depths=[2, 2, 2, 2], num_heads=[1, 2, 4, 8],
                                    window_size=[7, 7], **kwargs)
    return randomize_(model, seed)


@pytest.mark.parametrize("train", [False, True])
def test_swin_default_size(train):
    assert_same(swin_small(), torch.randn(1, 3, 224, 224), train=train, min_converted=8)


@pytest.mark.parametrize("size", [(100, 100), (60, 84)])
def test_swin_padded_sizes_float64(size):
    # 100 px: 25 (padded, shifted), 13, 7, 4 (padded up to the window, as torchvision does).
    assert_same(swin_small(), torch.randn(2, 3, *size), dtype=torch.float64, train=True, min_converted=8)


def test_swin_t_state_dict_both_ways():
    model = torchvision.models.swin_t()
    fused = medmtl.accelerate(model)
    assert converted_count(fused) == 12
    assert_state_dict_both_ways(model, fused)


def test_swin_v2_left_alone():
    model = torchvision.models.swin_v2_t()
    rows = medmtl.accelerated_modules(medmtl.accelerate(model))
    assert len(rows) == 12 and not any(r.converted for r in rows)
    assert all("v2" in r.reason for r in rows)


def deeplab(seed=0):
    torch.manual_seed(seed)
    model = torchvision.models.segmentation.deeplabv3_resnet50(weights=None, weights_backbone=None)
    return randomize_(model, seed)


@pytest.mark.slow
def test_deeplabv3_resnet50_train_float64():
    """The whole model in train mode (BatchNorm batch statistics and running-statistic
    updates), float64 (ResNet's ReLUs and max pool would make float32 gradients
    depend on ties): a 13x13 map, where the rate-12 taps read a 1-pixel band."""
    fused = assert_same(deeplab(), torch.randn(2, 3, 104, 104), dtype=torch.float64, train=True)
    assert type(fused.classifier[0]).__name__ == "FusedASPP"


def test_deeplabv3_resnet50_eval_second_size():
    """Eval (BatchNorms folded into the op) on a 17x15 map, float32, output only."""
    assert_same(deeplab(), torch.randn(1, 3, 136, 120), grads=False, atol=1e-4)


@pytest.mark.parametrize("train", [False, True])
def test_aspp_float32_28x28(train):
    """ASPP alone on DeepLabV3's 224 px map (28x28, rates 12, 24, 36), narrow channels."""
    torch.manual_seed(0)
    aspp = randomize_(tv_deeplab.ASPP(64, (12, 24, 36), out_channels=32))
    assert_same(aspp, torch.randn(2, 64, 28, 28), train=train, atol=1e-4)


def test_aspp_channels_last_64x64_and_state_dict():
    torch.manual_seed(0)
    aspp = randomize_(tv_deeplab.ASPP(32, (12, 24, 36), out_channels=16))
    x = torch.randn(2, 32, 64, 64).contiguous(memory_format=torch.channels_last)
    fused = assert_same(aspp, x, train=False, atol=1e-4)
    assert_state_dict_both_ways(aspp, fused)


def test_aspp_eval_fold_follows_weights():
    """The cached eval fold is remade when a weight or running statistic changes."""
    torch.manual_seed(0)
    aspp = randomize_(tv_deeplab.ASPP(16, (2, 3), out_channels=8)).eval()
    fused = medmtl.accelerate(aspp)
    x = torch.randn(1, 16, 9, 9)
    with torch.no_grad():
        fused(x)
        for module in (aspp, fused):
            module.convs[1][0].weight.mul_(2)
            module.convs[2][1].running_var.add_(1)
        torch.testing.assert_close(fused(x), aspp(x), rtol=1e-5, atol=1e-5)


def test_aspp_unsupported_branch_left_alone():
    aspp = tv_deeplab.ASPP(16, (2, 3), out_channels=8)
    aspp.convs[1][0].stride = (2, 2)
    rows = medmtl.accelerated_modules(medmtl.accelerate(aspp))
    assert len(rows) == 1 and not rows[0].converted and "stride 1" in rows[0].reason

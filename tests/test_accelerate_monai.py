"""accelerate() on MONAI's SwinTransformer / SwinUNETR (2-D and 3-D) against
the original with the same weights: outputs, input and parameter gradients,
eval and train, float32 and float64, maps the window divides and does not,
and maps smaller than the window (MONAI's bias reading)."""

from __future__ import annotations

import copy

import pytest
import torch

import medmtl
from tests.accelerate_common import assert_same, assert_state_dict_both_ways, converted_count, randomize_
from tests.conftest import requires_extension

monai_nets = pytest.importorskip("monai.networks.nets")
monai_swin = pytest.importorskip("monai.networks.nets.swin_unetr")
pytest.importorskip("einops")

pytestmark = requires_extension


def swin_transformer(spatial_dims: int, seed: int = 0, **kwargs) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = monai_swin.SwinTransformer(in_chans=1, embed_dim=12, window_size=(7,) * spatial_dims,
                                       patch_size=(2,) * spatial_dims, depths=(2, 2, 2, 2),
                                       num_heads=(3, 6, 12, 24), spatial_dims=spatial_dims, **kwargs)
    return randomize_(model, seed)


# Token maps of the four stages (after the 2x patch embedding): 14 -> 7 -> 4 -> 2 has a
# window-divided map, a map equal to the window and maps smaller than it; 10x9x11 and
# 17x13 are padded and shifted, then 5x5x6 / 9x7 -> ... shrink the window in some dims.
SIZES_3D = [(28, 28, 28), (20, 18, 22)]
SIZES_2D = [(28, 28), (34, 26)]


@pytest.mark.parametrize("size, train", [(SIZES_3D[0], False), (SIZES_3D[1], True)])
def test_swin_transformer_3d_float32(size, train):
    assert_same(swin_transformer(3), torch.randn(1, 1, *size), train=train, min_converted=8)


@pytest.mark.parametrize("size", SIZES_2D)
@pytest.mark.parametrize("train, dtype", [(False, torch.float32), (True, torch.float64)])
def test_swin_transformer_2d(size, train, dtype):
    assert_same(swin_transformer(2), torch.randn(2, 1, *size), dtype=dtype, train=train, min_converted=8)


def test_swin_transformer_3d_float64_small_maps_and_v2():
    # use_v2 adds residual convolution blocks before each stage; the blocks are the same.
    assert_same(swin_transformer(3, use_v2=True), torch.randn(1, 1, 20, 18, 22), dtype=torch.float64,
                train=True, min_converted=8)


def test_small_map_reads_monai_bias_not_offsets():
    """A 4x4x4 map under a 7x7x7 window: MONAI reads relative_position_index[:64, :64];
    the converted block must too (the true offsets give another answer)."""
    block = monai_swin.SwinTransformerBlock(12, 3, (7, 7, 7), (0, 0, 0)).double().eval()
    randomize_(block)
    layer = monai_swin.BasicLayer(12, 1, 3, (7, 7, 7), [0.0]).double().eval()
    layer.blocks[0] = block
    x = torch.randn(1, 12, 4, 4, 4, dtype=torch.float64)
    fused = medmtl.accelerate(layer)
    assert converted_count(fused) == 1
    with torch.no_grad():
        want, got = layer(x), fused(x)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
        offsets = medmtl.accelerate(layer)
        offsets.blocks[0].attn.bias_reading = "offsets"
        assert (offsets(x) - want).abs().max() > 1e-3


def test_swin_unetr_2d_and_state_dict():
    torch.manual_seed(0)
    model = randomize_(monai_nets.SwinUNETR(in_channels=1, out_channels=3, feature_size=12, spatial_dims=2))
    # float64: the decoder's LeakyReLUs would make float32 gradients depend on ties.
    fused = assert_same(model, torch.randn(1, 1, 64, 64), dtype=torch.float64, train=True, min_converted=8)
    model, fused = model.double(), fused.double()
    assert_state_dict_both_ways(model, fused)
    assert "swinViT.layers1.0.blocks.0.attn.relative_position_index" in fused.state_dict()


@pytest.mark.slow
def test_swin_unetr_3d_eval():
    torch.manual_seed(0)
    model = randomize_(monai_nets.SwinUNETR(in_channels=1, out_channels=2, feature_size=12, spatial_dims=3))
    assert_same(model, torch.randn(1, 1, 64, 64, 64), grads=False, min_converted=8)


def test_attention_dropout_left_alone_and_reported():
    model = swin_transformer(2, attn_drop_rate=0.1)
    fused = medmtl.accelerate(model)
    rows = medmtl.accelerated_modules(fused)
    assert len(rows) == 8 and not any(r.converted for r in rows)
    assert all("attention dropout" in r.reason for r in rows)
    assert all(type(m) is monai_swin.SwinTransformerBlock for m in fused.modules()
               if isinstance(m, monai_swin.SwinTransformerBlock))


def test_standalone_block_left_alone():
    """A block outside a BasicLayer gets its mask from its caller: not converted."""
    holder = torch.nn.Sequential(monai_swin.SwinTransformerBlock(12, 3, (7, 7), (3, 3)))
    rows = medmtl.accelerated_modules(medmtl.accelerate(holder))
    assert len(rows) == 1 and not rows[0].converted and "BasicLayer" in rows[0].reason


def test_checkpointing_block_converted():
    model = swin_transformer(2, use_checkpoint=True)
    assert_same(model, torch.randn(1, 1, 34, 26), train=True, min_converted=8)


def test_original_untouched_and_inplace():
    model = swin_transformer(2)
    before = copy.deepcopy(model.state_dict())
    fused = medmtl.accelerate(model)
    assert fused is not model and converted_count(model) == 0
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    same = medmtl.accelerate(model, inplace=True)
    assert same is model and converted_count(model) == 8

"""The WindowAttention layer against MONAI's and timm's Swin attention with
shared weights, its state_dict, and its backends."""

from __future__ import annotations

import math

import pytest
import torch

import medmtl
from medmtl.layers import WindowAttention
from tests.conftest import requires_extension, triton_device

monai_swin = pytest.importorskip("monai.networks.nets.swin_unetr")
timm_swin = pytest.importorskip("timm.models.swin_transformer")


def monai_attention(block, x):
    """The attention part of MONAI's SwinTransformerBlock (after norm1), with
    the mask its BasicLayer computes."""
    spatial = x.shape[1:-1]
    window, shift = monai_swin.get_window_size(spatial, block.window_size, block.shift_size)
    padded = [math.ceil(s / w) * w for s, w in zip(spatial, window)]
    mask = monai_swin.compute_mask(padded, window, shift, x.device)
    block.norm1 = torch.nn.Identity()
    return block.forward_part1(x, mask)


def randomize(module, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


# MONAI reads the bias of windows clipped to the map at the wrong offsets
# (relative_position_index[:n, :n]), so these cases keep every map dim larger
# than the window; sizes the window does not divide are included.
MONAI_CASES = [
    ((14, 14), 7, 0, 2),
    ((14, 14), 7, 3, 2),
    ((15, 9), 4, 2, 3),
    ((17, 10), (8, 4), (4, 2), 2),
    ((8, 8, 8), 4, 0, 3),
    ((9, 10, 11), 4, 2, 3),
    ((9, 7, 8), (4, 3, 5), (2, 1, 2), 1),
]


@requires_extension
@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("spatial, window, shift, heads", MONAI_CASES)
def test_matches_monai_swin_block_attention(spatial, window, shift, heads, backend):
    nd, dim = len(spatial), 4 * heads
    window = (window,) * nd if isinstance(window, int) else window
    shift = (shift,) * nd if isinstance(shift, int) else shift
    block = monai_swin.SwinTransformerBlock(dim, heads, window, shift, qkv_bias=True).eval()
    randomize(block, 1)
    layer = WindowAttention(dim, heads, window, shift, spatial_dims=nd).eval()
    layer.load_state_dict(block.attn.state_dict())  # carries MONAI's relative_position_index buffer
    x = torch.randn(2, *spatial, dim)
    with torch.no_grad():
        expected = monai_attention(block, x)
        with medmtl.backend(backend):
            got = layer(x)
    torch.testing.assert_close(got, expected, rtol=2e-5, atol=2e-5)


TIMM_CASES = [
    ((14, 14), 7, 0, 2),
    ((14, 14), 7, 3, 2),
    ((16, 8), 4, 2, 4),
    ((12, 12), (6, 4), 0, 1),
]


@requires_extension
@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("spatial, window, shift, heads", TIMM_CASES)
def test_matches_timm_swin_block_attn(spatial, window, shift, heads, backend):
    dim = 8 * heads
    block = timm_swin.SwinTransformerBlock(dim, spatial, num_heads=heads, window_size=window,
                                           shift_size=shift).eval()
    randomize(block, 2)
    layer = WindowAttention(dim, heads, window, shift).eval()
    layer.load_state_dict(block.attn.state_dict(), strict=True)
    x = torch.randn(2, *spatial, dim)
    with torch.no_grad():
        expected = block._attn(x)
        with medmtl.backend(backend):
            got = layer(x)
    torch.testing.assert_close(got, expected, rtol=2e-5, atol=2e-5)


def _large_logit_block(dtype=torch.float64):
    """A shifted timm Swin block whose attention logits spread by hundreds, so keys of
    another shift region (Swin's additive -100) still take weight where they outscore
    the visible keys by more than 100 (an -inf mask would give them none)."""
    block = timm_swin.SwinTransformerBlock(8, (8, 8), num_heads=1, window_size=4, shift_size=2).eval()
    randomize(block, 5)
    with torch.no_grad():
        block.attn.qkv.weight[:16] *= 12.0   # q and k rows: scores ~ 144x larger
    return block.to(dtype)


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_large_logits_match_timm_mask_semantics(backend):
    if backend == "cpu" and not medmtl._extension.extension_loaded():
        pytest.skip("medmtl._C is not built")
    if backend == "triton":
        pytest.importorskip("triton")
    block = _large_logit_block()
    device = triton_device() if backend == "triton" else torch.device("cpu")
    # float64, but float32 for compiled Triton (its GPU kernels take no float64)
    dtype = torch.float64 if device.type == "cpu" else torch.float32
    layer = WindowAttention(8, 1, 4, 2).double().eval()
    layer.load_state_dict(block.attn.state_dict(), strict=True)
    x = torch.randn(2, 8, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        expected = block._attn(x)
        # the case discriminates: some masked logits beat the visible ones by > 100
        qkv = block.attn.qkv(x.flatten(1, 2))
        assert (qkv[..., :8] @ qkv[..., 8:16].transpose(-1, -2)).abs().max() * 8 ** -0.5 > 300
        with medmtl.backend(backend):
            got = layer.to(device, dtype)(x.to(device, dtype)).cpu().double()
    tol = 1e-7 if dtype == torch.float64 else 2e-3
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol)


def test_state_dict_keys_and_shapes_match_timm_and_monai():
    layer = WindowAttention(48, 3, 7, 3, spatial_dims=3)
    shapes = {k: tuple(v.shape) for k, v in layer.state_dict().items()}
    assert shapes == {"relative_position_bias_table": (13**3, 3), "qkv.weight": (144, 48), "qkv.bias": (144,),
                      "proj.weight": (48, 48), "proj.bias": (48,)}
    monai = monai_swin.WindowAttention(48, 3, (7, 7, 7), qkv_bias=True)
    missing, unexpected = monai.load_state_dict(layer.state_dict(), strict=False)
    assert missing == ["relative_position_index"] and unexpected == []
    timm = timm_swin.WindowAttention(32, 2, window_size=7)
    timm.load_state_dict(WindowAttention(32, 2, 7).state_dict(), strict=True)
    assert WindowAttention(8, 2, 4, qkv_bias=False).qkv.bias is None


@requires_extension
@pytest.mark.parametrize("spatial, window, shift", [((15, 9), (4, 4), (2, 2)), ((5, 6, 7), (3, 3, 3), (1, 1, 1)),
                                                    ((3, 5), (7, 7), (3, 3))])
def test_cpu_backend_gradients_match_reference(spatial, window, shift):
    """Gradients reach every parameter, the qkv bias also through the padded keys and values."""
    nd = len(spatial)
    layer = WindowAttention(12, 3, window, shift, spatial_dims=nd).double()
    randomize(layer, 3)
    x = torch.randn(2, *spatial, 12, dtype=torch.float64)
    grads = {}
    for backend in ("reference", "cpu"):
        layer.zero_grad()
        xb = x.clone().requires_grad_()
        with medmtl.backend(backend):
            out = layer(xb)
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view(out.shape)).sum().backward()
        grads[backend] = [xb.grad] + [p.grad.clone() for p in layer.parameters()]
    names = ["x"] + [n for n, _ in layer.named_parameters()]
    for name, want, have in zip(names, grads["reference"], grads["cpu"]):
        torch.testing.assert_close(have, want, rtol=1e-9, atol=1e-9, msg=name)


def test_attention_dropout_in_training_drops_probabilities():
    layer = WindowAttention(8, 2, 4, 2, attn_drop=0.5)
    x = torch.randn(1, 8, 8, 8)
    layer.train()
    a, b = layer(x), layer(x)
    assert not torch.allclose(a, b)
    layer.eval()
    torch.testing.assert_close(layer(x), layer(x))


@pytest.mark.parametrize("kwargs, words", [
    (dict(dim=10, num_heads=3, window_size=4), "dim \\(10\\) must be a multiple of num_heads \\(3\\)"),
    (dict(dim=8, num_heads=2, window_size=4, shift_size=4), "shift_size entries must be in"),
    (dict(dim=8, num_heads=2, window_size=(4, 4, 4)), "window_size must be an int or 2 ints"),
    (dict(dim=8, num_heads=2, window_size=4, spatial_dims=1), "spatial_dims must be 2 or 3"),
    (dict(dim=8, num_heads=0, window_size=4), "num_heads must be a positive int"),
    (dict(dim=8, num_heads=2, window_size=4, attn_drop=1.0), "attn_drop must be in"),
])
def test_bad_arguments_name_the_argument(kwargs, words):
    with pytest.raises(ValueError, match=words):
        WindowAttention(**kwargs)


def test_bad_input_shape():
    layer = WindowAttention(8, 2, 4)
    with pytest.raises(ValueError, match=r"x must be \(B, H, W, C\) with C = dim = 8"):
        layer(torch.randn(1, 8, 8, 6))
    with pytest.raises(ValueError, match=r"x must be \(B, H, W, C\)"):
        layer(torch.randn(1, 2, 8, 8, 8))


@pytest.mark.parametrize("spatial, window, shift", [((9, 6), (4, 4), (2, 2)), ((3, 4, 5), (2, 3, 3), (1, 1, 1))])
def test_triton_backend_layer_matches_reference(spatial, window, shift):
    """The layer on the Triton kernels (interpreted without a GPU, else compiled): output
    and every parameter's gradient."""
    pytest.importorskip("triton")
    nd = len(spatial)
    layer = WindowAttention(8, 2, window, shift, spatial_dims=nd)
    randomize(layer, 4)
    layer.to(triton_device())
    x = torch.randn(1, *spatial, 8).to(triton_device())
    results = {}
    for backend in ("reference", "triton"):
        layer.zero_grad()
        with medmtl.backend(backend):
            out = layer(x)
        out.square().sum().backward()
        results[backend] = [out.detach()] + [p.grad.clone() for p in layer.parameters()]
    for want, have in zip(results["reference"], results["triton"]):
        torch.testing.assert_close(have, want, rtol=1e-4, atol=1e-4)

"""accelerate() / accelerated_modules(): arguments, a model mixing convertible
and non-convertible parts, a library whose code differs from what a converter
was written for (the probe leaves it alone), and torch.compile of a converted model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import medmtl
from tests.accelerate_common import converted_count, randomize_
from tests.conftest import requires_extension

tv_swin = pytest.importorskip("torchvision.models.swin_transformer")
tv_deeplab = pytest.importorskip("torchvision.models.segmentation.deeplabv3")

pytestmark = requires_extension


def test_arguments_checked():
    with pytest.raises(TypeError, match="model"):
        medmtl.accelerate("not a module")
    with pytest.raises(TypeError, match="model"):
        medmtl.accelerated_modules(3)
    with pytest.raises(TypeError, match="inplace"):
        medmtl.accelerate(nn.Linear(2, 2), inplace=1)
    with pytest.raises(ValueError, match="include"):
        medmtl.accelerate(nn.Linear(2, 2), include=["monai_swin", "nope"])
    with pytest.raises(TypeError, match="include"):
        medmtl.accelerate(nn.Linear(2, 2), include="monai_swin")


def test_model_without_candidates_unchanged():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    fused = medmtl.accelerate(model)
    assert medmtl.accelerated_modules(fused) == []
    assert [type(m) for m in fused.modules()] == [type(m) for m in model.modules()]


class Mixed(nn.Module):
    """Convertible (a v1 attention, an ASPP) and non-convertible (attention with
    dropout, v2 attention, a plain conv) parts in one model."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.attn = tv_swin.ShiftedWindowAttention(16, [4, 4], [2, 2], 2)
        self.attn_dropout = tv_swin.ShiftedWindowAttention(16, [4, 4], [0, 0], 2, attention_dropout=0.1)
        self.attn_v2 = tv_swin.ShiftedWindowAttentionV2(16, [4, 4], [2, 2], 2)
        self.aspp = tv_deeplab.ASPP(16, (2, 3), out_channels=8)

    def forward(self, x):
        x = self.stem(x).permute(0, 2, 3, 1)
        x = self.attn_v2(self.attn_dropout(self.attn(x)))
        return self.aspp(x.permute(0, 3, 1, 2))


def test_mixed_model():
    torch.manual_seed(0)
    model = randomize_(Mixed()).eval()
    fused = medmtl.accelerate(model)
    rows = {r.path: r for r in medmtl.accelerated_modules(fused)}
    assert set(rows) == {"attn", "attn_dropout", "attn_v2", "aspp"}
    assert rows["attn"].converted and rows["aspp"].converted
    assert "attention dropout" in rows["attn_dropout"].reason and "v2" in rows["attn_v2"].reason
    assert type(fused.attn_dropout) is tv_swin.ShiftedWindowAttention
    x = torch.randn(2, 3, 10, 9)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=1e-5, atol=1e-5)
    assert str(rows["attn"]).startswith("attn: torchvision.models.swin_transformer.ShiftedWindowAttention -> ")


def test_include_selects_families():
    torch.manual_seed(0)
    model = Mixed()
    fused = medmtl.accelerate(model, include=["torchvision_aspp"])
    rows = {r.path: r for r in medmtl.accelerated_modules(fused)}
    assert rows["aspp"].converted and not rows["attn"].converted
    assert "not converted" in rows["attn"].reason


def test_library_drift_left_alone(monkeypatch):
    """A torchvision whose window attention shifted before padding (as timm does)
    is not what the converter was written for: the probe sees the difference and
    the module is left as it is, with the reason."""
    original = tv_swin.shifted_window_attention

    def shift_then_pad(input, *args, **kwargs):
        return original(input.roll((1, 1), (1, 2)), *args, **kwargs)

    monkeypatch.setattr(tv_swin, "shifted_window_attention", shift_then_pad)
    model = tv_swin.ShiftedWindowAttention(16, [4, 4], [2, 2], 2)
    fused = medmtl.accelerate(model)
    assert type(fused) is tv_swin.ShiftedWindowAttention
    (row,) = medmtl.accelerated_modules(fused)
    assert not row.converted and "probe" in row.reason


@pytest.mark.slow
def test_torch_compile_of_converted_model():
    """fullgraph compile (forward and backward) of converted window attention and
    ASPP, float64 (gradients through ReLUs compared)."""
    torch.manual_seed(0)
    model = nn.ModuleDict(dict(attn=tv_swin.ShiftedWindowAttention(16, [4, 4], [2, 2], 2),
                               aspp=tv_deeplab.ASPP(16, (2, 3), out_channels=8)))
    randomize_(model).double().eval()
    fused = medmtl.accelerate(model)
    assert converted_count(fused) == 2

    def forward(m, x):
        return m["aspp"](m["attn"](x).permute(0, 3, 1, 2))

    compiled = torch.compile(lambda x: forward(fused, x), fullgraph=True)
    x = torch.randn(2, 10, 9, 16, dtype=torch.float64)
    want = forward(model, x.clone().requires_grad_())
    xc = x.clone().requires_grad_()
    got = compiled(xc)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    got.sum().backward()
    xo = x.clone().requires_grad_()
    forward(model, xo).sum().backward()
    torch.testing.assert_close(xc.grad, xo.grad, rtol=1e-9, atol=1e-9)


def test_window_attention_bias_reading_option():
    from medmtl.layers import WindowAttention

    with pytest.raises(ValueError, match="bias_reading"):
        WindowAttention(8, 2, 4, bias_reading="first")
    plain, monai = WindowAttention(8, 2, 4), WindowAttention(8, 2, 4, bias_reading="monai")
    assert "relative_position_index" not in plain.state_dict()
    assert monai.state_dict()["relative_position_index"].shape == (16, 16)
    # On maps the window fits, the two readings are the same computation.
    monai.load_state_dict(plain.state_dict(), strict=False)
    x = torch.randn(1, 9, 10, 8)
    torch.testing.assert_close(monai(x), plain(x))

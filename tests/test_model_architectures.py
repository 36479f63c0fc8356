"""What each family's switches, loaders and controls do."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import medmtl
from medmtl.models import ResFormerMTL, create_model
from tests.model_configs import SMALL, batch, flat_outputs, small_model, toy_loss


def _params(module) -> int:
    return sum(p.numel() for p in module.parameters())


# -- ResFormerMTL


def test_resformer_parameter_count_equals_the_authors_model():
    """The released Res34_Swin_MS with FEM_4 on every skip, 4 segmentation classes
    and 3 labels (RETOUCH) has 56,347,403 parameters at 224 px and 56,541,803 at
    512 px (its relative-position tables grow with the window): counted module
    by module from the authors' code."""
    assert _params(create_model("resformer_mtl", seg_classes=4, num_classes=3, img_size=224)) == 56_347_403
    assert _params(create_model("resformer_mtl", seg_classes=4, num_classes=3, img_size=512)) == 56_541_803


def test_resformer_ablation_switches_change_what_they_say():
    kwargs = dict(SMALL["resformer_mtl"][0])
    full = create_model("resformer_mtl", **kwargs)
    no_tf = create_model("resformer_mtl", **{**kwargs, "use_transformer": False})
    assert not hasattr(no_tf.encoder, "stages")
    transformer = [full.encoder.patch_embed, full.encoder.stages, full.encoder.merges]
    assert _params(full) - _params(no_tf) == sum(_params(m) for m in transformer)

    no_dfe = create_model("resformer_mtl", **{**kwargs, "use_dfe": False})
    assert all(isinstance(d, nn.Identity) for d in no_dfe.dfe)
    assert _params(full) - _params(no_dfe) == sum(_params(d) for d in full.dfe)

    summed = create_model("resformer_mtl", **{**kwargs, "dfe_variant": "sum"})
    c, n = 64, 3  # the deepest level, three dilations: per branch 3x3 conv + BN + 1x1 conv + BN, and the gate
    assert _params(summed.dfe[3]) == n * (9 * c * c + 2 * c + c * c + 2 * c) + 2 * 49
    assert summed.dfe[3].variant == "sum" and full.dfe[3].variant == "concat"

    deepest = create_model("resformer_mtl", **{**kwargs, "cls_levels": (3,)})
    assert deepest.cls_head[1].in_features == 64 and full.cls_head[1].in_features == 64 + 32
    out = deepest.eval()(batch("resformer_mtl"))
    assert out["cls"].shape == (2, 2)

    seg_only = create_model("resformer_mtl", **{**kwargs, "tasks": ("seg",)})
    assert set(seg_only.eval()(batch("resformer_mtl"))) == {"seg"} and not hasattr(seg_only, "cls_head")


def test_resformer_window_follows_img_size():
    model = create_model("resformer_mtl", img_size=512)
    attn = model.encoder.stages[0].blocks[1].attn
    assert model.window_size == 32 and attn.window_size == (32, 32) and attn.shift_size == (16, 16)
    assert create_model("resformer_mtl").encoder.stages[3].blocks[0].attn.window_size == (14, 14)


def test_load_resnet34_gives_torchvision_stage_outputs():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    tv = torchvision.models.resnet34(weights=None).eval()
    for m in tv.modules():  # non-trivial statistics
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    model = ResFormerMTL(img_size=32).eval()
    report = model.load_resnet34(tv.state_dict())
    assert set(report["skipped"]) == {"fc.weight", "fc.bias"}
    assert "layer4.2.bn2.running_var" in report["used"] and "conv1.weight" in report["used"]
    x = torch.randn(2, 64, 16, 16)
    with torch.no_grad():
        for name in ("layer1", "layer2", "layer3", "layer4"):
            ours, theirs = getattr(model.encoder, name)(x), getattr(tv, name)(x)
            torch.testing.assert_close(ours, theirs)
            x = theirs
    torch.testing.assert_close(model.encoder.conv1.weight, tv.conv1.weight)
    with pytest.raises(ValueError, match="layer1"):
        model.load_resnet34({"fc.weight": torch.zeros(3)})


# -- FT-MTL-Net


def test_ft_mtl_net_transfer_modes():
    kwargs = dict(SMALL["ft_mtl_net"][0])
    plain = create_model("ft_mtl_net", **{**kwargs, "transfer": None})
    summed = create_model("ft_mtl_net", **{**kwargs, "transfer": "sum"})
    concat = create_model("ft_mtl_net", **{**kwargs, "transfer": "concat"})
    widths = kwargs["branch_channels"]
    assert _params(summed) - _params(plain) == sum(6 * c * c for c in widths)       # 1x1 conv per ordered pair
    assert _params(concat) - _params(plain) == sum(3 * (3 * c * c + 2 * c) for c in widths)
    # with transfer, the segmentation output depends on the other branches' weights; without, it does not
    x = batch("ft_mtl_net")
    for model, coupled in ((summed, True), (concat, True), (plain, False)):
        model.eval()
        if model is summed:  # its transfers start at zero: give them weights
            for conv in model.transfers[0].transfers.values():
                nn.init.normal_(conv.weight, std=0.1)
        before = model(x)["seg"]
        with torch.no_grad():
            model.branches["det"][0].conv_bn_relu[0].weight.mul_(3)
        assert (not torch.equal(model(x)["seg"], before)) is coupled


def test_decode_detections_returns_planted_boxes():
    model = small_model("ft_mtl_net")
    h = w = 16  # a 64-px input at stride 4
    heat = torch.full((2, 2, h, w), -10.0)
    size = torch.zeros(2, 2, h, w)
    offset = torch.zeros(2, 2, h, w)
    # image 0: class 1 centred in cell (y=3, x=5), 8 x 4 cells, offset (0.25, 0.5); class 0 at (10, 10), weak
    heat[0, 1, 3, 5], size[0, :, 3, 5], offset[0, :, 3, 5] = 3.0, torch.tensor([8.0, 4.0]), torch.tensor([0.25, 0.5])
    heat[0, 0, 10, 10], size[0, :, 10, 10] = 0.0, torch.tensor([2.0, 2.0])
    heat[0, 1, 3, 6] = 2.0  # a neighbour of the peak, not a peak itself
    out = model.decode_detections({"heatmap": heat, "size": size, "offset": offset}, score_threshold=0.3)
    assert len(out) == 2 and out[1]["boxes"].shape == (0, 4)
    cx, cy = (5 + 0.25 + 0.5) * 4, (3 + 0.5 + 0.5) * 4
    expected = torch.tensor([[cx - 16, cy - 8, cx + 16, cy + 8], [40 + 2 - 4, 42 - 4, 42 + 4, 42 + 4]])
    torch.testing.assert_close(out[0]["boxes"], expected)
    torch.testing.assert_close(out[0]["scores"], torch.sigmoid(torch.tensor([3.0, 0.0])))
    assert out[0]["labels"].tolist() == [1, 0]
    top = model.decode_detections({"heatmap": heat, "size": size, "offset": offset}, 0.6, max_detections=1)
    assert top[0]["labels"].tolist() == [1]


def test_encode_then_decode_recovers_boxes():
    from medmtl.models import decode_detections, encode_targets

    boxes = [torch.tensor([[8.0, 12.0, 40.0, 28.0], [44.0, 40.0, 60.0, 62.0]])]
    labels = [torch.tensor([0, 1])]
    t = encode_targets(boxes, labels, classes=2, map_size=(16, 16), stride=4)
    logits = torch.logit(t["heatmap"].clamp(1e-4, 1 - 1e-4))
    out = decode_detections({"heatmap": logits, "size": t["size"], "offset": t["offset"]}, 4, 0.9)
    order = out[0]["labels"].argsort()
    torch.testing.assert_close(out[0]["boxes"][order], boxes[0])


# -- UMS-Rep


def test_ums_rep_modes_and_freezing():
    model = small_model("ums_rep")
    x = batch("ums_rep", n=3)
    assert set(model.pretrain()(x)) == {"denoise"}
    assert set(model.finetune()(x)) == {"denoise", "seg", "cls"}
    rep = {id(p) for p in model.representation_parameters()}
    heads = {t: {id(p) for p in model.head_parameters(t)} for t in ("denoise", "seg", "cls")}
    everything = {id(p) for p in model.parameters()}
    assert rep | heads["denoise"] | heads["seg"] | heads["cls"] == everything
    assert not rep & (heads["seg"] | heads["cls"] | heads["denoise"]) and not heads["seg"] & heads["cls"]

    model.freeze_representation().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    toy_loss(model(x)).backward()
    opt.step()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("heads.") for k in changed), sorted(changed)[:5]
    assert model.trainable_parameters()["representation"] == 0
    model.freeze_representation(False)
    assert model.trainable_parameters()["representation"] == sum(p.numel() for p in model.representation_parameters())
    assert model.pretrain().trainable_parameters().keys() == {"representation", "denoise"}


def test_ums_rep_resformer_backbone():
    model = create_model("ums_rep", backbone="resformer", img_size=32, channels=(8, 16, 32, 64),
                         backbone_kwargs=dict(num_heads=(1, 1, 2, 2), resnet_blocks=(1, 1, 1, 1),
                                              dfe_dilations=(1, 2)))
    out = model.eval()(torch.randn(2, 1, 32, 32))
    assert out["seg"].shape == (2, 2, 32, 32) and out["denoise"].shape == (2, 1, 32, 32)
    assert any(isinstance(m, medmtl.layers.DilatedFeatureEnhancement) for m in model.representation.modules())


# -- optimize


@pytest.mark.parametrize("name", list(SMALL))
def test_optimize_keeps_outputs(name):
    model = small_model(name).train()
    toy_loss(model(batch(name, n=3))).backward()  # running statistics away from their init
    model.eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = batch(name)
    fast = medmtl.optimize(model, example_input=x)
    assert fast.optimize_report["batch_norms_folded"] > 0
    assert not any(isinstance(m, nn.BatchNorm2d) for n, m in fast.named_modules()
                   if "dfe" not in n and "pool" not in n and "norms" not in n)
    with torch.no_grad():
        for a, b in zip(flat_outputs(fast(x)), flat_outputs(model(x))):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    for k, v in model.state_dict().items():  # the original is untouched
        assert torch.equal(v, state[k]), k
    low = medmtl.optimize(model, dtype=torch.bfloat16, example_input=x)
    report = low.optimize_report
    assert report["dtype"] == "bfloat16" and all(v.dtype == torch.float32 for v in flat_outputs(low(x)))
    if "seg" in getattr(model, "tasks", ()):
        assert report["seg.argmax_agreement"] > 0.5


def test_optimize_torchvision_resnet():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=5).eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
    x = torch.randn(2, 3, 64, 64)
    fast = medmtl.optimize(model, example_input=x)
    assert fast.optimize_report["batch_norms_folded"] == 20
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fast.modules())
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), atol=1e-4, rtol=1e-4)
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        medmtl.optimize("resnet")
    with pytest.raises(ValueError, match="dtype must be"):
        medmtl.optimize(model, dtype=torch.float16)


# -- arguments


@pytest.mark.parametrize("name,kwargs,match", [
    ("resformer_mtl", dict(in_channels=0), "in_channels must be a positive int"),
    ("resformer_mtl", dict(img_size=100), "img_size must be a multiple of 16"),
    ("resformer_mtl", dict(channels=(64, 128, 256)), "channels must be 4 ints"),
    ("resformer_mtl", dict(channels=(64, 100, 256, 512)), "channels must double"),
    ("resformer_mtl", dict(num_heads=(3, 4, 8, 16)), "multiple of its num_heads"),
    ("resformer_mtl", dict(dropout=1.5), "dropout must be a float in"),
    ("resformer_mtl", dict(drop_path_rate=-0.1), "drop_path_rate must be a float in"),
    ("resformer_mtl", dict(dfe_variant="max"), "dfe_variant must be one of"),
    ("resformer_mtl", dict(cls_levels=(4,)), "cls_levels must be distinct levels"),
    ("resformer_mtl", dict(tasks=("seg", "det")), "tasks must be a non-empty subset"),
    ("ums_rep", dict(backbone="vit"), "backbone must be one of"),
    ("ums_rep", dict(mode="train"), "mode must be one of"),
    ("ums_rep", dict(backbone_kwargs=dict(depths=(1, 1, 1, 1))), "backbone_kwargs apply to"),
    ("ft_mtl_net", dict(transfer="attention"), "transfer must be one of"),
    ("ft_mtl_net", dict(det_classes=0), "det_classes must be a positive int"),
    ("ft_mtl_net", dict(branch_channels=(8,)), "branch_channels must be 2 ints"),
])
def test_bad_arguments_name_themselves(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        create_model(name, **kwargs)


@pytest.mark.parametrize("name", list(SMALL))
def test_bad_inputs_name_themselves(name):
    model = small_model(name).eval()
    cin = SMALL[name][2]
    with pytest.raises(ValueError, match="in_channels"):
        model(torch.randn(1, cin + 1, 32, 32))
    with pytest.raises(ValueError, match="multiples of"):
        model(torch.randn(1, cin, 33, 32))
    with pytest.raises(TypeError, match="floating-point"):
        model(torch.zeros(1, cin, 32, 32, dtype=torch.long))

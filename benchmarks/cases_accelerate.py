"""medmtl.accelerate() cases: whole models from MONAI, timm and torchvision, and
each converted module alone, original vs converted, inference and a training
step (forward + backward of the output's sum).

Providers: the original model eager ("reference"), torch.compile of the
original ("compile(reference)"), and the model converted by
medmtl.accelerate on the cpu backend ("medmtl cpu"); all with the same
weights (random: the timings do not depend on them) and inputs.

Models (the issue's set-ups): MONAI SwinUNETR 3-D (feature_size 48, 1 input
channel, 14 classes, one 64^3 volume), timm swin_tiny_patch4_window7_224
(batch 2), torchvision deeplabv3_resnet50 (batch 2, 224 and 512 px). Modules
alone: SwinUNETR's first stage (two blocks, 48 channels on 32^3 tokens),
Swin-T's first-stage block (96 channels on 56x56, shifted), and DeepLabV3's
ASPP on its 224 px and 512 px maps (2048 channels, 28x28 and 64x64).
"""

from __future__ import annotations

import copy

import torch

import medmtl
from benchmarks.case import Case


def _swin_unetr():
    from monai.networks.nets import SwinUNETR

    torch.manual_seed(0)
    return SwinUNETR(in_channels=1, out_channels=14, feature_size=48, spatial_dims=3), (1, 1, 64, 64, 64)


def _timm_swin_t():
    import timm

    torch.manual_seed(0)
    return timm.create_model("swin_tiny_patch4_window7_224", pretrained=False), (2, 3, 224, 224)


def _timm_block():
    model, _ = _timm_swin_t()
    return model.layers[0].blocks[1], (2, 56, 56, 96)


def _deeplab(size):
    def make():
        import torchvision

        torch.manual_seed(0)
        return (torchvision.models.segmentation.deeplabv3_resnet50(weights=None, weights_backbone=None),
                (2, 3, size, size))
    return make


def _aspp(size):
    def make():
        model, _ = _deeplab(size * 8)()
        return model.classifier[0], (2, 2048, size, size)
    return make


def _swin_unetr_stage1():
    """SwinUNETR's first stage (a MONAI BasicLayer: a plain and a shifted block,
    then patch merging) on its 32^3 token map of 48 channels."""
    model, _ = _swin_unetr()
    return model.swinViT.layers1[0], (1, 48, 32, 32, 32)


def _inputs(build, training):
    def make():
        model, shape = build()
        model.train(training)
        if training:  # dropout-free timings: the original models' default rates are 0 except DropPath
            for m in model.modules():
                if hasattr(m, "drop_prob"):
                    m.drop_prob = 0.0
        x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
        fused = medmtl.accelerate(model)
        return dict(model=model, fused=fused, x=x, training=training)
    return make


def _step(model, x, training):
    if not training:
        return lambda: model(x)

    def run():
        model.zero_grad(set_to_none=True)
        out = model(x)
        out = out["out"] if isinstance(out, dict) else out
        out.float().sum().backward()
    return run


def _providers():
    def eager(inputs):
        return _step(inputs["model"], inputs["x"], inputs["training"])

    def compiled(inputs):
        return _step(torch.compile(copy.deepcopy(inputs["model"])), inputs["x"], inputs["training"])

    def medmtl_cpu(inputs):
        step = _step(inputs["fused"], inputs["x"], inputs["training"])

        def run():
            with medmtl.backend("cpu"):
                return step()
        return run

    return {"reference": eager, "compile(reference)": compiled, "medmtl cpu": medmtl_cpu}


MODELS = [
    # op, name, builder, description, rounds
    ("accelerate_swinunetr3d", "model_64^3", _swin_unetr, "MONAI SwinUNETR 3-D, feature_size 48, 1 -> 14 channels, "
     "one 64^3 volume", 3),
    ("accelerate_swinunetr3d", "stage1_C48_32^3", _swin_unetr_stage1, "its stage 1 alone (a plain and a shifted "
     "block, C 48, 32^3 tokens, window 7, then patch merging)", 5),
    ("accelerate_timm_swin_t", "model_224_b2", _timm_swin_t, "timm swin_tiny_patch4_window7_224, batch 2", 3),
    ("accelerate_timm_swin_t", "block_C96_56x56", _timm_block, "its stage-1 shifted block alone (C 96, 56x56, "
     "window 7, shift 3), batch 2", 5),
    ("accelerate_deeplabv3", "model_224_b2", _deeplab(224), "torchvision deeplabv3_resnet50, batch 2, 224 px", 3),
    ("accelerate_deeplabv3", "model_512_b2", _deeplab(512), "torchvision deeplabv3_resnet50, batch 2, 512 px", 3),
    ("accelerate_deeplabv3", "aspp_28x28_b2", _aspp(28), "its ASPP alone on the 224 px map (2048 -> 256, 28x28, "
     "rates 12, 24, 36), batch 2", 5),
    ("accelerate_deeplabv3", "aspp_64x64_b2", _aspp(64), "its ASPP alone on the 512 px map (2048 -> 256, 64x64), "
     "batch 2", 5),
]

CASES = [
    Case(f"{op}_{'train' if training else 'infer'}", name, _inputs(build, training),
         f"{description}; {'training step (forward + backward)' if training else 'inference'}",
         _providers(), rounds=rounds, inference=not training)
    for training in (False, True) for op, name, build, description, rounds in MODELS
]

"""ResFormerMTL (Le et al., 2024): a ResNet-34 and a Swin transformer in
sequence, dilated feature enhancement on every skip, a U-Net decoder for
segmentation and a multi-scale pooling head for classification.

Data flow (the authors' released `Res34_Swin_MS`):

    image -> stem (7x7 conv stride 1, BN, ReLU, 3x3 max-pool stride 2)   H/2
    s1 = swin_1(layer1(stem) + patch_embed(image))                       H/2
    s_i = swin_i(layer_i(s_{i-1}) + merge_i(s_{i-1}))   for i = 2, 3, 4  H/2^i
    d = up(DFE(s4)) ++ DFE(s3) -> conv ... ++ DFE(s1) -> conv; x2; 1x1   seg logits
    cls = Linear(32, classes)(Linear(sum C, 32)(GAP(ReLU(BN(s_l))) for the cls levels))
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from medmtl.layers import DilatedFeatureEnhancement, MultiScalePool
from medmtl.models import _checks as check
from medmtl.models.base import MultiTaskModel
from medmtl.models.decoder import SegmentationHead, UpBlock
from medmtl.models.registry import register_model
from medmtl.models.resnet import RESNET34_BLOCKS, load_resnet_stages, resnet_stage
from medmtl.models.swin import ConvPatchMerging, MultiScalePatchEmbed, SwinStage

NAME = "ResFormerMTL"


class ResFormerEncoder(nn.Module):
    """image (B, in_channels, H, W) -> four skips [(B, channels[i], H / 2^(i+1), W / 2^(i+1))].

    With use_transformer=False it is the plain ResNet (the ablation without
    the transformer branch): no patch embedding, merging or Swin stages.
    """

    def __init__(self, in_channels, channels, resnet_blocks, depths, num_heads, window_size, mlp_ratio, dropout,
                 drop_path_rate, use_transformer):
        super().__init__()
        c0 = channels[0]
        # The stem and stages carry torchvision's names (conv1, bn1, layer1..4).
        self.conv1 = nn.Conv2d(in_channels, c0, 7, stride=1, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(c0)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        for i, (c, blocks) in enumerate(zip(channels, resnet_blocks)):
            setattr(self, f"layer{i + 1}", resnet_stage(channels[max(i - 1, 0)], c, blocks, 1 if i == 0 else 2))
        self.use_transformer = use_transformer
        if use_transformer:
            self.patch_embed = MultiScalePatchEmbed(in_channels, c0)
            rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
            starts = [sum(depths[:i]) for i in range(len(depths))]
            self.stages = nn.ModuleList(
                SwinStage(c, d, h, window_size, mlp_ratio, dropout, rates[s:s + d])
                for c, d, h, s in zip(channels, depths, num_heads, starts))
            self.merges = nn.ModuleList(ConvPatchMerging(channels[i], channels[i + 1]) for i in range(3))

    def layers(self) -> list[nn.Module]:
        return [self.layer1, self.layer2, self.layer3, self.layer4]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        stem = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        if not self.use_transformer:
            skips, y = [], stem
            for layer in self.layers():
                y = layer(y)
                skips.append(y)
            return skips
        tokens = self.patch_embed(x)                                     # (B, H/2, W/2, C0)
        y = self.layer1(stem) + tokens.permute(0, 3, 1, 2)
        skips = []
        for i, layer in enumerate(self.layers()):
            if i > 0:
                y = layer(skips[-1]) + self.merges[i - 1](tokens)
            tokens = self.stages[i](y.permute(0, 2, 3, 1))               # Swin on (B, h, w, C)
            skips.append(tokens.permute(0, 3, 1, 2))
        return skips


class ResFormerMTL(MultiTaskModel):
    """ResFormerMTL: x (B, in_channels, H, W), H and W multiples of 16 ->
    {"seg": (B, seg_classes, H, W) logits, "cls": (B, num_classes) logits}.

    Args:
        in_channels: image channels.
        seg_classes: segmentation classes (background included).
        num_classes: classification labels (multi-label logits).
        img_size: the training size; the window is img_size // 16 (14 at 224,
            32 at 512) unless window_size is given. Other sizes divisible by
            16 run too (maps the window does not divide are padded).
        channels: the four levels' widths (64, 128, 256, 512); channels[0]
            must be a multiple of 8 and each level's width twice the last's.
        resnet_blocks: basic blocks per ResNet stage ((3, 4, 6, 3): ResNet-34).
        depths: Swin blocks per stage; num_heads: heads per stage (head dim 32
            by default).
        mlp_ratio: the Swin MLP's hidden width over dim.
        dropout: dropout in the Swin blocks and before the classifier.
        drop_path_rate: stochastic depth, rising linearly to this over the blocks.
        use_transformer: False drops the Swin branch (a plain ResNet encoder).
        use_dfe: False feeds the skips to the decoder without enhancement.
        dfe_variant: "concat" (the released code's FEM_4, default) or "sum"
            (the paper's three-branch text); dfe_dilations: their rates.
        cls_levels: the levels (0 = finest, 3 = deepest) pooled for classification.
        cls_hidden: the classifier's hidden width (32).
        tasks: a subset of ("seg", "cls").
    """

    all_tasks = ("seg", "cls")

    def __init__(self, in_channels: int = 3, seg_classes: int = 4, num_classes: int = 3, img_size: int = 224,
                 channels: Sequence[int] = (64, 128, 256, 512), resnet_blocks: Sequence[int] = RESNET34_BLOCKS,
                 depths: Sequence[int] = (2, 2, 2, 2), num_heads: Sequence[int] = (2, 4, 8, 16),
                 window_size: int | None = None, mlp_ratio: float = 4.0, dropout: float = 0.0,
                 drop_path_rate: float = 0.1, use_transformer: bool = True, use_dfe: bool = True,
                 dfe_variant: str = "concat", dfe_dilations: Sequence[int] = (6, 12, 18),
                 cls_levels: Sequence[int] = (3, 2), cls_hidden: int = 32,
                 tasks: Sequence[str] = ("seg", "cls")) -> None:
        super().__init__()
        self.in_channels = check.positive_int(NAME, "in_channels", in_channels)
        self.seg_classes = check.positive_int(NAME, "seg_classes", seg_classes)
        self.num_classes = check.positive_int(NAME, "num_classes", num_classes)
        self.img_size = check.positive_int(NAME, "img_size", img_size)
        if img_size % 16:
            raise ValueError(f"{NAME}: img_size must be a multiple of 16, got {img_size}")
        channels = check.int_tuple(NAME, "channels", channels, 4)
        if channels[0] % 8 or any(channels[i + 1] != 2 * channels[i] for i in range(3)):
            raise ValueError(f"{NAME}: channels must double from level to level, starting at a multiple of 8 "
                             f"(e.g. (64, 128, 256, 512)), got {channels}")
        resnet_blocks = check.int_tuple(NAME, "resnet_blocks", resnet_blocks, 4)
        depths = check.int_tuple(NAME, "depths", depths, 4)
        num_heads = check.int_tuple(NAME, "num_heads", num_heads, 4)
        for c, h in zip(channels, num_heads):
            if c % h:
                raise ValueError(f"{NAME}: each level's channels must be a multiple of its num_heads, got channels "
                                 f"{channels} and num_heads {num_heads}")
        window_size = img_size // 16 if window_size is None else check.positive_int(NAME, "window_size",
                                                                                   window_size)
        if isinstance(mlp_ratio, bool) or not isinstance(mlp_ratio, (int, float)) or mlp_ratio <= 0:
            raise ValueError(f"{NAME}: mlp_ratio must be a positive number, got {mlp_ratio!r}")
        check.probability(NAME, "dropout", dropout)
        check.probability(NAME, "drop_path_rate", drop_path_rate)
        check.choice(NAME, "dfe_variant", dfe_variant, ("concat", "sum"))
        dfe_dilations = check.int_tuple(NAME, "dfe_dilations", dfe_dilations)
        cls_levels = check.int_tuple(NAME, "cls_levels", cls_levels, minimum=0)
        if any(level > 3 for level in cls_levels) or len(set(cls_levels)) != len(cls_levels):
            raise ValueError(f"{NAME}: cls_levels must be distinct levels in 0..3, got {cls_levels}")
        self.cls_hidden = check.positive_int(NAME, "cls_hidden", cls_hidden)
        self.tasks = check.tasks_subset(NAME, tasks, self.all_tasks)
        self.channels, self.window_size, self.cls_levels = channels, window_size, cls_levels
        self.use_transformer, self.use_dfe, self.dfe_variant = bool(use_transformer), bool(use_dfe), dfe_variant

        self.encoder = ResFormerEncoder(in_channels, channels, resnet_blocks, depths, num_heads, window_size,
                                        mlp_ratio, dropout, drop_path_rate, self.use_transformer)
        if "seg" in self.tasks:
            self.dfe = nn.ModuleList(
                DilatedFeatureEnhancement(c, c, dfe_dilations, dfe_variant) if use_dfe else nn.Identity()
                for c in channels)
            self.decoder = nn.ModuleList(UpBlock(channels[i + 1], channels[i]) for i in reversed(range(3)))
            self.seg_head = SegmentationHead(channels[0], seg_classes, scale=2)
        if "cls" in self.tasks:
            self.cls_pool = MultiScalePool([channels[level] for level in cls_levels])
            self.cls_head = nn.Sequential(nn.Dropout(dropout), nn.Linear(self.cls_pool.out_features, cls_hidden),
                                          nn.Linear(cls_hidden, num_classes))
            for fc in self.cls_head[1:]:
                nn.init.xavier_normal_(fc.weight)

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x (B, in_channels, H, W) -> the encoder's four levels (B, channels[i], H / 2^(i+1), W / 2^(i+1))."""
        check.image_batch(NAME, x, self.in_channels, 16)
        return self.encoder(x)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        skips = self.forward_features(x)
        out = {}
        if "seg" in self.tasks:
            enhanced = [dfe(s) for dfe, s in zip(self.dfe, skips)]
            d = enhanced[3]
            for block, skip in zip(self.decoder, reversed(enhanced[:3])):
                d = block(d, skip)
            out["seg"] = self.seg_head(d)
        if "cls" in self.tasks:
            out["cls"] = self.cls_head(self.cls_pool([skips[level] for level in self.cls_levels]))
        return out

    def load_resnet34(self, state_dict) -> dict[str, list[str]]:
        """Loads torchvision resnet34 weights (a state_dict the user has: nothing is
        downloaded) into the CNN branch (stem conv1/bn1 and layer1..4); returns
        {"used": keys copied, "skipped": keys not (fc.*, and any of another shape)}."""
        return load_resnet_stages(self.encoder, state_dict)

    def part_paths(self) -> dict[str, list[str]]:
        cnn = ["encoder.conv1", "encoder.bn1", "encoder.layer1", "encoder.layer2", "encoder.layer3",
               "encoder.layer4"]
        parts = {"encoder: cnn": cnn}
        if self.use_transformer:
            parts["encoder: transformer"] = ["encoder.patch_embed", "encoder.stages", "encoder.merges"]
        return parts

    def head_paths(self) -> dict[str, list[str]]:
        return {"seg": ["dfe", "decoder", "seg_head"], "cls": ["cls_pool", "cls_head"]}


@register_model
def resformer_mtl(**kwargs) -> ResFormerMTL:
    """ResFormerMTL (Le et al. 2024; the released Res34_Swin_MS), 224 px by default."""
    return ResFormerMTL(**kwargs)

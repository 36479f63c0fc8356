"""Small configurations of the three model families, fast enough for the test suite."""

from __future__ import annotations

import torch

from medmtl.models import create_model

# name -> (constructor kwargs, two input sizes it takes, in_channels)
SMALL = {
    "resformer_mtl": (dict(in_channels=3, seg_classes=3, num_classes=2, img_size=32, channels=(8, 16, 32, 64),
                           resnet_blocks=(1, 1, 1, 1), depths=(2, 2, 2, 2), num_heads=(1, 1, 2, 2),
                           dfe_dilations=(1, 2, 3)), (32, 48), 3),
    "ums_rep": (dict(in_channels=1, seg_classes=2, num_classes=2, channels=(8, 16, 32, 64)), (16, 24), 1),
    "ft_mtl_net": (dict(in_channels=1, seg_classes=2, num_classes=2, det_classes=2, channels=(8, 16, 32, 64),
                        encoder_blocks=(1, 1, 1, 1), branch_channels=(16, 8), cls_hidden=16), (32, 48), 1),
}


def small_model(name: str, seed: int = 0, **overrides):
    kwargs, sizes, cin = SMALL[name]
    torch.manual_seed(seed)
    return create_model(name, **{**kwargs, **overrides})


def batch(name: str, size: int | None = None, n: int = 2, seed: int = 1, dtype=torch.float32):
    _, sizes, cin = SMALL[name]
    size = sizes[0] if size is None else size
    return torch.randn(n, cin, size, size, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def flat_outputs(out) -> list[torch.Tensor]:
    """Every tensor of a model's output dict (det's maps included), in a fixed order."""
    tensors = []
    for key in sorted(out):
        value = out[key]
        tensors += [value[k] for k in sorted(value)] if isinstance(value, dict) else [value]
    return tensors


def toy_loss(out) -> torch.Tensor:
    """A loss that reaches every output: mean squares towards fixed targets (0.5)."""
    return sum(((t - 0.5) ** 2).mean() for t in flat_outputs(out))

"""From a RunConfig to the objects a run needs: datasets and the model.

    train_set = build_dataset(config.data, "train", seed=config.train.seed)
    model = build_model(config.model, train_set)     # fills in what the data decides

The model's in_channels, img_size, seg_classes and num_classes default to the
data's (when the model takes them and the config does not set them), so a
config pointed at a new folder needs no model edits.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn
from torch.utils.data import Dataset

from medmtl.config import DataConfig, model_arguments
from medmtl.data import Compose, FolderDataset, NormalizeIntensity, RandomFlip, RandomRotate, Resize, SyntheticLesions

SYNTHETIC = "synthetic"
SYNTHETIC_SPLITS = ("train", "val", "test")


def build_dataset(data: DataConfig, split: str, seed: int = 0, train: bool = False) -> Dataset:
    """The dataset of `split` ("train", "val", "test"; for folders also "all"). train: with
    data.augment, random flips and rotations."""
    if data.root == SYNTHETIC:
        if split not in SYNTHETIC_SPLITS:
            raise ValueError(f"data.root synthetic has the splits {SYNTHETIC_SPLITS}, got split {split!r}")
        index = SYNTHETIC_SPLITS.index(split)
        size = (data.train_size, data.val_size, data.test_size)[index]
        return SyntheticLesions(size, data.img_size, seed=seed + index, channels=data.channels or 1,
                                noise=data.noise, noise_level=data.noise_level)
    root = Path(data.root)
    if not root.is_dir():
        raise ValueError(f"data.root must be 'synthetic' or a folder, got {data.root!r} (no such folder)")
    steps = [Resize(data.img_size)]
    if data.normalize:
        steps.append(NormalizeIntensity())
    if train and data.augment:
        steps += [RandomFlip(), RandomRotate()]
    return FolderDataset(root, None if split == "all" else split, data.val_fraction, seed, Compose(steps),
                         data.channels)


def split_name(data: DataConfig, which: str) -> str:
    """The split named by data.train_split / val_split / test_split."""
    return {"train": data.train_split, "val": data.val_split, "test": data.test_split}[which]


def resolve_model_config(model: dict, dataset: Dataset) -> dict:
    """model with in_channels, img_size, seg_classes, num_classes taken from the data where
    the model takes them and they are not set."""
    arguments = model_arguments(model["name"])
    sample = dataset[0]
    found = {"in_channels": int(sample["image"].shape[0]), "img_size": int(sample["image"].shape[-1])}
    seg_classes = getattr(dataset, "seg_classes", 0)
    if seg_classes:
        found["seg_classes"] = int(seg_classes)
    labels = getattr(dataset, "num_labels", 0)
    if labels:
        found["num_classes"] = int(labels)
    resolved = dict(model)
    for key, value in found.items():
        if key in arguments and key not in resolved:
            resolved[key] = value
    return resolved


def build_model(model: dict) -> nn.Module:
    """create_model(model["name"], **the rest)."""
    from medmtl.models import create_model

    return create_model(model["name"], **{k: v for k, v in model.items() if k != "name"})

"""Datasets for the multi-task models: the built-in SyntheticLesions, folders
of real images (FolderDataset, read through MONAI), joint transforms and the
collate function. A sample is a dict: "image" (C, H, W) float32, "mask"
(H, W) int64, "labels" (L,) float32, "boxes" (K, 4) xyxy and "box_labels"
(K,) int64, optionally "clean" (C, H, W) (denoising target), and "name"."""

from medmtl.data.collate import collate_samples
from medmtl.data.folder import IMAGE_SUFFIXES, FolderDataset, read_image
from medmtl.data.synthetic import SyntheticLesions
from medmtl.data.transforms import Compose, NormalizeIntensity, RandomFlip, RandomRotate, Resize

__all__ = ["IMAGE_SUFFIXES", "Compose", "FolderDataset", "read_image", "NormalizeIntensity", "RandomFlip", "RandomRotate", "Resize",
           "SyntheticLesions", "collate_samples"]

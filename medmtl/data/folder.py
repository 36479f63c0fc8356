"""FolderDataset: a user's own images, masks, labels and boxes in one folder.

Layout (only images/ is required; each other part adds a task)::

    root/images/      a.png  b.dcm  c.nii.gz ...   (PNG, JPEG, TIFF, DICOM .dcm, NIfTI .nii/.nii.gz 2-D)
    root/masks/       a.png  b.png  c.nii.gz ...   same stem as the image, any of those formats  -> "seg"
    root/labels.csv   image,<label 1>,<label 2>,...   one row per image, values 0/1            -> "cls"
    root/boxes.csv    image,x1,y1,x2,y2,label         zero or more rows per image (optional)   -> "det"
    root/splits/      train.txt  val.txt  test.txt    image file names, one per line (optional)

Orientation: a sample's image[c, i, j] is the pixel at row i, column j, as the
file's rows and columns: PNG/JPEG/TIFF as PIL reads them, DICOM as its Rows x
Columns pixel data. NIfTI follows the NIfTI/ITK/MONAI convention that the
first array axis is x (columns) and the second y (rows), as viewers show it
(no reorientation by the affine): a slice written from a (H, W) array `a` is
`nibabel.Nifti1Image(a.T, affine)`.

Boxes are xyxy in pixel-edge coordinates (pixel (i, j) covers x in [j, j+1),
y in [i, i+1); x2, y2 exclusive), within the image; box labels are integers.

Errors: anything that does not fit the layout raises ValueError naming the
file(s): an unreadable file, an unsupported file in images/ or masks/, a mask
of another size than its image, an image without a mask (when masks/ exists),
a mask without an image, an image without a labels.csv row, a labels.csv,
boxes.csv or split-list entry for an image that does not exist, a non-0/1
label. Nothing is silently skipped. Files and rows are checked at
construction; pixel sizes and mask values when a sample is read
(`dataset.validate()` reads them all up front).
"""

from __future__ import annotations

import csv
import math
import os
import warnings
from pathlib import Path

import torch
from torch.utils.data import Dataset

__all__ = ["FolderDataset", "IMAGE_SUFFIXES", "read_image"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".dcm", ".nii", ".nii.gz")
_PIL, _DICOM, _NIFTI = "pil", "dicom", "nifti"


def _suffix(name: str) -> str:
    low = name.lower()
    return ".nii.gz" if low.endswith(".nii.gz") else os.path.splitext(low)[1]


def _stem(name: str) -> str:
    return name[: len(name) - len(_suffix(name))]


def _kind(name: str) -> str:
    s = _suffix(name)
    return _DICOM if s == ".dcm" else _NIFTI if s in (".nii", ".nii.gz") else _PIL


def _list_folder(folder: Path) -> dict[str, str]:
    """{stem: file name} of the image files in `folder`; hidden files are ignored."""
    by_stem: dict[str, str] = {}
    for name in sorted(os.listdir(folder)):
        if name.startswith("."):
            continue
        if not (folder / name).is_file() or _suffix(name) not in IMAGE_SUFFIXES:
            raise ValueError(f"FolderDataset: {folder / name} is not a supported image file "
                             f"(expected one of {', '.join(IMAGE_SUFFIXES)})")
        stem = _stem(name)
        if stem in by_stem:
            raise ValueError(f"FolderDataset: {folder / by_stem[stem]} and {folder / name} have the same stem "
                             f"{stem!r}; masks are matched to images by stem, so stems must be unique")
        by_stem[stem] = name
    return by_stem


class FolderDataset(Dataset):
    """Samples from a folder laid out as in this module's docstring.

    Args:
        root: the folder.
        split: None (every image), "train", "val" or "test". With
            root/splits/<split>.txt, the images listed there; otherwise
            "train"/"val" split the images not listed in splits/test.txt at
            random (torch.Generator seeded by `seed`), `val_fraction` of them
            (rounded, at least one of each when there are two or more) to
            "val". A "test" split needs splits/test.txt; giving only one of
            train.txt and val.txt is an error.
        val_fraction: fraction in [0, 1) for the ratio split.
        seed: seed of the ratio split and of the per-sample transform generators.
        transform: callable sample -> sample (medmtl.data transforms); when it
            takes a `generator`, each sample gets one seeded by (seed, epoch,
            index), so augmentation is deterministic whatever the DataLoader's
            workers and order (call set_epoch(e) for new draws each epoch).
        in_channels: None keeps the file's channels (grayscale 1, RGB 3;
            an alpha channel is dropped); 1 averages RGB to gray, 3 repeats gray.

    A sample: {"image": (C, H, W) float32 intensities as read, "mask": (H, W)
    int64 (with "seg"), "labels": (num_labels,) float32 0/1 (with "cls"),
    "boxes": (K, 4) float32 and "box_labels": (K,) int64 (with "det"; K may be
    0), "name": image file name}.

    Attributes: tasks (tuple of "seg", "cls", "det"), names (image file names
    of the split, sorted), label_names, num_labels, seg_classes (max mask
    value + 1 over every mask of the folder, all splits, so that train and val
    agree; scanned lazily on first access, reading all masks once).
    """

    def __init__(self, root, split: str | None = None, val_fraction: float = 0.2, seed: int = 0,
                 transform=None, in_channels: int | None = None):
        if not isinstance(root, (str, os.PathLike)):
            raise TypeError(f"FolderDataset: root must be a path, got {type(root).__name__}")
        self.root = Path(root)
        if not (self.root / "images").is_dir():
            raise ValueError(f"FolderDataset: root must contain an images/ folder, got {self.root} "
                             f"without {self.root / 'images'}")
        if split not in (None, "train", "val", "test"):
            raise ValueError(f"FolderDataset: split must be None, 'train', 'val' or 'test', got {split!r}")
        if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) \
                or not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"FolderDataset: val_fraction must be a number in [0, 1), got {val_fraction!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"FolderDataset: seed must be an int, got {seed!r}")
        if transform is not None and not callable(transform):
            raise TypeError(f"FolderDataset: transform must be callable or None, got {type(transform).__name__}")
        if in_channels not in (None, 1, 3):
            raise ValueError(f"FolderDataset: in_channels must be None, 1 or 3, got {in_channels!r}")
        self.split, self.val_fraction, self.seed = split, float(val_fraction), seed
        self.transform, self.in_channels, self.epoch = transform, in_channels, 0

        images = _list_folder(self.root / "images")
        self._all_images = sorted(images.values())
        if not self._all_images:
            raise ValueError(f"FolderDataset: {self.root / 'images'} holds no image files")
        tasks = []
        self._masks: dict[str, str] | None = None
        if (self.root / "masks").is_dir():
            self._masks = self._match_masks(images)
            tasks.append("seg")
        self._labels: dict[str, list[float]] | None = None
        self.label_names: tuple[str, ...] = ()
        if (self.root / "labels.csv").is_file():
            self._labels = self._read_labels(set(self._all_images))
            tasks.append("cls")
        self._boxes: dict[str, list] | None = None
        if (self.root / "boxes.csv").is_file():
            self._boxes = self._read_boxes(set(self._all_images))
            tasks.append("det")
        self.tasks = tuple(tasks)
        self.names = self._split_names()
        self._seg_classes: int | None = None

    # ---- layout ---------------------------------------------------------------------------------
    def _match_masks(self, images: dict[str, str]) -> dict[str, str]:
        masks = _list_folder(self.root / "masks")
        for stem, name in images.items():
            if stem not in masks:
                raise ValueError(f"FolderDataset: image {self.root / 'images' / name} has no mask in "
                                 f"{self.root / 'masks'} (expected a file with stem {stem!r})")
        for stem, name in masks.items():
            if stem not in images:
                raise ValueError(f"FolderDataset: mask {self.root / 'masks' / name} has no image with stem "
                                 f"{stem!r} in {self.root / 'images'}")
        return {images[s]: masks[s] for s in images}

    def _read_rows(self, path: Path, first: list[str]) -> tuple[list[str], list[tuple[int, list[str]]]]:
        try:
            with open(path, newline="") as f:
                rows = [r for r in csv.reader(f)]
        except (OSError, UnicodeDecodeError, csv.Error) as e:
            raise ValueError(f"FolderDataset: cannot read {path}: {e}") from e
        numbered = [(i + 1, [c.strip() for c in r]) for i, r in enumerate(rows) if any(c.strip() for c in r)]
        if not numbered or numbered[0][1][: len(first)] != first:
            got = numbered[0][1] if numbered else "an empty file"
            raise ValueError(f"FolderDataset: {path} must start with a header {','.join(first)}..., got {got}")
        header = numbered[0][1]
        for line, r in numbered[1:]:
            if len(r) != len(header):
                raise ValueError(f"FolderDataset: {path} line {line} has {len(r)} fields, the header has {len(header)}")
        return header, numbered[1:]

    def _read_labels(self, existing: set[str]) -> dict[str, list[float]]:
        path = self.root / "labels.csv"
        header, rows = self._read_rows(path, ["image"])
        self.label_names = tuple(header[1:])
        if not self.label_names:
            raise ValueError(f"FolderDataset: {path} must have one column per label after 'image', got none")
        labels: dict[str, list[float]] = {}
        for line, r in rows:
            name = r[0]
            if name not in existing:
                raise ValueError(f"FolderDataset: {path} line {line} names image {name!r}, which does not exist "
                                 f"in {self.root / 'images'}")
            if name in labels:
                raise ValueError(f"FolderDataset: {path} line {line} repeats image {name!r}")
            values = []
            for col, v in zip(header[1:], r[1:]):
                try:
                    x = float(v)
                except ValueError:
                    x = math.nan
                if x not in (0.0, 1.0):
                    raise ValueError(f"FolderDataset: {path} line {line} column {col!r}: labels must be 0 or 1, "
                                     f"got {v!r}")
                values.append(x)
            labels[name] = values
        missing = sorted(existing - set(labels))
        if missing:
            raise ValueError(f"FolderDataset: image {self.root / 'images' / missing[0]} has no row in {path} "
                             f"({len(missing)} images have none)")
        return labels

    def _read_boxes(self, existing: set[str]) -> dict[str, list]:
        path = self.root / "boxes.csv"
        header, rows = self._read_rows(path, ["image", "x1", "y1", "x2", "y2", "label"])
        if len(header) != 6:
            raise ValueError(f"FolderDataset: {path} must have the columns image,x1,y1,x2,y2,label, got {header}")
        boxes: dict[str, list] = {name: [] for name in existing}
        for line, r in rows:
            name = r[0]
            if name not in existing:
                raise ValueError(f"FolderDataset: {path} line {line} names image {name!r}, which does not exist "
                                 f"in {self.root / 'images'}")
            try:
                x1, y1, x2, y2 = (float(v) for v in r[1:5])
                label = int(r[5])
            except ValueError:
                raise ValueError(f"FolderDataset: {path} line {line}: x1,y1,x2,y2 must be numbers and label an "
                                 f"integer, got {r[1:]}") from None
            if not (0 <= x1 < x2 and 0 <= y1 < y2) or label < 0:
                raise ValueError(f"FolderDataset: {path} line {line}: expected 0 <= x1 < x2, 0 <= y1 < y2 and a "
                                 f"label >= 0, got {r[1:]}")
            boxes[name].append((line, [x1, y1, x2, y2], label))
        return boxes

    def _split_names(self) -> list[str]:
        if self.split is None:
            return list(self._all_images)
        lists = {s: self._read_split(s) for s in ("train", "val", "test")
                 if (self.root / "splits" / f"{s}.txt").is_file()}
        seen: dict[str, str] = {}
        for s, names in lists.items():
            for n in names:
                if n in seen:
                    raise ValueError(f"FolderDataset: image {n!r} is in both splits/{seen[n]}.txt and "
                                     f"splits/{s}.txt under {self.root}")
                seen[n] = s
        if self.split in lists:
            return sorted(lists[self.split])
        if self.split == "test":
            raise ValueError(f"FolderDataset: split='test' needs {self.root / 'splits' / 'test.txt'}, which does "
                             f"not exist (only train/val are split by ratio)")
        if "train" in lists or "val" in lists:
            have, lack = ("train", "val") if "train" in lists else ("val", "train")
            raise ValueError(f"FolderDataset: {self.root / 'splits' / (have + '.txt')} exists but "
                             f"{self.root / 'splits' / (lack + '.txt')} does not; give both lists or neither")
        pool = [n for n in self._all_images if n not in set(lists.get("test", []))]
        n = len(pool)
        n_val = round(n * self.val_fraction)
        if self.val_fraction > 0 and n >= 2:
            n_val = min(max(n_val, 1), n - 1)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed)).tolist()
        val = {pool[i] for i in order[:n_val]}
        return sorted(x for x in pool if (x in val) == (self.split == "val"))

    def _read_split(self, split: str) -> list[str]:
        path = self.root / "splits" / f"{split}.txt"
        try:
            names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"FolderDataset: cannot read {path}: {e}") from e
        existing = set(self._all_images)
        for n in names:
            if n not in existing:
                raise ValueError(f"FolderDataset: {path} lists image {n!r}, which does not exist in "
                                 f"{self.root / 'images'}")
        if len(set(names)) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise ValueError(f"FolderDataset: {path} lists image {dup!r} more than once")
        return names

    # ---- samples --------------------------------------------------------------------------------
    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    @property
    def seg_classes(self) -> int:
        """max mask value + 1 over every mask of the folder (0 without masks/)."""
        if self._masks is None:
            return 0
        if self._seg_classes is None:
            self._seg_classes = 1 + max(int(self._read_mask(n).max()) for n in self._all_images)
        return self._seg_classes

    def label_matrix(self) -> torch.Tensor:
        """(len(self), num_labels) float32: the split's labels, read from labels.csv alone."""
        if self._labels is None:
            raise ValueError(f"FolderDataset: {self.root} has no labels.csv")
        return torch.tensor([self._labels[n] for n in self.names], dtype=torch.float32).reshape(-1, self.num_labels)

    def set_epoch(self, epoch: int) -> None:
        """New transform draws for `epoch` (the per-sample generators are seeded by seed, epoch, index)."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"FolderDataset.set_epoch: epoch must be an int >= 0, got {epoch!r}")
        self.epoch = epoch

    def validate(self) -> None:
        """Read every sample of the split once; raises the first error (naming its file)."""
        for i in range(len(self)):
            self._load(self.names[i])

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int) -> dict:
        if isinstance(index, bool) or not isinstance(index, int) or not -len(self) <= index < len(self):
            raise IndexError(f"FolderDataset: index must be an int in [{-len(self)}, {len(self)}), got {index!r}")
        index %= len(self)
        sample = self._load(self.names[index])
        if self.transform is not None:
            from medmtl.data.transforms import _takes_generator
            if _takes_generator(self.transform):
                g = torch.Generator().manual_seed(((self.seed * 1_000_003 + self.epoch) * 10_000_019 + index) % 2**63)
                sample = self.transform(sample, generator=g)
            else:
                sample = self.transform(sample)
        return sample

    def _load(self, name: str) -> dict:
        image = self._read_image(name)
        sample: dict = {"image": image}
        if self._masks is not None:
            mask = self._read_mask(name)
            if tuple(mask.shape) != tuple(image.shape[1:]):
                raise ValueError(f"FolderDataset: mask {self.root / 'masks' / self._masks[name]} is "
                                 f"{tuple(mask.shape)} (H, W) but its image {self.root / 'images' / name} is "
                                 f"{tuple(image.shape[1:])}")
            sample["mask"] = mask
        if self._labels is not None:
            sample["labels"] = torch.tensor(self._labels[name], dtype=torch.float32)
        if self._boxes is not None:
            h, w = image.shape[1:]
            for line, (x1, y1, x2, y2), _ in self._boxes[name]:
                if x2 > w or y2 > h:
                    raise ValueError(f"FolderDataset: {self.root / 'boxes.csv'} line {line}: box "
                                     f"{[x1, y1, x2, y2]} exceeds image {name} of size (H, W) = ({h}, {w})")
            rows = self._boxes[name]
            sample["boxes"] = torch.tensor([r[1] for r in rows], dtype=torch.float32).reshape(-1, 4)
            sample["box_labels"] = torch.tensor([r[2] for r in rows], dtype=torch.int64)
        sample["name"] = name
        return sample

    def _read_image(self, name: str) -> torch.Tensor:
        return read_image(self.root / "images" / name, self.in_channels)

    def _read_mask(self, name: str) -> torch.Tensor:
        path = self.root / "masks" / self._masks[name]
        m = _read(path)
        if m.shape[0] > 1:
            if not bool((m == m[:1]).all()):
                raise ValueError(f"FolderDataset: mask {path} has {m.shape[0]} different channels; a mask must be "
                                 f"one channel of class indices")
        m = m[0]
        if not bool(torch.isfinite(m).all()) or bool((m < 0).any()) or not bool((m == m.round()).all()):
            raise ValueError(f"FolderDataset: mask {path} must hold integer class indices >= 0, got values in "
                             f"[{float(m.min())}, {float(m.max())}] (non-integers or negatives)")
        return m.to(torch.int64)


def read_image(path: str | os.PathLike, in_channels: int | None = None) -> torch.Tensor:
    """One image file (any of IMAGE_SUFFIXES) as (C, H, W) float32, C 1 or 3 (an alpha
    channel dropped; in_channels 1 averages RGB, 3 repeats gray; None keeps the file's)."""
    path = Path(path)
    if _suffix(path.name) not in IMAGE_SUFFIXES:
        raise ValueError(f"read_image: {path} is not a supported image file (expected one of "
                         f"{', '.join(IMAGE_SUFFIXES)})")
    if in_channels not in (None, 1, 3):
        raise ValueError(f"read_image: in_channels must be None, 1 or 3, got {in_channels!r}")
    x = _read(path)
    c = x.shape[0]
    if c in (2, 4):  # gray + alpha, RGB + alpha
        x, c = x[: c - 1], c - 1
    if c not in (1, 3):
        raise ValueError(f"FolderDataset: {path} has {c} channels, expected 1 or 3")
    if in_channels == 3 and c == 1:
        x = x.repeat(3, 1, 1)
    elif in_channels == 1 and c == 3:
        x = x.mean(dim=0, keepdim=True)
    return x.contiguous()


_loaders: dict = {}


def _loader(kind: str):
    """MONAI LoadImage with a fixed reader per format, oriented as (rows, columns)."""
    if kind not in _loaders:
        from monai.data import NibabelReader, PILReader, PydicomReader
        from monai.transforms import LoadImage
        reader = {_PIL: lambda: PILReader(reverse_indexing=False), _DICOM: lambda: PydicomReader(swap_ij=False),
                  _NIFTI: lambda: NibabelReader()}[kind]()
        _loaders[kind] = LoadImage(reader=reader, image_only=True, dtype="float32")
    return _loaders[kind]


def _read(path: Path) -> torch.Tensor:
    """Read one 2-D image file as (C, H, W) float32 (see the module docstring for the orientation)."""
    kind = _kind(path.name)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            x = _loader(kind)(str(path))
    except Exception as e:
        raise ValueError(f"FolderDataset: cannot read {path}: {type(e).__name__}: {e}") from e
    channel_last = x.meta.get("original_channel_dim") == -1 if hasattr(x, "meta") else False
    x = x.as_tensor() if hasattr(x, "as_tensor") else torch.as_tensor(x)
    x = x.to(torch.float32)
    if kind == _NIFTI:
        while x.dim() > 2 and x.shape[-1] == 1:
            x = x[..., 0]
        if x.dim() != 2:
            raise ValueError(f"FolderDataset: {path} has shape {tuple(x.shape)}; expected a 2-D NIfTI slice "
                             f"(X, Y) or (X, Y, 1)")
        return x.T[None]
    if x.dim() == 2:
        return x[None]
    if x.dim() == 3 and channel_last:
        return x.permute(2, 0, 1)
    raise ValueError(f"FolderDataset: {path} has shape {tuple(x.shape)}; expected a 2-D image, grayscale or "
                     f"with channels last")

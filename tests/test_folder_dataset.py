"""FolderDataset on temporary folders of PNG, TIFF, DICOM and NIfTI files written by the test."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

nib = pytest.importorskip("nibabel")
pydicom = pytest.importorskip("pydicom")
from PIL import Image  # noqa: E402
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, generate_uid  # noqa: E402

from medmtl.data.collate import collate_samples  # noqa: E402
from medmtl.data.folder import FolderDataset  # noqa: E402
from medmtl.data.transforms import Compose, RandomFlip, Resize  # noqa: E402


def write_png(path: Path, a: np.ndarray) -> None:
    Image.fromarray(a).save(path)


def write_nifti(path: Path, a: np.ndarray) -> None:
    """A 2-D slice: NIfTI's first axis is x (columns), so the (H, W) array goes in transposed."""
    nib.save(nib.Nifti1Image(np.ascontiguousarray(a.T), np.eye(4)), str(path))


def write_dicom(path: Path, a: np.ndarray) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns = a.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = a.astype(np.uint16).tobytes()
    ds.save_as(str(path), enforce_file_format=True)


def _rng_image(seed: int, shape) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 250, size=shape).astype(np.uint8)


def _mask(shape, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 4, size=shape).astype(np.uint8)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """a.png gray 5x7, b.dcm 6x4 (mask b.png), c.nii.gz 5x6 (mask c.nii.gz), d.png RGB 4x5 (mask d.tif)."""
    root = tmp_path_factory.mktemp("folder")
    (root / "images").mkdir()
    (root / "masks").mkdir()
    data = {"a.png": (_rng_image(1, (5, 7)), _mask((5, 7), 11)),
            "b.dcm": (np.random.default_rng(2).integers(0, 4000, (6, 4)).astype(np.uint16), _mask((6, 4), 12)),
            "c.nii.gz": (np.random.default_rng(3).normal(size=(5, 6)).astype(np.float32), _mask((5, 6), 13)),
            "d.png": (_rng_image(4, (4, 5, 3)), _mask((4, 5), 14))}
    data["a.png"][1][0, 0] = 4  # seg_classes = 5
    write_png(root / "images" / "a.png", data["a.png"][0])
    write_png(root / "masks" / "a.png", data["a.png"][1])
    write_dicom(root / "images" / "b.dcm", data["b.dcm"][0])
    write_png(root / "masks" / "b.png", data["b.dcm"][1])
    write_nifti(root / "images" / "c.nii.gz", data["c.nii.gz"][0])
    write_nifti(root / "masks" / "c.nii.gz", data["c.nii.gz"][1].astype(np.float32))
    write_png(root / "images" / "d.png", data["d.png"][0])
    Image.fromarray(data["d.png"][1]).save(root / "masks" / "d.tif")
    labels = {"a.png": [1, 0], "b.dcm": [0, 1], "c.nii.gz": [1, 1], "d.png": [0, 0]}
    (root / "labels.csv").write_text("image,cyst,nodule\n" + "".join(f"{k},{v[0]},{v[1]}\n" for k, v in labels.items()))
    (root / "boxes.csv").write_text("image,x1,y1,x2,y2,label\na.png,1,0,4,3,2\na.png,0,2,7,5,1\nc.nii.gz,2,1,6,4,3\n")
    return root, data, labels


def _copy(folder, tmp_path) -> Path:
    root = tmp_path / "copy"
    shutil.copytree(folder[0], root)
    return root


def test_samples_equal_what_was_written(folder):
    root, data, labels = folder
    ds = FolderDataset(root)
    assert ds.tasks == ("seg", "cls", "det") and ds.names == ["a.png", "b.dcm", "c.nii.gz", "d.png"]
    assert ds.label_names == ("cyst", "nodule") and ds.num_labels == 2 and ds.seg_classes == 5
    for i, name in enumerate(ds.names):
        s = ds[i]
        image, mask = data[name]
        expected = torch.from_numpy(image.astype(np.float32))
        expected = expected.permute(2, 0, 1) if expected.dim() == 3 else expected[None]
        assert s["name"] == name
        assert s["image"].dtype == torch.float32 and type(s["image"]) is torch.Tensor
        assert torch.equal(s["image"], expected), name  # rows and columns as written, no scaling
        assert s["mask"].dtype == torch.int64 and torch.equal(s["mask"], torch.from_numpy(mask.astype(np.int64))), name
        assert s["labels"].dtype == torch.float32 and s["labels"].tolist() == labels[name]
    a, c, d = ds[0], ds[2], ds[3]
    assert a["boxes"].tolist() == [[1, 0, 4, 3], [0, 2, 7, 5]] and a["box_labels"].tolist() == [2, 1]
    assert c["boxes"].tolist() == [[2, 1, 6, 4]] and c["box_labels"].dtype == torch.int64
    assert d["boxes"].shape == (0, 4) and d["box_labels"].shape == (0,)


def test_in_channels_converts_and_collate_batches(folder):
    root, data, _ = folder
    gray = FolderDataset(root, in_channels=1)
    rgb = FolderDataset(root, in_channels=3)
    d = torch.from_numpy(data["d.png"][0].astype(np.float32)).permute(2, 0, 1)
    torch.testing.assert_close(gray[3]["image"], d.mean(0, keepdim=True))
    a = torch.from_numpy(data["a.png"][0].astype(np.float32))
    assert torch.equal(rgb[0]["image"], a.expand(3, -1, -1))
    ds = FolderDataset(root, in_channels=1, transform=Compose([Resize(8), RandomFlip()]))
    batch = collate_samples([ds[i] for i in range(len(ds))])
    assert batch["image"].shape == (4, 1, 8, 8) and batch["mask"].shape == (4, 8, 8) and batch["labels"].shape == (4, 2)
    assert [b.shape[0] for b in batch["boxes"]] == [2, 0, 1, 0] and batch["name"] == ds.names
    # transforms are seeded per (seed, epoch, index): the same sample twice is the same
    assert torch.equal(ds[1]["image"], ds[1]["image"])


def test_split_lists(folder, tmp_path):
    root = _copy(folder, tmp_path)
    (root / "splits").mkdir()
    (root / "splits" / "train.txt").write_text("d.png\na.png\n\n")
    (root / "splits" / "val.txt").write_text("c.nii.gz\n")
    (root / "splits" / "test.txt").write_text("b.dcm\n")
    assert FolderDataset(root, split="train").names == ["a.png", "d.png"]
    assert FolderDataset(root, split="val").names == ["c.nii.gz"]
    assert FolderDataset(root, split="test").names == ["b.dcm"]
    (root / "splits" / "val.txt").write_text("c.nii.gz\nmissing.png\n")
    with pytest.raises(ValueError, match="missing.png"):
        FolderDataset(root, split="train")
    (root / "splits" / "val.txt").unlink()
    with pytest.raises(ValueError, match="val.txt"):
        FolderDataset(root, split="val")


@pytest.fixture(scope="module")
def plain_folder(tmp_path_factory):
    """Ten small PNGs and nothing else."""
    root = tmp_path_factory.mktemp("plain")
    (root / "images").mkdir()
    for i in range(10):
        write_png(root / "images" / f"img{i}.png", _rng_image(i, (3, 4)))
    return root


def test_ratio_split_is_deterministic_disjoint_and_covering(plain_folder):
    train = FolderDataset(plain_folder, split="train", val_fraction=0.3, seed=5).names
    val = FolderDataset(plain_folder, split="val", val_fraction=0.3, seed=5).names
    assert len(val) == 3 and len(train) == 7 and not set(train) & set(val)
    assert sorted(train + val) == FolderDataset(plain_folder).names
    assert FolderDataset(plain_folder, split="val", val_fraction=0.3, seed=5).names == val
    others = {tuple(FolderDataset(plain_folder, split="val", val_fraction=0.3, seed=s).names) for s in range(6)}
    assert len(others) > 1  # the seed matters


def test_ratio_split_leaves_out_the_test_list(plain_folder, tmp_path):
    root = tmp_path / "p"
    shutil.copytree(plain_folder, root)
    (root / "splits").mkdir()
    (root / "splits" / "test.txt").write_text("img0.png\nimg1.png\n")
    train = FolderDataset(root, split="train", val_fraction=0.25).names
    val = FolderDataset(root, split="val", val_fraction=0.25).names
    assert len(val) == 2 and sorted(train + val) == [f"img{i}.png" for i in range(2, 10)]


def test_a_folder_serves_only_the_tasks_it_has(plain_folder, folder, tmp_path):
    ds = FolderDataset(plain_folder)
    assert ds.tasks == () and ds.num_labels == 0 and ds.seg_classes == 0
    assert set(ds[0]) == {"image", "name"} and ds[0]["image"].shape == (1, 3, 4)
    root = _copy(folder, tmp_path)
    shutil.rmtree(root / "masks")
    (root / "boxes.csv").unlink()
    ds = FolderDataset(root)
    assert ds.tasks == ("cls",) and set(ds[1]) == {"image", "labels", "name"}
    root2 = tmp_path / "seg"
    shutil.copytree(folder[0], root2)
    (root2 / "labels.csv").unlink()
    ds = FolderDataset(root2)
    assert ds.tasks == ("seg", "det") and set(ds[3]) == {"image", "mask", "boxes", "box_labels", "name"}


def test_a_corrupt_file_is_an_error_naming_it(folder, tmp_path):
    root = _copy(folder, tmp_path)
    (root / "images" / "b.dcm").write_bytes(b"not a dicom file at all")
    ds = FolderDataset(root)
    assert ds[0]["name"] == "a.png"  # other files still read
    with pytest.raises(ValueError, match=r"cannot read .*b\.dcm"):
        ds[1]
    with pytest.raises(ValueError, match=r"b\.dcm"):
        ds.validate()


def test_a_mismatched_mask_names_both_files_and_sizes(folder, tmp_path):
    root = _copy(folder, tmp_path)
    write_png(root / "masks" / "a.png", np.zeros((7, 5), np.uint8))  # transposed size
    with pytest.raises(ValueError, match=r"masks/a\.png is \(7, 5\).*images/a\.png is \(5, 7\)"):
        FolderDataset(root)[0]


def test_layout_errors_name_the_file(folder, tmp_path):
    root = _copy(folder, tmp_path)
    labels = (root / "labels.csv").read_text()
    (root / "labels.csv").write_text(labels + "ghost.png,1,0\n")
    with pytest.raises(ValueError, match="ghost.png"):
        FolderDataset(root)
    (root / "labels.csv").write_text(labels.replace("d.png,0,0", "d.png,0,2"))
    with pytest.raises(ValueError, match="nodule.*0 or 1"):
        FolderDataset(root)
    (root / "labels.csv").write_text(labels.replace("d.png,0,0\n", ""))
    with pytest.raises(ValueError, match=r"d\.png has no row"):
        FolderDataset(root)
    (root / "labels.csv").write_text(labels)
    (root / "masks" / "d.tif").unlink()
    with pytest.raises(ValueError, match=r"d\.png has no mask"):
        FolderDataset(root)
    write_png(root / "masks" / "d.png", np.zeros((4, 5), np.uint8))
    write_png(root / "masks" / "e.png", np.zeros((4, 5), np.uint8))
    with pytest.raises(ValueError, match=r"e\.png has no image"):
        FolderDataset(root)
    (root / "masks" / "e.png").unlink()
    (root / "boxes.csv").write_text("image,x1,y1,x2,y2,label\nnope.dcm,1,1,2,2,1\n")
    with pytest.raises(ValueError, match="nope.dcm"):
        FolderDataset(root)
    (root / "boxes.csv").write_text("image,x1,y1,x2,y2,label\nd.png,1,1,9,2,1\n")
    with pytest.raises(ValueError, match=r"exceeds image d\.png"):
        FolderDataset(root)[3]
    (root / "images" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match=r"notes\.txt is not a supported"):
        FolderDataset(root)


def test_argument_errors_name_the_argument(plain_folder, tmp_path):
    for kwargs, word in [({"split": "training"}, "split"), ({"val_fraction": 1.0}, "val_fraction"),
                         ({"in_channels": 2}, "in_channels"), ({"transform": 3}, "transform")]:
        with pytest.raises((ValueError, TypeError), match=word):
            FolderDataset(plain_folder, **kwargs)
    with pytest.raises(ValueError, match="images/"):
        FolderDataset(tmp_path)
    with pytest.raises(ValueError, match="test.txt"):
        FolderDataset(plain_folder, split="test")
    with pytest.raises(IndexError, match="index"):
        FolderDataset(plain_folder)[10]

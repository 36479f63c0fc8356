"""Joint transforms of medmtl.data (image, mask, boxes, clean move together) and collate_samples."""

from __future__ import annotations

import pytest
import torch

from medmtl.data.collate import collate_samples
from medmtl.data.transforms import Compose, NormalizeIntensity, RandomFlip, RandomRotate, Resize, rotate


def _extent(mask: torch.Tensor) -> list[float]:
    """xyxy pixel-edge box of the nonzero pixels of a (H, W) mask."""
    rows, cols = torch.nonzero(mask, as_tuple=True)
    return [cols.min().item(), rows.min().item(), cols.max().item() + 1.0, rows.max().item() + 1.0]


def _square(h=20, w=30, rows=(3, 8), cols=(5, 11), with_clean=False) -> dict:
    """A dark image with one bright square; its mask, box and a gradient so orientation matters."""
    image = torch.linspace(0, 0.2, h * w).reshape(1, h, w)
    image[:, rows[0]:rows[1], cols[0]:cols[1]] = 1.0
    mask = torch.zeros(h, w, dtype=torch.int64)
    mask[rows[0]:rows[1], cols[0]:cols[1]] = 2
    box = torch.tensor([[cols[0], rows[0], cols[1], rows[1]]], dtype=torch.float32)
    s = {"image": image, "mask": mask, "boxes": box,
         "box_labels": torch.tensor([2]), "labels": torch.tensor([0.0, 1.0]), "name": "sq.png"}
    if with_clean:
        s["clean"] = image * 0.5
    return s


@pytest.mark.parametrize("axes", [("h",), ("v",), ("h", "v")])
def test_flip_moves_mask_and_box_with_the_image(axes):
    s = _square(with_clean=True)
    out = RandomFlip(p=1.0, axes=axes)(s)
    dims = tuple({"h": -1, "v": -2}[a] for a in axes)
    assert torch.equal(out["image"], torch.flip(s["image"], dims))
    assert torch.equal(out["clean"], torch.flip(s["clean"], dims))
    assert torch.equal(out["mask"], torch.flip(s["mask"], dims))
    assert out["boxes"].tolist() == [_extent(out["mask"])]
    assert out["boxes"].tolist() != s["boxes"].tolist()
    assert torch.equal(s["mask"], _square()["mask"])  # the input sample is left alone
    assert torch.equal(RandomFlip(p=0.0)(s)["image"], s["image"])


def test_rotate_90_on_a_square_image_is_rot90_counter_clockwise():
    s = _square(h=16, w=16, rows=(2, 6), cols=(9, 14))
    out = rotate(s, 90.0)
    torch.testing.assert_close(out["image"], torch.rot90(s["image"], 1, (-2, -1)), atol=1e-5, rtol=0)
    assert torch.equal(out["mask"], torch.rot90(s["mask"], 1, (-2, -1)))
    torch.testing.assert_close(out["boxes"], torch.tensor([_extent(out["mask"])]), atol=1e-4, rtol=0)


@pytest.mark.parametrize("angle", [30.0, -20.0])
def test_rotated_box_encloses_the_rotated_square(angle):
    s = _square(h=40, w=50, rows=(12, 22), cols=(20, 32))
    out = rotate(s, angle)
    x1, y1, x2, y2 = out["boxes"][0].tolist()
    bright = out["image"][0] > 0.5
    ext = _extent(bright)
    assert x1 <= ext[0] and y1 <= ext[1] and x2 >= ext[2] and y2 >= ext[3]
    assert max(abs(a - b) for a, b in zip([x1, y1, x2, y2], ext)) < 1.5  # tight, not just large
    # the mask moved with the image: the rotated mask is where the rotated square is bright
    inter = ((out["mask"] == 2) & bright).sum().item()
    union = ((out["mask"] == 2) | bright).sum().item()
    assert inter / union > 0.85
    assert set(out["mask"].unique().tolist()) == {0, 2}


def test_rotation_drops_boxes_rotated_out_of_the_image():
    s = _square(h=10, w=40, rows=(2, 7), cols=(0, 4))
    s["boxes"] = torch.tensor([[0.0, 2.0, 4.0, 7.0], [18.0, 3.0, 22.0, 7.0]])
    s["box_labels"] = torch.tensor([2, 1])
    out = rotate(s, 90.0)
    assert out["box_labels"].tolist() == [1]
    torch.testing.assert_close(out["boxes"], torch.tensor([[18.0, 3.0, 22.0, 7.0]]), atol=1e-4, rtol=0)


def test_resize_scales_boxes_and_keeps_them_on_the_mask():
    s = _square(h=20, w=30, rows=(4, 10), cols=(6, 12), with_clean=True)
    for size in [(40, 60), (10, 15), 24]:
        out = Resize(size)(s)
        h, w = (size, size) if isinstance(size, int) else size
        assert out["image"].shape == (1, h, w) and out["clean"].shape == (1, h, w) and out["mask"].shape == (h, w)
        assert out["mask"].dtype == torch.int64
        expected = s["boxes"] * torch.tensor([w / 30, h / 20, w / 30, h / 20])
        torch.testing.assert_close(out["boxes"], expected)
        if size != 24:  # an integer scale: the nearest mask's extent is the scaled box exactly
            assert out["boxes"].tolist() == [_extent(out["mask"])]


def test_random_transforms_are_deterministic_given_a_seed():
    s = _square(with_clean=True)
    t = Compose([RandomFlip(), RandomRotate(degrees=40, p=1.0)])
    a = t(s, generator=torch.Generator().manual_seed(3))
    b = t(s, generator=torch.Generator().manual_seed(3))
    for k in ("image", "clean", "mask", "boxes"):
        assert torch.equal(a[k], b[k])
    outs = [t(s, generator=torch.Generator().manual_seed(i))["image"] for i in range(6)]
    assert any(not torch.equal(outs[0], o) for o in outs[1:])
    # a seed given at construction: two transforms with the same seed draw the same sequence
    f1, f2 = RandomRotate(p=0.5, generator=7), RandomRotate(p=0.5, generator=7)
    for _ in range(4):
        assert torch.equal(f1(s)["image"], f2(s)["image"])


def test_normalize_intensity_per_image_and_clean_follows_the_image():
    torch.manual_seed(1)
    img = torch.rand(2, 8, 9) * 5 + 3
    img[:, :2] = 0
    s = {"image": img, "clean": img.clone(), "name": "x"}
    out = NormalizeIntensity()(s)
    assert abs(out["image"].mean().item()) < 1e-5 and abs(out["image"].std(unbiased=False).item() - 1) < 1e-4
    torch.testing.assert_close(out["clean"], out["image"])
    nz = NormalizeIntensity(nonzero=True, channel_wise=True)(s)
    assert torch.equal(nz["image"][:, :2], torch.zeros(2, 2, 9))
    for c in range(2):
        vals = nz["image"][c, 2:]
        assert abs(vals.mean().item()) < 1e-5 and abs(vals.std(unbiased=False).item() - 1) < 1e-4
    torch.testing.assert_close(nz["clean"], nz["image"])
    assert isinstance(out["image"], torch.Tensor) and type(out["image"]) is torch.Tensor


def test_transform_argument_errors_name_the_argument():
    with pytest.raises(ValueError, match="size"):
        Resize(0)
    with pytest.raises(ValueError, match="axes"):
        RandomFlip(axes=("x",))
    with pytest.raises(ValueError, match="p must"):
        RandomRotate(p=1.5)
    with pytest.raises(ValueError, match="degrees"):
        RandomRotate(degrees=(10, -10))
    bad = _square()
    bad["mask"] = bad["mask"][:5]
    with pytest.raises(ValueError, match="mask"):
        RandomFlip(p=1.0)(bad)
    with pytest.raises(ValueError, match="image"):
        Resize(4)({"image": torch.zeros(4, 4)})


def test_collate_stacks_tensors_and_lists_boxes():
    a, b = _square(), RandomFlip(p=1.0)(_square())
    b["boxes"] = torch.zeros(0, 4)
    b["box_labels"] = torch.zeros(0, dtype=torch.int64)
    batch = collate_samples([a, b])
    assert batch["image"].shape == (2, 1, 20, 30) and batch["mask"].shape == (2, 20, 30)
    assert batch["labels"].shape == (2, 2) and batch["name"] == ["sq.png", "sq.png"]
    assert torch.equal(batch["mask"][1], b["mask"])
    assert [x.shape[0] for x in batch["boxes"]] == [1, 0] and [x.shape[0] for x in batch["box_labels"]] == [1, 0]
    c = _square()
    del c["labels"]
    with pytest.raises(ValueError, match="'labels'"):
        collate_samples([a, c])
    d = Resize((10, 30))(_square())
    with pytest.raises(ValueError, match="'image'"):
        collate_samples([a, d])
    with pytest.raises(ValueError, match="non-empty"):
        collate_samples([])

"""SyntheticLesions: determinism and content."""

from __future__ import annotations

import pytest
import torch

from medmtl.data import SyntheticLesions, collate_samples


def test_deterministic_from_seed_and_index():
    a, b = SyntheticLesions(6, 48, seed=3), SyntheticLesions(6, 48, seed=3, cache=False)
    for i in (5, 0, 2):
        x, y = a[i], b[i]
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["mask"], y["mask"])
        assert torch.equal(x["boxes"], y["boxes"])
    assert not torch.equal(SyntheticLesions(1, 48, seed=4)[0]["image"], a[0]["image"])


def test_masks_labels_and_boxes_agree():
    ds = SyntheticLesions(40, 48, seed=0)
    kinds_seen = torch.zeros(3)
    for i in range(len(ds)):
        s = ds[i]
        assert s["image"].shape == (1, 48, 48) and s["image"].dtype == torch.float32
        assert s["mask"].dtype == torch.int64 and int(s["mask"].max()) <= 3
        present = torch.tensor([float((s["mask"] == k).any()) for k in (1, 2, 3)])
        assert torch.equal(s["labels"], present)
        assert len(s["boxes"]) == len(s["box_labels"])
        assert sorted(set(s["box_labels"].tolist())) == [k for k in (1, 2, 3) if present[k - 1]]
        covered = torch.zeros_like(s["mask"], dtype=torch.bool)
        for (x1, y1, x2, y2), k in zip(s["boxes"].long().tolist(), s["box_labels"].tolist()):
            region = s["mask"][y1:y2, x1:x2] == k
            # the box is tight: the lesion touches all four sides
            assert region[0].any() and region[-1].any() and region[:, 0].any() and region[:, -1].any()
            covered[y1:y2, x1:x2] |= region
        assert torch.equal(covered, s["mask"] > 0)  # every lesion pixel is in its kind's box
        kinds_seen += present
    assert (kinds_seen > 8).all()  # each kind is common


def test_no_threshold_rule_segments_a_kind():
    """The best single intensity threshold (above or below) per class gives a Dice
    far below 0.5: a model must learn shape, texture and local contrast."""
    ds = SyntheticLesions(60, 48, seed=7)
    images = torch.stack([ds[i]["image"][0] for i in range(len(ds))])
    masks = torch.stack([ds[i]["mask"] for i in range(len(ds))])
    for k in (1, 2, 3):
        truth = masks == k
        best = max(2 * (pred & truth).sum().item() / (pred.sum() + truth.sum()).item()
                   for t in torch.linspace(0, 1, 51) for pred in (images > t, images < t))
        assert best < 0.4, (k, best)


@pytest.mark.parametrize("noise", ["gaussian", "poisson", "speckle"])
def test_noise_statistics(noise):
    ds = SyntheticLesions(8, 64, seed=1, noise=noise, noise_level=0.1)
    residuals, cleans = [], []
    for i in range(len(ds)):
        s = ds[i]
        assert s["noise"] == noise and s["clean"].shape == s["image"].shape
        residuals.append((s["image"] - s["clean"]).flatten())
        cleans.append(s["clean"].flatten())
    r, c = torch.cat(residuals), torch.cat(cleans)
    assert abs(r.mean().item()) < 0.01
    if noise == "gaussian":
        assert abs(r.std().item() - 0.1) < 0.01
    elif noise == "poisson":  # variance = clean / peak, peak = 100
        assert abs(r.var().item() - c.mean().item() / 100) < 0.3 * c.mean().item() / 100
    else:  # speckle: std proportional to the clean value
        assert abs((r / c.clamp_min(0.05)).std().item() - 0.1) < 0.02


def test_rgb_and_collate_and_errors():
    ds = SyntheticLesions(3, 32, channels=3)
    batch = collate_samples([ds[i] for i in range(3)])
    assert batch["image"].shape == (3, 3, 32, 32) and isinstance(batch["boxes"], list)
    with pytest.raises(ValueError, match="img_size must be an int >= 32"):
        SyntheticLesions(3, 16)
    with pytest.raises(ValueError, match="noise must be None or one of"):
        SyntheticLesions(3, 32, noise="salt")
    with pytest.raises(IndexError, match="out of range"):
        ds[3]

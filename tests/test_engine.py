"""Losses, metrics and the trainer: hand-computed cases, training, resume, checkpoints, plots."""

from __future__ import annotations

import csv
import math

import pytest
import torch
import torch.nn.functional as F

from medmtl.data import SyntheticLesions
from medmtl.engine import (ClassificationLoss, MultiTaskLoss, SegmentationLoss, TrainConfig, Trainer,
                           classification_metrics, denoising_loss, denoising_metrics, detection_metrics,
                           load_checkpoint, segmentation_metrics)
from tests.model_configs import small_model

# -- losses


def test_segmentation_loss_hand_case():
    """A perfect, confident prediction has a loss near 0; the uniform one has soft
    Dice loss 1 - mean over classes of 2 |p t| / (|p| + |t|) plus its focal term."""
    mask = torch.tensor([[[0, 1], [2, 2]]])
    perfect = F.one_hot(mask, 3).permute(0, 3, 1, 2).float() * 40 - 20
    loss = SegmentationLoss("dice_focal")
    assert loss(perfect, mask).item() < 1e-3
    uniform = torch.zeros(1, 3, 2, 2)
    # softmax 1/3 everywhere; per class Dice = 2 * n_k/3 / (4/3 + n_k) with n = (1, 1, 2)
    dice = sum(2 * n / 3 / (4 / 3 + n) for n in (1, 1, 2)) / 3
    focal = (1 - 1 / 3) ** 2 * -math.log(1 / 3)  # per pixel and class of the target ...
    got = loss(uniform, mask).item()
    assert got == pytest.approx(1 - dice + focal / 3, rel=0.05) or got == pytest.approx(1 - dice + focal, rel=0.05)
    with pytest.raises(ValueError, match="expected logits"):
        loss(uniform, mask[0])


def test_classification_and_denoising_losses_hand_cases():
    logits, labels = torch.tensor([[0.0, 2.0]]), torch.tensor([[1.0, 0.0]])
    expected = (math.log(2) + math.log(1 + math.exp(2))) / 2
    assert ClassificationLoss("soft_margin")(logits, labels).item() == pytest.approx(expected)
    assert ClassificationLoss("bce")(logits, labels).item() == pytest.approx(expected)
    weighted = ClassificationLoss("soft_margin", class_weights=[2.0, 0.0])(logits, labels).item()
    assert weighted == pytest.approx(2 * math.log(2) / 2)
    assert denoising_loss(torch.ones(1, 1, 2, 2), torch.zeros(1, 1, 2, 2), "mse").item() == 1.0
    assert denoising_loss(torch.full((1, 1, 2, 2), 0.5), torch.zeros(1, 1, 2, 2), "l1").item() == 0.5
    with pytest.raises(ValueError, match="kind must be one of"):
        ClassificationLoss("hinge")


def test_multi_task_weighting():
    losses = {"seg": torch.tensor(2.0), "cls": torch.tensor(4.0)}
    total, parts = MultiTaskLoss(("seg", "cls"), {"seg": 1.0, "cls": 0.25})(losses)
    assert total.item() == 3.0 and parts == {"seg": 2.0, "cls": 4.0}
    learned = MultiTaskLoss(("seg", "cls"), "uncertainty")
    with torch.no_grad():
        learned.log_vars["seg"].fill_(math.log(2.0))
    total, _ = learned(losses)
    assert total.item() == pytest.approx(2.0 / 2 + math.log(2) + 4.0)
    total.backward()
    assert learned.log_vars["cls"].grad.item() == pytest.approx(1 - 4.0)


# -- metrics


def test_segmentation_metrics_hand_case():
    true = torch.zeros(1, 8, 8, dtype=torch.long)
    true[0, 2:6, 2:6] = 1                       # 16 pixels
    pred = torch.zeros_like(true)
    pred[0, 2:6, 4:8] = 1                       # 16 pixels, 8 shared
    m = segmentation_metrics(pred, true, 2)
    assert m["dice_1"] == pytest.approx(0.5) and m["jaccard_1"] == pytest.approx(8 / 24)
    assert m["hd95_1"] == pytest.approx(2.0, abs=0.01)  # the shifted edges are 2 pixels apart
    assert m["dice_mean"] == m["dice_1"]


def test_classification_metrics_hand_case():
    logits = torch.tensor([[2.0, -1.0], [1.0, 1.0], [-2.0, -3.0], [-1.0, 2.0]])
    labels = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0], [1.0, 1.0]])
    m = classification_metrics(logits, labels, ["a", "b"])
    # label a: predictions (1, 1, 0, 0) vs truth (1, 0, 0, 1): tp 1, tn 1
    assert m["accuracy_a"] == 0.5 and m["sensitivity_a"] == 0.5 and m["specificity_a"] == 0.5
    assert m["auc_a"] == pytest.approx(0.75)     # positives scored 2, -1; negatives 1, -2
    assert m["auc_b"] == 1.0 and m["accuracy_b"] == 1.0
    assert m["auc_macro"] == pytest.approx(0.875)
    # label a: tp 1, fp 1, fn 1, tn 1 -> F1 2/(2+1+1) = 0.5, MCC (1 - 1) / 4 = 0; label b perfect
    assert m["f1_a"] == pytest.approx(0.5) and m["mcc_a"] == pytest.approx(0.0)
    assert m["f1_b"] == pytest.approx(1.0) and m["mcc_b"] == pytest.approx(1.0)


def test_denoising_and_detection_metrics():
    clean = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    m = denoising_metrics(clean + 0.1, clean)
    assert m["psnr"] == pytest.approx(20.0, abs=0.5)      # 10 log10(1 / 0.01), less where clamped
    assert denoising_metrics(clean, clean)["ssim"] == pytest.approx(1.0)
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    target = [{"boxes": boxes, "labels": torch.tensor([0])}]
    hit = [{"boxes": boxes + 1, "scores": torch.tensor([0.9]), "labels": torch.tensor([0])}]
    miss = [{"boxes": boxes + 8, "scores": torch.tensor([0.9]), "labels": torch.tensor([0])}]
    assert detection_metrics(hit, target)["map50"] == pytest.approx(1.0)
    assert detection_metrics(miss, target)["map50"] == pytest.approx(0.0)


# -- training


def _trainer(out_dir, epochs=3, model=None, **config):
    torch.manual_seed(0)
    model = model or small_model("resformer_mtl", in_channels=1, seg_classes=4, num_classes=3, drop_path_rate=0.1)
    settings = dict(epochs=epochs, batch_size=8, lr=3e-3, progress_bar=False, overlays=2, monitor="dice_mean")
    settings.update(config)
    return Trainer(model, SyntheticLesions(24, 32, seed=0), SyntheticLesions(8, 32, seed=1), out_dir,
                   TrainConfig(**settings))


def test_training_lowers_the_loss_and_writes_its_outputs(tmp_path):
    history = _trainer(tmp_path, epochs=4).fit()
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4] and "dice_mean" in rows[0] and "auc_macro" in rows[0]
    for name in ("progress.png", "overlays/synthetic_00000.png", "overlays/synthetic_00001.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    best = load_checkpoint(tmp_path / "checkpoint_best.pth")
    assert best["monitor"] == "dice_mean" and best["value"] == max(r["dice_mean"] for r in history)
    last = torch.load(tmp_path / "checkpoint_last.pth", weights_only=True)
    assert last["epoch"] == 4 and {"model", "optimizer", "scheduler", "rng", "config"} <= set(last)


def test_resume_repeats_the_uninterrupted_losses(tmp_path, monkeypatch):
    full = _trainer(tmp_path / "full", epochs=3).fit()
    cut = _trainer(tmp_path / "cut", epochs=3)
    real_epoch = cut.train_epoch

    def interrupted(epoch):
        if epoch == 3:
            raise KeyboardInterrupt  # killed during epoch 3: checkpoint_last holds epoch 2
        return real_epoch(epoch)

    monkeypatch.setattr(cut, "train_epoch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        cut.fit()
    assert torch.load(tmp_path / "cut" / "checkpoint_last.pth", weights_only=True)["epoch"] == 2
    resumed = _trainer(tmp_path / "cut", epochs=3, model=small_model("resformer_mtl", seed=9, in_channels=1,
                                                                       seg_classes=4, num_classes=3,
                                                                       drop_path_rate=0.1))
    torch.manual_seed(123)  # a new process's RNG: the checkpoint's states replace it
    history = resumed.fit(resume=True)
    assert [r["epoch"] for r in history] == [1, 2, 3]
    for a, b in zip(history, full):
        assert a["train_loss"] == b["train_loss"], (a["epoch"], a["train_loss"], b["train_loss"])
    for (k, v), w in zip(resumed.model.state_dict().items(), _final_state(tmp_path / "full")):
        assert torch.equal(v, w), k


def _final_state(run_dir):
    return list(torch.load(run_dir / "checkpoint_last.pth", weights_only=True)["model"].values())


def test_checkpoint_errors_name_the_file(tmp_path):
    bad = tmp_path / "broken.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="broken.pth"):
        load_checkpoint(bad)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_checkpoint(tmp_path / "missing.pth")


def test_config_and_task_errors(tmp_path):
    with pytest.raises(ValueError, match="epochs must be a positive int"):
        _trainer(tmp_path, epochs=0)
    with pytest.raises(ValueError, match="task_schedule must be one of"):
        _trainer(tmp_path, task_schedule="random")
    with pytest.raises(ValueError, match="tasks must be among"):
        Trainer(small_model("resformer_mtl", in_channels=1), SyntheticLesions(4, 32), tasks=("det",))


def test_detection_loss_hand_case():
    """One class, a 1x2 map: a positive cell (target 1) and a negative one (target
    0.5); probabilities 0.5 and 0.25, size and offset off by 2 and 1 at the centre."""
    from medmtl.engine import detection_loss

    logit = torch.logit(torch.tensor([0.5, 0.25]))
    det = {"heatmap": logit.view(1, 1, 1, 2), "size": torch.zeros(1, 2, 1, 2), "offset": torch.zeros(1, 2, 1, 2)}
    targets = {"heatmap": torch.tensor([1.0, 0.5]).view(1, 1, 1, 2),
               "size": torch.tensor([[2.0, 0.0], [2.0, 0.0]]).view(1, 2, 1, 2),
               "offset": torch.tensor([[1.0, 0.0], [1.0, 0.0]]).view(1, 2, 1, 2),
               "mask": torch.tensor([1.0, 0.0]).view(1, 1, 1, 2)}
    positive = -math.log(0.5) * 0.5 ** 2
    negative = -math.log(0.75) * 0.25 ** 2 * 0.5 ** 4
    expected = positive + negative + 0.1 * (2 + 2) + (1 + 1)   # L1 summed over (w, h), per box
    assert detection_loss(det, targets).item() == pytest.approx(expected, rel=1e-5)


def test_balanced_label_weights_follow_the_label_counts():
    from medmtl.engine.trainer import balanced_label_weights

    class Labels(torch.utils.data.Dataset):
        rows = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0], [0.0, 1.0, 1.0], [0.0, 0.0, 1.0]])

        def __len__(self):
            return 4

        def __getitem__(self, i):
            return {"labels": self.rows[i]}

    # label 0: 1 positive, 3 negatives -> 3; label 1: the same -> 3; label 2: no negatives -> 1
    w = balanced_label_weights(Labels())
    assert w == pytest.approx([3 / (7 / 3), 3 / (7 / 3), 1 / (7 / 3)])


def test_load_matching_weights_copies_what_fits(tmp_path):
    from medmtl.engine.checkpoint import save_atomic
    from medmtl.engine.trainer import load_matching_weights

    source = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Conv2d(4, 2, 1))
    target = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Conv2d(4, 5, 1))  # other head width
    save_atomic({"model": source.state_dict()}, tmp_path / "ckpt.pth")
    loaded = load_matching_weights(target, tmp_path / "ckpt.pth")
    assert loaded == ["0.bias", "0.weight"]
    assert torch.equal(target[0].weight, source[0].weight) and not torch.equal(target[1].bias[:2], source[1].bias)
    save_atomic({"model": {"other.weight": torch.zeros(1)}}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="no tensor of .*other.pth matches the model"):
        load_matching_weights(target, tmp_path / "other.pth")

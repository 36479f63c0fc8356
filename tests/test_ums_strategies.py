"""UMS-Rep's stages and fine-tuning strategies train exactly the parameters they say."""

from __future__ import annotations

import pytest
import torch

from medmtl.data import SyntheticLesions
from medmtl.engine import TrainConfig
from medmtl.engine.strategies import finetune, pretrain_representation
from tests.model_configs import small_model


def _data():
    return SyntheticLesions(8, 32, seed=0, noise="mixed"), SyntheticLesions(4, 32, seed=1, noise="mixed")


def _config():
    return TrainConfig(epochs=1, batch_size=4, lr=1e-3, progress_bar=False, overlays=0, monitor="val_loss")


def _model():
    return small_model("ums_rep", seg_classes=4, num_classes=3)


def _changed(before, model):
    return {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}


def test_pretraining_trains_the_representation_and_denoising_head(tmp_path):
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    record = pretrain_representation(model, *_data(), tmp_path, _config())
    changed = _changed(before, model)
    assert any(k.startswith("representation.") for k in changed)
    assert {k.split(".")[1] for k in changed if k.startswith("heads.")} == {"denoise"}
    assert record["trainable_parameters"] == sum(p.numel() for p in model.representation_parameters()) + \
        sum(p.numel() for p in model.head_parameters("denoise"))
    assert record["seconds"] > 0 and "psnr" in record and "ssim" in record


@pytest.mark.parametrize("strategy", ["independent", "alternating", "joint", "separate"])
def test_finetuning_strategies(strategy, tmp_path):
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    records = finetune(model, strategy, *_data(), tmp_path, _config(), make_model=_model)
    changed = _changed(before, model)
    heads_changed = {k.split(".")[1] for k in changed if k.startswith("heads.")}
    rep_changed = any(k.startswith("representation.") for k in changed)
    rep_size = sum(p.numel() for p in model.representation_parameters())
    if strategy == "independent":
        assert not rep_changed and heads_changed == {"denoise", "seg", "cls"}
        assert [r["tasks"] for r in records] == [["denoise"], ["seg"], ["cls"]]
        assert [r["trainable_parameters"] for r in records] == [
            sum(p.numel() for p in model.head_parameters(t)) for t in ("denoise", "seg", "cls")]
    elif strategy == "separate":
        assert not changed  # the shared model is untouched: one fresh model per task
        assert [r["tasks"] for r in records] == [["denoise"], ["seg"], ["cls"]]
        assert all(r["trainable_parameters"] > rep_size for r in records)
    else:
        assert rep_changed and heads_changed == {"denoise", "seg", "cls"} and len(records) == 1
        assert records[0]["trainable_parameters"] == sum(p.numel() for p in model.parameters())
    for r in records:
        assert r["strategy"] == strategy and r["seconds"] > 0 and "val_loss" in r
    with pytest.raises(ValueError, match="strategy must be one of"):
        finetune(model, "cyclic", *_data())

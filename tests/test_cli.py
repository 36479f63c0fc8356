"""The medmtl command end to end on tiny synthetic runs: configs and their errors,
train / resume, evaluate, predict (PNG and NIfTI), compare."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from medmtl import cli
from medmtl.commands import predict as predict_module
from medmtl.config import ConfigError, config_from_dict, load_config
from medmtl.engine.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))

# A ResFormerMTL small enough to train an epoch on 16 images in seconds.
TINY = {"name": "tiny",
        "model": {"name": "resformer_mtl", "channels": [8, 16, 32, 64], "num_heads": [1, 1, 1, 1],
                  "resnet_blocks": [1, 1, 1, 1], "depths": [1, 1, 1, 1], "dfe_dilations": [1, 2, 3],
                  "drop_path_rate": 0.0, "cls_hidden": 8},
        "data": {"root": "synthetic", "img_size": 32, "train_size": 16, "val_size": 6, "test_size": 6},
        "train": {"epochs": 2, "batch_size": 8, "lr": 0.01, "optimizer": "sgd", "overlays": 1,
                  "progress_bar": False}}


def write_config(tmp_path: Path, values: dict, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(values))
    return path


# -- configs ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_configs_load_and_build(path):
    from medmtl.commands.build import build_model

    config = load_config(path)
    assert config.model["name"] in ("resformer_mtl", "ums_rep", "ft_mtl_net")
    model = build_model(config.model)
    assert sum(p.numel() for p in model.parameters()) > 0


def test_shipped_configs_cover_the_papers_and_ablations():
    names = {p.stem for p in CONFIGS}
    assert {"resformer_mtl", "ums_rep", "ft_mtl_net", "resformer_mtl_isic", "resformer_mtl_retouch"} <= names
    ablations = [load_config(p).model for p in CONFIGS if p.stem.startswith("ablation_")]
    switched = {k for m in ablations for k in ("use_transformer", "use_dfe", "dfe_variant", "cls_levels") if k in m}
    assert switched == {"use_transformer", "use_dfe", "dfe_variant", "cls_levels"}
    isic = load_config(ROOT / "configs" / "resformer_mtl_isic.yaml")
    retouch = load_config(ROOT / "configs" / "resformer_mtl_retouch.yaml")
    assert isic.data.img_size == 224 and retouch.data.img_size == 512
    assert retouch.train.class_weights is not None and isic.train.loss_weights


@pytest.mark.parametrize("values, message", [
    ({"modle": {}}, "unknown config key 'modle' at the top level; valid keys: data, model, name, output_dir, train"),
    ({"data": {"img_sise": 64}}, "unknown config key 'img_sise' in data; valid keys: augment, channels"),
    ({"train": {"epoch": 3}}, "unknown config key 'epoch' in train; valid keys: accumulate_steps"),
    ({"model": {"name": "resformer_mtl", "use_dfa": True}}, "unknown config key 'use_dfa' in model; valid keys:"),
    ({"model": {"name": "unet"}}, "config key model.name: expected one of"),
    ({"train": {"lr": "fast"}}, "config key train.lr: expected float, got 'fast' (str)"),
    ({"data": {"img_size": 64.5}}, "config key data.img_size: expected int, got 64.5 (float)"),
    ({"train": {"amp": 1}}, "config key train.amp: expected bool, got 1 (int)"),
    ({"model": {"name": "resformer_mtl", "channels": [64, "x", 256, 512]}},
     "config key model.channels[1]: expected int, got 'x'"),
    ({"model": {"name": "ums_rep", "dropout": "none"}}, "config key model.dropout: expected float, got 'none'"),
    ({"data": ["root"]}, "config key data: expected a mapping"),
    ({"train": {"epochs": 0}}, "config key train.epochs must be a positive int, got 0"),
])
def test_config_errors_name_the_key(tmp_path, values, message):
    path = write_config(tmp_path, values)
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert message in str(error.value)
    assert str(path) in str(error.value)


def test_valid_keys_are_listed_in_full():
    with pytest.raises(ConfigError) as error:
        config_from_dict({"model": {"name": "ft_mtl_net", "transfr": "sum"}})
    listed = str(error.value).split("valid keys: ")[1].split(", ")
    assert {"name", "transfer", "det_classes", "branch_channels"} <= set(listed)


def test_overrides_are_typed_and_checked():
    config = load_config(None, ["train.epochs=3", "model.use_dfe=false", "model.channels=[32, 64, 128, 256]",
                                "data.root=synthetic", "train.class_weights=[1, 2.5]"])
    assert config.train.epochs == 3 and config.model["use_dfe"] is False
    assert config.model["channels"] == (32, 64, 128, 256) and config.train.class_weights == [1.0, 2.5]
    with pytest.raises(ConfigError, match="override must look like section.key=value"):
        load_config(None, ["train.epochs"])
    with pytest.raises(ConfigError, match="unknown config key 'epochz' in train"):
        load_config(None, ["train.epochz=3"])
    with pytest.raises(ConfigError, match="train.lr: expected float, got 'x'"):
        load_config(None, ["train.lr=x"])


def test_cli_reports_config_errors_without_a_traceback(tmp_path, capsys):
    path = write_config(tmp_path, {**TINY, "train": {"epohcs": 1}})
    assert cli.main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "medmtl train: error:" in err and "'epohcs'" in err and "Traceback" not in err


# -- train, resume, evaluate, compare ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A tiny 2-epoch run through the command."""
    tmp = tmp_path_factory.mktemp("run")
    path = write_config(tmp, {**TINY, "output_dir": str(tmp / "run")})
    assert cli.main(["train", "--config", str(path)]) == 0
    return tmp / "run"


def test_train_writes_the_run_folder(trained_run):
    expected = {"config.yaml", "config.json", "metrics.csv", "checkpoint_last.pth", "checkpoint_best.pth",
                "progress.png", "summary.json", "overlays"}
    assert expected <= {p.name for p in trained_run.iterdir()}
    resolved = yaml.safe_load((trained_run / "config.yaml").read_text())
    # the data decided the model's input channels, size and classes; every key is written
    assert resolved["model"]["in_channels"] == 1 and resolved["model"]["img_size"] == 32
    assert resolved["model"]["seg_classes"] == 4 and resolved["model"]["num_classes"] == 3
    assert resolved["train"]["weight_decay"] == pytest.approx(3e-5)
    summary = json.loads((trained_run / "summary.json").read_text())
    assert summary["epochs_done"] == 2 and summary["trainable_parameters"] > 0 and "dice_mean" in summary["last"]
    state = load_checkpoint(trained_run / "checkpoint_last.pth")
    assert state["metadata"]["label_names"] == ["cyst", "nodule", "plaque"]


def test_interrupted_run_resumes_to_the_same_weights(tmp_path, trained_run):
    path = write_config(tmp_path, {**TINY, "output_dir": str(tmp_path / "run")})
    assert cli.main(["train", "--config", str(path), "--stop-after-epoch", "1"]) == 0
    assert load_checkpoint(tmp_path / "run" / "checkpoint_last.pth")["epoch"] == 1
    assert not (tmp_path / "run" / "progress.png").exists()
    assert cli.main(["train", "--resume", str(tmp_path / "run")]) == 0
    resumed = load_checkpoint(tmp_path / "run" / "checkpoint_last.pth")
    whole = load_checkpoint(trained_run / "checkpoint_last.pth")
    assert resumed["epoch"] == 2
    for key, value in whole["model"].items():
        torch.testing.assert_close(resumed["model"][key], value, rtol=1e-5, atol=1e-6, msg=key)
    assert [r["train_loss"] for r in resumed["history"]] == pytest.approx([r["train_loss"] for r in whole["history"]])


def test_evaluate_writes_the_metrics(trained_run, tmp_path, capsys):
    out = tmp_path / "eval"
    assert cli.main(["evaluate", "--checkpoint", str(trained_run / "checkpoint_best.pth"), "--data", "synthetic",
                     "--split", "test", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"dice_mean", "auc_macro", "loss", "mcc_macro"} <= set(metrics)
    assert "| segmentation | cyst | nodule | plaque | mean |" in printed
    rows = (out / "metrics.csv").read_text().splitlines()
    assert rows[0] == "metric,value" and len(rows) == len(metrics) + 1


def test_compare_tables_two_runs(trained_run, tmp_path):
    other = tmp_path / "other"
    path = write_config(tmp_path, {**TINY, "name": "no_dfe", "output_dir": str(other),
                                   "model": {**TINY["model"], "use_dfe": False}, "train": {**TINY["train"],
                                                                                           "epochs": 1}})
    assert cli.main(["train", "--config", str(path)]) == 0
    out = tmp_path / "cmp"
    assert cli.main(["compare", str(trained_run), str(other), "--out", str(out)]) == 0
    table = (out / "comparison.md").read_text().splitlines()
    assert table[0].startswith("| run | model | dice_mean") and "trainable_parameters" in table[0]
    assert table[2].startswith("| tiny |") and table[3].startswith("| no_dfe |")
    params = [int(line.split("|")[-2].replace(",", "")) for line in table[2:]]
    assert params[0] > params[1]  # the DFE blocks' parameters
    assert (out / "comparison.png").stat().st_size > 10_000 and (out / "comparison.csv").is_file()
    assert cli.main(["compare", str(tmp_path), "--out", str(out)]) == 2  # not a run folder


# -- predict -------------------------------------------------------------------------------------------------

class _ThresholdModel(torch.nn.Module):
    """seg: class 1 where the input is bright; cls: the mean intensity; one box at
    model pixels (16, 8, 48, 24)."""

    def forward(self, x):
        return {"seg": torch.cat([0.5 - x, x - 0.5], 1), "cls": x.mean((1, 2, 3))[:, None] * 10 - 2,
                "det": {}}

    def decode_detections(self, det, score_threshold):
        return [{"boxes": torch.tensor([[16.0, 8.0, 48.0, 24.0]]), "scores": torch.tensor([0.9]),
                 "labels": torch.tensor([0])}]


@pytest.fixture
def threshold_model(monkeypatch):
    config = config_from_dict({"model": {"name": "resformer_mtl", "img_size": 64, "in_channels": 1},
                               "data": {"img_size": 64}})
    monkeypatch.setattr(predict_module, "load_trained", lambda path: (config, _ThresholdModel(), ["bright"]))


def _rectangle(h=70, w=100):
    image = np.zeros((h, w), dtype=np.float32)
    image[10:40, 20:90] = 1.0
    return image


def test_predict_maps_masks_and_boxes_back_to_each_image(tmp_path, threshold_model):
    import nibabel
    from PIL import Image

    from medmtl.data import read_image

    inputs = tmp_path / "in"
    inputs.mkdir()
    image = _rectangle()
    Image.fromarray(image.astype(np.uint8)).save(inputs / "a.png")  # intensities 0 and 1, as the NIfTI
    affine = np.diag([0.7, 0.8, 1.0, 1.0])
    nibabel.save(nibabel.Nifti1Image(image.T, affine), str(inputs / "b.nii.gz"))
    out = tmp_path / "out"
    result = predict_module.predict("unused.pth", inputs, out, progress=False, log=lambda *_: None)

    files = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    assert files == {"predictions.json", "masks/a.png", "masks/b.nii.gz", "overlays/a.png", "overlays/b.png"}
    assert json.loads((out / "predictions.json").read_text()) == result
    for name in ("masks/a.png", "masks/b.nii.gz"):
        mask = read_image(out / name)[0]
        assert tuple(mask.shape) == (70, 100)
        truth = torch.from_numpy(image) > 0.5
        iou = (truth & (mask > 0)).sum() / (truth | (mask > 0)).sum()
        assert iou > 0.95, (name, float(iou))
    assert np.allclose(nibabel.load(str(out / "masks" / "b.nii.gz")).affine, affine)
    record = result["images"][0]
    assert record["height"] == 70 and record["width"] == 100 and record["classes_present"] == [1]
    # cls logit 10 x mean - 2 with the rectangle covering 30 x 70 of 70 x 100 pixels (mean 0.3)
    assert record["probabilities"]["bright"] == pytest.approx(torch.sigmoid(torch.tensor(1.0)).item(), abs=0.02)
    assert record["labels"] == ["bright"]
    # the model's box (16, 8, 48, 24) at 64 x 64, in the image's 100 x 70 pixels
    assert record["boxes"][0]["box"] == pytest.approx([25.0, 8.75, 75.0, 26.25])
    assert record["boxes"][0]["label"] == 1


def test_predict_on_a_trained_checkpoint_and_its_errors(trained_run, tmp_path):
    from PIL import Image

    from medmtl.data import SyntheticLesions

    image = SyntheticLesions(1, 48, seed=9)[0]["image"][0].numpy()
    Image.fromarray((image * 255).clip(0, 255).astype(np.uint8)).save(tmp_path / "scan.png")
    out = tmp_path / "pred"
    assert cli.main(["predict", "--checkpoint", str(trained_run / "checkpoint_best.pth"), "--input",
                     str(tmp_path / "scan.png"), "--output", str(out)]) == 0
    record = json.loads((out / "predictions.json").read_text())["images"][0]
    assert set(record["probabilities"]) == {"cyst", "nodule", "plaque"}
    assert Image.open(out / "masks" / "scan.png").size == (48, 48)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="notes.txt is not a supported image file"):
        predict_module.list_inputs(tmp_path / "notes.txt")
    with pytest.raises(ValueError, match="holds no image files"):
        predict_module.list_inputs(_empty(tmp_path))


def _empty(tmp_path: Path) -> Path:
    folder = tmp_path / "empty"
    folder.mkdir()
    return folder

"""The papers' studies (make demo MODEL=...) in their quick form: every row, column and file."""

from __future__ import annotations

import csv

import pytest

from medmtl.studies import run_study


def test_ums_rep_study_tables_every_strategy(tmp_path):
    rows = run_study("ums_rep", tmp_path, quick=True, log=lambda *_: None)
    assert [r["strategy"] for r in rows] == ["independent", "alternating", "joint", "separate"]
    by = {r["strategy"]: r for r in rows}
    for row in rows:
        assert {"accuracy_macro", "f1_macro", "mcc_macro", "dice_mean", "jaccard_mean", "psnr", "ssim"} <= set(row)
    # independent trains the heads only; alternating and joint the same shared model; separate three models
    assert by["independent"]["trainable_parameters"] < by["joint"]["trainable_parameters"] \
        == by["alternating"]["trainable_parameters"] < by["separate"]["trainable_parameters"]
    assert by["separate"]["parameters_saved"] == "0%" and by["independent"]["parameters_saved"] != "0%"
    saved = 1 - by["joint"]["trainable_parameters"] / by["separate"]["trainable_parameters"]
    assert by["joint"]["parameters_saved"] == f"{100 * saved:.0f}%"
    table = (tmp_path / "study.md").read_text()
    assert "| independent |" in table and "cls MCC" in table and "denoise PSNR (dB)" in table
    with open(tmp_path / "study.csv") as f:
        assert len(list(csv.DictReader(f))) == 4
    assert (tmp_path / "study.png").stat().st_size > 10_000
    assert (tmp_path / "pretrain" / "checkpoint_last.pth").is_file()


def test_ft_mtl_net_study_compares_transfer_with_parallel_branches(tmp_path):
    rows = run_study("ft_mtl_net", tmp_path, quick=True, log=lambda *_: None)
    assert [r["transfer"] for r in rows] == ["sum", "None"]
    for row in rows:
        assert {"auc_macro", "map50", "dice_mean"} <= set(row)
    assert rows[0]["trainable_parameters"] > rows[1]["trainable_parameters"]  # the transfer convolutions
    assert "det mAP@0.5" in (tmp_path / "study.md").read_text()


def test_unknown_study_is_named():
    with pytest.raises(ValueError, match="name must be one of"):
        run_study("resformer", "x")

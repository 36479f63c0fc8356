"""UMS-Rep's comparison (the paper's Tables 5 and 7) on synthetic lesions with mixed noise.

Stage 1 learns the representation by denoising. Stage 2 then serves the three
tasks (denoising, segmentation, classification) from it under each strategy:
`independent` (representation frozen, one head at a time), `alternating`,
`joint`; the baseline `separate` trains one whole model per task from scratch.
Each row: per-task metrics on a held-out split, stage-2 training time and
trainable parameters, and the compute saved against `separate`.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import torch

from medmtl.engine.strategies import finetune, pretrain_representation
from medmtl.models import create_model
from medmtl.studies.common import QUICK, StudySize, plot_rows, study_config, study_data, write_report

STRATEGY_ORDER = ("independent", "alternating", "joint", "separate")
METRICS = ("accuracy_macro", "f1_macro", "mcc_macro", "auc_macro", "dice_mean", "jaccard_mean", "psnr", "ssim")
COLUMNS = [("strategy", "strategy"), ("accuracy_macro", "cls accuracy"), ("f1_macro", "cls F1"),
           ("mcc_macro", "cls MCC"), ("dice_mean", "seg Dice"), ("jaccard_mean", "seg IoU"),
           ("psnr", "denoise PSNR (dB)"), ("ssim", "denoise SSIM"), ("seconds", "training (s)"),
           ("trainable_parameters", "trainable parameters"), ("time_saved", "time saved vs separate"),
           ("parameters_saved", "parameters saved vs separate")]


# Eleven training runs (stage 1, three independent heads, alternating, joint, three separate
# models) within 10 minutes on 2 CPU cores.
SIZE = StudySize(train_images=300, test_images=200, epochs=12)


def _model(img_size: int):
    return create_model("ums_rep", in_channels=1, seg_classes=4, num_classes=3, channels=(16, 32, 64, 128),
                        img_size=img_size)


def _row(strategy: str, records: list[dict]) -> dict:
    """One table row from a strategy's runs (independent and separate: one run per task)."""
    row = {"strategy": strategy, "seconds": round(sum(r["seconds"] for r in records), 1),
           "trainable_parameters": sum(r["trainable_parameters"] for r in records)}
    for record in records:
        row.update({k: record[k] for k in METRICS if k in record})
    return row


def run(out: Path, quick: bool = False, log=print) -> list[dict]:
    size = QUICK if quick else SIZE
    torch.manual_seed(0)
    train_set, test_set = study_data(size, noise="mixed")
    config = study_config(size)
    start = time.perf_counter()
    log(f"UMS-Rep study: {len(train_set)} noisy synthetic training images at {size.img_size} px, "
        f"{size.epochs} epochs per run, metrics on {len(test_set)} held-out images")
    pretrained = _model(size.img_size)
    stage1 = pretrain_representation(pretrained, train_set, test_set, out / "pretrain", config)
    log(f"stage 1 (denoising representation): {stage1['seconds']:.0f} s, PSNR {stage1['psnr']:.2f} dB")
    rows = []
    for strategy in STRATEGY_ORDER:
        model = copy.deepcopy(pretrained)
        records = finetune(model, strategy, train_set, test_set, out, config,
                           make_model=lambda: _model(size.img_size))
        rows.append(_row(strategy, records))
        log(f"  {strategy}: {rows[-1]['seconds']:.0f} s")
    separate = rows[-1]
    for row in rows:
        row["time_saved"] = f"{100 * (1 - row['seconds'] / separate['seconds']):.0f}%"
        row["parameters_saved"] = f"{100 * (1 - row['trainable_parameters'] / separate['trainable_parameters']):.0f}%"
    notes = (f"Stage 1 (the denoising representation, learned once for every task): {stage1['seconds']:.0f} s, "
             f"{stage1['trainable_parameters']:,} trainable parameters, PSNR {stage1['psnr']:.2f} dB. "
             f"Training time and trainable parameters are stage 2's, summed over a strategy's runs "
             f"(independent and separate train one run per task). Study time {time.perf_counter() - start:.0f} s.")
    table = write_report(rows, COLUMNS, out, "UMS-Rep: fine-tuning strategies against one model per task", notes)
    plot_rows(rows, [c for c in COLUMNS if c[0] not in ("strategy", "time_saved", "parameters_saved")],
              out / "study.png", "strategy")
    log("\n" + table + "\n\n" + notes + f"\n\nwritten: {out / 'study.md'}, {out / 'study.csv'}, {out / 'study.png'}")
    return rows

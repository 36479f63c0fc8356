"""FT-MTL-Net's comparison on synthetic lesions: feature transfer between the
classification, detection and segmentation branches (transfer="sum", the
paper's model) against the same branches in parallel, joined only in the loss
(transfer=None). Same data, recipe and seed; metrics on a held-out split.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from medmtl.engine.trainer import Trainer
from medmtl.models import create_model
from medmtl.studies.common import FULL, QUICK, plot_rows, study_config, study_data, write_report

VARIANTS = (("sum", "feature transfer (sum)"), (None, "parallel branches (no transfer)"))
COLUMNS = [("variant", "model"), ("auc_macro", "cls AUC"), ("accuracy_macro", "cls accuracy"),
           ("map50", "det mAP@0.5"), ("dice_mean", "seg Dice"), ("jaccard_mean", "seg IoU"),
           ("seconds", "training (s)"), ("trainable_parameters", "trainable parameters")]


def _model(transfer, img_size: int):
    return create_model("ft_mtl_net", in_channels=1, seg_classes=4, num_classes=3, det_classes=3,
                        channels=(16, 32, 64, 128), branch_channels=(64, 32), transfer=transfer)


def run(out: Path, quick: bool = False, log=print) -> list[dict]:
    size = QUICK if quick else FULL
    train_set, test_set = study_data(size)
    config = study_config(size, monitor="map50")
    log(f"FT-MTL-Net study: {len(train_set)} synthetic training images at {size.img_size} px, {size.epochs} "
        f"epochs per run, metrics on {len(test_set)} held-out images")
    rows = []
    for transfer, label in VARIANTS:
        torch.manual_seed(0)
        model = _model(transfer, size.img_size)
        start = time.perf_counter()
        trainer = Trainer(model, train_set, test_set, out / f"transfer_{transfer}", config)
        history = trainer.fit()
        seconds = time.perf_counter() - start
        # history's own "seconds" is the last epoch's: the run's time comes after it
        rows.append({**history[-1], "variant": label, "transfer": str(transfer), "seconds": round(seconds, 1),
                     "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad)})
        log(f"  {label}: {seconds:.0f} s")
    notes = ("Both models have the same encoder, branches and heads; transfer adds a zero-initialised 1x1 "
             "convolution per branch stage and task pair, so it starts as the parallel model and learns how much "
             "of the other branches' features to take.")
    table = write_report(rows, COLUMNS, out, "FT-MTL-Net: feature transfer against parallel branches", notes)
    plot_rows(rows, [c for c in COLUMNS if c[0] != "variant"], out / "study.png", "variant")
    log("\n" + table + "\n\n" + notes + f"\n\nwritten: {out / 'study.md'}, {out / 'study.csv'}, {out / 'study.png'}")
    return rows

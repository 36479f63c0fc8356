"""`medmtl evaluate`: a trained model's metrics on a split.

    medmtl evaluate --checkpoint runs/resformer_mtl/checkpoint_best.pth --data synthetic --split test
    medmtl evaluate --checkpoint CKPT --data /data/isic --split all

Prints the metrics tables and writes metrics.json and metrics.csv to --out
(default: beside the checkpoint, in eval-<split>/).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from medmtl.commands.build import build_dataset
from medmtl.commands.from_checkpoint import load_trained
from medmtl.commands.tables import metrics_tables
from medmtl.engine.trainer import Trainer


def evaluate(checkpoint: str | Path, data: str | None = None, split: str = "test", out: str | Path | None = None,
             batch_size: int | None = None, log=print) -> dict:
    """Metrics of the checkpoint's model on `split` of `data` (default: the run's data root)."""
    config, model, label_names = load_trained(checkpoint)
    data_config = dataclasses.replace(config.data, root=data) if data else config.data
    dataset = build_dataset(data_config, split, config.train.seed)
    train_config = dataclasses.replace(config.train, init_from=None, progress_bar=False,
                                       batch_size=batch_size or config.train.batch_size)
    out = Path(out) if out else Path(checkpoint).parent / f"eval-{split}"
    trainer = Trainer(model, None, None, out, train_config)
    metrics = trainer.evaluate(dataset, out_dir=out)
    log(f"{config.model['name']} from {checkpoint} on {len(dataset)} images ({data_config.root}, split {split}):\n")
    log(metrics_tables(metrics, label_names or getattr(dataset, "label_names", None),
                       getattr(dataset, "class_names", None)))
    log(f"\nwritten: {out / 'metrics.json'}, {out / 'metrics.csv'}")
    (out / "evaluated.json").write_text(json.dumps({"checkpoint": str(checkpoint), "data": data_config.root,
                                                    "split": split, "images": len(dataset)}, indent=1))
    return metrics


def main(args) -> int:
    evaluate(args.checkpoint, args.data, args.split, args.out, args.batch_size)
    return 0


def add_parser(commands) -> None:
    import argparse

    p = commands.add_parser("evaluate", help="metrics of a trained checkpoint on a data split",
                            description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a checkpoint written by medmtl train")
    p.add_argument("--data", help="'synthetic' or a folder in FolderDataset's layout (default: the run's)")
    p.add_argument("--split", default="test", help="train, val, test (default), or all (folders)")
    p.add_argument("--out", help="where metrics.json/csv go (default: <checkpoint folder>/eval-<split>)")
    p.add_argument("--batch-size", type=int)
    p.set_defaults(run=main)

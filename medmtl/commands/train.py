"""`medmtl train`: one run from a config, into its run folder.

    medmtl train --config configs/resformer_mtl.yaml train.epochs=5 data.root=/data/isic
    medmtl train --resume runs/resformer_mtl                  # continues an interrupted run
    torchrun --nproc-per-node 2 -m medmtl train --config ...   # several processes (DDP)

The run folder (config.output_dir, default runs/<name>) gets config.yaml (the
resolved config: every key, the model's data-derived arguments filled in),
metrics.csv (one row per epoch), checkpoint_last.pth / checkpoint_best.pth,
progress.png, overlays/ and summary.json (training time, parameters, the last
validation metrics), which `medmtl compare` reads.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from medmtl.commands.build import build_dataset, build_model, resolve_model_config, split_name
from medmtl.config import RunConfig, config_to_dict, load_config, save_config
from medmtl.engine import distributed as dist
from medmtl.engine.trainer import Trainer

SUMMARY = "summary.json"


def train(config: RunConfig, resume: bool = False, stop_after_epoch: int | None = None,
          log=print) -> dict:
    """Trains config's run (joining torchrun's process group when launched by it); returns
    the summary written to summary.json."""
    device = dist.init_from_environment()
    seed = config.train.seed
    torch.manual_seed(seed)
    train_set = build_dataset(config.data, split_name(config.data, "train"), seed, train=True)
    val_set = build_dataset(config.data, split_name(config.data, "val"), seed)
    config.model = resolve_model_config(config.model, train_set)
    model = build_model(config.model)
    run_dir = config.run_dir
    if dist.is_main_process():
        save_config(config, run_dir / "config.yaml")
    metadata = {"run_config": config_to_dict(config), "label_names": list(getattr(train_set, "label_names", ()))}
    trainer = Trainer(model, train_set, val_set, run_dir, config.train, device=device, metadata=metadata)
    torch.manual_seed(seed + dist.rank())  # dropout draws differ per process; the weights came from seed
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if dist.is_main_process():
        log(f"{config.model['name']} ({trainable:,} trainable parameters) on {len(train_set)} training and "
            f"{len(val_set)} validation images, {config.train.epochs} epochs, {dist.world_size()} process(es); "
            f"run folder {run_dir}")
    history = trainer.fit(resume=resume, stop_after_epoch=stop_after_epoch)
    summary = {"name": config.name, "model": config.model["name"], "epochs_done": trainer.epoch,
               "epochs": config.train.epochs, "processes": dist.world_size(),
               "train_seconds": sum(row.get("seconds", 0.0) for row in history),
               "trainable_parameters": trainable, "parameters": sum(p.numel() for p in model.parameters()),
               "monitor": config.train.monitor, "best": trainer.best, "last": history[-1] if history else {}}
    if dist.is_main_process():
        (run_dir / SUMMARY).write_text(json.dumps(summary, indent=1))
        log(f"trained {trainer.epoch}/{config.train.epochs} epochs in {_duration(summary['train_seconds'])}; "
            f"best {config.train.monitor} {trainer.best}; checkpoints in {run_dir}")
    return summary


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def main(args) -> int:
    if args.resume:
        run_dir = Path(args.resume)
        if not (run_dir / "config.yaml").is_file():
            raise SystemExit(f"medmtl train: --resume {run_dir}: no config.yaml there (not a run folder)")
        config = load_config(run_dir / "config.yaml", [*args.overrides, f"output_dir={run_dir}"])
    else:
        if args.config is None:
            raise SystemExit("medmtl train: give --config FILE (see configs/) or --resume RUN_DIR")
        config = load_config(args.config, args.overrides)
    try:
        train(config, resume=bool(args.resume), stop_after_epoch=args.stop_after_epoch)
    finally:
        dist.shutdown()
    return 0


def add_parser(commands) -> None:
    p = commands.add_parser("train", help="train a model from a YAML config into a run folder",
                            description=__doc__, formatter_class=_raw())
    p.add_argument("--config", help="a YAML config (configs/*.yaml)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the interrupted run in RUN_DIR")
    p.add_argument("--stop-after-epoch", type=int, metavar="N",
                   help="stop after epoch N of the schedule (a time-limited job); --resume continues it")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="config overrides, e.g. train.epochs=5 data.root=/data/isic model.use_dfe=false")
    p.set_defaults(run=main)


def _raw():
    import argparse

    return argparse.RawDescriptionHelpFormatter

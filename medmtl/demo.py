"""`make demo`: trains a small ResFormerMTL on SyntheticLesions on the CPU,
evaluates it on a held-out synthetic split, prints the metrics table and
where the plots and overlays are.

    python -m medmtl.demo --out demo-results [--epochs 14] [--minutes 10]
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import torch

from medmtl.data import SyntheticLesions
from medmtl.engine import TrainConfig, Trainer
from medmtl.models import create_model

# A ResFormerMTL for 64-px grayscale images: the released design, narrower and shallower.
DEMO_MODEL = dict(in_channels=1, seg_classes=4, num_classes=3, img_size=64, channels=(16, 32, 64, 128),
                  num_heads=(1, 1, 2, 4), resnet_blocks=(1, 1, 1, 1), depths=(2, 2, 2, 2), dfe_dilations=(2, 4, 6),
                  drop_path_rate=0.0)


def metrics_table(metrics: dict, names=("cyst", "nodule", "plaque")) -> str:
    rows = ["| | " + " | ".join(names) + " | mean |", "|---|" + "---:|" * (len(names) + 1)]
    for key, label in (("dice", "Dice"), ("jaccard", "Jaccard"), ("hd95", "HD95 (px)")):
        values = [metrics.get(f"{key}_{k}", float("nan")) for k in range(1, len(names) + 1)]
        rows.append(f"| {label} | " + " | ".join(f"{v:.3f}" for v in values) + f" | {metrics[key + '_mean']:.3f} |")
    for key, label in (("auc", "AUC"), ("accuracy", "accuracy"), ("sensitivity", "sensitivity"),
                       ("specificity", "specificity")):
        values = [metrics.get(f"{key}_{n}", float("nan")) for n in names]
        rows.append(f"| {label} | " + " | ".join(f"{v:.3f}" for v in values) + f" | {metrics[key + '_macro']:.3f} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="demo-results")
    parser.add_argument("--epochs", type=int, default=14)
    parser.add_argument("--train-images", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    warnings.filterwarnings("ignore", message=".*all 0, this may result in nan/inf distance")
    out = Path(args.out)
    train = SyntheticLesions(args.train_images, 64, seed=args.seed)
    val = SyntheticLesions(100, 64, seed=args.seed + 1)
    test = SyntheticLesions(200, 64, seed=args.seed + 2)
    model = create_model("resformer_mtl", **DEMO_MODEL)
    config = TrainConfig(epochs=args.epochs, batch_size=16, lr=2e-3, seed=args.seed, val_every=max(args.epochs // 3, 1),
                         monitor="dice_mean", loss_weights={"seg": 1.0, "cls": 0.5}, overlays=6)
    print(f"ResFormerMTL ({sum(p.numel() for p in model.parameters()):,} parameters) on {len(train)} synthetic "
          f"64-px images, {args.epochs} epochs, {torch.get_num_threads()} threads, cpu backend")
    start = time.perf_counter()
    trainer = Trainer(model, train, val, out, config)
    history = trainer.fit()
    trained = time.perf_counter() - start
    metrics = trainer.evaluate(test, out_dir=out / "test")
    print(f"\ntrained in {trained / 60:.1f} min (last epoch's train loss {history[-1]['train_loss']:.4f}); "
          f"held-out test split ({len(test)} images):\n")
    print(metrics_table(metrics))
    print(f"\nmetrics: {out / 'test' / 'metrics.csv'}, per epoch: {out / 'metrics.csv'}")
    print(f"curves: {out / 'progress.png'}; overlays: {out / 'overlays'}/*.png; checkpoints: "
          f"{out / 'checkpoint_best.pth'}, {out / 'checkpoint_last.pth'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

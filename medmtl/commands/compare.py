"""`medmtl compare`: several runs side by side.

    medmtl compare runs/resformer_mtl runs/resformer_no_dfe --out comparison/

Reads each run folder's summary.json (and its eval-*/metrics.json when
`medmtl evaluate` wrote one) and writes comparison.md, comparison.csv and
comparison.png (one panel per metric, one bar per run): the validation (or
evaluation) metrics, training time and trainable parameters.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from medmtl.commands.tables import markdown

# The metrics compared when present, in this order.
METRICS = ("dice_mean", "jaccard_mean", "hd95_mean", "auc_macro", "accuracy_macro", "f1_macro", "mcc_macro",
           "psnr", "ssim", "map50", "val_loss")


def read_run(run_dir: str | Path) -> dict:
    """{"run", "train_seconds", "trainable_parameters", metric: value...} of one run folder;
    evaluation metrics (eval-*/metrics.json, the newest) win over the last validation row."""
    run_dir = Path(run_dir)
    summary_path = run_dir / "summary.json"
    if not summary_path.is_file():
        raise ValueError(f"medmtl compare: {run_dir} has no summary.json (not a finished `medmtl train` run folder)")
    try:
        summary = json.loads(summary_path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"medmtl compare: cannot read {summary_path}: {error}") from None
    row = {"run": summary.get("name") or run_dir.name, "model": summary.get("model", ""),
           "train_seconds": summary.get("train_seconds", float("nan")),
           "trainable_parameters": summary.get("trainable_parameters", float("nan"))}
    metrics = dict(summary.get("last", {}))
    evaluations = sorted(run_dir.glob("eval-*/metrics.json"), key=lambda p: p.stat().st_mtime)
    if evaluations:
        try:
            metrics.update(json.loads(evaluations[-1].read_text()))
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(f"medmtl compare: cannot read {evaluations[-1]}: {error}") from None
        row["evaluated_on"] = evaluations[-1].parent.name
    row.update({k: metrics[k] for k in METRICS if k in metrics})
    return row


def compare(run_dirs, out: str | Path, log=print) -> list[dict]:
    if not run_dirs:
        raise ValueError("medmtl compare: give at least one run folder")
    rows = [read_run(d) for d in run_dirs]
    shown = [k for k in METRICS if any(k in r for r in rows)]
    columns = ["run", "model", *shown, "train_seconds", "trainable_parameters"]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    table = markdown(columns, [[r.get(c, float("nan")) for c in columns] for r in rows])
    (out / "comparison.md").write_text(table + "\n")
    with open(out / "comparison.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    plot_comparison(rows, [*shown, "train_seconds", "trainable_parameters"], out / "comparison.png")
    log(table)
    log(f"\nwritten: {out / 'comparison.md'}, {out / 'comparison.csv'}, {out / 'comparison.png'}")
    return rows


def plot_comparison(rows: list[dict], keys: list[str], path: Path) -> Path:
    from medmtl.engine.plots import _pyplot, _save

    plt = _pyplot()
    cols = min(4, len(keys))
    nrows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.2 * cols, 2.6 * nrows), squeeze=False)
    names = [r["run"] for r in rows]
    for ax, key in zip(axes.flat, keys):
        values = [r.get(key, float("nan")) for r in rows]
        ax.bar(range(len(rows)), [v if isinstance(v, (int, float)) else float("nan") for v in values],
               color=[f"C{i}" for i in range(len(rows))])
        ax.set_title(key, fontsize=9)
        ax.set_xticks(range(len(rows)), names, rotation=30, ha="right", fontsize=7)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    return _save(fig, path)


def main(args) -> int:
    compare(args.runs, args.out)
    return 0


def add_parser(commands) -> None:
    import argparse

    p = commands.add_parser("compare", help="a table and plot of several runs' metrics, time and parameters",
                            description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--out", default="comparison", help="folder for comparison.md/.csv/.png")
    p.set_defaults(run=main)

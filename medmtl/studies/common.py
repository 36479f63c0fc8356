"""What the studies share: their data, training recipe and report files."""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

from medmtl.commands.tables import markdown
from medmtl.data import SyntheticLesions
from medmtl.engine.trainer import TrainConfig


@dataclasses.dataclass
class StudySize:
    """How big a study's runs are: images per split, epochs, image side."""

    train_images: int
    test_images: int
    epochs: int
    img_size: int = 64
    batch_size: int = 16


FULL = StudySize(train_images=400, test_images=200, epochs=8)
QUICK = StudySize(train_images=8, test_images=4, epochs=1, img_size=32, batch_size=4)


def study_data(size: StudySize, noise: str | None = None, seed: int = 0):
    """(train, held-out test) synthetic splits; the test split scores every run once, at its end."""
    return (SyntheticLesions(size.train_images, size.img_size, seed=seed, noise=noise),
            SyntheticLesions(size.test_images, size.img_size, seed=seed + 2, noise=noise))


def study_config(size: StudySize, **changes) -> TrainConfig:
    """The recipe every run of a study shares (evaluation once, after the last epoch)."""
    recipe = dict(epochs=size.epochs, batch_size=size.batch_size, lr=2e-3, val_every=size.epochs,
                  monitor="val_loss", overlays=0, progress_bar=False, loss_weights=None)
    return TrainConfig(**{**recipe, **changes})


def write_report(rows: list[dict], columns: list[tuple[str, str]], out: Path, title: str, notes: str) -> str:
    """study.md (title, the table, notes) and study.csv from rows; returns the table."""
    out.mkdir(parents=True, exist_ok=True)
    table = markdown([label for _, label in columns], [[r.get(k, float("nan")) for k, _ in columns] for r in rows])
    (out / "study.md").write_text(f"# {title}\n\n{table}\n\n{notes}\n")
    with open(out / "study.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([k for k, _ in columns])
        writer.writerows([[r.get(k, "") for k, _ in columns] for r in rows])
    return table


def plot_rows(rows: list[dict], keys: list[tuple[str, str]], path: Path, label_key: str) -> Path:
    """One bar panel per metric, one bar per row."""
    from medmtl.commands.compare import plot_comparison

    renamed = [{"run": r[label_key], **{label: r.get(k, float("nan")) for k, label in keys}} for r in rows]
    return plot_comparison(renamed, [label for _, label in keys], path)

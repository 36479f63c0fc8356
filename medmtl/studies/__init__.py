"""The papers' comparisons on synthetic data (`make demo MODEL=...`, `medmtl study NAME`).

    ums_rep     UMS-Rep: a denoising-pretrained representation fine-tuned under the
                independent / alternating / joint strategies, against one model per task
    ft_mtl_net  FT-MTL-Net: feature transfer between the task branches against parallel branches

Each writes study.md (the table), study.csv, study.png and the runs' folders.
"""

from __future__ import annotations

from pathlib import Path

STUDIES = ("ums_rep", "ft_mtl_net")


def run_study(name: str, out: str | Path | None = None, quick: bool = False, log=print) -> list[dict]:
    """Runs the study `name` into `out` (default demo-results/<name>); quick: a tiny
    version for tests (minutes -> seconds, numbers meaningless)."""
    if name not in STUDIES:
        raise ValueError(f"run_study: name must be one of {STUDIES}, got {name!r}")
    out = Path(out) if out is not None else Path("demo-results") / name
    if name == "ums_rep":
        from medmtl.studies.ums_rep import run
    else:
        from medmtl.studies.ft_mtl_net import run
    return run(out, quick=quick, log=log)

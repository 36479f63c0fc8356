"""Where the time of each accelerate() benchmark model goes: torch.profiler's
self CPU time per op, for the original and the converted model, one
inference call after warm-up, on the threads the benchmarks use.

    python benchmarks/profile_accelerate.py --out bench-results [--threads 2] [--models swinunetr3d,...]

Writes OUT/profile_accelerate.md (the top ops of each, with their share).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
TOP = 12


def _models():
    from benchmarks import cases_accelerate as cases

    return {
        "swinunetr3d": ("MONAI SwinUNETR 3-D, feature_size 48, one 64^3 volume", cases._swin_unetr),
        "timm_swin_t": ("timm swin_tiny_patch4_window7_224, batch 2", cases._timm_swin_t),
        "deeplabv3_224": ("torchvision deeplabv3_resnet50, batch 2, 224 px", cases._deeplab(224)),
        "deeplabv3_512": ("torchvision deeplabv3_resnet50, batch 2, 512 px", cases._deeplab(512)),
    }


def profile_table(model, x, title: str) -> list[str]:
    """Markdown lines: the TOP ops by self CPU time of one model(x) call."""
    import medmtl

    with torch.no_grad(), medmtl.backend("cpu"):
        for _ in range(2):
            model(x)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            model(x)
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    events.sort(key=lambda e: -e.self_cpu_time_total)
    lines = [f"**{title}**: {total / 1e3:.0f} ms of self CPU time", "",
             "| op | calls | self ms | share |", "|---|---:|---:|---:|"]
    for e in events[:TOP]:
        lines.append(f"| {e.key} | {e.count} | {e.self_cpu_time_total / 1e3:.1f} | "
                     f"{100 * e.self_cpu_time_total / total:.1f}% |")
    return lines + [""]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench-results")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models", default=None, help="comma-separated subset of the model names")
    args = parser.parse_args()
    import medmtl

    torch.set_num_threads(args.threads)
    models = _models()
    names = args.models.split(",") if args.models else list(models)
    lines = ["# Where the time goes: accelerate() models, inference", "",
             f"torch.profiler self CPU time per op, one call after two warm-up calls, {args.threads} threads.", ""]
    for name in names:
        description, build = models[name]
        model, shape = build()
        model.eval()
        x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
        lines += [f"## {name}: {description}", ""]
        lines += profile_table(model, x, "original")
        lines += profile_table(medmtl.accelerate(model), x, "converted (medmtl cpu)")
        print("\n".join(lines[-2 * (TOP + 5):]), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "profile_accelerate.md").write_text("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())

"""`make gpu-check`: everything that needs a CUDA GPU, in one command, one report.

    python .ci/gpu_check.py [--out gpu-check-results] [--budget-s 470]

For a machine with a CUDA GPU (no network; PyTorch, Triton and nvcc already
installed, in whatever versions): builds medmtl._C with its CUDA kernels in
place (MEDMTL_BUILD_CUDA=1, all cores), prints medmtl info, runs every GPU test
(pytest --medmtl-backend GPU: the CUDA kernels and the compiled Triton kernels
against the reference, every dtype, forward and backward; tests/test_gpu_backends.py
among them) and a short benchmark of cuda vs triton vs reference vs
torch.compile(reference) for every op's cases (benchmarks/gpu_bench.py). Each
step runs under a share of one overall budget (default 470 s, inside 8
minutes); the report (OUT/report.md) lists every step with its status, time
and output tail, and the last line printed says which steps failed.

Without a GPU it says so, skips the build, the GPU tests and the benchmark,
lists the GPU tests it would run, and exits 0.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


class Report:
    def __init__(self, out: Path, budget_s: float):
        self.out, self.start, self.budget = out, time.monotonic(), budget_s
        self.steps: list[tuple[str, str, float, str]] = []  # name, status, seconds, output tail

    def left(self) -> float:
        return self.budget - (time.monotonic() - self.start)

    def run(self, name: str, command: list[str], limit_s: float, env: dict | None = None) -> bool:
        limit = max(10.0, min(limit_s, self.left()))
        print(f"== gpu-check: {name} (limit {limit:.0f} s): {' '.join(command)}", flush=True)
        t0 = time.monotonic()
        log = self.out / (re.sub(r"\W+", "-", name).strip("-") + ".log")
        try:
            with log.open("w") as f:
                done = subprocess.run(command, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=f,
                                      stderr=subprocess.STDOUT, timeout=limit)
            status = "passed" if done.returncode == 0 else f"FAILED (exit {done.returncode})"
        except subprocess.TimeoutExpired:
            status = f"FAILED (over its {limit:.0f} s)"
        except OSError as e:
            status = f"FAILED ({e})"
        text = log.read_text(errors="replace") if log.exists() else ""
        print(text[-3000:], flush=True)
        self.add(name, status, time.monotonic() - t0, text[-6000:])
        return status == "passed"

    def add(self, name: str, status: str, seconds: float, tail: str = "") -> None:
        self.steps.append((name, status, seconds, tail))
        print(f"== gpu-check: {name}: {status} ({seconds:.0f} s)", flush=True)

    def write(self) -> list[str]:
        failed = [name for name, status, _, _ in self.steps if status.startswith("FAILED")]
        lines = ["# medmtl gpu-check", "", f"total {time.monotonic() - self.start:.0f} s; "
                 + ("failed: " + ", ".join(failed) if failed else "no step failed"), "",
                 "| step | status | seconds |", "|---|---|---|"]
        lines += [f"| {name} | {status} | {seconds:.0f} |" for name, status, seconds, _ in self.steps]
        for name, status, _, tail in self.steps:
            if tail:
                lines += ["", f"## {name}: {status}", "", "```", tail.rstrip(), "```"]
        bench = self.out / "gpu_bench.md"
        if bench.exists():
            lines += ["", bench.read_text()]
        (self.out / "report.md").write_text("\n".join(lines) + "\n")
        return failed


def environment() -> str:
    import torch

    parts = [f"python {sys.version.split()[0]}", f"torch {torch.__version__} (CUDA {torch.version.cuda})"]
    try:
        import triton

        parts.append(f"triton {triton.__version__}")
    except ImportError:
        parts.append("triton: not installed")
    nvcc = shutil.which("nvcc") or (os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc")
                                    if os.environ.get("CUDA_HOME") else None)
    parts.append(f"nvcc: {nvcc or 'not found'}")
    if torch.cuda.is_available():
        cc = torch.cuda.get_device_capability()
        parts.append(f"GPU: {torch.cuda.get_device_name()} (sm_{cc[0]}{cc[1]})")
    else:
        parts.append("GPU: none")
    parts.append(f"{os.cpu_count()} CPUs")
    return "; ".join(parts)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="gpu-check-results")
    parser.add_argument("--budget-s", type=float, default=470.0, help="all steps together (8 min = 480 s)")
    args = parser.parse_args()
    out = (ROOT / args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    report = Report(out, args.budget_s)
    import torch

    env_line = environment()
    report.add("environment", "passed", 0.0, env_line)
    python = sys.executable
    gpu_tests = [python, "-m", "pytest", "tests", "-q", "-p", "no:cacheprovider", "--medmtl-backend", "GPU", "-rfE"]
    if not torch.cuda.is_available():
        print("gpu-check: no GPU (torch.cuda.is_available() is False): skipping the CUDA build, the GPU tests "
              "and the GPU benchmark; listing the GPU tests instead", flush=True)
        for step in ("build", "gpu tests", "gpu bench"):
            report.add(step, "skipped: no GPU", 0.0)
        report.run("gpu tests (list only)", gpu_tests + ["--collect-only"], 120)
        failed = report.write()
        print(f"gpu-check: no GPU here; report in {out / 'report.md'}"
              + (f"; FAILED: {', '.join(failed)}" if failed else ""))
        return 1 if failed else 0
    # The kernels package lives in kernels/ (installed as medmtl.kernels): an
    # in-place build sees it through a link when medmtl is not pip-installed.
    link = ROOT / "medmtl" / "kernels"
    if not link.exists():
        link.symlink_to(Path("..") / "kernels")
    jobs = str(os.cpu_count() or 4)
    built = report.run("build", [python, "setup.py", "build_ext", "--inplace"], 230,
                       env={"MEDMTL_BUILD_CUDA": "1", "MAX_JOBS": jobs})
    if built:
        report.run("info", [python, "-m", "medmtl", "info"], 60)
        report.run("gpu tests", gpu_tests, 160)
        report.run("gpu bench", [python, "benchmarks/gpu_bench.py", "--out", str(out),
                                 "--budget-s", str(max(30.0, report.left() - 15))], report.left())
    else:
        report.add("gpu tests", "skipped: the build failed", 0.0)
        report.add("gpu bench", "skipped: the build failed", 0.0)
    failed = report.write()
    print(f"gpu-check: report in {out / 'report.md'}; "
          + (f"FAILED at: {', '.join(failed)}" if failed else "every step passed"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""Runs the benchmark suite and writes the report: `make bench`.

    python benchmarks/run.py --out bench-results [--quick]

Writes OUT/raw.json (every timed call of every provider), OUT/report.md,
OUT/results.csv and OUT/report.png.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench-results", help="folder for the report")
    parser.add_argument("--quick", action="store_true", help="few rounds, for a first look")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads for every provider")
    parser.add_argument("-k", default=None, help="pytest -k expression selecting cases")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "MEDMTL_BENCH_THREADS": str(args.threads), "OMP_NUM_THREADS": str(args.threads),
           "MEDMTL_BENCH_JSON": str((out / "raw.json").resolve())}
    if args.quick:
        env["MEDMTL_BENCH_ROUNDS"] = "5"
    command = [sys.executable, "-m", "pytest", "benchmarks/test_bench_ops.py", "-q", "-p", "no:cacheprovider"]
    if args.k:
        command += ["-k", args.k]
    done = subprocess.run(command, cwd=ROOT, env=env)
    if done.returncode != 0:
        return done.returncode
    from benchmarks.report import write_report

    sys.path.insert(0, str(ROOT))
    print(write_report(out / "raw.json", out))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())

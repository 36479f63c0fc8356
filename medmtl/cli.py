"""The `medmtl` command.

    medmtl train --config configs/resformer_mtl.yaml [section.key=value ...]   (or --resume RUN_DIR)
    medmtl evaluate --checkpoint CKPT [--data ROOT|synthetic] [--split test]
    medmtl predict --checkpoint CKPT --input FILE|FOLDER --output FOLDER
    medmtl compare RUN_DIR [RUN_DIR ...] [--out FOLDER]
    medmtl study ums_rep|ft_mtl_net [--out FOLDER]     (the papers' comparisons on synthetic data)
    medmtl bench [--quick] [-k EXPR]                  (from a source checkout)
    medmtl info [--kernels]

Several processes: torchrun --nproc-per-node N -m medmtl train --config ...
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from medmtl.config import ConfigError


def _info(args) -> int:
    from medmtl.info import info, kernels_info

    print(info())
    if args.kernels:
        print()
        print(kernels_info(tuple(args.arch or (80, 90))))
    return 0


def _bench(args) -> int:
    root = Path(__file__).resolve().parent.parent
    script = root / "benchmarks" / "run.py"
    if not script.is_file():
        print("medmtl bench: the benchmark suite lives in the source checkout (benchmarks/run.py), which this "
              "installation does not have; clone the repository and run `make bench`", file=sys.stderr)
        return 2
    command = [sys.executable, str(script), "--out", args.out, "--threads", str(args.threads)]
    command += ["--quick"] if args.quick else []
    command += ["-k", args.k] if args.k else []
    return subprocess.run(command, cwd=root).returncode


def _study(args) -> int:
    from medmtl.studies import run_study

    run_study(args.name, args.out, quick=args.quick)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from medmtl.commands import compare, evaluate, predict, train

    parser = argparse.ArgumentParser(prog="medmtl", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    for module in (train, evaluate, predict, compare):
        module.add_parser(commands)

    study = commands.add_parser("study", help="a paper's comparison on synthetic data (tables, plots)")
    study.add_argument("name", choices=("ums_rep", "ft_mtl_net"))
    study.add_argument("--out", default=None, help="output folder (default demo-results/<name>)")
    study.add_argument("--quick", action="store_true", help="a tiny version (seconds; numbers meaningless)")
    study.set_defaults(run=_study)

    bench = commands.add_parser("bench", help="time every backend of every op (the source checkout's suite)")
    bench.add_argument("--out", default="bench-results")
    bench.add_argument("--quick", action="store_true")
    bench.add_argument("--threads", type=int, default=2)
    bench.add_argument("-k", default=None, help="pytest -k expression selecting cases")
    bench.set_defaults(run=_bench)

    info = commands.add_parser("info", help="print what was built and which backends each op has")
    info.add_argument("--kernels", action="store_true",
                      help="also list each GPU kernel's registers, shared memory and spills per arch "
                           "(compiles every Triton configuration ahead of time: minutes, no GPU needed)")
    info.add_argument("--arch", type=int, action="append", choices=(80, 90),
                      help="with --kernels: only this arch (repeatable; default 80 and 90)")
    info.set_defaults(run=_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ConfigError, ValueError, FileNotFoundError) as error:
        if os.environ.get("MEDMTL_TRACEBACK"):
            raise
        print(f"medmtl {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

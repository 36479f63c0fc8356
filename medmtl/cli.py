"""The `medmtl` command: `medmtl info [--kernels]` (more subcommands come with training)."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="medmtl", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    info_parser = commands.add_parser("info", help="print what was built and which backends each op has")
    info_parser.add_argument("--kernels", action="store_true",
                             help="also list each GPU kernel's registers, shared memory and spills per arch "
                                  "(compiles every Triton configuration ahead of time: minutes, no GPU needed)")
    info_parser.add_argument("--arch", type=int, action="append", choices=(80, 90),
                             help="with --kernels: only this arch (repeatable; default 80 and 90)")
    args = parser.parse_args(argv)
    if args.command == "info":
        from medmtl.info import info, kernels_info

        print(info())
        if args.kernels:
            print()
            print(kernels_info(tuple(args.arch or (80, 90))))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The `medmtl` command: `medmtl info` (more subcommands come with training)."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="medmtl", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="print what was built and which backends each op has")
    args = parser.parse_args(argv)
    if args.command == "info":
        from medmtl.info import info

        print(info())
    return 0


if __name__ == "__main__":
    sys.exit(main())

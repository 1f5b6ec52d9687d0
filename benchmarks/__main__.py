"""``python -m benchmarks <command>``: the one entry point of the benchmarks."""

from __future__ import annotations

import argparse
import logging
import sys

from . import ab, context_parallel, features, model, profiling, run, sweep

COMMAND_MODULES = (run, features, model, profiling, context_parallel, ab, sweep)


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(
        prog="python -m benchmarks", description="Reproducible speed comparisons of varlen_compile. Run on a GPU "
        "from the repository root (`sweep --regs` also without one); result tables go to --out ($OUT when set, "
        "else benchmarks/results). Each command's --help says what it measures.")
    commands = root.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMAND_MODULES:
        module.register(commands)
    return root


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log = logging.getLogger("benchmarks")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())

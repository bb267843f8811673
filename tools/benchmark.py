#!/usr/bin/env python3
"""One entry point for every benchmark: ``python tools/benchmark.py {losses,data,train,eval,comm,checkpoint,all} [args]``.

Each subcommand runs ``benchmarks.<name>.main(args)`` (the ``benchmarks/`` folder beside the
package), which measures the compared variants side by side in one run, prints their ratios
and, with ``--json PATH``, writes them.
``all`` runs each benchmark with its defaults, one after the other.
"""
from __future__ import annotations

import importlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's benchmarks/

BENCHMARKS = ("losses", "data", "train", "eval", "comm", "checkpoint")


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in BENCHMARKS + ("all",):
        print(__doc__.strip())
        print("\nbenchmarks: " + ", ".join(BENCHMARKS) + "  (add --help after a name for its options)")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    names = BENCHMARKS if argv[0] == "all" else (argv[0],)
    for name in names:
        importlib.import_module(f"benchmarks.{name}").main(argv[1:] if len(names) == 1 else [])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

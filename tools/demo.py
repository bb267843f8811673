#!/usr/bin/env python3
"""The end-to-end demo on synthetic faces (``make demo``, ``fr-distill demo``): data, teacher,
four students under torchrun (none, ILED, RPSD, unified), evaluation with 95 % intervals,
``study.md``."""
from __future__ import annotations

import sys

from fr_distill.commands.demo import demo_main

if __name__ == "__main__":
    sys.exit(demo_main(sys.argv[1:]))

#!/usr/bin/env python3
"""``fr-distill study``: objectives compared over variants x seeds with uncertainty.

    python tools/study.py configs/study/study.yaml --out study_out
"""
from __future__ import annotations

import sys

from fr_distill.commands.study import study_main

if __name__ == "__main__":
    sys.exit(study_main(sys.argv[1:]))

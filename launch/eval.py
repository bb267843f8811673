"""Evaluate a face model on verification `.bin` sets (METHOD V1), IJB-B/IJB-C (V2, V3) and
TinyFace (V4).

``torchrun --nproc_per_node N launch/eval.py --model M [--arch iresnet100] --bin a.bin b.bin
--ijb DIR --ijb-name IJBC --tinyface DIR --out OUT [--batch-size 128]`` — images are sharded
over the N ranks; ``--folder DIR [--pairs pairs.txt]`` scores a folder of aligned faces as a
`.bin` set (:mod:`fr_distill.eval.folder`); results go to the console, ``OUT/results.json``
and ``OUT/roc_<name>.png``. Feature shards are cached under ``OUT/features`` so an interrupted
run resumes. Exit status 2 with a one-line message for bad input.
"""
from __future__ import annotations

import sys

from fr_distill.commands.eval import eval_main as main

if __name__ == "__main__":
    sys.exit(main())

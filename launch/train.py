"""Train a student by distillation:

    torchrun --nproc_per_node N launch/train.py --config X.yaml [key=value ...]
    python launch/train.py --config X.yaml --dry-run      # validate and print the plan

Exit status: 0 completed, 75 (``REQUEUE_EXIT_CODE``) stopped on SIGTERM/SIGUSR1 after a
checkpoint, 2 configuration/data error, 1 failed run. See ``fr_distill.commands.train``.
"""
from __future__ import annotations

import sys

from fr_distill.commands.train import train_main

if __name__ == "__main__":
    sys.exit(train_main())

"""Train a student by distillation: ``torchrun --nproc_per_node N launch/train.py --config X.yaml
[key=value ...]`` (one process per GPU; gloo on CPUs). ``--dry-run`` validates the config and
the data and prints the plan without training.

Exit status: 0 when training completed, ``fr_distill.engine.REQUEUE_EXIT_CODE`` (75) when it
stopped on SIGTERM/SIGUSR1 after writing a checkpoint, 2 for a configuration or data error,
1 for a failed run (the message is one line).
"""
from __future__ import annotations

import argparse
import sys

from fr_distill.config import ConfigError, load_config
from fr_distill.data import DataError
from fr_distill.engine import REQUEUE_EXIT_CODE, TrainingError
from fr_distill.engine.checkpoint import CheckpointError
from fr_distill.losses import ObjectiveInputError
from fr_distill.models import ModelLoadError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Distill a frozen face-recognition teacher into a student "
                    "(run under torchrun; one process per GPU).")
    parser.add_argument("--config", required=True, help="YAML config (see configs/)")
    parser.add_argument("--dry-run", action="store_true",
                        help="validate config and data, print the plan, do not train")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted config overrides, e.g. loss.rpsd.weight=20")
    args = parser.parse_intermixed_args(argv)
    from fr_distill.engine import dry_run, train  # after --help: the trainer imports torch models

    try:
        cfg = load_config(args.config, args.overrides)
        if args.dry_run:
            print(dry_run(cfg))
            return 0
        result = train(cfg)
    except (ConfigError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (TrainingError, CheckpointError, ModelLoadError, ObjectiveInputError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return REQUEUE_EXIT_CODE if result.status == "preempted" else 0


if __name__ == "__main__":
    sys.exit(main())

"""Command line of training: ``launch/train.py`` and ``fr-distill train``.

``--config X.yaml [key=value ...]`` trains under torchrun's environment (one process per GPU;
gloo on CPUs); ``--dry-run`` validates the config, the input paths and the data (fast
pre-flight) and prints the plan without building models.

Exit status: 0 when training completed, :data:`~fr_distill.engine.faults.REQUEUE_EXIT_CODE`
(75) when it stopped on SIGTERM/SIGUSR1 after writing a checkpoint, 2 for a configuration or
data error, 1 for a failed run; errors are printed as one line.
"""
from __future__ import annotations

from fr_distill.commands import config_parser
from fr_distill.config import load_config
from fr_distill.engine.faults import REQUEUE_EXIT_CODE
from fr_distill.errors import FrDistillError, exit_with


def train_main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Parse ``argv`` and train (or describe the plan); returns the exit status."""
    parser = config_parser(
        prog, "Distill a frozen face-recognition teacher into a student (run under torchrun; "
              "one process per GPU).", "YAML config (see configs/)", "loss.rpsd.weight=20")
    parser.add_argument("--dry-run", action="store_true",
                        help="validate config and data, print the plan, do not train")
    args = parser.parse_intermixed_args(argv)
    # Imported after parsing, so that --help answers without loading the models.
    from fr_distill.engine.preflight import dry_run
    from fr_distill.engine.trainer import train

    try:
        cfg = load_config(args.config, args.overrides)
        if args.dry_run:
            print(dry_run(cfg))
            return 0
        result = train(cfg)
    except FrDistillError as err:  # bad input: 2; a run that cannot go on: 1
        return exit_with(err)
    return REQUEUE_EXIT_CODE if result.status == "preempted" else 0

"""``fr-distill cache-teacher``: the teacher's embedding of every training sample, unflipped
and flipped, into ``teacher.cache`` (:mod:`fr_distill.teacher_cache.build`; run under
torchrun like training)."""
from __future__ import annotations

from fr_distill.commands import config_parser
from fr_distill.config import load_config
from fr_distill.errors import FrDistillError, exit_with
from fr_distill.engine.cache_teacher import build_cache
from fr_distill.teacher_cache.build import DEFAULT_SHARD_SAMPLES


def cache_teacher_main(argv: list[str] | None = None) -> int:
    """``fr-distill cache-teacher --config C [--shard-samples N] [--force] [key=value ...]``."""
    parser = config_parser(
        "fr-distill cache-teacher",
        "Compute the teacher's embedding of every training sample, unflipped and flipped, into "
        "teacher.cache (run under torchrun like training).",
        "the training config (YAML)", "teacher.cache=/data/cache")
    parser.add_argument("--shard-samples", type=int, default=DEFAULT_SHARD_SAMPLES,
                        help="samples per checksummed shard, the unit of resumption "
                             f"(default {DEFAULT_SHARD_SAMPLES})")
    parser.add_argument("--force", action="store_true",
                        help="discard what teacher.cache holds and build it from scratch")
    args = parser.parse_intermixed_args(argv)
    try:
        build_cache(load_config(args.config, args.overrides), args.shard_samples, args.force)
    except FrDistillError as err:
        return exit_with(err)
    return 0

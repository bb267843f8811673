"""The ``fr-distill`` command: configuration utilities and the entry points of the launchers.

``fr-distill config validate FILE [key=value ...]``  check a config (types, ranges, input paths)
``fr-distill config show FILE [key=value ...]``      print the resolved config as YAML
``fr-distill config reference``                       the table of every key (README section)
``fr-distill train ...`` / ``fr-distill eval ...``    the same as ``launch/train.py`` / ``launch/eval.py``
``fr-distill cache-teacher --config C [...]``          the teacher's embeddings of the training set (torchrun)
``fr-distill study SPEC [--out DIR] [--dry-run]``     variants x seeds with uncertainty (docs/STUDY.md)
``fr-distill demo [--quick] [--out DIR]``             the end-to-end demo on synthetic faces (make demo)
``fr-distill export --checkpoint C --out DIR [...]``   verified deployment files (ONNX, TorchScript) and a report
"""
from __future__ import annotations

import argparse
import sys

import yaml

from fr_distill.errors import FrDistillError, exit_with

from fr_distill.config import check_paths, load_config, schema_reference, to_dict


def config_reference_markdown() -> str:
    """Markdown table of every config key with its type, default and rule."""
    lines = ["| key | type | default | allowed | meaning |", "|---|---|---|---|---|"]
    for key, type_name, default, rule, meaning in schema_reference():
        shown = "`\"\"`" if default == "" else f"`{default}`"
        lines.append(f"| `{key}` | {type_name} | {shown} | {rule} | {meaning} |")
    return "\n".join(lines)


def _config_command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="fr-distill config",
                                     description="Validate, show or document configurations.")
    parser.add_argument("action", choices=("validate", "show", "reference"))
    parser.add_argument("file", nargs="?", help="YAML config file")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. loss.rpsd.weight=20")
    args = parser.parse_args(argv)
    if args.action == "reference":
        print(config_reference_markdown())
        return 0
    if args.file is None:
        parser.error(f"'{args.action}' needs a config FILE")
    try:
        cfg = load_config(args.file, args.overrides)
        if args.action == "validate":
            check_paths(cfg)
    except FrDistillError as err:
        return exit_with(err)
    if args.action == "show":
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
    else:
        print(f"{args.file}: OK")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    from fr_distill.engine.entry import train_main
    from fr_distill.demo import demo_main
    from fr_distill.deploy import export_main
    from fr_distill.eval.runner import eval_main
    from fr_distill.study import study_main
    from fr_distill.teacher_cache.build import cache_teacher_main

    commands = {"config": _config_command, "train": train_main, "eval": eval_main,
                "study": study_main, "demo": demo_main, "cache-teacher": cache_teacher_main,
                "export": export_main}
    if not argv or argv[0] not in commands:
        print(__doc__.strip())
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    return commands[argv[0]](argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())

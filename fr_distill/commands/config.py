"""``fr-distill config validate|show|reference``: check a config (types, ranges, input
paths), print it resolved as YAML, or print the table of every key (README section)."""
from __future__ import annotations

import argparse

import yaml

from fr_distill.config import check_paths, load_config, schema_reference, to_dict
from fr_distill.errors import FrDistillError, exit_with


def config_reference_markdown() -> str:
    """Markdown table of every config key with its type, default and rule."""
    lines = ["| key | type | default | allowed | meaning |", "|---|---|---|---|---|"]
    for key, type_name, default, rule, meaning in schema_reference():
        shown = "`\"\"`" if default == "" else f"`{default}`"
        lines.append(f"| `{key}` | {type_name} | {shown} | {rule} | {meaning} |")
    return "\n".join(lines)


def config_main(argv: list[str]) -> int:
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

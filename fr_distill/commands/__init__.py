"""The commands of ``fr-distill`` (:mod:`fr_distill.cli` dispatches to them), one module each:
parse the arguments, call the libraries below, turn their errors into an exit status. The
only modules that import fr_distill inside functions, so that ``--help`` and a mistyped
option answer without loading torch models."""
from __future__ import annotations

import argparse

def config_parser(prog: str | None, description: str, config_help: str,
                  override_example: str) -> argparse.ArgumentParser:
    """A command's parser with the two arguments every config-taking command shares:
    ``--config FILE`` and the trailing dotted ``key=value`` overrides."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", required=True, help=config_help)
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help=f"dotted config overrides, e.g. {override_example}")
    return parser

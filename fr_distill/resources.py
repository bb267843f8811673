"""Files the commands ship with: the YAML configs (the demo's and the study's specs among them).

In a source checkout they are ``configs/`` beside the package; an installed (non-editable)
package carries a copy as package data, ``fr_distill/configs`` (see ``setup.py``), so
``fr-distill demo`` and ``fr-distill study`` work without the checkout.
"""
from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def configs_dir() -> Path:
    """The shipped ``configs`` directory: the installed copy, else the checkout's."""
    for candidate in (_PACKAGE / "configs", _PACKAGE.parent / "configs"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"fr_distill: no configs directory next to {_PACKAGE} (a broken "
                            f"installation: reinstall the package)")

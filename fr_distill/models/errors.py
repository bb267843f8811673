"""The models package's exception: a one-line message naming the file, model, key or layer."""
from __future__ import annotations

from fr_distill.errors import FrDistillError


class ModelLoadError(FrDistillError, ValueError):
    """A backbone cannot be built or a weights file cannot be loaded (one-line message)."""

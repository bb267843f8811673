"""The distillation objective of METHOD §2: SphereFace2 (E1), ILED (E2), the shared memory bank
(E3), RPSD (E4), the unified weighted sum (E5) and the baseline terms (E6)."""
from __future__ import annotations

from fr_distill.losses.errors import ObjectiveInputError
from fr_distill.losses.memory_bank import MemoryBank
from fr_distill.losses.objective import Objective, ObjectiveOutput, build_objective
from fr_distill.losses.sphereface2 import SphereFace2Head

__all__ = ["build_objective", "Objective", "ObjectiveOutput", "ObjectiveInputError",
           "MemoryBank", "SphereFace2Head"]

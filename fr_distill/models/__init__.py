"""Backbones (IResNet, MobileFaceNet, timm) and frozen-teacher loading (METHOD §3)."""
from __future__ import annotations

from fr_distill.models.errors import ModelLoadError
from fr_distill.models.registry import build_student, get_backbone
from fr_distill.models.teacher import FrozenTeacher, load_frozen_model

__all__ = ["FrozenTeacher", "ModelLoadError", "build_student", "get_backbone", "load_frozen_model"]

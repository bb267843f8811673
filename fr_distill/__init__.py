"""fr_distill: distributed knowledge distillation for deep face recognition."""

__version__ = "0.1.0"

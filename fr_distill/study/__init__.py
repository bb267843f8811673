"""``fr-distill study``: the distillation objectives compared on one teacher and one data set,
variants × seeds, every run through the real trainer, with uncertainty (METHOD S1).

:mod:`~fr_distill.study.spec` reads and checks the spec, :mod:`~fr_distill.study.runner`
trains and evaluates (reusing and resuming), :mod:`~fr_distill.study.stats` computes the
intervals and :mod:`~fr_distill.study.report` writes ``study.md``/``study.json``/figures.
"""
from fr_distill.study.spec import StudyError, StudySpec, load_spec

__all__ = ["StudyError", "StudySpec", "load_spec"]

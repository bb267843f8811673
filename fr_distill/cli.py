"""The ``fr-distill`` command: dispatch to the command modules of :mod:`fr_distill.commands`.

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

import importlib
import sys

#: command -> (module, function) of :mod:`fr_distill.commands`
COMMANDS = {"config": ("fr_distill.commands.config", "config_main"),
            "train": ("fr_distill.commands.train", "train_main"),
            "eval": ("fr_distill.commands.eval", "eval_main"),
            "study": ("fr_distill.commands.study", "study_main"),
            "demo": ("fr_distill.commands.demo", "demo_main"),
            "cache-teacher": ("fr_distill.commands.cache_teacher", "cache_teacher_main"),
            "export": ("fr_distill.commands.export", "export_main")}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(__doc__.strip())
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    module, function = COMMANDS[argv[0]]
    # Only the command run is imported: the others' libraries (torch models, DALI) are not.
    return getattr(importlib.import_module(module), function)(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())

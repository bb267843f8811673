"""The commands of ``fr-distill`` (:mod:`fr_distill.cli` dispatches to them), one module each:
parse the arguments, call the libraries below, turn their errors into an exit status. The
only modules that import fr_distill inside functions, so that ``--help`` and a mistyped
option answer without loading torch models."""

"""Print the requirements fr_distill declares that an NGC PyTorch image must add (one a line).

Used by docker/Dockerfile after ``pip install --no-deps -e .``: reads the installed package's
metadata (``install_requires`` and the extras named below), leaves out what the image
provides — torch, torchvision (NVIDIA's builds, never to be replaced) and DALI (installed to
match the image's CUDA) — and drops the extra markers.
"""
from __future__ import annotations

import sys
from importlib.metadata import requires

from packaging.requirements import Requirement

EXTRAS = ("onnx", "timm", "eval", "dev")
FROM_IMAGE = ("torch", "torchvision", "nvidia-dali")


def image_requirements(declared: list[str], extras: tuple[str, ...] = EXTRAS) -> list[str]:
    """The entries of ``declared`` (metadata strings) to install on top of the image."""
    out: list[str] = []
    for text in declared:
        req = Requirement(text)
        name = req.name.lower()
        if name in FROM_IMAGE or name.startswith("nvidia-dali"):
            continue
        if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in extras):
            req.marker = None
            if str(req) not in out:
                out.append(str(req))
    return out


if __name__ == "__main__":
    print("\n".join(image_requirements(requires(sys.argv[1] if len(sys.argv) > 1 else "fr_distill") or [])))

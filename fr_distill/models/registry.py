"""Backbone registry: one name → one constructor, with the same arguments for every family.

Names: ``iresnet18|34|50|100|200`` (InsightFace layout), ``mobilefacenet`` and
``timm:<model_name>``. Common keyword arguments: ``width`` (channel multiplier, 1.0 = the
published layout), ``dropout`` (before the embedding FC) and ``fp16`` (the body opens a
float16 autocast region; the embedding head is float32 regardless). Every model maps
[B,3,112,112] images normalized as ``(x/255 - 0.5)/0.5`` to [B,D] float32 embeddings.
"""
from __future__ import annotations

from torch import nn

from fr_distill.backbones import TIMM_PREFIX, backbone_names, is_backbone_name
from fr_distill.models.errors import ModelLoadError
from fr_distill.models.iresnet import iresnet
from fr_distill.models.mobilefacenet import MobileFaceNet
from fr_distill.models.timm_backbone import TimmBackbone

IRESNET_OPTIONS = {"width", "dropout", "fp16", "zero_init_residual"}
MOBILEFACENET_OPTIONS = {"width", "dropout", "fp16"}


def _check_options(name: str, kwargs: dict, allowed: set[str]) -> None:
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise ModelLoadError(f"backbone {name!r} takes no option(s) {', '.join(unknown)}; "
                             f"valid: {', '.join(sorted(allowed))}")


def get_backbone(name: str, embedding_dim: int = 512, **kwargs) -> nn.Module:
    """Build the backbone ``name`` producing ``embedding_dim``-dimensional embeddings.

    Raises :class:`ModelLoadError` (one line) for an unknown name, an option the family does
    not take, or an out-of-range ``embedding_dim``/``width``/``dropout``.
    """
    if embedding_dim <= 0:
        raise ModelLoadError(f"backbone {name!r}: embedding_dim must be > 0, got {embedding_dim}")
    if kwargs.get("width", 1.0) <= 0:
        raise ModelLoadError(f"backbone {name!r}: width must be > 0, got {kwargs['width']}")
    if not 0.0 <= kwargs.get("dropout", 0.0) < 1.0:
        raise ModelLoadError(f"backbone {name!r}: dropout must be in [0, 1), "
                             f"got {kwargs['dropout']}")
    if name.startswith(TIMM_PREFIX):
        if kwargs.pop("width", 1.0) != 1.0:
            raise ModelLoadError(f"backbone {name!r}: timm models take no width multiplier "
                                 "(choose a smaller timm model instead)")
        return TimmBackbone(name[len(TIMM_PREFIX):], embedding_dim, **kwargs)
    if is_backbone_name(name) and name.startswith("iresnet"):
        _check_options(name, kwargs, IRESNET_OPTIONS)
        return iresnet(int(name[len("iresnet"):]), embedding_dim, **kwargs)
    if name == "mobilefacenet":
        _check_options(name, kwargs, MOBILEFACENET_OPTIONS)
        if kwargs.pop("dropout", 0.0) != 0.0:
            raise ModelLoadError("backbone 'mobilefacenet' has no dropout (set dropout to 0)")
        return MobileFaceNet(embedding_dim, **kwargs)
    raise ModelLoadError(f"unknown backbone {name!r}; valid: {', '.join(backbone_names())}")


def build_student(name: str, embedding_dim: int, width: float = 1.0,
                  dropout: float = 0.0) -> nn.Module:
    """The student backbone of the ``model`` config keys of these names; channels_last, compile
    and the projector are applied by the trainer."""
    options = {"width": width}
    if dropout:
        options["dropout"] = dropout
    return get_backbone(name, embedding_dim, **options)

"""The names of the backbones the model registry builds, as plain data.

Kept below both the config (whose ``model.name`` and ``teacher.name`` rules check a name) and
the models package (which builds one), so that checking a config needs no model code.
"""
from __future__ import annotations

#: IResNet depth -> blocks per stage (the InsightFace layouts).
IRESNET_LAYERS: dict[int, tuple[int, int, int, int]] = {
    18: (2, 2, 2, 2),
    34: (3, 4, 6, 3),
    50: (3, 4, 14, 3),
    100: (3, 13, 30, 3),
    200: (6, 26, 60, 6),
}
TIMM_PREFIX = "timm:"


def backbone_names() -> list[str]:
    """The names the registry accepts (``timm:<model_name>`` stands for any timm model)."""
    return [f"iresnet{depth}" for depth in IRESNET_LAYERS] + ["mobilefacenet",
                                                               f"{TIMM_PREFIX}<model_name>"]


def is_backbone_name(name: str) -> bool:
    """Whether the registry knows ``name`` (a ``timm:`` name is checked when built)."""
    if name.startswith(TIMM_PREFIX):
        return len(name) > len(TIMM_PREFIX)
    depth = name.removeprefix("iresnet")
    return name == "mobilefacenet" or (name.startswith("iresnet") and depth.isdigit()
                                       and int(depth) in IRESNET_LAYERS)

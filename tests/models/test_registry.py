"""The backbone registry: a student from its config keys, and one-line errors for unknown
names and bad options."""
from __future__ import annotations

import pytest

from fr_distill.models import ModelLoadError, build_student, get_backbone


def test_build_student_from_its_config_keys():
    model = build_student("iresnet18", embedding_dim=64, width=0.25, dropout=0.2)
    assert model.fc.out_features == 64 and model.conv1.weight.shape[0] == 16
    assert model.dropout.p == 0.2
    assert build_student("mobilefacenet", embedding_dim=32, width=0.25) \
        .features.layers[2].out_features == 32


@pytest.mark.parametrize("name, kwargs, fragment", [
    ("resnet18", {}, "unknown backbone 'resnet18'; valid: iresnet18, iresnet34, iresnet50, "
                     "iresnet100, iresnet200, mobilefacenet, timm:<model_name>"),
    ("iresnet101", {}, "unknown backbone 'iresnet101'"),
    ("iresnet18", {"widht": 0.5}, "takes no option(s) widht; valid: dropout, fp16, width"),
    ("iresnet18", {"width": 0}, "width must be > 0, got 0"),
    ("mobilefacenet", {"dropout": 0.2}, "'mobilefacenet' has no dropout"),
    ("timm:no_such_model_xyz", {}, "unknown timm model 'no_such_model_xyz'"),
    ("timm:test_resnet", {"width": 0.5}, "timm models take no width multiplier"),
])
def test_backbone_errors_are_one_line(name, kwargs, fragment):
    with pytest.raises(ModelLoadError) as info:
        get_backbone(name, 64, **kwargs)
    assert fragment in str(info.value) and "\n" not in str(info.value)

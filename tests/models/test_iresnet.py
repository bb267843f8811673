"""IResNet: parameter counts, shapes, InsightFace state-dict layout and forward semantics,
initialization, the float32 head under autocast, width multiplier and dropout."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fr_distill.models import get_backbone
from .conftest import images, on_meta

LAYERS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 14, 3), 100: (3, 13, 30, 3),
          200: (6, 26, 60, 6)}
CHANNELS = (64, 128, 256, 512)
BN_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def bn_shapes(prefix: str, c: int) -> dict[str, tuple]:
    return {f"{prefix}.{k}": (() if k == "num_batches_tracked" else (c,)) for k in BN_KEYS}


def insightface_iresnet_layout(layers: tuple[int, ...], dim: int) -> dict[str, tuple]:
    """Key → shape of arcface_torch's iresnet state dict, written out from its definition."""
    shapes = {"conv1.weight": (64, 3, 3, 3), **bn_shapes("bn1", 64), "prelu.weight": (64,)}
    c_in = 64
    for stage, (blocks, c) in enumerate(zip(layers, CHANNELS), start=1):
        for b in range(blocks):
            p = f"layer{stage}.{b}"
            shapes.update(bn_shapes(f"{p}.bn1", c_in))
            shapes[f"{p}.conv1.weight"] = (c, c_in, 3, 3)
            shapes.update(bn_shapes(f"{p}.bn2", c))
            shapes[f"{p}.prelu.weight"] = (c,)
            shapes[f"{p}.conv2.weight"] = (c, c, 3, 3)
            shapes.update(bn_shapes(f"{p}.bn3", c))
            if b == 0:
                shapes[f"{p}.downsample.0.weight"] = (c, c_in, 1, 1)
                shapes.update(bn_shapes(f"{p}.downsample.1", c))
            c_in = c
    shapes.update(bn_shapes("bn2", 512))
    shapes.update({"fc.weight": (dim, 512 * 7 * 7), "fc.bias": (dim,)})
    shapes.update(bn_shapes("features", dim))
    return shapes


def iresnet_param_count(layers: tuple[int, ...], dim: int) -> int:
    """Parameters of IResNet by the architecture formula (BN: weight + bias; PReLU: one/channel)."""
    total = 3 * 64 * 9 + 2 * 64 + 64
    c_in = 64
    for blocks, c in zip(layers, CHANNELS):
        for b in range(blocks):
            total += 2 * c_in + c_in * c * 9 + 2 * c + c + c * c * 9 + 2 * c
            if b == 0:
                total += c_in * c + 2 * c
            c_in = c
    return total + 2 * 512 + 512 * 49 * dim + dim + 2 * dim


@pytest.mark.parametrize("depth", sorted(LAYERS))
def test_iresnet_parameter_count(depth):
    model = on_meta(f"iresnet{depth}")
    assert sum(p.numel() for p in model.parameters()) == iresnet_param_count(LAYERS[depth], 512)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == iresnet_param_count(LAYERS[depth], 512) - 512  # features.weight frozen
    assert sum(p.numel() for p in on_meta(f"iresnet{depth}", 128).parameters()) == \
        iresnet_param_count(LAYERS[depth], 128)


@pytest.mark.parametrize("depth", sorted(LAYERS))
def test_iresnet_output_and_stage_shapes(depth):
    model = get_backbone(f"iresnet{depth}", 24, width=0.125).eval()
    seen = {}
    for stage in range(1, 5):
        getattr(model, f"layer{stage}").register_forward_hook(
            lambda _m, _i, out, stage=stage: seen.__setitem__(stage, tuple(out.shape)))
    with torch.no_grad():
        out = model(images(3))
    assert out.shape == (3, 24) and out.dtype == torch.float32 and torch.isfinite(out).all()
    assert seen == {1: (3, 8, 56, 56), 2: (3, 16, 28, 28), 3: (3, 32, 14, 14), 4: (3, 64, 7, 7)}


@pytest.mark.parametrize("depth", [18, 100])
def test_iresnet_state_dict_matches_insightface_layout(depth):
    state = {k: tuple(v.shape) for k, v in on_meta(f"iresnet{depth}").state_dict().items()}
    assert state == insightface_iresnet_layout(LAYERS[depth], 512)
    # spot checks of the published names, written out literally
    assert state["conv1.weight"] == (64, 3, 3, 3)
    assert state["prelu.weight"] == (64,)
    assert state["layer1.0.bn1.running_var"] == (64,)
    assert state["layer1.0.conv1.weight"] == (64, 64, 3, 3)
    assert state["layer1.0.downsample.0.weight"] == (64, 64, 1, 1)
    assert state["layer2.0.downsample.0.weight"] == (128, 64, 1, 1)
    assert state["layer2.0.downsample.1.running_mean"] == (128,)
    assert state["layer4.1.conv2.weight"] == (512, 512, 3, 3)
    assert state["bn2.weight"] == (512,)
    assert state["fc.weight"] == (512, 25088) and state["fc.bias"] == (512,)
    assert state["features.running_var"] == (512,) and "features.num_batches_tracked" in state
    assert "layer1.1.downsample.0.weight" not in state


def test_iresnet_init_and_head_like_insightface():
    model = get_backbone("iresnet50", 64, width=0.25, zero_init_residual=True)
    assert torch.equal(model.features.weight, torch.ones(64))
    assert not model.features.weight.requires_grad
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert norms and all(m.eps == 1e-5 for m in norms)
    convs = torch.cat([m.weight.flatten() for m in model.modules() if isinstance(m, nn.Conv2d)])
    assert abs(convs.std().item() - 0.1) < 0.005 and abs(convs.mean().item()) < 0.005
    assert all(torch.count_nonzero(model.get_submodule(f"layer{s}.{b}").bn2.weight) == 0
               for s, n in zip(range(1, 5), LAYERS[50]) for b in range(n))


def reference_iresnet_forward(state: dict, layers: tuple[int, ...],
                              x: torch.Tensor) -> torch.Tensor:
    """InsightFace's eval-mode forward written with functional ops from the state dict."""
    def bn(p, t):
        return F.batch_norm(t, state[f"{p}.running_mean"], state[f"{p}.running_var"],
                            state[f"{p}.weight"], state[f"{p}.bias"], False, 0.0, 1e-5)

    x = F.prelu(bn("bn1", F.conv2d(x, state["conv1.weight"], padding=1)), state["prelu.weight"])
    for stage, blocks in enumerate(layers, start=1):
        for b in range(blocks):
            p, stride = f"layer{stage}.{b}", 2 if b == 0 else 1
            out = F.conv2d(bn(f"{p}.bn1", x), state[f"{p}.conv1.weight"], padding=1)
            out = F.prelu(bn(f"{p}.bn2", out), state[f"{p}.prelu.weight"])
            out = F.conv2d(out, state[f"{p}.conv2.weight"], stride=stride, padding=1)
            out = bn(f"{p}.bn3", out)
            if b == 0:
                x = F.conv2d(x, state[f"{p}.downsample.0.weight"], stride=2)
                x = bn(f"{p}.downsample.1", x)
            x = out + x
    x = torch.flatten(bn("bn2", x), 1)
    return bn("features", F.linear(x, state["fc.weight"], state["fc.bias"]))


def test_iresnet_forward_equals_insightface_definition():
    torch.manual_seed(0)
    model = get_backbone("iresnet18", 16, width=0.25).eval()
    with torch.no_grad():  # non-trivial BN statistics, affine parameters and PReLU slopes
        for name, tensor in model.state_dict().items():
            if name.endswith(("running_mean", "bias")):
                tensor.copy_(torch.randn_like(tensor) * 0.1)
            elif name.endswith(("running_var", "bn1.weight", "bn2.weight", "bn3.weight",
                                "downsample.1.weight")):
                tensor.uniform_(0.5, 1.5)
            elif name.endswith("prelu.weight"):
                tensor.uniform_(0.1, 0.4)
        expected = reference_iresnet_forward(model.state_dict(), LAYERS[18], images(2))
        actual = model(images(2))
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def test_float32_head_under_autocast():
    model = get_backbone("iresnet18", 32, width=0.25).eval()
    dtypes = {}
    model.layer1.register_forward_hook(lambda m, i, o: dtypes.__setitem__("body", o.dtype))
    model.fc.register_forward_hook(lambda m, i, o: dtypes.__setitem__("fc_in", i[0].dtype))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(images(2))
    assert dtypes == {"body": torch.bfloat16, "fc_in": torch.float32}
    assert out.dtype == torch.float32
    fp16_model = get_backbone("iresnet18", 32, width=0.25, fp16=True).eval()
    dtypes.clear()
    fp16_model.layer1.register_forward_hook(lambda m, i, o: dtypes.__setitem__("body", o.dtype))
    with torch.no_grad():
        assert fp16_model(images(2)).dtype == torch.float32
    assert dtypes["body"] == torch.float16


def test_width_multiplier_and_dropout():
    half = on_meta("iresnet34", 48, width=0.5)
    assert half.conv1.weight.shape == (32, 3, 3, 3)
    assert half.layer4[0].conv2.weight.shape == (256, 256, 3, 3)
    assert half.fc.weight.shape == (48, 256 * 49)
    assert on_meta("iresnet18", 8, width=0.01).conv1.weight.shape[0] == 8  # floor of 8
    model = get_backbone("iresnet18", 48, width=0.125, dropout=0.4)
    assert model.dropout.p == 0.4
    x = images(2)
    model.train()
    a, b = model(x), model(x)
    assert not torch.equal(a, b)  # dropout active in training
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))

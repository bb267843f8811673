"""Teacher loading: every accepted format reproduces the source model, ONNX by both backends,
the teacher stays bitwise frozen through student training, and bad files fail in one line."""
from __future__ import annotations

import logging

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from fr_distill.config import Config, to_dict
from fr_distill.synthetic.onnx_teachers import RawPixelsInput
from fr_distill.models import FrozenTeacher, ModelLoadError, get_backbone, load_frozen_model

DIM, WIDTH = 32, 0.25
EXPORT_BATCH = 4


def well_conditioned_iresnet(seed: int = 0) -> nn.Module:
    """A small IResNet-18 whose BatchNorm statistics come from its activations (outputs O(1)):
    random deep IResNets produce huge activations that hide numerical errors."""
    torch.manual_seed(seed)
    model = get_backbone("iresnet18", DIM, width=WIDTH)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.momentum = 1.0  # running statistics := the calibration batch's
    model.train()
    with torch.no_grad():
        model(torch.randn(12, 3, 112, 112))
    return model.eval()


def images(batch: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, 112, 112, generator=torch.Generator().manual_seed(seed))


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def fr_distill_checkpoint(model: nn.Module, name: str = "iresnet18") -> dict:
    cfg = Config()
    cfg.model.name, cfg.model.embedding_dim, cfg.model.width = name, DIM, WIDTH
    return {"format": "fr_distill", "version": 1, "step": 7, "config": to_dict(cfg),
            "student": model.state_dict(), "objective": {}, "optimizer": {}, "metrics": {}}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """The source model and its files in every format."""
    model = well_conditioned_iresnet()
    root = tmp_path_factory.mktemp("teacher")
    files = {name: str(root / name) for name in
             ("backbone.pth", "ddp.pth", "arcface_ckpt.pt", "checkpoint.pt", "script.pt",
              "default.onnx", "keep_inits.onnx", "legacy_keep_inits.onnx")}
    state = model.state_dict()
    torch.save(state, files["backbone.pth"])
    torch.save({f"module.{k}": v for k, v in state.items()}, files["ddp.pth"])
    torch.save({"epoch": 3, "state_dict_backbone": state}, files["arcface_ckpt.pt"])
    torch.save(fr_distill_checkpoint(model), files["checkpoint.pt"])
    torch.jit.save(torch.jit.trace(model, images(2)), files["script.pt"])
    example = (images(EXPORT_BATCH),)
    torch.onnx.export(model, example, files["default.onnx"])
    torch.onnx.export(model, example, files["keep_inits.onnx"], keep_initializers_as_inputs=True)
    torch.onnx.export(model, example, files["legacy_keep_inits.onnx"], dynamo=False,
                      keep_initializers_as_inputs=True)
    return model, files


@pytest.mark.parametrize("file, args", [
    ("backbone.pth", ("iresnet18", DIM, WIDTH)),
    ("ddp.pth", ("iresnet18", DIM, WIDTH)),
    ("arcface_ckpt.pt", ("iresnet18", DIM, WIDTH)),
    ("checkpoint.pt", ()),  # the architecture comes from the checkpoint's config
])
def test_weight_files_load_exactly(source, file, args):
    model, files = source
    teacher = load_frozen_model(files[file], *args)
    assert isinstance(teacher, FrozenTeacher) and teacher.backend == "torch"
    assert teacher.embedding_dim == DIM
    x = images(3)
    with torch.no_grad():
        assert torch.equal(teacher(x), model(x))


def test_torchscript_teacher(source):
    model, files = source
    teacher = load_frozen_model(files["script.pt"])
    assert teacher.backend == "torchscript" and teacher.embedding_dim == DIM
    with torch.no_grad():
        torch.testing.assert_close(teacher(images(3)), model(images(3)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("file", ["default.onnx", "keep_inits.onnx", "legacy_keep_inits.onnx"])
def test_onnx_round_trip_both_backends(source, file, caplog):
    """torch.onnx.export's default (dynamo) export, the same with keep_initializers_as_inputs
    and the legacy TorchScript exporter: onnx2torch 1.5.15 rejects each file as written (op
    versions of opset 19/20, Reshape allowzero=1); after the opset-17 / allowzero normalisation
    the conversion verifies, so ``auto`` takes the torch path. onnxruntime runs them all."""
    model, files = source
    graph_inputs = len(onnx.load(files[file]).graph.input)
    assert (graph_inputs > 1) == ("keep_inits" in file)  # weights listed as graph inputs
    x = images(EXPORT_BATCH + 1)  # not the exported (fixed) batch size: chunked and padded
    with torch.no_grad():
        expected = model(x)
    with caplog.at_level(logging.INFO, logger="fr_distill"):
        converted = load_frozen_model(files[file], onnx_backend="auto")
    assert converted.backend == "onnx2torch"
    assert "converted with onnx2torch, verified against onnxruntime" in caplog.text
    assert relative_error(converted(x), expected) <= 1e-4
    assert any(p.numel() for p in converted.parameters())  # a real torch module
    with caplog.at_level(logging.INFO, logger="fr_distill"):
        runtime = load_frozen_model(files[file], onnx_backend="onnxruntime")
    assert runtime.backend == "onnxruntime" and "running ONNX in onnxruntime" in caplog.text
    out = runtime(x)
    assert out.shape == (EXPORT_BATCH + 1, DIM) and out.dtype == torch.float32
    assert relative_error(out, expected) <= 1e-4


def shrink_embedding_onnx(path: str, weight: np.ndarray, lambd: float) -> None:
    """A dynamic-batch ONNX embedding model using Shrink, an op onnx2torch does not convert."""
    nodes = [helper.make_node("GlobalAveragePool", ["images"], ["pooled"]),
             helper.make_node("Flatten", ["pooled"], ["flat"]),
             helper.make_node("MatMul", ["flat", "weight"], ["projected"]),
             helper.make_node("Shrink", ["projected"], ["embedding"], lambd=lambd)]
    graph = helper.make_graph(
        nodes, "shrink_embedding",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, 112, 112])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", weight.shape[1]])],
        [numpy_helper.from_array(weight, "weight")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def test_onnx_falls_back_to_onnxruntime(tmp_path, caplog):
    weight = np.random.default_rng(0).normal(size=(3, DIM)).astype(np.float32) * 100
    path = str(tmp_path / "shrink.onnx")
    shrink_embedding_onnx(path, weight, lambd=0.5)
    with caplog.at_level(logging.INFO, logger="fr_distill"):
        teacher = load_frozen_model(path)
    assert teacher.backend == "onnxruntime" and teacher.embedding_dim == DIM
    assert "onnx2torch conversion not usable" in caplog.text and "Shrink" in caplog.text
    x = images(3)
    projected = x.mean(dim=(2, 3)) @ torch.from_numpy(weight)
    expected = torch.where(projected.abs() > 0.5, projected, torch.zeros_like(projected))
    assert relative_error(teacher(x), expected) <= 1e-5
    with pytest.raises(ModelLoadError,
                       match=r"onnx2torch conversion failed \(onnx_backend=torch\)"):
        load_frozen_model(path, onnx_backend="torch")


class StudentWithTeacher(nn.Module):
    """A training module holding the teacher as a submodule, as a trainer might."""

    def __init__(self, teacher: nn.Module) -> None:
        super().__init__()
        self.student = nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(48, DIM),
                                     nn.BatchNorm1d(DIM))
        self.teacher = teacher

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(self.student(x), self.teacher(x))


def test_teacher_is_bitwise_frozen_through_training(source):
    _, files = source
    teacher = load_frozen_model(files["backbone.pth"], "iresnet18", DIM, WIDTH)
    assert all(not p.requires_grad for p in teacher.parameters())
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    assert before  # parameters and BatchNorm buffers to watch
    pair = StudentWithTeacher(teacher)
    student_before = pair.student[2].weight.clone()
    optimizer = torch.optim.SGD(pair.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    for step in range(3):
        pair.train()
        optimizer.zero_grad()
        pair(images(4, seed=step)).backward()
        optimizer.step()
    assert not torch.equal(pair.student[2].weight, student_before)  # the student trained
    after = teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(m.training for m in teacher.modules())
    with pytest.raises(RuntimeError, match="frozen"):
        teacher.requires_grad_(True)


class CarriesCode:
    def __reduce__(self):
        return (print, ("this would run on load",))


def one_line_error(path: str, *args, **kwargs) -> str:
    with pytest.raises(ModelLoadError) as info:
        load_frozen_model(path, *args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_refuses_pickled_code(tmp_path):
    code = tmp_path / "code.pth"
    torch.save({"weights": CarriesCode()}, code)
    assert one_line_error(str(code)) == \
        f"refusing to unpickle code from {code}: it references print (save a state_dict instead)"
    whole_module = tmp_path / "module.pth"
    torch.save(nn.Linear(2, 2), whole_module)
    assert one_line_error(str(whole_module)).startswith(
        f"refusing to unpickle code from {whole_module}: it references torch.nn.modules.linear")


def test_wrong_architecture_lists_keys(source):
    _, files = source
    path = files["backbone.pth"]
    message = one_line_error(path, "iresnet34", DIM, WIDTH)
    assert message.startswith(f"{path} does not fit iresnet34 (width {WIDTH}, embedding_dim {DIM}):"
                              " missing keys [layer1.2.bn1.weight, layer1.2.bn1.bias,")
    assert "(+" in message
    assert "the file looks like iresnet18 (width 0.25, embedding_dim 32)" in message
    message = one_line_error(path, "iresnet18", DIM, 0.5)
    assert "shape mismatches (file vs model) [conv1.weight (16, 3, 3, 3) vs (32, 3, 3, 3)," \
        in message
    message = one_line_error(path, "iresnet18", 64, WIDTH)
    assert "fc.weight (32, 6272) vs (64, 6272)" in message
    assert "missing keys" not in message


def test_bad_files_and_arguments(tmp_path, source):
    _, files = source
    assert one_line_error(str(tmp_path / "absent.pth")) == \
        f"model file not found: {tmp_path / 'absent.pth'}"
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(open(files["backbone.pth"], "rb").read()[:500])
    assert one_line_error(str(truncated)).startswith(
        f"cannot read {truncated} (truncated or corrupt?)")
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"not a model at all" * 10)
    assert one_line_error(str(garbage)).startswith(
        f"{garbage} is neither a torch/TorchScript file nor a valid ONNX model")
    no_student = tmp_path / "no_student.pt"
    checkpoint = fr_distill_checkpoint(nn.Linear(1, 1))
    del checkpoint["student"]
    torch.save(checkpoint, no_student)
    assert one_line_error(str(no_student)) == f"fr_distill checkpoint {no_student} lacks student"
    tensors_only = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], tensors_only)
    assert "holds no state dict of tensors" in one_line_error(str(tensors_only))
    assert one_line_error(files["backbone.pth"], onnx_backend="tensorrt") == \
        "onnx_backend must be one of auto, torch, onnxruntime, got 'tensorrt'"


def test_onnx_input_convention_is_detected_and_can_be_overridden(source, tmp_path, caplog):
    """Both model-zoo input conventions give the source model's embeddings from the
    pipeline's (x - 127.5) / 127.5 images; forcing the wrong one changes them, and the log
    says which input each teacher got and why."""
    model, files = source
    raw = str(tmp_path / "raw_pixels.onnx")
    torch.onnx.export(RawPixelsInput(model).eval(), (images(EXPORT_BATCH) * 127.5 + 127.5,), raw)
    with caplog.at_level(logging.INFO, logger="fr_distill"):
        normalized = load_frozen_model(files["default.onnx"])
        raw_teacher = load_frozen_model(raw)
    assert (f"teacher {files['default.onnx']}: input (pixels - 127.5) / 127.5: no Sub and "
            f"Mul/Div before the first Conv") in caplog.text
    assert f"teacher {raw}: input (pixels - 0) / 1: the graph normalizes its input itself" \
        in caplog.text
    x = images(3)
    forced = load_frozen_model(raw, input_mean=127.5, input_std=127.5)
    with torch.no_grad():
        expected = model(x)
        assert relative_error(normalized(x), expected) < 1e-4
        assert relative_error(raw_teacher(x), expected) < 1e-4
        assert relative_error(forced(x), expected) > 0.05

"""Student export: tools/export.py turns an fr_distill checkpoint into an InsightFace-layout
backbone.pth (strict-loadable, same output) and a verified dynamic-batch backbone.onnx."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import onnxruntime as ort
import pytest
import torch
from torch import nn

from fr_distill.config import Config, to_dict
from fr_distill.models import ModelLoadError, get_backbone
from fr_distill.models.export import export_student

REPO = Path(__file__).resolve().parents[1]
DIM, WIDTH = 32, 0.25


def calibrated(name: str) -> nn.Module:
    """A small backbone whose BatchNorm running statistics come from its own activations, so
    its outputs are O(1) and a 1e-4 relative comparison is meaningful."""
    torch.manual_seed(0)
    model = get_backbone(name, DIM, width=WIDTH)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.momentum = 1.0
    model.train()
    with torch.no_grad():
        model(torch.randn(6, 3, 112, 112))
    return model.eval()


def write_checkpoint(path: Path, model: nn.Module, name: str) -> None:
    """A checkpoint in the fr_distill contract format (as engine/checkpoint.py writes it)."""
    cfg = Config()
    cfg.model.name, cfg.model.embedding_dim, cfg.model.width = name, DIM, WIDTH
    torch.save({"format": "fr_distill", "version": 1, "step": 1200, "config": to_dict(cfg),
                "student": model.state_dict(), "objective": {"head.weight": torch.zeros(4, DIM)},
                "optimizer": {"state": {}, "param_groups": []}, "scheduler": {}, "scaler": {},
                "data": {"step": 1200}, "rng": {}, "metrics": {"lfw/accuracy_mean": 0.5}}, path)


def images(batch: int) -> torch.Tensor:
    return torch.randn(batch, 3, 112, 112, generator=torch.Generator().manual_seed(3))


def test_export_tool_writes_state_dict_and_verified_onnx(tmp_path):
    model = calibrated("iresnet18")
    checkpoint = tmp_path / "step_1200.pt"
    write_checkpoint(checkpoint, model, "iresnet18")
    out = tmp_path / "export"
    proc = subprocess.run([sys.executable, "tools/export.py", "--checkpoint", str(checkpoint),
                           "--out", str(out), "--onnx"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"state_dict: {out / 'backbone.pth'}" in proc.stdout
    assert f"onnx: {out / 'backbone.onnx'}" in proc.stdout

    state = torch.load(out / "backbone.pth", map_location="cpu", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    insightface_layout = get_backbone("iresnet18", DIM, width=WIDTH)
    insightface_layout.load_state_dict(state, strict=True)
    x = images(5)
    with torch.no_grad():
        expected = model(x)
        assert torch.equal(insightface_layout.eval()(x), expected)

    session = ort.InferenceSession(str(out / "backbone.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input"]
    assert session.get_inputs()[0].shape[1:] == [3, 112, 112]
    assert not isinstance(session.get_inputs()[0].shape[0], int)  # dynamic batch axis
    actual = torch.from_numpy(session.run(["embedding"], {"input": x.numpy()})[0])
    assert ((actual - expected).abs().max() / expected.abs().max()).item() <= 1e-4


def test_export_mobilefacenet_student(tmp_path):
    model = calibrated("mobilefacenet")
    write_checkpoint(tmp_path / "ckpt.pt", model, "mobilefacenet")
    written = export_student(str(tmp_path / "ckpt.pt"), str(tmp_path / "out"))
    assert written == {"state_dict": str(tmp_path / "out" / "backbone.pth")}
    reloaded = get_backbone("mobilefacenet", DIM, width=WIDTH)
    reloaded.load_state_dict(torch.load(written["state_dict"], weights_only=True), strict=True)
    with torch.no_grad():
        assert torch.equal(reloaded.eval()(images(2)), model(images(2)))


def load_tool():
    spec = importlib.util.spec_from_file_location("export_tool", REPO / "tools" / "export.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_export_rejects_non_checkpoints(tmp_path, capsys):
    plain = tmp_path / "backbone.pth"
    torch.save(get_backbone("iresnet18", DIM, width=0.125).state_dict(), plain)
    assert load_tool().main(["--checkpoint", str(plain), "--out", str(tmp_path / "o")]) == 2  # bad input
    assert capsys.readouterr().err == (f"error: {plain} is not an fr_distill checkpoint "
                                       "(no 'format': 'fr_distill' entry)\n")
    broken = tmp_path / "broken.pt"
    write_checkpoint(broken, get_backbone("iresnet34", DIM, width=WIDTH), "iresnet18")
    with pytest.raises(ModelLoadError, match=r"does not fit checkpoint model iresnet18 .* "
                                             r"unexpected keys \[layer1\.2\.bn1\.weight"):
        export_student(str(broken), str(tmp_path / "o"))
    assert not (tmp_path / "o").exists()  # nothing written before the checkpoint is validated

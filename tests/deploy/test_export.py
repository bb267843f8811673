"""Export for deployment (``fr-distill export``): every file written, loaded back and verified
against the PyTorch model, the report's numbers, InsightFace's ONNX loader, and the failures."""
from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from fr_distill.config import Config, to_dict
from fr_distill.synthetic.build import write_verification_bin
from fr_distill.commands.export import export_main
from fr_distill.deploy import artifacts, verify
from fr_distill.eval.runner import evaluate_bin_sets
from fr_distill.models import get_backbone

DIM, WIDTH = 32, 0.25
FAST = ["--latency-batches", "1,2", "--latency-warmup", "0", "--latency-repeats", "1",
        "--threads", "1", "--batch-size", "20"]
FILES = ["backbone.pth", "backbone.onnx", "backbone_fp16.onnx", "backbone_torchscript.pt"]


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
    """A checkpoint in the fr_distill contract format (as checkpoint/files.py writes it)."""
    cfg = Config()
    cfg.model.name, cfg.model.embedding_dim, cfg.model.width = name, DIM, WIDTH
    torch.save({"format": "fr_distill", "version": 1, "step": 1200, "config": to_dict(cfg),
                "student": model.state_dict(), "objective": {"head.weight": torch.zeros(4, DIM)},
                "optimizer": {"state": {}, "param_groups": []}, "scheduler": {}, "scaler": {},
                "data": {"step": 1200}, "rng": {}, "metrics": {"lfw/accuracy_mean": 0.5}}, path)


def images(batch: int) -> torch.Tensor:
    return torch.randn(batch, 3, 112, 112, generator=torch.Generator().manual_seed(3))


def run_export(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = export_main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def student(tmp_path_factory) -> tuple[nn.Module, Path]:
    root = tmp_path_factory.mktemp("student")
    model = calibrated("iresnet18")
    write_checkpoint(root / "best.pt", model, "iresnet18")
    return model, root / "best.pt"


@pytest.fixture(scope="module")
def exported(student, tmp_path_factory) -> tuple[Path, str]:
    """Every format exported, verified on the synthetic set (no --bin): (out dir, stdout)."""
    out = tmp_path_factory.mktemp("exported")
    code, stdout, stderr = run_export(["--checkpoint", str(student[1]), "--out", str(out),
                                       "--synthetic-pairs", "20", *FAST])
    assert code == 0, stderr[-3000:]
    return out, stdout


@pytest.fixture(scope="module")
def small_bin(tmp_path_factory) -> Path:
    return write_verification_bin(tmp_path_factory.mktemp("bin") / "synth_lfw.bin", 20, workers=1)


def conv_and_linear_flops(model: nn.Module) -> int:
    """2 × multiply-adds of every Conv2d and Linear on one 112×112 image, from output shapes."""
    total = []

    def count(module, _inputs, output):
        if isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            total.append(2 * output.numel() * module.in_channels // module.groups * kh * kw)
        elif isinstance(module, nn.Linear):
            total.append(2 * output.numel() * module.in_features)

    handles = [m.register_forward_hook(count) for m in model.modules()]
    with torch.no_grad():
        model(torch.zeros(1, 3, 112, 112))
    for handle in handles:
        handle.remove()
    return sum(total)


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_every_format_is_written_verified_and_reported(student, exported):
    model, checkpoint = student
    out, stdout = exported
    assert sorted(p.name for p in out.iterdir()) == sorted(FILES + ["export.json"])  # no staging
    report = json.loads((out / "export.json").read_text())
    assert report["checkpoint"] == str(checkpoint) and report["step"] == 1200
    assert report["architecture"] == "iresnet18 (width 0.25, embedding_dim 32)"
    assert report["parameters"] == sum(p.numel() for p in model.parameters())
    assert report["gflops_per_image"] == pytest.approx(conv_and_linear_flops(model) / 1e9, rel=1e-9)
    assert "multiply-add = 2 FLOPs" in report["flop_convention"]
    assert report["latency"]["threads"] == 1 and report["latency"]["batches"] == [1, 2]
    assert "cores" in report["machine"]
    assert report["verification_sets"] == [{"name": "synth_lfw", "path": None, "pairs": 20,
                                            "synthetic": True}]
    reference = report["reference"]["accuracy"]["synth_lfw"]
    assert [a["file"] for a in report["artifacts"]] == FILES
    for art in report["artifacts"]:
        assert art["verified"] is True
        assert art["bytes"] == (out / art["file"]).stat().st_size
        assert all(v > 0 for v in art["latency_ms"].values()) and set(art["latency_ms"]) == {"1", "2"}
        error = art["embedding_rel_error"]["synth_lfw"]
        assert error <= {"fp32": 1e-4, "fp16": 1e-2}[art["precision"]]
        assert art["accuracy"]["synth_lfw"] - reference == art["accuracy_diff_points"]["synth_lfw"]
        if art["precision"] == "fp32":  # tolerance 0 by default: the same accuracy exactly
            assert art["accuracy"]["synth_lfw"] == reference
            assert art["accuracy_tolerance_points"] == 0.0
    by_file = {a["file"]: a for a in report["artifacts"]}
    assert by_file["backbone.pth"]["embedding_rel_error"]["synth_lfw"] == 0.0
    assert by_file["backbone_fp16.onnx"]["accuracy_tolerance_points"] == 0.05
    assert by_file["backbone_fp16.onnx"]["bytes"] < 0.6 * by_file["backbone.onnx"]["bytes"]
    for name in FILES:
        assert re.search(rf"^\| {re.escape(name)} +\|", stdout, re.M), stdout
    assert f"parameters {report['parameters']:,};" in stdout

    x = images(5)
    with torch.no_grad():
        expected = model(x)
        insightface_layout = get_backbone("iresnet18", DIM, width=WIDTH)
        insightface_layout.load_state_dict(torch.load(out / "backbone.pth", weights_only=True),
                                           strict=True)
        assert torch.equal(insightface_layout.eval()(x), expected)
        scripted = torch.jit.load(str(out / "backbone_torchscript.pt"))
        assert torch.equal(scripted(x), expected)
    fp16 = onnx.load(str(out / "backbone_fp16.onnx"))
    assert {init.data_type for init in fp16.graph.initializer} >= {onnx.TensorProto.FLOAT16}
    for name in ("backbone.onnx", "backbone_fp16.onnx"):
        session = ort.InferenceSession(str(out / name), providers=["CPUExecutionProvider"])
        (inp,), (output,) = session.get_inputs(), session.get_outputs()
        assert (inp.name, inp.type, output.name, output.type) == (
            "input", "tensor(float)", "embedding", "tensor(float)")
        assert inp.shape[1:] == [3, 112, 112] and not isinstance(inp.shape[0], int)


def blob_from_images(imgs: list[np.ndarray], scalefactor: float, size: tuple[int, int],
                     mean: tuple[float, float, float], swap_rb: bool) -> np.ndarray:
    """``cv2.dnn.blobFromImages`` for images already of ``size`` (no resize, no crop): each
    image to float32, BGR→RGB when ``swap_rb`` (the mean is swapped with it), minus ``mean``,
    times ``scalefactor``, stacked NCHW."""
    blobs = []
    for img in imgs:
        assert img.shape[1::-1] == size and img.dtype == np.uint8
        pixels = img.astype(np.float32)
        channel_mean = np.asarray(mean, np.float32)
        if swap_rb:
            pixels, channel_mean = pixels[..., ::-1], channel_mean[::-1]
        blobs.append(((pixels - channel_mean) * np.float32(scalefactor)).transpose(2, 0, 1))
    return np.ascontiguousarray(np.stack(blobs), dtype=np.float32)


class ArcFaceONNXImitation:
    """InsightFace's ``model_zoo/arcface_onnx.py`` ArcFaceONNX, with numpy for cv2: the
    normalization from the first 8 node names, input name and size from the session."""

    def __init__(self, model_file: str) -> None:
        find_sub = find_mul = False
        for node in onnx.load(model_file).graph.node[:8]:
            find_sub |= node.name.startswith("Sub") or node.name.startswith("_minus")
            find_mul |= node.name.startswith("Mul") or node.name.startswith("_mul")
        self.input_mean, self.input_std = (0.0, 1.0) if find_sub and find_mul else (127.5, 127.5)
        self.session = ort.InferenceSession(model_file, None)
        input_cfg = self.session.get_inputs()[0]
        self.input_size = tuple(input_cfg.shape[2:4][::-1])
        self.input_name = input_cfg.name
        self.output_names = [out.name for out in self.session.get_outputs()]
        assert len(self.output_names) == 1

    def get_feat(self, imgs: list[np.ndarray]) -> np.ndarray:
        blob = blob_from_images(imgs, 1.0 / self.input_std, self.input_size,
                                (self.input_mean,) * 3, swap_rb=True)
        return self.session.run(self.output_names, {self.input_name: blob})[0]


def test_insightface_onnx_loader_reproduces_the_pytorch_model(student, exported):
    model, _ = student
    out, _ = exported
    bgr = np.random.default_rng(0).integers(0, 256, (4, 112, 112, 3), dtype=np.uint8)  # as cv2 reads
    rgb = torch.from_numpy(np.ascontiguousarray(bgr[..., ::-1].transpose(0, 3, 1, 2)))
    with torch.no_grad():
        expected = model((rgb.float() - 127.5) / 127.5)
    for name, bound in (("backbone.onnx", 1e-4), ("backbone_fp16.onnx", 1e-2)):
        loader = ArcFaceONNXImitation(str(out / name))
        assert (loader.input_mean, loader.input_std, loader.input_size) == (127.5, 127.5, (112, 112))
        features = torch.from_numpy(loader.get_feat(list(bgr)))
        assert features.dtype == torch.float32 and features.shape == expected.shape
        assert verify.relative_error(features, expected) <= bound, name
    assert artifacts.insightface_input(out / "backbone.onnx") == (127.5, 127.5)


def test_blob_imitation_matches_cv2_semantics():
    """blobFromImages' documented arithmetic on a hand-computed pixel: (RGB - mean) * scale."""
    img = np.zeros((112, 112, 3), np.uint8)
    img[0, 0] = (10, 20, 255)  # B, G, R
    blob = blob_from_images([img], 1 / 127.5, (112, 112), (127.5,) * 3, swap_rb=True)
    assert blob.shape == (1, 3, 112, 112) and blob.dtype == np.float32
    np.testing.assert_array_equal(blob[0, :, 0, 0], np.float32([127.5, -107.5, -117.5])
                                  * np.float32(1 / 127.5))


class Constant(nn.Module):
    """A corrupted student: the same embedding for every image."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :1, 0, 0] * 0 + torch.ones(1, DIM)


def corrupt_torchscript(monkeypatch) -> None:
    monkeypatch.setitem(artifacts.WRITERS, "torchscript",
                        lambda model, path: artifacts.write_torchscript(Constant(), path))


def test_a_file_that_fails_verification_fails_the_export(student, small_bin, tmp_path,
                                                         monkeypatch):
    model, checkpoint = student
    out = tmp_path / "out"
    out.mkdir()
    corrupt_torchscript(monkeypatch)
    argv = ["--checkpoint", str(checkpoint), "--out", str(out), "--formats", "torchscript",
            "--bin", str(small_bin), *FAST]
    code, stdout, stderr = run_export(argv)
    assert code == 1 and stdout == ""
    assert re.fullmatch(r"error: torchscript artifact backbone_torchscript\.pt: its embeddings of "
                        r"synth_lfw differ from the PyTorch model's by \d\.\d\de[+-]\d\d relative "
                        r"\(> 0\.0001\)\n", stderr), stderr
    assert list(out.iterdir()) == []  # nothing claimed, staging removed

    monkeypatch.setitem(verify.EMBEDDING_RTOL, "fp32", float("inf"))  # reach the accuracy check
    code, _, stderr = run_export(argv)
    reference = 100 * evaluate_bin_sets(model, [str(small_bin)], "cpu")["synth_lfw"]["accuracy_mean"]
    assert reference != 50.0
    assert code == 1 and stderr == (
        f"error: torchscript artifact backbone_torchscript.pt: accuracy on synth_lfw is 50.000 %, "
        f"the PyTorch model's {reference:.3f} %: differs by {50 - reference:+.3f} points "
        f"(tolerance 0)\n")
    assert list(out.iterdir()) == []

    def exporter_fails(model, path):
        path.write_bytes(b"half a file")
        raise RuntimeError("unsupported operator\ndetails")

    monkeypatch.setitem(artifacts.WRITERS, "torchscript", exporter_fails)
    code, _, stderr = run_export(argv)
    assert code == 1 and stderr == ("error: torchscript artifact backbone_torchscript.pt: cannot "
                                    "be written and loaded back: RuntimeError: unsupported "
                                    "operator\n")
    assert list(out.iterdir()) == []

    new = tmp_path / "new" / "deploy"  # a failed export removes the directories it created
    code, _, _ = run_export([*argv[:2], "--out", str(new), *argv[4:]])
    assert code == 1 and not (tmp_path / "new").exists()


def test_a_passing_export_replaces_an_earlier_one(student, small_bin, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    for name in ("backbone.pth", "backbone_fp16.onnx"):
        (out / name).write_bytes(b"file of an earlier export")
    (out / "export.json").write_text(json.dumps({"artifacts": [{"file": "backbone.pth"},
                                                               {"file": "backbone_fp16.onnx"}]}))
    code, _, stderr = run_export(["--checkpoint", str(student[1]), "--out", str(out),
                                  "--formats", "torchscript", "--bin", str(small_bin), *FAST])
    assert code == 0, stderr
    assert sorted(p.name for p in out.iterdir()) == ["backbone.pth", "backbone_torchscript.pt",
                                                     "export.json"]
    report = json.loads((out / "export.json").read_text())
    assert report["verification_sets"] == [{"name": "synth_lfw", "path": str(small_bin),
                                            "pairs": 20, "synthetic": False}]


def test_bad_input_gets_one_line_before_any_work(student, tmp_path):
    _, checkpoint = student
    plain = tmp_path / "backbone.pth"
    torch.save(get_backbone("iresnet18", DIM, width=0.125).state_dict(), plain)
    afile = tmp_path / "afile"
    afile.write_text("x")
    out = str(tmp_path / "out")
    cases = [
        (["--checkpoint", str(tmp_path / "nope.pt"), "--out", out],
         f"--checkpoint: no such file {tmp_path / 'nope.pt'}"),
        (["--checkpoint", str(plain), "--out", out],
         f"{plain} is not an fr_distill checkpoint (no 'format': 'fr_distill' entry)"),
        (["--checkpoint", str(checkpoint), "--out", str(afile / "sub")],
         f"--out: cannot write to {afile / 'sub'} (Not a directory)"),
        (["--checkpoint", str(checkpoint), "--out", out, "--formats", "onnx-fp32,tflite"],
         "--formats: unknown format 'tflite'; choose from onnx-fp32, onnx-fp16, torchscript"),
        (["--checkpoint", str(checkpoint), "--out", out, "--tolerance-fp16", "-1"],
         "--tolerance-fp16 must be at least 0 points, got -1.0"),
        (["--checkpoint", str(checkpoint), "--out", out, "--latency-batches", "1,x"],
         "--latency-batches: '1,x' is not a comma-separated list of positive integers"),
        (["--checkpoint", str(checkpoint), "--out", out, "--bin", str(afile)],
         None),  # the eval's own message for an unreadable .bin
    ]
    for argv, message in cases:
        code, stdout, stderr = run_export(argv)
        assert code == 2 and stdout == "", (argv, stderr)
        assert stderr.count("\n") == 1 and stderr.startswith("error: "), stderr
        if message is not None:
            assert stderr == f"error: {message}\n"
        else:
            assert str(afile) in stderr
    assert not (tmp_path / "out").exists()  # created for the export, removed with its failure


def test_an_out_holding_files_no_export_wrote_is_refused_before_any_work(student, tmp_path,
                                                                        monkeypatch):
    """Before, an InsightFace model folder (its own backbone.onnx and backbone.pth) given as
    --out lost its backbone.onnx and had its backbone.pth replaced. Only an earlier export's
    files (listed in its export.json) are replaced; anything else stops the export, naming the
    directory and the first such file, exit 2, before the checkpoint is read."""
    from fr_distill.deploy import export as command

    monkeypatch.setattr(command, "load_student",
                        lambda path: pytest.fail("the checkpoint was read before --out was checked"))
    out = tmp_path / "buffalo_l"
    out.mkdir()
    theirs = {"backbone.onnx": b"their onnx model", "backbone.pth": b"their weights"}
    for name, data in theirs.items():
        (out / name).write_bytes(data)
    earlier = json.dumps({"artifacts": [{"file": "backbone.pth"}, {"file": "../elsewhere"}]})
    cases = [
        ({}, "backbone.onnx (and 1 more)"),
        ({"export.json": b"{not json"}, "backbone.onnx (and 2 more)"),
        ({"export.json": earlier.encode()}, "backbone.onnx"),  # lists backbone.pth only
    ]
    for extra, first in cases:
        for name, data in extra.items():
            (out / name).write_bytes(data)
        code, stdout, stderr = run_export(["--checkpoint", str(student[1]), "--out", str(out),
                                           "--formats", "torchscript", *FAST])
        assert code == 2 and stdout == "" and stderr == (
            f"error: --out: {out} holds {first}, which no earlier fr-distill export wrote there; "
            f"export into a new or empty directory (or an earlier export's: its export.json "
            f"lists its files)\n")
        assert all((out / name).read_bytes() == data for name, data in theirs.items())
    (out / "backbone.onnx").unlink()
    (out / "sub").mkdir()
    code, _, stderr = run_export(["--checkpoint", str(student[1]), "--out", str(out), *FAST])
    assert code == 2 and f"{out} holds sub, which" in stderr


def test_formats_default_to_the_installed_ones(monkeypatch):
    from fr_distill.deploy.export import ExportInputError, parse_formats

    assert [f.name for f in parse_formats(None)] == ["state-dict", "onnx-fp32", "onnx-fp16",
                                                     "torchscript"]
    assert [f.name for f in parse_formats("torchscript,onnx-fp16")] == [
        "state-dict", "onnx-fp16", "torchscript"]
    real = artifacts.importlib.util.find_spec
    monkeypatch.setattr(artifacts.importlib.util, "find_spec",
                        lambda name: None if name == "onnxruntime" else real(name))
    assert [f.name for f in parse_formats(None)] == ["state-dict", "torchscript"]
    with pytest.raises(ExportInputError, match=r"^--formats: onnx-fp32 needs the package\(s\) "
                                               r"onnxruntime \(pip install -e '\.\[onnx\]'\)$"):
        parse_formats("onnx-fp32")

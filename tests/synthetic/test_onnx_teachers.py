"""ONNX teachers of both model-zoo input conventions (``tools/make_synthetic.py
--onnx-teachers``): each read with its convention, reproducing the source model; a bad model
refused before anything is written."""
from __future__ import annotations

import contextlib
import io
import logging
import runpy
from pathlib import Path

import pytest
import torch

from conftest import REPO
from .conftest import TOOL_ARGS

TEACHER_ARCH = ("iresnet18", 32, 0.125)  # the conftest teacher_file's architecture


@pytest.fixture(scope="module")
def onnx_teachers(teacher_file, tmp_path_factory) -> tuple[Path, str]:
    """``tools/make_synthetic.py OUT_DIR --onnx-teachers`` on an fr_distill checkpoint holding
    the conftest teacher's weights, with a small data set (.bin sets of 20 pairs: a quick
    teacher check): (OUT_DIR, the tool's stdout)."""
    from fr_distill.config import Config, to_dict

    cfg = Config()
    cfg.model.name, cfg.model.embedding_dim, cfg.model.width = TEACHER_ARCH
    out = tmp_path_factory.mktemp("onnx_teachers")
    checkpoint = out / "checkpoint.pt"
    torch.save({"format": "fr_distill", "version": 1, "step": 1, "config": to_dict(cfg),
                "student": torch.load(teacher_file, weights_only=True)}, checkpoint)
    main = runpy.run_path(str(REPO / "tools" / "make_synthetic.py"))["main"]
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main([str(out / "data"), *TOOL_ARGS, "--onnx-teachers", str(checkpoint)]) == 0
    return out / "data", stdout.getvalue()


def test_onnx_teachers_take_each_input_convention_and_reproduce_the_model(
        onnx_teachers, teacher_file, caplog):
    """Both written files are read with the convention they were written for (the log says
    which and why), give the source model's embeddings from pipeline-normalized images and
    its accuracy on the data set's .bin set; the raw-pixel file fed the other convention
    does not."""
    from fr_distill.eval import evaluate_bin_sets
    from fr_distill.models import load_frozen_model

    data, stdout = onnx_teachers
    root = data / "onnx_teachers"
    normalized, raw = root / "teacher_normalized.onnx", root / "teacher_raw_pixels.onnx"
    assert sorted(p.name for p in root.iterdir()) == [normalized.name, raw.name]
    assert f"onnx teacher, normalized: {normalized}\n" in stdout
    assert f"onnx teacher, raw_pixels: {raw}\n" in stdout
    source = load_frozen_model(str(teacher_file), *TEACHER_ARCH)
    with caplog.at_level(logging.INFO, logger="fr_distill"):
        teachers = {"normalized": load_frozen_model(str(normalized)),
                    "raw_pixels": load_frozen_model(str(raw))}
    assert (f"teacher {normalized}: input (pixels - 127.5) / 127.5: no Sub and Mul/Div before "
            f"the first Conv") in caplog.text
    assert (f"teacher {raw}: input (pixels - 0) / 1: the graph normalizes its input itself "
            f"(Sub, Mul before the first Conv): raw 0-255 pixels") in caplog.text
    pixels = torch.randint(0, 256, (3, 3, 112, 112), generator=torch.Generator().manual_seed(2))
    x = (pixels.float() - 127.5) / 127.5
    expected = source(x)

    def relative_error(model) -> float:
        return ((model(x) - expected).abs().max() / expected.abs().max()).item()

    assert all(relative_error(teacher) < 1e-4 for teacher in teachers.values())
    forced = load_frozen_model(str(raw), input_mean=127.5, input_std=127.5)
    assert relative_error(forced) > 0.05
    lfw = str(data / "synth_lfw.bin")
    accuracy = {name: evaluate_bin_sets(model, [lfw], "cpu")["synth_lfw"]["accuracy_mean"]
                for name, model in {"source": source, **teachers}.items()}
    assert accuracy["normalized"] == accuracy["raw_pixels"] == accuracy["source"]


def test_onnx_teachers_option_refuses_a_bad_model_before_writing(tmp_path, capsys):
    main = runpy.run_path(str(REPO / "tools" / "make_synthetic.py"))["main"]
    out, missing = tmp_path / "out", tmp_path / "absent.pt"
    assert main([str(out), *TOOL_ARGS, "--onnx-teachers", str(missing)]) == 2
    assert capsys.readouterr().err == f"error: model file not found: {missing}\n"
    script = tmp_path / "script.pt"
    model = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                torch.nn.Linear(3, 4))
    torch.jit.save(torch.jit.script(model), script)
    assert main([str(out), *TOOL_ARGS, "--onnx-teachers", str(script)]) == 2
    assert capsys.readouterr().err == (f"error: {script}: a torchscript model cannot be exported "
                                       "to ONNX again; give an fr_distill checkpoint or a state "
                                       "dict\n")
    assert not out.exists()

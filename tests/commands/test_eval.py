"""``fr-distill eval`` and ``launch/eval.py``: the script end to end against
:func:`evaluate_model`, and the ``--amp`` settings it accepts."""
from __future__ import annotations

import json

import torch

from fr_distill.commands.eval import build_parser
from fr_distill.eval.report import to_jsonable
from fr_distill.eval.runner import evaluate_model
from launch import eval as launch_eval
from tests.eval_data import assert_results_close, tiny_model, write_bin, write_ijb


def test_launch_eval_script(tmp_path, capsys):
    write_bin(tmp_path / "s.bin", 12, seed=2)
    ijb = write_ijb(tmp_path / "IJBC", subjects=4, templates_per_subject=2)
    model = tiny_model()
    torch.jit.script(model).save(str(tmp_path / "model.pt"))
    argv = ["--model", str(tmp_path / "model.pt"), "--bin", str(tmp_path / "s.bin"), "--ijb", str(ijb),
            "--ijb-name", "IJBC", "--out", str(tmp_path / "out"), "--batch-size", "4"]
    assert launch_eval.main(argv) == 0
    assert "TAR@FAR" in capsys.readouterr().out
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    expected = evaluate_model(model, "cpu", [str(tmp_path / "s.bin")], [(str(ijb), "IJBC")],
                              batch_size=4)
    assert_results_close(saved, to_jsonable(expected))
    assert (tmp_path / "out" / "roc_IJBC.png").stat().st_size > 1000
    argv[3] = str(tmp_path / "missing.bin")
    assert launch_eval.main(argv) == 2
    error = capsys.readouterr().err.strip()
    assert "missing.bin: cannot read" in error and "\n" not in error


def test_the_eval_command_accepts_fp32_and_off():
    for amp in ("fp32", "off", "fp16", "bf16"):
        args = build_parser().parse_args(["--model", "m.pt", "--out", "o", "--amp", amp])
        assert args.amp == amp

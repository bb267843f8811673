"""``launch/train.py`` is ``fr-distill train``: its help, dry run and one-line errors."""
from __future__ import annotations

import importlib.util

import pytest

from conftest import REPO
from fr_distill.commands.train import train_main


def test_launch_script_is_the_train_command():
    spec = importlib.util.spec_from_file_location("launch_train", REPO / "launch" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.train_main is train_main


def test_train_command_help_dry_run_and_errors(synthetic_data, tmp_path, capsys):
    main = train_main
    with pytest.raises(SystemExit) as exit_help:
        main(["--help"])
    assert exit_help.value.code == 0 and "--dry-run" in capsys.readouterr().out
    config = tmp_path / "run.yaml"
    config.write_text("defaults: [" + str(REPO / "configs" / "vggface2_r100_r18_unified.yaml")
                      + "]\nloss: {iled: {weight: 0}, rpsd: {weight: 0}}\n")
    args = ["--config", str(config), f"data.train={synthetic_data / 'train'}",
            "data.batch_size=16", f"run.output_dir={tmp_path / 'out'}"]
    assert main(args + ["--dry-run"]) == 0
    plan = capsys.readouterr().out
    assert "192 images, 24 identities" in plan
    assert "batch     16/rank x 1 rank(s) = 16 global, x1 accumulation = 16 per optimizer step" in plan
    assert "lr 0.003125" in plan  # 0.1 * 16 / 512 (optim.reference_batch)
    assert not (tmp_path / "out").exists()  # nothing trained, nothing written
    assert main(args + ["--dry-run", "loss.rpsd.wieght=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "unknown config key 'loss.rpsd.wieght'" in err
    assert main(args + ["--dry-run", "loss.iled.weight=1"]) == 2
    assert "teacher.path" in capsys.readouterr().err

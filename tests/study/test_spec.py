"""The study spec: the shipped spec loads, and a bad spec gets one line before any training."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest

from conftest import GOOD, REPO, STUDY_CONFIGS, torchrun_env, write_spec
from fr_distill.cli import main as cli_main
from fr_distill.study import StudyError, load_spec


def test_the_shipped_study_spec_loads():
    spec = load_spec(STUDY_CONFIGS / "study.yaml")
    assert {"none", "iled", "rpsd", "unified", "l2", "fc", "rkd"} <= set(spec.variants)
    assert spec.baseline == "none" and len(spec.seeds) >= 3


@pytest.mark.parametrize("change, message", [
    (("iled: [loss.iled.weight=1.0]", "iled: [loss.iled.weigth=1.0]"),
     r"variant 'iled': .*unknown config key 'loss.iled.weigth'; did you mean loss.iled.weight"),
    (("teacher: {config: teacher.yaml}", "teacher: {path: missing.pt}"),
     r"'teacher.path' file not found: .*missing.pt"),
    (("seeds: [1, 2]", "seeds: [1, 2, 1]"), r"'seeds' lists 1 more than once"),
    (("variants:", "variantz:"), r"unknown key 'variantz' \(did you mean 'variants'\?\)"),
    (("bootstrap: 200", "bootstrap: 200\nbaseline: rpsd"), r"'baseline' 'rpsd' is not a variant"),
    (("iled: [loss.iled.weight=1.0]", "iled: [loss.iled.weight=heavy]"),
     r"variant 'iled': .*'loss.iled.weight' must be float"),
    (("bootstrap: 200", "bootstrap: 200\nx: &a [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]\n"
      + "".join(f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
                f"*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
                f"*{chr(97 + i)}, *{chr(97 + i)}]\n" for i in range(7))),
     r"aliases \(\*name\) expand to more than"),
    (("teacher_cache: true", "teacher_cache: yes please"),
     r"'teacher_cache' must be true or false, got 'yes please'"),
    (("iled: [loss.iled.weight=1.0]", "iled: [loss.iled.weight=1.0, loss.balance.enabled=true]"),
     r"variant 'iled': .*'loss.balance.iled' must be > 0 with loss.balance.enabled"),
])
def test_bad_specs_get_one_line_before_any_training(tmp_path, capsys, change, message):
    spec = write_spec(tmp_path, GOOD.replace(*change))
    with pytest.raises(StudyError, match=message) as err:
        load_spec(spec)
    assert "\n" not in str(err.value)
    out = tmp_path / "out"
    assert cli_main(["study", str(spec), "--out", str(out)]) == 2
    stderr = capsys.readouterr().err
    assert stderr.count("\n") == 1 and stderr.startswith("error: "), stderr
    assert re.search(message, stderr) and not out.exists()


def test_a_bad_spec_exits_2_with_one_line_from_the_installed_command(tmp_path):
    """The same contract through ``python -m fr_distill.cli`` in a process of its own: the
    exit status, and nothing else on stderr (no warning, no traceback)."""
    spec = write_spec(tmp_path, GOOD.replace("seeds: [1, 2]", "seeds: [1, 2, 1]"))
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "fr_distill.cli", "study", str(spec), "--out",
                           str(out)], cwd=REPO, env=torchrun_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("error: ") and "'seeds' lists 1 more than once" in proc.stderr
    assert not out.exists()

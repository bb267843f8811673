"""The study runner: a spec training on a list of sets, and the settings that make a run
another run."""
from __future__ import annotations

import pytest

from conftest import GOOD, write_spec
from fr_distill.study import StudyError, load_spec


def test_a_spec_trains_on_a_list_of_sets(tmp_path, synthetic_data):
    from fr_distill.study.runner import plan_runs, prepare_data

    folder, rec = synthetic_data / "train", synthetic_data / "train.rec"
    body = GOOD.replace(GOOD[GOOD.index("data:"):GOOD.index("teacher:")],
                        f"data: {{train: [{folder}, {rec}], bin_sets: "
                        f"[{synthetic_data / 'synth_lfw.bin'}]}}\n")
    spec = load_spec(write_spec(tmp_path, body))
    assert spec.train == [str(folder), str(rec)]
    teacher, students = plan_runs(spec, prepare_data(spec, tmp_path / "out"), tmp_path / "out")
    assert all(run.config.data.train == [str(folder), str(rec)] for run in [teacher, *students])
    with pytest.raises(StudyError) as err:
        load_spec(write_spec(tmp_path, body.replace(str(rec), str(tmp_path / "gone"))))
    assert str(err.value).endswith(f"'data.train[1]' not found: {tmp_path / 'gone'}")


def test_settings_of_terms_a_run_does_not_use_do_not_make_it_another_run():
    """A default changed for a term that is off (here RPSD's anchor and ILED's weight in a run
    without them) leaves a finished run reusable; the same change in a run using them does not."""
    from fr_distill.config import load_config
    from fr_distill.study.runner import effective_settings

    plain = ["loss.iled.weight=0", "loss.rpsd.weight=0"]
    assert effective_settings(load_config(None, plain + ["loss.rpsd.student_anchor=student_bank",
                                                         "loss.balance.smoothing=0.3"])) == \
        effective_settings(load_config(None, plain + ["loss.rpsd.student_anchor=teacher_bank"]))
    assert effective_settings(load_config(None, ["loss.rpsd.student_anchor=student_bank"])) != \
        effective_settings(load_config(None, ["loss.rpsd.student_anchor=teacher_bank"]))
    assert effective_settings(load_config(None, plain + ["loss.l2.weight=1"])) != \
        effective_settings(load_config(None, plain))

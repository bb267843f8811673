"""The README is the user's manual: its commands must work as written.

Every command in a ``bash`` block is parsed out of README.md. Each script it names must exist
and answer ``--help``; each config it names must load with the command's overrides; each
``make`` target must exist; the cheap commands (dry run, config tools) are run for real. The
configuration reference table must equal the one generated from the schema.
"""
from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fr_distill.commands.config import config_reference_markdown
from fr_distill.config import load_config

REPO = Path(__file__).resolve().parents[2]
README = (REPO / "README.md").read_text()


def readme_commands() -> list[list[str]]:
    """Commands of the README's bash blocks, continuation lines joined, comments dropped."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.split(" #")[0].strip()
            if line and not line.startswith("#"):
                commands.append(shlex.split(line))
    return commands


COMMANDS = readme_commands()


def scripts_of(command: list[str]) -> list[str]:
    return [t for t in command if t.endswith((".py", ".sh", ".sbatch")) and "/" in t]


def config_and_overrides(command: list[str]) -> tuple[str | None, list[str]]:
    config = None
    if "--config" in command:
        config = command[command.index("--config") + 1]
    elif command[0] == "sbatch":
        config = next(t for t in command if t.endswith(".yaml"))
    overrides = [t for t in command if re.fullmatch(r"[a-z_]+(\.[a-z_0-9]+)+=.*", t)]
    return config, overrides


def test_readme_has_the_commands_the_manual_promises():
    firsts = {c[0] for c in COMMANDS}
    assert {"make", "python", "torchrun", "sbatch", "pip", "docker"} <= firsts
    assert ["make", "demo"] in COMMANDS and ["make", "test"] in COMMANDS


def test_config_reference_table_is_generated_from_the_schema():
    start, end = "<!-- config-reference:start -->\n", "\n<!-- config-reference:end -->"
    table = README[README.index(start) + len(start):README.index(end)]
    assert table == config_reference_markdown(), \
        "README config table is stale: regenerate it with `fr-distill config reference`"


@pytest.mark.parametrize("script", sorted({s for c in COMMANDS for s in scripts_of(c)}))
def test_every_script_the_readme_names_exists_and_answers_help(script):
    path = REPO / script
    assert path.is_file(), f"README names {script}, which does not exist"
    if script.endswith(".py"):
        proc = subprocess.run([sys.executable, str(path), "--help"], cwd=REPO, capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert "usage" in proc.stdout.lower()


@pytest.mark.parametrize("command", [c for c in COMMANDS if config_and_overrides(c)[0]],
                         ids=lambda c: " ".join(c)[:60])
def test_every_config_command_loads_with_its_overrides(command):
    config, overrides = config_and_overrides(command)
    cfg = load_config(REPO / config, overrides)
    for text in overrides:
        key, value = text.split("=", 1)
        if not value.startswith("["):
            node = cfg
            for part in key.split("."):
                node = getattr(node, part)
            assert str(node) == value or float(node) == float(value)


def test_every_make_target_exists():
    makefile = (REPO / "Makefile").read_text()
    for command in COMMANDS:
        if command[0] == "make":
            for target in (t for t in command[1:] if "=" not in t):
                assert re.search(rf"^{target}:", makefile, flags=re.M), f"no make target {target}"


DRY_RUNS = [c for c in COMMANDS if "--dry-run" in c and "launch/train.py" in c]


@pytest.mark.parametrize("command", DRY_RUNS, ids=[str(i) for i in range(len(DRY_RUNS))])
def test_the_dry_run_commands_run_as_written(synthetic_data, tmp_path, command):
    """The README's dry runs, with demo_out/ standing for a prepared synthetic data set."""
    assert len(DRY_RUNS) == 2  # the plan, and the plan with the teacher check
    demo = tmp_path / "demo_out"
    demo.mkdir()
    (demo / "data").symlink_to(synthetic_data)
    teacher = next(t.split("=", 1)[1] for t in command if t.startswith("teacher.path="))
    (demo / teacher.removeprefix("demo_out/")).parent.mkdir(parents=True)
    torch.save({"stands": torch.zeros(1)}, demo / teacher.removeprefix("demo_out/"))
    args = [a.replace("demo_out/", f"{demo}/") for a in command[1:]]
    proc = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "192 images, 24 identities" in proc.stdout


def test_config_tool_commands_run():
    proc = subprocess.run([sys.executable, "-m", "fr_distill.cli", "config", "show",
                           "configs/vggface2_r100_r18_unified.yaml", "loss.rpsd.weight=20"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "weight: 20.0" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "fr_distill.cli", "config", "validate",
                           "configs/vggface2_r100_r18_unified.yaml"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("error: config key 'data.train' is empty: name an image folder "
                                   "or train.rec")


def test_the_study_commands_run_as_written():
    """The study's dry run for real; the full study is the same command without it."""
    commands = [c for c in COMMANDS if c[:2] == ["fr-distill", "study"]]
    assert {"--dry-run", "--out"} <= {t for c in commands for t in c}
    for command in commands:
        if "--dry-run" in command:
            proc = subprocess.run([sys.executable, "-m", "fr_distill.cli", *command[1:]], cwd=REPO,
                                  capture_output=True, text=True, timeout=120)
            assert proc.returncode == 0, proc.stderr
            assert "OK, 55 runs: teacher, none/seed1," in proc.stdout

"""An installed, non-editable package works without the checkout: ``fr-distill demo`` finds
its specs in the package data, and training runs under torchrun from any directory."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from conftest import REPO, background_run, free_port


def run(cmd: list, cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    proc = background_run(cmd, cwd=cwd, env=env, timeout=timeout)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def install(root: Path) -> Path:
    """A throw-away virtual environment with the package installed from a built wheel; its
    dependencies are this environment's (linked, without this environment's own fr_distill)."""
    deps = root / "deps"
    deps.mkdir()
    ours = Path(sysconfig.get_paths()["purelib"])
    for entry in ours.iterdir():
        if not entry.name.startswith(("fr_distill", "__editable__")) and entry.suffix != ".pth":
            (deps / entry.name).symlink_to(entry)
    venv = root / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=root)
    site = Path(run([venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_paths()"
                     "['purelib'])"], cwd=root).stdout.strip())
    (site / "deps.pth").write_text(f"{deps}\n")
    source = root / "source"  # built from a copy: no build/ folder left in the checkout
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "*.egg-info", "__pycache__", "demo_out", "study_out"))
    run([venv / "bin" / "python", "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
         source], cwd=root)
    return venv


def installed_package_runs(root: Path) -> dict:
    """The package installed into a fresh environment under ``root``, then run from
    ``root/work`` (the background job of the test below): what each command printed."""
    installed = install(root)
    work = root / "work"
    work.mkdir()
    python = installed / "bin" / "python"
    seen = {"installed": installed, "work": work}
    seen["where"] = run([python, "-c", "import fr_distill; print(fr_distill.__file__)"], cwd=work)
    seen["demo"] = demo = run([installed / "bin" / "fr-distill", "demo", "--quick", "--dry-run"],
                              cwd=work)
    spec = Path(demo.stdout.split(":")[0])
    run([python, "-c", "from fr_distill.synthetic import generate; "
         "generate('data', num_identities=6, images_per_identity=4, bin_identities=4, "
         "bin_pairs=4, ijb_subjects=2)"], cwd=work)
    teacher = spec.parent / "teacher.yaml"
    seen["trained"] = run([python, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           "--master_addr=127.0.0.1", f"--master_port={free_port()}",
                           "-m", "fr_distill.cli", "train", "--config", teacher,
                           "data.train=data/train", "run.output_dir=run",
                           "schedule.total_steps=2", "schedule.warmup_steps=1",
                           "data.batch_size=4", "checkpoint.every_steps=2",
                           "logging.tensorboard=false"], cwd=work)
    return seen


@pytest.mark.slow
@pytest.mark.background(job=installed_package_runs)
def test_the_installed_package_trains_and_finds_its_configs_outside_the_checkout(background):
    installed, work = background["installed"], background["work"]
    where = background["where"]
    assert where.stdout.startswith(str(installed)), where.stdout
    demo = background["demo"]
    spec = Path(demo.stdout.split(":")[0])
    assert spec.is_relative_to(installed) and spec.parts[-3:] == ("demo", "quick", "study.yaml")
    assert "runs: teacher, none/seed1, iled/seed1, rpsd/seed1, unified/seed1" in demo.stdout
    assert "completed at step 2" in background["trained"].stdout
    assert (work / "run" / "checkpoints" / "step_00000002.pt").is_file()

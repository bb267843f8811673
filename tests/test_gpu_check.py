"""tools/gpu_check.sh and tests_gpu/ on a machine without a GPU: the GPU tests are outside the
CPU suite's testpaths, and run without CUDA they stop with an error instead of skipping."""
from __future__ import annotations

import configparser
import os
import subprocess
import sys

from conftest import REPO


def test_gpu_tests_are_outside_the_default_testpaths():
    ini = configparser.ConfigParser()
    ini.read(REPO / "pytest.ini")
    assert ini["pytest"]["testpaths"].split() == ["tests"]
    assert (REPO / "tests_gpu" / "test_gpu.py").is_file()


def test_gpu_tests_refuse_to_run_without_cuda():
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "tests_gpu"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 4, proc.stdout + proc.stderr  # pytest's usage error, not a skip
    assert "tests_gpu/ needs a CUDA GPU" in proc.stdout + proc.stderr


def test_gpu_check_script_parses_and_names_its_steps():
    script = REPO / "tools" / "gpu_check.sh"
    assert os.access(script, os.X_OK)
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert "pytest -q -m gpu" in text and "tests_gpu" in text
    assert "--no-index --no-deps" in text and "--batch 64 128 256" in text

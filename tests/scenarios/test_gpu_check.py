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


def test_gpu_tests_import_against_the_current_code():
    """The GPU tests cannot be collected here, so an import they make of a renamed function
    would go unseen until a GPU session: import their module (without running it)."""
    code = ("import sys; sys.path.insert(0, 'tests_gpu'); import importlib.util as u; "
            "spec = u.spec_from_file_location('gpu_tests', 'tests_gpu/test_gpu.py'); "
            "spec.loader.exec_module(u.module_from_spec(spec))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.returncode == 0, proc.stderr


STUB = """#!/usr/bin/env bash
# stands for python: records every call; GPU_STUB_* choose what fails
echo "$*" >> "$GPU_STUB_LOG"
case "$1 $2" in
  "-m pip") exit 0 ;;
  "-m pytest") [[ -z "${GPU_STUB_TESTS_FAIL:-}" ]] ;;
  "- ") cat > /dev/null; [[ -z "${GPU_STUB_NO_CUDA:-}" ]] || { echo "gpu_check: no CUDA device" >&2; exit 1; } ;;
  *) exit 0 ;;
esac
"""


def run_gpu_check(tmp_path, *args: str, **failures: str) -> tuple[int, list[str]]:
    """tools/gpu_check.sh with a recording stand-in for python; returns (status, its calls)."""
    stub, log = tmp_path / "python", tmp_path / "calls.log"
    stub.write_text(STUB)
    stub.chmod(0o755)
    log.write_text("")
    env = dict(os.environ, PYTHON=str(stub), GPU_STUB_LOG=str(log),
               GPU_CHECK_OUT=str(tmp_path / "out"), **failures)
    proc = subprocess.run(["bash", str(REPO / "tools" / "gpu_check.sh"), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)
    return proc.returncode, log.read_text().splitlines()


def test_gpu_check_installs_wheels_then_runs_the_gpu_tests_and_the_benchmark(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    for name in ("nvidia_dali_cuda130-1.0-py3-none-any.whl", "simplejpeg-1.0-py3-none-any.whl"):
        (wheels / name).write_bytes(b"")
    status, calls = run_gpu_check(tmp_path, str(wheels))
    assert status == 0
    assert calls[0].startswith("-m pip install -q --no-index --no-deps ")
    assert sorted(calls[0].split()[6:]) == sorted(str(w) for w in wheels.iterdir())
    assert calls[1] == "-m pip install -q --no-index --no-deps --no-build-isolation -e ."
    assert calls[2] == "-"  # the CUDA check
    assert calls[3] == "-m pytest -q -m gpu -p no:cacheprovider tests_gpu"
    bench = calls[4].split()
    assert bench[:2] == ["tools/benchmark.py", "train"]
    assert bench[bench.index("--batch") + 1:bench.index("--amp")] == ["64", "128", "256"]
    assert calls[5].startswith("-c ")  # the summary table


def test_gpu_check_fails_when_the_gpu_tests_fail_and_stops_without_cuda(tmp_path):
    status, calls = run_gpu_check(tmp_path, GPU_STUB_TESTS_FAIL="1")
    assert status == 1 and any(c.startswith("tools/benchmark.py train") for c in calls)
    status, calls = run_gpu_check(tmp_path, GPU_STUB_NO_CUDA="1")
    assert status == 1 and calls[-1] == "-"  # nothing runs after the failed CUDA check

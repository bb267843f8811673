"""docker/Dockerfile, checked without a Docker engine: NGC PyTorch base, the image's torch kept
(package installed with --no-deps, no pip line naming torch or forcing reinstalls), DALI
added only when missing, and the requirement list the build installs is this package's own."""
from __future__ import annotations

import re
import shlex
import subprocess
import sys
from importlib.metadata import requires

from conftest import REPO

DOCKER = REPO / "docker"
NGC_PYTORCH = re.compile(r"^nvcr\.io/nvidia/pytorch:\d{2}\.\d{2}-py3$")


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", (DOCKER / "Dockerfile").read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def pip_installs() -> list[list[str]]:
    """The argument lists of every ``pip install`` in the RUN instructions."""
    found = []
    for word, rest in instructions():
        if word != "RUN":
            continue
        lexer = shlex.shlex(rest, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        command: list[str] = []
        for token in [*lexer, ";"]:
            if token in ("&&", "||", ";", "|", ";;"):
                if command[:2] == ["pip", "install"]:
                    found.append(command[2:])
                command = []
            else:
                command.append(token)
    return found


def test_base_image_is_ngc_pytorch():
    steps = instructions()
    args = {name: value for word, rest in steps if word == "ARG" and "=" in rest
            for name, value in [rest.split("=", 1)]}
    froms = [rest for word, rest in steps if word == "FROM"]
    assert len(froms) == 1 and steps[[w for w, _ in steps].index("FROM") - 1][0] == "ARG"
    base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], froms[0])
    assert NGC_PYTORCH.match(base), base
    year, month = map(int, base.split(":")[1].split("-")[0].split("."))
    assert (year, month) >= (25, 10)  # torch >= 2.9: torchrun --signals-to-handle


def test_torch_is_never_reinstalled():
    installs = pip_installs()
    assert installs, "no pip install found"
    for args in installs:
        names = [a for a in args if not a.startswith("-")]
        assert not any(re.match(r"^(torch|torchvision|torchaudio)\b", n) for n in names), args
        assert not {"-U", "--upgrade", "--force-reinstall", "--ignore-installed"} & set(args), args
    package = [a for a in installs if "-e" in a and "." in a]
    assert package == [["--no-deps", "--no-build-isolation", "-e", "."]]
    run_text = " ".join(rest for word, rest in instructions() if word == "RUN")
    assert "/opt/torch_version.txt" in run_text.split("pip install")[0]  # recorded before
    assert re.search(r'test "\$\(python -c .import torch; print\(torch.__version__\).\)" = '
                     r'"\$\(cat /opt/torch_version.txt\)"', run_text)  # compared after


def test_dali_added_only_when_missing_and_matching_cuda():
    run_text = " ".join(rest for word, rest in instructions() if word == "RUN")
    assert 'if python -c "import nvidia.dali"' in run_text
    dali = [a for a in pip_installs() if any("nvidia-dali" in x for x in a)]
    assert dali == [["--extra-index-url", "https://pypi.nvidia.com",
                     "nvidia-dali-cuda${cuda_major}0"]]
    assert "torch.version.cuda.split('.')[0]" in run_text


def test_requirements_the_build_installs_are_the_packages_own():
    out = subprocess.run([sys.executable, str(DOCKER / "image_requirements.py")],
                         capture_output=True, text=True, check=True).stdout.split()
    declared = requires("fr_distill")
    base = [r for r in declared if ";" not in r]
    assert not any(re.match(r"^(torch|torchvision|nvidia-dali)", r) for r in out)
    assert {r for r in base if not r.startswith("torch")} <= set(out)
    for extra in ("onnx", "timm", "eval", "dev"):
        wanted = [r.split(";")[0].strip() for r in declared if f'extra == "{extra}"' in r]
        assert wanted and set(wanted) <= set(out), extra
    assert len(out) == len(set(out))
    assert ["-r", "/tmp/requirements.txt"] in pip_installs()


def test_build_context_leaves_out_local_environments():
    ignored = (DOCKER / "Dockerfile.dockerignore").read_text().split()
    assert {".venv", ".git", "runs"} <= set(ignored)
    copies = [rest for word, rest in instructions() if word == "COPY"]
    assert copies == [". ."]

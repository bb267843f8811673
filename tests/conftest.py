"""Shared fixtures: launching torchrun process groups (gloo on the CPU), finding the processes
a test started, the synthetic data, small training sets (an image folder; a folder and a
RecordIO pair), a study spec, FIFOs and images whose header lies about their size; end-to-end
runs started in the background when collection ends.

The fixtures and helpers of one test folder alone are in that folder's conftest.py."""
from __future__ import annotations

import contextlib
import fcntl
import io
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import zlib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    env["CUDA_VISIBLE_DEVICES"] = ""
    env.update(extra or {})
    return env


def run_torchrun(script: str | Path, *args: str, nproc: int = 2, timeout: float = 600,
                 torchrun_args: tuple[str, ...] = (), env: dict | None = None,
                 check: bool = True) -> subprocess.CompletedProcess:
    """Run ``script`` under ``torchrun --nproc_per_node nproc`` on a free loopback port. The
    output goes through files, not pipes: a process left behind cannot hold the call up."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *torchrun_args,
           str(script), *map(str, args)]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        status = subprocess.run(cmd, cwd=REPO, env=torchrun_env(env), stdout=out, stderr=err,
                                timeout=timeout).returncode
        out.seek(0)
        err.seek(0)
        proc = subprocess.CompletedProcess(cmd, status, out.read(), err.read())
    if check and proc.returncode != 0:
        raise AssertionError(f"torchrun failed ({proc.returncode}): {' '.join(cmd)}\n"
                             f"--- stdout ---\n{proc.stdout[-6000:]}\n--- stderr ---\n{proc.stderr[-6000:]}")
    return proc


def assert_checkpoints_bitwise(a: dict, b: dict) -> None:
    """Two checkpoints hold bitwise equal student, objective (head, bank) and SGD momentum."""
    import torch

    for part in ("student", "objective"):
        assert a[part].keys() == b[part].keys()
        for key, value in a[part].items():
            if torch.is_tensor(value):
                assert torch.equal(value, b[part][key]), f"{part}.{key} differs"
    momentum_a = [s["momentum_buffer"] for s in a["optimizer"]["state"].values()]
    momentum_b = [s["momentum_buffer"] for s in b["optimizer"]["state"].values()]
    assert all(torch.equal(x, y) for x, y in zip(momentum_a, momentum_b, strict=True))


@pytest.fixture
def torchrun():
    return run_torchrun


@pytest.fixture
def single_thread():
    """In-process training on one thread, as each torchrun worker has (OMP_NUM_THREADS=1)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def write_jpeg_folder(root: Path, num_classes: int, per_class: int, seed: int = 0) -> Path:
    """``root/id{c}/{k}.jpg``: left/right-asymmetric random 112×112 JPEGs (flips are visible)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c in range(num_classes):
        (root / f"id{c:03d}").mkdir(parents=True)
        for k in range(per_class):
            pixels = rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)
            pixels[:, :40] //= 4
            Image.fromarray(pixels).save(root / f"id{c:03d}" / f"{k}.jpg", quality=90)
    return root


@pytest.fixture
def jpeg_folder(tmp_path) -> Path:
    """A small image-folder training set: 4 identities × 6 JPEGs."""
    return write_jpeg_folder(tmp_path / "train", 4, 6)


@pytest.fixture
def two_sets(tmp_path) -> tuple[str, str]:
    """Set a: a folder of 3 identities × 4 JPEGs; set b: a RecordIO pair (InsightFace layout,
    ``property`` file) of 2 identities × 5 JPEGs, in b/train.rec."""
    from fr_distill.data.convert import folder_to_recordio

    a = write_jpeg_folder(tmp_path / "a", 3, 4, seed=1)
    source = write_jpeg_folder(tmp_path / "b_source", 2, 5, seed=2)
    (tmp_path / "b").mkdir()
    folder_to_recordio(source, tmp_path / "b" / "train.rec", seed=3)
    return str(a), str(tmp_path / "b")


SYNTHETIC_DATA_ARGS = dict(num_identities=24, images_per_identity=8, seed=0, bin_identities=24,
                           bin_pairs=100, ijb_subjects=12, workers=1)


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory) -> Path:
    """The synthetic face data set, generated once per session (``SYNTHETIC_DATA_ARGS``): 24
    identities × 8 images (folder + RecordIO), synth_lfw/synth_cfp .bin sets of 100 pairs, an
    IJB-style release ``ijb/IJBS`` of 12 subjects; its ``manifest.json`` holds the counts."""
    from fr_distill.synthetic import generate

    out = tmp_path_factory.mktemp("synthetic")
    generate(out, **SYNTHETIC_DATA_ARGS)
    return out


@pytest.fixture(scope="session")
def teacher_file(tmp_path_factory) -> Path:
    """A random IResNet-18 (width 0.125, 32-d) state dict, the teacher of the trainer tests."""
    import torch

    from fr_distill.models import get_backbone

    torch.manual_seed(7)
    path = tmp_path_factory.mktemp("teacher") / "teacher.pth"
    torch.save(get_backbone("iresnet18", 32, width=0.125).state_dict(), path)
    return path


# -- a study spec: the study's unit tests and the reduced study end to end ----------------------
STUDY_CONFIGS = REPO / "configs" / "study"


def write_spec(tmp_path: Path, body: str) -> Path:
    (tmp_path / "student.yaml").write_text(
        f"defaults: [{STUDY_CONFIGS / 'student.yaml'}]\n"
        "schedule: {total_steps: 4, warmup_steps: 1}\n"
        "checkpoint: {every_steps: 2}\nlogging: {every_steps: 2}\ndata: {batch_size: 8}\n")
    (tmp_path / "teacher.yaml").write_text(
        f"defaults: [{STUDY_CONFIGS / 'teacher.yaml'}]\n"
        "schedule: {total_steps: 4, warmup_steps: 1}\n"
        "checkpoint: {every_steps: 2}\nlogging: {every_steps: 2}\ndata: {batch_size: 8}\n")
    spec = tmp_path / "study.yaml"
    spec.write_text(body)
    return spec


GOOD = """
data:
  synthetic: {identities: 10, images_per_identity: 4, bin_identities: 10, bin_pairs: 40,
              ijb_subjects: 6}
teacher: {config: teacher.yaml}
student: student.yaml
seeds: [1, 2]
bootstrap: 200
teacher_cache: true
variants:
  none: []
  iled: [loss.iled.weight=1.0]
"""


@contextlib.contextmanager
def fifos(*paths: Path, release_after: float = 10.0):
    """A FIFO at each of ``paths`` for the block (removed after it); a reader blocked on one is released
    every ``release_after`` seconds (the FIFO opened for writing and closed, so the reader sees
    an empty file) and the block then fails: code that reads a FIFO fails the test instead of
    hanging it."""
    for path in paths:
        os.mkfifo(path)
    released: list[Path] = []
    done = threading.Event()

    def release() -> None:
        while not done.wait(release_after):
            for path in paths:
                try:
                    fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)  # ENXIO: nobody reads it
                except OSError:
                    continue
                released.append(path)
                os.close(fd)

    thread = threading.Thread(target=release, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        for path in paths:
            path.unlink(missing_ok=True)
    assert not released, f"a reader blocked on the FIFO {released[0]}"


def lying_jpeg(width: int, height: int) -> bytes:
    """A 16×16 JPEG (a few hundred bytes) whose frame header declares ``width``×``height``."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (90, 120, 150)).save(buf, format="JPEG")
    data = bytearray(buf.getvalue())
    sof = data.index(b"\xff\xc0")
    struct.pack_into(">HH", data, sof + 5, height, width)
    return bytes(data)


def lying_png(width: int, height: int) -> bytes:
    """A one-row PNG (a hundred bytes) whose IHDR declares ``width``×``height`` RGB pixels."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(bytes(1 + 3 * 16))) + chunk(b"IEND", b""))


def forbid_decoding(monkeypatch) -> None:
    """Make decoding any pixels (simplejpeg's or PIL's) fail the test: what a header check must
    refuse is then never decoded (an image declaring 30000x30000 pixels would take 2.7 GB)."""
    import simplejpeg
    from PIL import ImageFile

    def decoded(*args, **kwargs):
        raise AssertionError("the pixels were decoded")

    monkeypatch.setattr(simplejpeg, "decode_jpeg", decoded)
    monkeypatch.setattr(ImageFile.ImageFile, "load", decoded)

#: Environment variable marking the processes of one test (:func:`process_tag`).
TAG_VARIABLE = "FR_DISTILL_TEST_TAG"


def tagged_processes(tag: str) -> list[int]:
    """Pids of the live processes whose environment holds ``TAG_VARIABLE=tag``: the processes
    a test started with the tag and everything they forked or spawned, orphans included."""
    needle = f"{TAG_VARIABLE}={tag}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):  # gone meanwhile, or not ours
                if needle in (entry / "environ").read_bytes().split(b"\0"):
                    pids.append(int(entry.name))
    return pids


def wait_until(condition, timeout: float = 60.0) -> bool:
    """Poll ``condition()`` until it is true (True) or ``timeout`` seconds passed (False)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def lock_is_free(directory: Path) -> bool:
    """No process holds a ``flock`` on ``directory/.lock`` (a run's or a cache build's)."""
    fd = os.open(directory / ".lock", os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


@pytest.fixture
def process_tag():
    """A tag for the environment of the processes a test starts (``{TAG_VARIABLE: tag}``);
    whatever still carries it at the end is SIGKILLed, so a failed test leaves no orphan."""
    tag = uuid.uuid4().hex
    yield tag
    for pid in tagged_processes(tag):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


# -- end-to-end runs in the background ---------------------------------------------------------
# The end-to-end tests (the quick demo, the reduced study) spend minutes in subprocesses. A
# test marked ``@pytest.mark.background(job=f)`` has ``f(root)`` started in a thread as soon as
# collection ends, its processes at a low CPU priority (``nice``): they use what the rest of
# the suite leaves idle (most tests train on one thread, one core of two) and barely slow it
# down. The test itself runs last; its ``background`` fixture waits for the job's result (or
# re-raises its exception) and the test asserts on it as it would on a run made in its body.
BACKGROUND_NICE = 10


class BackgroundJob:
    def __init__(self, name: str, job, root: Path) -> None:
        self.name, self.job, self.root = name, job, root
        self.done = threading.Event()
        self.result = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.result = self.job(self.root)
        except BaseException as err:  # noqa: BLE001 (re-raised in the test)
            self.error = err
        finally:
            self.done.set()


_BACKGROUND: dict[str, BackgroundJob] = {}
_BACKGROUND_PROCS: list[subprocess.Popen] = []
_SESSION_OVER = threading.Event()  # no background process starts after the session's end


def background_popen(cmd: list[str], **kwargs) -> subprocess.Popen:
    """``subprocess.Popen`` of ``cmd`` at the background priority, in a session of its own,
    killed (its group) if the test session ends first."""
    if _SESSION_OVER.is_set():
        raise RuntimeError("the test session is over")
    proc = subprocess.Popen(["nice", "-n", str(BACKGROUND_NICE), *map(str, cmd)],
                            start_new_session=True, **kwargs)
    _BACKGROUND_PROCS.append(proc)
    return proc


def background_run(cmd: list[str], timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, capture_output=True, text=True)`` through :func:`background_popen`."""
    proc = background_popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            **kwargs)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def pytest_configure(config):
    config.addinivalue_line("markers", "background(job=f): f(root) runs in a background thread "
                            "from the end of collection; the test runs last and reads its result "
                            "through the `background` fixture")


@pytest.hookimpl(trylast=True)  # after -m/-k deselected what will not run
def pytest_collection_modifyitems(session, config, items):
    marked = [item for item in items if item.get_closest_marker("background")]
    if not marked or config.option.collectonly:
        return
    items[:] = [item for item in items if item not in marked] + marked
    jobs = []
    for item in marked:
        name = item.nodeid
        job = BackgroundJob(name, item.get_closest_marker("background").kwargs["job"],
                            config._tmp_path_factory.mktemp(item.name[:30]))
        _BACKGROUND[name] = job
        jobs.append(job)

    def run_all() -> None:
        for job in jobs:
            job.run()

    threading.Thread(target=run_all, name="background-jobs", daemon=True).start()


def pytest_sessionfinish(session, exitstatus):
    _SESSION_OVER.set()
    for proc in _BACKGROUND_PROCS:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
    for job in _BACKGROUND.values():  # torchrun starts its workers in sessions of their own
        if not job.done.is_set():
            subprocess.run(["pkill", "-KILL", "-f", str(job.root)], check=False)


@pytest.fixture
def background(request):
    """The result of the test's background job (waited for). An exception of the job (an
    assertion it makes on a step, a timeout) is raised here: pytest reports it as an error
    in the test's setup, and the wait shows in ``--durations`` as the test's setup."""
    job = _BACKGROUND.get(request.node.nodeid)
    if job is None:  # collected without the hook (e.g. run by another plugin): run it here
        root = request.getfixturevalue("tmp_path")
        job = BackgroundJob(request.node.nodeid,
                            request.node.get_closest_marker("background").kwargs["job"], root)
        job.run()
    job.done.wait()
    if job.error is not None:
        raise job.error
    return job.result

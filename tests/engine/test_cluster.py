"""SLURM → torchrun launch: host lists, the generated rendezvous line, the
batch script run against fake ``srun``/``scontrol``, and two torchrun agents on this machine
meeting through the generated c10d rendezvous (exit codes and preemption forwarding)."""
from __future__ import annotations

import json
import os
import re
import shlex
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, free_port, torchrun_env
from fr_distill.engine.cluster import (ClusterError, command_line, default_port, expand_hostlist,
                                       slurm_node_from_env, torchrun_args)
from fr_distill.engine.faults import REQUEUE_EXIT_CODE

SBATCH = REPO / "launch" / "slurm" / "train.sbatch"
TORCHRUN_CMD = REPO / "launch" / "torchrun_cmd.py"
WORKER = REPO / "tests" / "workers" / "worker_cluster_rendezvous.py"


@pytest.mark.parametrize("text, hosts", [
    ("node01", ["node01"]),
    ("node[01-03,07]", ["node01", "node02", "node03", "node07"]),
    ("gpu[8-11]", ["gpu8", "gpu9", "gpu10", "gpu11"]),
    ("gpu[08-10]", ["gpu08", "gpu09", "gpu10"]),
    ("a[1-2]-ib[3,5]", ["a1-ib3", "a1-ib5", "a2-ib3", "a2-ib5"]),
    ("login1,cn[098-101],dgx-a100-[1,3]",
     ["login1", "cn098", "cn099", "cn100", "cn101", "dgx-a100-1", "dgx-a100-3"]),
    ("host.example.org,10.0.0.[4-5]", ["host.example.org", "10.0.0.4", "10.0.0.5"]),
])
def test_expand_hostlist(text, hosts):
    assert expand_hostlist(text) == hosts


@pytest.mark.parametrize("text, fragment", [
    ("", "empty"),
    ("node[01-03", "unclosed"),
    ("node01-03]", "unmatched"),
    ("node[1-x]", "bad range '1-x'"),
    ("node[5-3]", "runs backwards"),
    ("a,,b", "empty entry"),
    ("n[[1]]", "nested"),
])
def test_expand_hostlist_errors_name_the_list(text, fragment):
    with pytest.raises(ClusterError, match=re.escape(fragment)):
        expand_hostlist(text)


def slurm_env(nodelist="gpu[07-08]", nnodes="2", node_id=None, job_id="4242", **extra) -> dict:
    env = {"SLURM_JOB_NODELIST": nodelist, "SLURM_NNODES": nnodes, "SLURM_JOB_ID": job_id}
    if node_id is not None:
        env["SLURM_NODEID"] = str(node_id)
    env.update(extra)
    return env


def test_torchrun_args_from_slurm_env():
    env = slurm_env(node_id=1, SLURM_GPUS_ON_NODE="8")
    args = torchrun_args(slurm_node_from_env(env), "launch/train.py", ["--config", "a b.yaml"],
                         max_restarts=3)
    assert args == ["--nnodes", "2", "--nproc-per-node", "8", "--rdzv-backend", "c10d",
                    "--rdzv-endpoint", "gpu07:24242", "--rdzv-id", "4242",
                    "--rdzv-conf", "is_host=false", "--max-restarts", "3",
                    "--signals-to-handle", "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1",
                    "--shutdown-timeout", "90", "launch/train.py", "--config", "a b.yaml"]
    assert shlex.split(command_line(args)) == ["torchrun", *args]
    node0 = torchrun_args(slurm_node_from_env(slurm_env(SLURM_GPUS_ON_NODE="8")), "t.py")
    assert "is_host=true" in node0  # batch step: SLURM_NODEID unset means node 0


@pytest.mark.parametrize("extra, nproc", [
    ({"SLURM_GPUS_ON_NODE": "4"}, 4),
    ({"SLURM_GPUS_PER_NODE": "h100:8"}, 8),
    ({"SLURM_GPUS_PER_NODE": "2"}, 2),
    ({"SLURM_GPUS_ON_NODE": "4", "SLURM_GPUS_PER_NODE": "8"}, 4),
])
def test_gpu_count_sources(extra, nproc):
    assert slurm_node_from_env(slurm_env(**extra)).gpus_per_node == nproc


def test_overrides_and_default_port():
    node = slurm_node_from_env(slurm_env(nodelist="cn[1-4]", nnodes="4", job_id="98765"))
    args = torchrun_args(node, "t.py", nproc_per_node=2, port=6000, rdzv_host="10.1.1.1")
    assert args[args.index("--rdzv-endpoint") + 1] == "10.1.1.1:6000"
    assert args[args.index("--nproc-per-node") + 1] == "2"
    assert default_port("98765") == 20000 + 98765 % 10000
    assert default_port("98765_3") == 20000 + 987653 % 10000  # array job ids
    assert 20000 <= default_port("123456789") < 30000


@pytest.mark.parametrize("env, fragment", [
    ({}, "SLURM_JOB_NODELIST is not set"),
    (slurm_env(nnodes="3"), "SLURM_NNODES=3 disagrees"),
    (slurm_env(node_id=2), "SLURM_NODEID=2 is outside 0..1"),
    (slurm_env(job_id=""), "SLURM_JOB_ID is not set"),
    (slurm_env(SLURM_GPUS_ON_NODE="eight"), "SLURM_GPUS_ON_NODE='eight'"),
    (slurm_env(SLURM_GPUS_PER_NODE="h100"), "SLURM_GPUS_PER_NODE='h100'"),
])
def test_bad_slurm_env_is_one_line_naming_the_variable(env, fragment):
    with pytest.raises(ClusterError) as err:
        slurm_node_from_env(env)
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_missing_gpu_count_is_reported():
    with pytest.raises(ClusterError, match="--nproc-per-node"):
        torchrun_args(slurm_node_from_env(slurm_env()), "t.py")


# --------------------------------------------------------------------------------------
# The batch script, with srun/scontrol replaced by recorders
# --------------------------------------------------------------------------------------
FAKE_SRUN = """#!/bin/bash
printf '%s\\n' "$@" > "$FAKE_SLURM_DIR/srun.args"
exit "${FAKE_SRUN_RC:-0}"
"""
FAKE_SCONTROL = """#!/bin/bash
printf '%s\\n' "$@" >> "$FAKE_SLURM_DIR/scontrol.args"
"""


def fake_slurm_bin(tmp_path: Path) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(stat.S_IRWXU)
    return bin_dir


def run_sbatch(tmp_path: Path, srun_rc: int) -> tuple[subprocess.CompletedProcess, dict]:
    env = dict(os.environ, **slurm_env(SLURM_GPUS_ON_NODE="8", SLURM_CPUS_PER_TASK="16"),
               SLURM_SUBMIT_DIR=str(REPO), PYTHON=sys.executable, FAKE_SLURM_DIR=str(tmp_path),
               FAKE_SRUN_RC=str(srun_rc),
               PATH=str(fake_slurm_bin(tmp_path)) + os.pathsep + os.environ["PATH"])
    proc = subprocess.run(["bash", str(SBATCH), "configs/demo.yaml", "loss.iled.weight=2"],
                          env=env, capture_output=True, text=True, timeout=120)
    return proc, env


def test_sbatch_runs_the_generated_torchrun_line_on_every_node(tmp_path):
    proc, env = run_sbatch(tmp_path, srun_rc=0)
    assert proc.returncode == 0, proc.stderr
    srun_args = (tmp_path / "srun.args").read_text().splitlines()
    assert srun_args[:3] == ["--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=16"]
    node_cmd = srun_args[srun_args.index(sys.executable):]
    assert node_cmd[1:3] == ["launch/torchrun_cmd.py", "--exec"]
    train = ["launch/train.py", "--config", "configs/demo.yaml", "loss.iled.weight=2"]
    assert node_cmd[-5:] == ["--", *train]
    lines = []
    for node_id in (0, 1):  # what each node's task prints, run here without --exec
        printed = subprocess.run([a for a in node_cmd if a != "--exec"], cwd=REPO,
                                 env=dict(env, SLURM_NODEID=str(node_id)),
                                 capture_output=True, text=True, timeout=60)
        assert printed.returncode == 0, printed.stderr
        expected = torchrun_args(slurm_node_from_env(dict(env, SLURM_NODEID=str(node_id))),
                                 train[0], train[1:], max_restarts=2)
        assert printed.stdout.strip() == command_line(expected)
        lines.append(printed.stdout.strip())
    for line, is_host in zip(lines, ("true", "false")):
        assert (" --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint gpu07:24242"
                f" --rdzv-id 4242 --rdzv-conf is_host={is_host} --max-restarts 2 ") in line
    assert lines[0] in proc.stdout  # the batch log shows node 0's line before the start
    assert not (tmp_path / "scontrol.args").exists()


@pytest.mark.parametrize("srun_rc, requeued, exit_code", [
    (REQUEUE_EXIT_CODE, True, 0),
    (1, False, 1),
])
def test_sbatch_requeues_only_on_the_requeue_exit_code(tmp_path, srun_rc, requeued, exit_code):
    proc, _ = run_sbatch(tmp_path, srun_rc=srun_rc)
    assert proc.returncode == exit_code, proc.stderr
    recorded = tmp_path / "scontrol.args"
    assert (recorded.read_text().split() if recorded.exists() else []) == (
        ["requeue", "4242"] if requeued else [])


# --------------------------------------------------------------------------------------
# Two torchrun agents on this machine, joined by the generated rendezvous
# --------------------------------------------------------------------------------------
def start_nodes(tmp_path: Path, mode: str) -> list[subprocess.Popen]:
    """Both 'nodes' of a fake 2-node job, each running ``torchrun_cmd.py --exec``."""
    return start_node_pair(tmp_path, "5150", str(free_port()), [str(WORKER), str(tmp_path), mode])


def start_node_pair(tmp_path: Path, job_id: str, port: str,
                    command: list[str]) -> list[subprocess.Popen]:
    """Nodes 0 and 1 of SLURM job ``job_id`` on this machine, meeting on ``port``, each
    running ``torchrun_cmd.py --exec ... -- command`` and logging to ``tmp_path/node<i>.log``."""
    procs = []
    for node_id in (0, 1):
        env = torchrun_env(slurm_env(nodelist="localhost,127.0.0.1", node_id=node_id,
                                     job_id=job_id, SLURM_GPUS_ON_NODE="1"))
        log = open(tmp_path / f"node{node_id}.log", "w")
        procs.append(subprocess.Popen(
            [sys.executable, str(TORCHRUN_CMD), "--exec", "--port", port, "--", *command],
            cwd=REPO, env=env, stdout=log, stderr=log))
    return procs


def wait_nodes(procs: list[subprocess.Popen], tmp_path: Path) -> list[int]:
    try:
        return [p.wait(timeout=90) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        logs = "\n".join((tmp_path / f"node{i}.log").read_text()[-3000:] for i in (0, 1))
        print(logs)


def reports(tmp_path: Path) -> list[dict]:
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.dist
def test_two_agents_meet_and_report_requeue_on_exit_code_and_on_preemption(tmp_path):
    """Two fake jobs at once: (a) the workers exit with the requeue code themselves; (b) the
    agents receive SIGUSR1 (SLURM's ``--signal=USR1@120``) and forward it to the workers."""
    exiting, signalled = tmp_path / "exit", tmp_path / "signal"
    exiting.mkdir(), signalled.mkdir()
    first = start_nodes(exiting, f"exit:{REQUEUE_EXIT_CODE}")
    second = start_nodes(signalled, f"wait_signal:{REQUEUE_EXIT_CODE}")
    deadline = time.monotonic() + 90
    while not all((signalled / f"ready{r}").exists() for r in (0, 1)):
        assert time.monotonic() < deadline and all(p.poll() is None for p in second), \
            "workers did not start"
        time.sleep(0.1)
    for p in second:
        p.send_signal(signal.SIGUSR1)
    codes_exit, codes_signal = wait_nodes(first, exiting), wait_nodes(second, signalled)

    # (a) The store's host (node 0) always sees its worker's code; another agent may lose the
    # store first and report 1. srun returns the highest task code, so the job sees 75.
    assert codes_exit[0] == REQUEUE_EXIT_CODE and codes_exit[1] in (REQUEUE_EXIT_CODE, 1)
    # (b) Both agents stop on the signal after their workers exited: both report 75.
    assert codes_signal == [REQUEUE_EXIT_CODE, REQUEUE_EXIT_CODE]
    assert [r["signals"] for r in reports(signalled)] == [[signal.SIGUSR1], [signal.SIGUSR1]]
    for got in (reports(exiting), reports(signalled)):
        assert [r["world_size"] for r in got] == [2, 2]
        assert sorted(r["group_rank"] for r in got) == [0, 1]  # one process on each node
        assert [r["local_rank"] for r in got] == [0, 0]
        assert [r["sum"] for r in got] == [3.0, 3.0]  # all-reduce of rank+1 across the nodes
    assert "node 1/2: torchrun --nnodes 2" in (exiting / "node1.log").read_text()


# --------------------------------------------------------------------------------------
# Multi-node training: two agents (one process each) == one node with two processes
# --------------------------------------------------------------------------------------
def tiny_distillation_config(root: Path) -> Path:
    """A 4-step unified distillation run (SphereFace2 + ILED + RPSD with its bank all-gather)."""
    import torch

    from conftest import write_jpeg_folder
    from fr_distill.models import get_backbone

    write_jpeg_folder(root / "data", num_classes=4, per_class=8)
    torch.manual_seed(1)
    torch.save(get_backbone("iresnet18", 32, width=0.125).state_dict(), root / "teacher.pth")
    config = root / "tiny.yaml"
    config.write_text(f"""
model: {{name: iresnet18, embedding_dim: 32, width: 0.125, channels_last: false}}
teacher: {{path: {root}/teacher.pth, name: iresnet18, embedding_dim: 32, width: 0.125}}
data: {{train: {root}/data, loader: torch, batch_size: 4, num_workers: 0}}
optim: {{lr: 0.05}}
schedule: {{total_steps: 4, milestones: [3]}}
precision: {{amp: fp32}}
checkpoint: {{every_steps: 100}}
logging: {{every_steps: 1, tensorboard: false, progress_bar: never}}
run: {{seed: 3}}
""")
    return config


@pytest.mark.dist
def test_two_node_training_equals_one_node_with_two_processes(tmp_path):
    import torch

    config = tiny_distillation_config(tmp_path)
    train = ["launch/train.py", "--config", str(config)]
    single_log = open(tmp_path / "single.log", "w")
    single = subprocess.Popen(  # started together with the two nodes: the runs are independent
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
         "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
         *train, f"run.output_dir={tmp_path / 'single'}"],
        cwd=REPO, env=torchrun_env(), stdout=single_log, stderr=single_log)
    port = str(free_port())
    nodes = start_node_pair(tmp_path, "31", port, [*train, f"run.output_dir={tmp_path / 'multi'}"])
    codes = wait_nodes([single, *nodes], tmp_path)
    assert codes == [0, 0, 0], (tmp_path / "single.log").read_text()[-3000:]
    for node_id in (0, 1):
        assert (f"node {node_id}/2: torchrun --nnodes 2 --nproc-per-node 1 --rdzv-backend c10d "
                f"--rdzv-endpoint localhost:{port} --rdzv-id 31") in \
            (tmp_path / f"node{node_id}.log").read_text()

    def final(run: str) -> dict:
        return torch.load(tmp_path / run / "checkpoints" / "step_00000004.pt", weights_only=True)

    one, two = final("single"), final("multi")
    assert one["step"] == two["step"] == 4
    for part in ("student", "objective"):  # objective: SphereFace2 head and the memory bank
        tensors = {k: v for k, v in one[part].items() if isinstance(v, torch.Tensor)}
        assert tensors and tensors.keys() == {k for k, v in two[part].items()
                                              if isinstance(v, torch.Tensor)}
        for key, value in tensors.items():
            assert torch.allclose(value.double(), two[part][key].double(), rtol=0, atol=1e-6), key
    from fr_distill.models import get_backbone

    torch.manual_seed(3)  # run.seed: the trainer's initialization of the student
    initial = get_backbone("iresnet18", 32, width=0.125).state_dict()
    moved = [k for k, v in initial.items()
             if v.is_floating_point() and not torch.equal(v, one["student"][k])]
    assert "fc.weight" in moved  # the runs trained: equality is not that of untouched weights

"""From a SLURM allocation to the torchrun command line of one node (multi-node training).

``launch/slurm/train.sbatch`` starts one task per node (``srun --ntasks-per-node=1``); each
task runs ``launch/torchrun_cmd.py --exec``, which reads the SLURM variables of its node,
builds the torchrun arguments here and runs torchrun in the same process. Printing the
command (``launch/torchrun_cmd.py`` without ``--exec``) goes through the same functions, so
the line in the log is the line that ran.

Rendezvous: torchrun's c10d backend, endpoint ``<first host of the node list>:<port>``
(the agent of SLURM node 0 hosts the store: ``is_host`` is set from ``SLURM_NODEID``, not
guessed from host names), rendezvous id = the job id, so a requeued job (same id) meets
again and agents of two jobs never mix. SLURM's compressed host lists (``gpu[01-03,07]``,
``rack[1-2]-n[1-2]``) are expanded here, without ``scontrol``.

Preemption: the agents forward SIGUSR1 (besides torchrun's SIGTERM/SIGINT/SIGHUP/SIGQUIT)
to the training processes and give them ``shutdown_timeout`` seconds to write their
checkpoint. The node's exit code is the trainer's ``REQUEUE_EXIT_CODE`` when the workers
asked for a requeue or the agent was stopped by one of those signals, so the batch script
can requeue on it.
"""
from __future__ import annotations

import os
import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from fr_distill.errors import FrDistillError

FORWARDED_SIGNALS = ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT", "SIGUSR1")
"""Signals the torchrun agent catches and forwards to the training processes."""

PORT_BASE = 20000
PORT_SPAN = 10000
"""Default rendezvous port: ``PORT_BASE + job_id % PORT_SPAN`` — two jobs sharing a first
node rarely collide, and the range stays below Linux's ephemeral ports (32768+)."""


class ClusterError(FrDistillError, ValueError):
    """A SLURM environment or host list the launcher cannot use; one line naming the variable."""


# --------------------------------------------------------------------------------------
# Host lists
# --------------------------------------------------------------------------------------
_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")


def _split_top_level(text: str) -> list[str]:
    """Split ``text`` at commas that are not inside brackets."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
            if depth > 1:
                raise ClusterError(f"host list '{text}': nested '[' at position {i}")
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ClusterError(f"host list '{text}': unmatched ']' at position {i}")
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth != 0:
        raise ClusterError(f"host list '{text}': unclosed '['")
    parts.append(text[start:])
    return parts


def _expand_bracket(body: str, full: str) -> list[str]:
    """``'01-03,07'`` → ``['01', '02', '03', '07']``; a range keeps its lower bound's width."""
    out: list[str] = []
    for item in body.split(","):
        match = _RANGE.match(item.strip())
        if not match:
            raise ClusterError(f"host list '{full}': bad range '{item}' in '[{body}]'")
        low, high = match.group(1), match.group(2)
        if high is None:
            out.append(low)
            continue
        if int(high) < int(low):
            raise ClusterError(f"host list '{full}': range '{item}' runs backwards")
        width = len(low) if low.startswith("0") else 0
        out += [str(n).zfill(width) for n in range(int(low), int(high) + 1)]
    return out


def _expand_host(pattern: str, full: str) -> list[str]:
    """One host pattern, possibly with several bracket groups (their cartesian product)."""
    match = re.search(r"\[([^\]]*)\]", pattern)
    if not match:
        if "[" in pattern or "]" in pattern:
            raise ClusterError(f"host list '{full}': unbalanced brackets in '{pattern}'")
        return [pattern]
    head, tail = pattern[:match.start()], pattern[match.end():]
    return [head + middle + rest
            for middle in _expand_bracket(match.group(1), full)
            for rest in _expand_host(tail, full)]


def expand_hostlist(text: str) -> list[str]:
    """Expand a SLURM host list: ``'gpu[01-03,07],login1'`` → ``gpu01 gpu02 gpu03 gpu07 login1``.

    Supports several comma-separated patterns, several bracket groups per pattern, ranges
    with zero padding (``[08-10]`` → 08 09 10) and single numbers. Order is kept (node 0 of
    the job is the first host).
    """
    text = text.strip()
    if not text:
        raise ClusterError("host list is empty")
    hosts: list[str] = []
    for pattern in _split_top_level(text):
        pattern = pattern.strip()
        if not pattern:
            raise ClusterError(f"host list '{text}': empty entry")
        hosts += _expand_host(pattern, text)
    return hosts


# --------------------------------------------------------------------------------------
# SLURM environment
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SlurmNode:
    """What one node of a SLURM job needs to know to join the job's rendezvous."""

    hosts: tuple[str, ...]
    node_id: int
    job_id: str
    gpus_per_node: int | None

    @property
    def num_nodes(self) -> int:
        return len(self.hosts)


def _int_var(env: Mapping[str, str], name: str) -> int:
    value = env.get(name, "")
    try:
        return int(value)
    except ValueError:
        raise ClusterError(f"SLURM variable {name}={value!r} is not an integer") from None


def _gpus_per_node(env: Mapping[str, str]) -> int | None:
    """``SLURM_GPUS_ON_NODE``, else ``SLURM_GPUS_PER_NODE`` (``8`` or ``h100:8``), else None."""
    if env.get("SLURM_GPUS_ON_NODE"):
        return _int_var(env, "SLURM_GPUS_ON_NODE")
    per_node = env.get("SLURM_GPUS_PER_NODE", "")
    if per_node:
        count = per_node.rsplit(":", 1)[-1].split("(", 1)[0]
        if not count.isdigit():
            raise ClusterError(f"SLURM variable SLURM_GPUS_PER_NODE={per_node!r}: no GPU count")
        return int(count)
    return None


def slurm_node_from_env(env: Mapping[str, str] | None = None) -> SlurmNode:
    """Read this node's view of the job from SLURM's variables (``os.environ`` by default).

    Uses ``SLURM_JOB_NODELIST`` (or ``SLURM_NODELIST``), ``SLURM_NNODES`` (or
    ``SLURM_JOB_NUM_NODES``) as a consistency check, ``SLURM_NODEID`` (0 in the batch
    step, where it is unset), ``SLURM_JOB_ID`` and the GPU count of the node.
    """
    env = os.environ if env is None else env
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        raise ClusterError("SLURM variable SLURM_JOB_NODELIST is not set: run inside a SLURM "
                           "allocation (sbatch/salloc) or pass the torchrun options yourself")
    hosts = tuple(expand_hostlist(nodelist))
    for name in ("SLURM_NNODES", "SLURM_JOB_NUM_NODES"):
        if env.get(name):
            if _int_var(env, name) != len(hosts):
                raise ClusterError(f"SLURM variable {name}={env[name]} disagrees with "
                                   f"SLURM_JOB_NODELIST={nodelist!r} ({len(hosts)} hosts)")
            break
    node_id = _int_var(env, "SLURM_NODEID") if env.get("SLURM_NODEID") else 0
    if not 0 <= node_id < len(hosts):
        raise ClusterError(f"SLURM variable SLURM_NODEID={node_id} is outside 0..{len(hosts) - 1}")
    job_id = env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID")
    if not job_id:
        raise ClusterError("SLURM variable SLURM_JOB_ID is not set")
    return SlurmNode(hosts=hosts, node_id=node_id, job_id=job_id, gpus_per_node=_gpus_per_node(env))


# --------------------------------------------------------------------------------------
# torchrun arguments
# --------------------------------------------------------------------------------------
def default_port(job_id: str) -> int:
    """The rendezvous port of a job: ``PORT_BASE + job_id % PORT_SPAN`` (digits of the id)."""
    digits = re.sub(r"\D", "", job_id)
    return PORT_BASE + (int(digits) % PORT_SPAN if digits else 0)


def torchrun_args(node: SlurmNode, script: str, script_args: Sequence[str] = (), *,
                  nproc_per_node: int | None = None, port: int | None = None,
                  rdzv_host: str | None = None, max_restarts: int = 0,
                  shutdown_timeout: int = 90) -> list[str]:
    """torchrun's arguments (without the ``torchrun`` word) for ``node`` of a SLURM job.

    ``nproc_per_node`` defaults to the node's GPU count; ``port`` to :func:`default_port`;
    ``rdzv_host`` to the first host of the job. ``max_restarts``: how often the agents restart
    failed workers (which resume from the newest checkpoint) before giving up.
    ``shutdown_timeout``: seconds the workers get to checkpoint after a forwarded signal.
    """
    nproc = nproc_per_node if nproc_per_node is not None else node.gpus_per_node
    if nproc is None:
        raise ClusterError("no GPU count: SLURM_GPUS_ON_NODE and SLURM_GPUS_PER_NODE are unset "
                           "(request --gpus-per-node) or pass --nproc-per-node")
    if nproc < 1:
        raise ClusterError(f"processes per node must be >= 1, got {nproc}")
    if max_restarts < 0:
        raise ClusterError(f"max restarts must be >= 0, got {max_restarts}")
    endpoint_port = default_port(node.job_id) if port is None else port
    if not 0 < endpoint_port < 65536:
        raise ClusterError(f"rendezvous port must be in 1..65535, got {endpoint_port}")
    host = rdzv_host or node.hosts[0]
    return ["--nnodes", str(node.num_nodes), "--nproc-per-node", str(nproc),
            "--rdzv-backend", "c10d", "--rdzv-endpoint", f"{host}:{endpoint_port}",
            "--rdzv-id", node.job_id,
            "--rdzv-conf", f"is_host={'true' if node.node_id == 0 else 'false'}",
            "--max-restarts", str(max_restarts),
            "--signals-to-handle", ",".join(FORWARDED_SIGNALS),
            "--shutdown-timeout", str(shutdown_timeout),
            script, *script_args]


def command_line(args: Sequence[str]) -> str:
    """The shell line ``torchrun <args>`` (quoted so it can be pasted)."""
    return shlex.join(["torchrun", *args])


def run_torchrun(args: Sequence[str], requeue_exit_code: int) -> int:
    """Run torchrun with ``args`` in this process; return the node's exit code.

    0 on success; ``requeue_exit_code`` when every failed worker exited with it or the agent
    was stopped by a forwarded signal (preemption: the workers were told to checkpoint);
    otherwise the first failed worker's exit code (1 when it died of a signal).
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun_main

    try:
        torchrun_main(list(args))
    except SignalException:
        return requeue_exit_code
    except ChildFailedError as err:
        codes = [failure.exitcode for failure in err.failures.values()]
        if codes and all(code == requeue_exit_code for code in codes):
            return requeue_exit_code
        first = codes[0] if codes else 1
        return first if first > 0 else 1
    return 0


__all__ = ["ClusterError", "FORWARDED_SIGNALS", "SlurmNode", "expand_hostlist",
           "slurm_node_from_env", "default_port", "torchrun_args", "command_line", "run_torchrun"]

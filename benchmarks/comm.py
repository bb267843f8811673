"""Communication of one training step: the collectives counted, against a closed-form model.

``python tools/benchmark.py comm`` runs the trainer's own step
(:func:`fr_distill.engine.step.train_step`, plus the logging callback's reduction) under
``torchrun`` with gloo on the CPU at each world size of ``--worlds`` (default 1, 2, 3), with
tiny models, counts every collective of two steps (an ordinary step and a logging step), and
prints the counts per collective and call site next to :func:`predict`, the model of the
step's communication; then it projects the model to the paper's pair on 8–512 GPUs
(:func:`scaling_rows`). ``docs/SCALING.md`` holds the formula and the numbers.

**What is counted: the payload.** For each call, the bytes of the tensor(s) a rank hands to
the collective as its contribution: the buffer of an ``all_reduce``, the rank's own part of an
``all_gather``, the whole input of a ``reduce_scatter_tensor``, the buffers of a broadcast
(every rank, the root's being sent). DDP reduces its gradient buckets in C++; a DDP
communication hook (:meth:`CollectiveCounter.ddp_hook`) counts each bucket and then runs the
default all-reduce. Payload is what the code decides; **wire bytes** (what a rank actually
sends) depend on the backend's algorithm and are modeled by :func:`wire_bytes`
(bandwidth-optimal ring algorithms, as NCCL's), not measured.

The call site of a collective is the innermost frame outside torch and outside
``fr_distill/dist.py``, with the outermost ``dist`` helper it went through
(``fr_distill/losses/iled.py:distance_weights via dist.all_reduce_sum``).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import socket
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.distributed

import fr_distill
from fr_distill import dist

PACKAGE_ROOT = Path(fr_distill.__file__).resolve().parent.parent
#: the checkout holding ``benchmarks/``, put on the workers' path (``-m benchmarks.comm``)
REPO = Path(__file__).resolve().parents[1]
TORCH_ROOT = str(Path(torch.__file__).resolve().parent)
DIST_FILE = str(Path(dist.__file__).resolve())
THIS_FILE = str(Path(__file__).resolve())

#: torch.distributed functions counted, and which argument holds this rank's payload.
PAYLOAD_ARGUMENT = {"all_reduce": 0, "all_gather": 1, "all_gather_into_tensor": 1,
                    "reduce_scatter_tensor": 1, "reduce_scatter": 1, "broadcast": 0,
                    "reduce": 0, "_broadcast_coalesced": 1}
#: collectives of objects (pickled payload, counted by call only) and barriers.
UNSIZED = ("all_gather_object", "broadcast_object_list", "barrier")
DDP_BUCKET_SITE = "DDP gradient bucket (comm hook)"


def _nbytes(value) -> int:
    if torch.is_tensor(value):
        return value.numel() * value.element_size()
    return sum(_nbytes(item) for item in value)


def call_site() -> str:
    """Where the collective being called comes from (see the module docstring)."""
    frame, via = sys._getframe(1), None
    while frame is not None:
        path = str(Path(frame.f_code.co_filename).resolve())
        if path == DIST_FILE:
            via = frame.f_code.co_qualname
        elif not path.startswith(TORCH_ROOT) and path != THIS_FILE:
            where = Path(path)
            name = where.relative_to(PACKAGE_ROOT) if where.is_relative_to(PACKAGE_ROOT) else where
            site = f"{name}:{frame.f_code.co_qualname}"
            return site if via is None else f"{site} via dist.{via}"
        frame = frame.f_back
    return f"dist.{via}" if via else "<unknown>"


class CollectiveCounter:
    """Counts calls and payload bytes per ``(collective, call site)`` while installed.

    A context manager that replaces the torch.distributed functions of
    :data:`PAYLOAD_ARGUMENT` and :data:`UNSIZED` (callers look them up at call time, DDP's
    buffer broadcast included) and restores them on exit. ``counts`` maps
    ``"<collective> <site>"`` to ``[calls, bytes]``; :meth:`reset` starts a new window.
    """

    def __init__(self) -> None:
        self.counts: dict[str, list[int]] = {}
        self._originals: dict[str, object] = {}
        self._site: str | None = None

    def reset(self) -> dict[str, list[int]]:
        """The counts so far, and start counting afresh."""
        counts, self.counts = self.counts, {}
        return counts

    def record(self, kind: str, nbytes: int) -> None:
        entry = self.counts.setdefault(f"{kind} {self._site or call_site()}", [0, 0])
        entry[0] += 1
        entry[1] += nbytes

    def _wrap(self, kind: str, original):
        position = PAYLOAD_ARGUMENT.get(kind)

        def counted(*args, **kwargs):
            self.record(kind, 0 if position is None else _nbytes(args[position]))
            return original(*args, **kwargs)

        return counted

    def __enter__(self) -> "CollectiveCounter":
        for kind in (*PAYLOAD_ARGUMENT, *UNSIZED):
            self._originals[kind] = getattr(torch.distributed, kind)
            setattr(torch.distributed, kind, self._wrap(kind, self._originals[kind]))
        return self

    def __exit__(self, *exc) -> None:
        for kind, original in self._originals.items():
            setattr(torch.distributed, kind, original)
        self._originals.clear()

    def ddp_hook(self, state, bucket):
        """DDP communication hook: DDP's default all-reduce of ``bucket``, counted as one
        ``all_reduce`` of the bucket's flat gradient buffer at :data:`DDP_BUCKET_SITE`."""
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        self._site = DDP_BUCKET_SITE
        try:
            return allreduce_hook(state, bucket)
        finally:
            self._site = None


# ------------------------------------------------------------------------------------------
# The model
# ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StepShape:
    """What one optimizer step's communication depends on.

    ``batch`` is B, images per rank per micro-step; ``dim`` D the student's embedding,
    ``teacher_dim`` the width of the distillation terms and the bank (the projector's output);
    ``params`` P the student's trainable parameters (float32 gradients: parameters stay
    float32 under autocast) and ``buffer_bytes`` its buffers (BatchNorm statistics).
    """

    world: int
    batch: int
    classes: int
    dim: int
    teacher_dim: int
    params: int
    buffer_bytes: int
    head: str = "replicated"
    terms: tuple[str, ...] = ("sphereface2", "iled", "rpsd")
    projector: bool = False
    distance_weighting: bool = True
    accumulation: int = 1
    grad_clip: bool = False
    backend: str = "nccl"
    logging_step: bool = False


@dataclass(frozen=True)
class Traffic:
    """One term of :func:`predict`: a collective at a call site, per optimizer step."""

    kind: str
    site: str
    calls: int | None   # None: DDP's bucket count, which its bucketing decides
    nbytes: int

    @property
    def key(self) -> str:
        return f"{self.kind} {self.site}"


def _site(module: str, function: str, helper: str) -> str:
    return f"fr_distill/{module}.py:{function} via dist.{helper}"


#: Call site of each term of the model (the collective kind is the first word of the key).
SITES = {
    "ddp_gradients": DDP_BUCKET_SITE,
    "ddp_buffers": "fr_distill/engine/step.py:student_forward",
    "head_features": _site("losses/sphereface2", "SphereFace2Head.forward", "all_gather_with_grad"),
    "head_labels": _site("losses/sphereface2", "SphereFace2Head.forward", "all_gather_cat"),
    "rkd_student": _site("losses/baselines", "RelationalKD.forward", "all_gather_with_grad"),
    "rkd_teacher": _site("losses/baselines", "RelationalKD.forward", "all_gather_cat"),
    "feature_grads": _site("engine/step", "backward", "_GatherWithGrad.backward"),
    "iled_normalizer": _site("losses/iled", "distance_weights", "all_reduce_sum"),
    "replicated_grads": _site("engine/step", "agree", "average_gradients"),
    "nonfinite_flags": _site("engine/step", "agree", "all_reduce_sum"),
    "clip_norm": _site("engine/optim", "clip_gradients", "all_reduce_sum"),
    "bank": _site("losses/objective", "Objective.update_bank", "all_gather_cat"),
    "diagnostics": _site("losses/diagnostics", "term_diagnostics", "all_reduce_sum"),
    "diagnostics_feature_grads": _site("losses/diagnostics", "term_diagnostics",
                                       "_GatherWithGrad.backward"),
    "logging": _site("engine/run_log", "LoggingCallback._emit", "all_reduce_sum"),
}
FLOAT, INT64 = 4, 8


def predict(s: StepShape) -> dict[str, Traffic]:
    """Payload bytes (and calls) each rank hands to each collective in one optimizer step of
    ``accumulation`` micro-steps; nothing on one process. Terms with no traffic are left out.

    Per step: DDP's bucketed all-reduce of the student's gradients (4·P) and its broadcast of
    the student's buffers from rank 0 (once per step: DDP syncs buffers before a forward that
    follows a synchronized one, i.e. the first micro-step); ``agree``'s average of the
    replicated gradients (the head's ``C×D`` weight when replicated, its bias, the projector),
    one per parameter, and its one vector of non-finite flags and stop signal (embeddings,
    terms, total, stop); the clipping norm's scalar with ``optim.grad_clip``. Per micro-step:
    a class-sharded head's all-gather of features (B·D floats) and labels (B int64) and, in
    the backward, the sum of the gathered features' gradient (W·B·D floats: an all-reduce on
    gloo, a reduce-scatter on NCCL); RKD's gathers likewise; ILED's global normalizer (2
    floats); the bank's all-gather of the normalized teacher and student rows (B·2·Dt floats,
    after the optimizer step). A logging step adds the diagnostics' all-reduce (2 floats per
    term and per mining statistic), the diagnostics' gradients through each differentiable
    gather again, and the logging window's averages (terms, total, cosine, data wait).
    """
    if s.world == 1:
        return {}
    W, B, A, D, Dt = s.world, s.batch, s.accumulation, s.dim, s.teacher_dim
    feature_grad_kind = "reduce_scatter_tensor" if s.backend == "nccl" else "all_reduce"
    out: dict[str, Traffic] = {}

    def add(term: str, calls: int | None, nbytes: int, kind: str = "all_reduce") -> None:
        if nbytes:
            out[term] = Traffic(kind, SITES[term], calls, nbytes)

    head = "sphereface2" in s.terms
    sharded = head and s.head == "class_sharded"
    rkd = "rkd" in s.terms
    add("ddp_gradients", None, FLOAT * s.params)
    add("ddp_buffers", 1, s.buffer_bytes, "_broadcast_coalesced")
    replicated = ([FLOAT * s.classes * D] if head and not sharded else []) \
        + ([FLOAT] if head else []) + ([FLOAT * D * Dt] if s.projector else [])
    add("replicated_grads", len(replicated), sum(replicated))
    if sharded:
        add("head_features", A, A * FLOAT * B * D, "all_gather")
        add("head_labels", A, A * INT64 * B, "all_gather")
    if rkd:
        add("rkd_student", A, A * FLOAT * B * Dt, "all_gather")
        add("rkd_teacher", A, A * FLOAT * B * Dt, "all_gather")
    gathered_dims = ([D] if sharded else []) + ([Dt] if rkd else [])
    add("feature_grads", A * len(gathered_dims), A * FLOAT * W * B * sum(gathered_dims),
        feature_grad_kind)
    if "iled" in s.terms and s.distance_weighting:
        add("iled_normalizer", A, A * 2 * FLOAT)
    flags = 2 + len(s.terms) + 1 + 1  # student and teacher embeddings, terms, total; stop
    add("nonfinite_flags", 1, FLOAT * flags)
    if s.grad_clip:
        add("clip_norm", 1, FLOAT)
    if "rpsd" in s.terms:
        add("bank", A, A * FLOAT * B * 2 * Dt, "all_gather")
    if s.logging_step:
        statistics = ("iled" in s.terms) + 2 * ("rpsd" in s.terms)
        add("diagnostics", 1, FLOAT * 2 * (len(s.terms) + statistics))
        add("diagnostics_feature_grads", len(gathered_dims), FLOAT * W * B * sum(gathered_dims),
            feature_grad_kind)
        add("logging", 1, FLOAT * (len(s.terms) + 3))
    return out


def wire_bytes(kind: str, nbytes: int, world: int) -> float:
    """Bytes the busiest rank sends for a payload of ``nbytes`` under the bandwidth-optimal
    ring algorithms (NCCL's for large messages): all-reduce ``2(W−1)/W·n`` (reduce-scatter then
    all-gather), all-gather ``(W−1)·n`` (n: the rank's part), reduce-scatter ``(W−1)/W·n``
    (n: the whole input), broadcast ``n`` (a pipelined chain: every rank but the last
    forwards it). Divided by the bus bandwidth this is the transfer time."""
    if world == 1:
        return 0.0
    factor = {"all_reduce": 2 * (world - 1) / world, "all_gather": world - 1,
              "reduce_scatter_tensor": (world - 1) / world, "_broadcast_coalesced": 1.0}[kind]
    return factor * nbytes


# ------------------------------------------------------------------------------------------
# Counting the trainer's step (a torchrun worker)
# ------------------------------------------------------------------------------------------
#: The counted scenarios: the paper's objective as configured (replicated head), and every
#: other path (class-sharded head, RKD's gathers, a projector to a wider teacher, gradient
#: accumulation, clipping).
SCENARIOS = {
    "paper": dict(head="replicated", terms=("sphereface2", "iled", "rpsd"), projector=False,
                  teacher_dim=32, accumulation=1, grad_clip=False),
    "sharded": dict(head="class_sharded", terms=("sphereface2", "iled", "rpsd", "rkd"),
                    projector=True, teacher_dim=48, accumulation=2, grad_clip=True),
}
TINY = dict(batch=4, classes=10, dim=32, width=0.125)
WARMUP_STEPS = 2
COUNTED_STEPS = ("step", "logging_step")  # an ordinary step, then a logging step


def student_size(student: torch.nn.Module) -> tuple[int, int]:
    """``(P, S)``: the trainable parameters (DDP's buckets hold their gradients) and the bytes
    of the buffers (DDP broadcasts them) of ``student``."""
    return (sum(p.numel() for p in student.parameters() if p.requires_grad),
            sum(_nbytes(b) for b in student.buffers()))


def tiny_run(name: str, run_dir: Path, counter: CollectiveCounter):
    """A :class:`~fr_distill.engine.state.Run` of scenario ``name`` on this process group:
    tiny IResNet-18 student (under the trainer's DDP wrapper, buckets counted by ``counter``)
    and frozen teacher, the trainer's objective and optimizer, logging every 4 steps."""
    from benchmarks.train import calibrate_batchnorm
    from fr_distill.config import Config, ScheduleConfig
    from fr_distill.engine.build import assemble_run, data_parallel
    from fr_distill.losses import build_objective
    from fr_distill.models import FrozenTeacher, get_backbone

    spec, device = SCENARIOS[name], torch.device("cpu")
    cfg = Config()
    cfg.run.output_dir = str(run_dir)
    cfg.run.max_nonfinite_steps = 1
    cfg.precision.amp = "fp32"
    cfg.loss.sphereface2.parallel = spec["head"]
    cfg.loss.rkd.weight = 1.0 if "rkd" in spec["terms"] else 0.0
    cfg.optim.grad_clip = 5.0 if spec["grad_clip"] else 0.0
    cfg.optim.lr = 0.01
    cfg.optim.accumulation_steps = spec["accumulation"]
    cfg.schedule = ScheduleConfig(name="multistep", milestones=[], total_steps=1000)
    cfg.logging.every_steps = WARMUP_STEPS + len(COUNTED_STEPS)
    torch.manual_seed(0)
    student = get_backbone("iresnet18", TINY["dim"], width=TINY["width"]).train()
    teacher_net = get_backbone("iresnet18", spec["teacher_dim"], width=TINY["width"])
    teacher = FrozenTeacher(calibrate_batchnorm(teacher_net, torch.rand(8, 3, 112, 112) * 2 - 1),
                            source="random iresnet18", backend="torch",
                            embedding_dim=spec["teacher_dim"])
    objective = build_objective(cfg.loss, TINY["classes"], TINY["dim"], spec["teacher_dim"],
                                dist.world_size() * TINY["batch"] * spec["accumulation"],
                                spec["projector"], device)
    model = data_parallel(student, device)
    if model is not student:
        model.register_comm_hook(None, counter.ddp_hook)
    run_dir.mkdir(parents=True, exist_ok=True)
    info = dist.DistInfo(rank=dist.rank(), world_size=dist.world_size(), device=device)
    return assemble_run(cfg, info, student, objective, model=model, teacher=teacher)


def count_scenario(name: str, work_dir: Path, counter: CollectiveCounter) -> dict:
    """The trainer's step and logging callback on :func:`tiny_run`: ``WARMUP_STEPS`` steps
    (DDP rebuilds its buckets in the second), then one window of ``counter`` per step of
    :data:`COUNTED_STEPS`; the step's :class:`StepShape` and the windows."""
    from benchmarks.train import synthetic_batches
    from fr_distill.engine.faults import StopSignal
    from fr_distill.engine.run_log import LoggingCallback
    from fr_distill.engine.step import train_step

    spec = SCENARIOS[name]
    run = tiny_run(name, work_dir / name, counter)
    batches = synthetic_batches(TINY["batch"], TINY["classes"], run.info.device, seed=dist.rank())
    logger, stop, windows = LoggingCallback(), StopSignal(), {}
    for window in (None,) * WARMUP_STEPS + COUNTED_STEPS:
        counter.reset()
        stats = train_step(run, batches, stop)
        logger.on_step_end(run, stats)
        if stats.skipped:
            raise RuntimeError(f"comm benchmark: step {run.step} of {name} was non-finite")
        if window is not None:
            windows[window] = counter.reset()
    params, buffer_bytes = student_size(run.student)
    shape = StepShape(world=dist.world_size(), batch=TINY["batch"], classes=TINY["classes"],
                      dim=TINY["dim"], teacher_dim=spec["teacher_dim"], params=params,
                      buffer_bytes=buffer_bytes, head=spec["head"], terms=spec["terms"],
                      projector=spec["projector"], accumulation=spec["accumulation"],
                      grad_clip=spec["grad_clip"], backend="gloo")
    return {"shape": asdict(shape), "windows": windows}


def worker(out_dir: Path) -> None:
    """One rank of a counting run: every scenario, written to ``out_dir/rank<r>.json``."""
    info = dist.init("gloo", "cpu")
    torch.set_num_threads(1)
    try:
        with CollectiveCounter() as counter:
            results = {name: count_scenario(name, out_dir, counter) for name in SCENARIOS}
        (out_dir / f"rank{info.rank}.json").write_text(json.dumps(
            {"world": info.world_size, "scenarios": results}, indent=1))
    finally:
        dist.shutdown()


# ------------------------------------------------------------------------------------------
# Counted against predicted
# ------------------------------------------------------------------------------------------
def window_shape(shape: dict, window: str) -> StepShape:
    """The :class:`StepShape` of a counted window (a worker's ``shape``, as JSON)."""
    return replace(StepShape(**{**shape, "terms": tuple(shape["terms"])}),
                   logging_step=window == "logging_step")


def compare(shape: StepShape, counted: dict[str, list[int]]) -> list[dict]:
    """One row per term of :func:`predict` and per counted collective it does not predict
    (term ``unmodeled``): calls and bytes counted and predicted, wire bytes modeled."""
    rows, seen = [], set()
    for term, traffic in predict(shape).items():
        calls, nbytes = counted.get(traffic.key, (0, 0))
        seen.add(traffic.key)
        rows.append({"term": term, "kind": traffic.kind, "calls": calls,
                     "predicted_calls": traffic.calls if traffic.calls is not None else calls,
                     "bytes": nbytes, "predicted_bytes": traffic.nbytes,
                     "wire_bytes": wire_bytes(traffic.kind, traffic.nbytes, shape.world)})
    for key, (calls, nbytes) in counted.items():
        if key not in seen:
            rows.append({"term": "unmodeled: " + key, "kind": key.split()[0], "calls": calls,
                         "predicted_calls": 0, "bytes": nbytes, "predicted_bytes": 0,
                         "wire_bytes": float("nan")})
    return rows


def rows_match(rows: list[dict]) -> bool:
    return all(r["calls"] == r["predicted_calls"] and r["bytes"] == r["predicted_bytes"]
               for r in rows)


def format_comparison(world: int, scenario: str, window: str, rows: list[dict]) -> str:
    head = (f"W={world} {scenario} {window}\n  {'term':<26} {'collective':<22} {'calls':>9} "
            f"{'counted B':>11} {'predicted B':>11} {'ring wire B':>12}")
    lines = [head]
    for r in rows:
        calls = f"{r['calls']}/{r['predicted_calls']}"
        lines.append(f"  {r['term']:<26} {r['kind']:<22} {calls:>9} {r['bytes']:>11} "
                     f"{r['predicted_bytes']:>11} {r['wire_bytes']:>12.0f}")
    if not rows:
        lines.append("  (no collectives: one process)")
    return "\n".join(lines)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world: int, out_dir: Path, timeout: float) -> list[dict]:
    """Run :func:`worker` under ``torchrun --nproc_per_node world`` (gloo, CPU, one thread
    per rank); every rank's result."""
    out_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": os.pathsep.join([str(REPO), str(PACKAGE_ROOT),
                                          os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           "-m", "benchmarks.comm", "--worker", str(out_dir)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"torchrun failed ({proc.returncode}): {' '.join(cmd)}\n"
                           f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(world)]


# ------------------------------------------------------------------------------------------
# Projection to the paper's pair on a GPU cluster
# ------------------------------------------------------------------------------------------
#: Distillation step of the paper's pair (IResNet-100 → IResNet-18, 112×112), GFLOP per image,
#: counted by ``tools/benchmark.py train`` (docs/BENCHMARKS.md#train) with C = 8,631 classes
#: and an empty bank; the student's forward alone is 5.22.
STEP_GFLOP, STUDENT_FWD_GFLOP, COUNTED_CLASSES = 39.8, 5.22, 8631
DATASETS = (("VGGFace2", 8631), ("Glint360K", 360232), ("WebFace42M", 2059906))


@dataclass(frozen=True)
class Cluster:
    """Assumed hardware (docs/SCALING.md states why): H100 SXM at ``mfu`` of its dense bf16
    peak; 8 GPUs per node on NVLink, nodes on one 400 Gb/s InfiniBand NIC per GPU; ring
    collectives at ``link_efficiency`` of the slower link; ``latency_s`` per collective per
    ``log2 W`` (tree/PAT-like start-up)."""

    peak_flops: float = 989e12
    mfu: float = 0.45
    gpus_per_node: int = 8
    nvlink_bytes_s: float = 450e9      # per direction, per GPU
    network_bytes_s: float = 400e9 / 8  # 400 Gb/s per GPU
    link_efficiency: float = 0.8
    latency_s: float = 5e-6

    def bus_bandwidth(self, world: int) -> float:
        link = self.nvlink_bytes_s if world <= self.gpus_per_node else self.network_bytes_s
        return self.link_efficiency * link


def paper_student() -> tuple[int, int]:
    """:func:`student_size` of the paper's student, IResNet-18 with D = 512."""
    from fr_distill.models import get_backbone

    return student_size(get_backbone("iresnet18", 512))


def ddp_buckets(params: int, first_mib: float = 1.0, cap_mib: float = 25.0) -> int:
    """DDP's bucket count for ``params`` float32 gradients (its default caps, ignoring
    parameter boundaries)."""
    rest = max(0.0, FLOAT * params - first_mib * 2 ** 20)
    return 1 + math.ceil(rest / (cap_mib * 2 ** 20))


def step_time(shape: StepShape, cluster: Cluster) -> dict[str, float]:
    """Seconds of one step on ``cluster``: compute (FLOPs of the pair plus the head's
    ``6·C·D`` and RPSD's ``8·Q·D`` per image, ``Q = 3·W·B``), each communication term
    (latency + wire bytes / bus bandwidth), the exposed communication (all of it but the
    part of DDP's all-reduce that the student's backward hides) and the shares."""
    W, B, D = shape.world, shape.batch, shape.dim
    per_image = (STEP_GFLOP * 1e9 + 6 * D * (shape.classes - COUNTED_CLASSES)
                 + 8 * 3 * W * B * D)
    flops_s = cluster.peak_flops * cluster.mfu
    compute = B * shape.accumulation * per_image / flops_s
    backward = B * shape.accumulation * 2 * STUDENT_FWD_GFLOP * 1e9 / flops_s
    bandwidth, hop = cluster.bus_bandwidth(W), cluster.latency_s * max(1.0, math.log2(W))
    terms = {}
    for term, t in predict(shape).items():
        calls = ddp_buckets(shape.params) if t.calls is None else t.calls
        terms[term] = calls * hop + wire_bytes(t.kind, t.nbytes, W) / bandwidth
    ddp = terms.get("ddp_gradients", 0.0)
    total = sum(terms.values())
    exposed = total - ddp + max(0.0, ddp - backward)
    return {"compute": compute, "comm": total, "exposed": exposed, "terms": terms,
            "share": total / (compute + total), "exposed_share": exposed / (compute + exposed)}


def scaling_rows(worlds=(8, 64, 512), batch: int = 64,
                 cluster: Cluster = Cluster()) -> list[dict]:
    """The model on the paper's pair (B = 64 per GPU, D = 512, SphereFace2 + ILED + RPSD) for
    each data set's class count, both head modes and each world size."""
    params, buffers = paper_student()
    rows = []
    for dataset, classes in DATASETS:
        for head in ("replicated", "class_sharded"):
            for world in worlds:
                shape = StepShape(world=world, batch=batch, classes=classes, dim=512,
                                  teacher_dim=512, params=params, buffer_bytes=buffers, head=head)
                wire = {term: wire_bytes(t.kind, t.nbytes, world)
                        for term, t in predict(shape).items()}
                rows.append({"dataset": dataset, "classes": classes, "head": head,
                             "world": world, "wire_bytes": wire,
                             **step_time(shape, cluster)})
    return rows


def format_scaling(rows: list[dict]) -> str:
    groups = {"DDP": ("ddp_gradients", "ddp_buffers"),
              "head": ("replicated_grads", "head_features", "head_labels", "feature_grads"),
              "bank": ("bank",)}
    head = (f"{'data set':<10} {'head':<13} {'W':>4} " + " ".join(f"{g + ' MB':>9}" for g in groups)
            + f" {'comm ms':>8} {'compute ms':>10} {'share':>6} {'exposed':>7}")
    lines = [head, "-" * len(head)]
    for r in rows:
        mb = [sum(r["wire_bytes"].get(t, 0.0) for t in terms) / 1e6 for terms in groups.values()]
        lines.append(f"{r['dataset']:<10} {r['head']:<13} {r['world']:>4} "
                     + " ".join(f"{v:>9.1f}" for v in mb)
                     + f" {r['comm'] * 1e3:>8.2f} {r['compute'] * 1e3:>10.2f}"
                     f" {100 * r['share']:>5.1f}% {100 * r['exposed_share']:>6.1f}%")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="tools/benchmark.py comm",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 3],
                        help="world sizes counted under torchrun (gloo, CPU)")
    parser.add_argument("--scale-worlds", type=int, nargs="+", default=[8, 64, 512],
                        help="GPU counts of the projection to the paper's pair")
    parser.add_argument("--scale-batch", type=int, default=64,
                        help="images per GPU of the projection (the paper config: 64)")
    parser.add_argument("--timeout", type=float, default=600.0, help="per torchrun launch, s")
    parser.add_argument("--json", default="", help="write the counts and the projection here")
    parser.add_argument("--worker", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if min(args.worlds) < 1 or min(args.scale_worlds) < 1 or args.scale_batch < 1:
        parser.error("--worlds, --scale-worlds and --scale-batch must be >= 1")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.worker:
        worker(Path(args.worker))
        return {}
    report = {"machine": {"torch": torch.__version__, "python": platform.python_version(),
                          "cpu": platform.processor() or platform.machine(),
                          "cpu_count": os.cpu_count()}, "counted": [], "all_match": True}
    with tempfile.TemporaryDirectory(prefix="fr_distill_comm_") as tmp:
        for world in args.worlds:
            results = launch(world, Path(tmp) / f"w{world}", args.timeout)
            for name, result in results[0]["scenarios"].items():
                for window, counted in result["windows"].items():
                    same = all(r["scenarios"][name]["windows"][window] == counted
                               for r in results)
                    rows = compare(window_shape(result["shape"], window), counted)
                    match = same and rows_match(rows)
                    report["all_match"] &= match
                    report["counted"].append({"world": world, "scenario": name,
                                              "window": window, "rows": rows,
                                              "same_on_every_rank": same, "match": match})
                    print(format_comparison(world, name, window, rows)
                          + f"\n  counted == predicted: {match}; same on every rank: {same}\n")
    report["scaling"] = scaling_rows(tuple(args.scale_worlds), args.scale_batch)
    print(f"Paper's pair at {args.scale_batch} images per GPU, per GPU per step (model; "
          f"assumptions in docs/SCALING.md):")
    print(format_scaling(report["scaling"]))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    if not report["all_match"]:
        raise SystemExit("comm benchmark: counted collectives differ from the model")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])

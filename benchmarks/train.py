"""One distillation training step, timed phase by phase, against plain training.

For every batch size × precision (bf16, fp16, fp32) × mode (eager; compiled with
``--compile``), in one run, two (three with ``--cache``) variants of the trainer's own step
(:func:`fr_distill.engine.step.train_step`, accumulation 1) on the same in-memory batches:
  * ``distill`` — frozen teacher forward (``no_grad``, autocast) + student forward/backward +
                  the unified objective (SphereFace2 + ILED + RPSD) + memory-bank all-gather;
  * ``plain``   — the same student and SphereFace2 head without a teacher (training from
                  scratch);
  * ``cached``  — ``distill`` with the teacher's rows read from a teacher-embedding cache
                  (:class:`fr_distill.teacher_cache.TeacherCache` over a float16 rows file of
                  the batches, written first; ``--cache-placement``) instead of its forward.
                  The table adds the measured speed-up over ``distill`` and the bound the FLOP
                  counts give for it: distill step / (distill step − teacher forward).
Phases (ms per step, the step's own marks): data wait, teacher forward, student
forward+backward (the backward of the whole loss included), objective forward (with the
device-side finiteness flags), agree (head-gradient average, the flags' all-reduce and the
step's one host read), optimizer (scaler step, schedule, zero_grad), bank all-gather/enqueue. On a GPU the phases are timed with
CUDA events and the step with a synchronize at its end; on a CPU with the wall clock. The
measured steps of the two variants alternate, so a load change hits both alike.

Step time and phases are medians over the measured steps; images/s = batch / median step.
The model FLOPs of a step are counted with ``torch.utils.flop_counter.FlopCounterMode``
(teacher forward + student forward and backward + objective, per image); with the card's
dense bf16 peak (``--peak-tflops``, or detected for H100/H200 from the device name) this gives
the share of the peak used. Peak GPU memory per variant is ``torch.cuda.max_memory_allocated``.
``--data PATH`` also measures the data wait of the real loader (``build_train_loader``)
feeding the first batch size.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from fr_distill.config import Config, DataConfig, LossConfig, ScheduleConfig
from fr_distill.data import Batch
from fr_distill.engine.build import assemble_run
from fr_distill.engine.faults import StopSignal
from fr_distill.engine.state import Run
from fr_distill.engine.step import train_step
from fr_distill import dist
from fr_distill.losses import build_objective
from fr_distill.models import FrozenTeacher, get_backbone
from fr_distill.precision import amp_dtype as resolve_amp, image_layout

PHASES = ("data", "teacher", "student_fwd_bwd", "objective", "agree", "optimizer", "bank")

#: Dense (no sparsity) bf16 tensor-core peaks, TFLOP/s, from NVIDIA's data sheets; matched in
#: order against the device name (the PCIe and NVL cards before the SXM default of a family).
BF16_DENSE_PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H200 NVL", 835.0),
                          ("H100", 989.0), ("H200", 989.0))

AMPS = ("bf16", "fp16", "fp32")


def bf16_peak_tflops(device_name: str) -> float | None:
    """The dense bf16 peak of a known card (H100/H200 variants) from its name, else None."""
    return next((peak for key, peak in BF16_DENSE_PEAK_TFLOPS if key in device_name), None)


def detect_peak_tflops(device: torch.device) -> float | None:
    """:func:`bf16_peak_tflops` of ``device`` (None on a CPU)."""
    return bf16_peak_tflops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None


def layout(device: torch.device) -> torch.memory_format:
    """The trainer's image/model memory format on ``device`` (channels_last on CUDA)."""
    return image_layout(Config().model.channels_last, device)


@dataclass
class Models:
    """One student/teacher pair (eager or compiled) shared by the variants of a mode."""

    student: nn.Module
    teacher: nn.Module
    student_step: nn.Module  # what the step calls: the student, or its compiled wrapper
    teacher_step: nn.Module


@dataclass
class Result:
    batch: int
    amp: str
    mode: str
    variant: str
    images_per_s: float
    step_ms: float
    phases_ms: dict[str, float]
    warmup_s: float
    peak_memory_gib: float | None = None
    step_gflop_per_image: float | None = None
    peak_share: float | None = None
    extra: dict = field(default_factory=dict)


class PhaseTimer:
    """Marks phase boundaries: CUDA events on a GPU (one synchronize per step), else wall clock."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: list[tuple[str, object]] = []

    def _now(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def start(self) -> None:
        self.marks = [("start", self._now())]

    def mark(self, phase: str) -> None:
        self.marks.append((phase, self._now()))

    def finish(self) -> dict[str, float]:
        """Milliseconds per phase of this step (phases marked twice are summed)."""
        if self.cuda:
            torch.cuda.synchronize()
        out: dict[str, float] = {}
        for (_, a), (phase, b) in zip(self.marks, self.marks[1:]):
            ms = a.elapsed_time(b) if self.cuda else (b - a) * 1e3
            out[phase] = out.get(phase, 0.0) + ms
        return out


SYNTHETIC_BATCHES = 4


def synthetic_batches(batch: int, num_classes: int, device: torch.device,
                      count: int = SYNTHETIC_BATCHES, seed: int = 0) -> Iterator[Batch]:
    """A few normalized random image batches on ``device``, cycled (no data wait); batch
    ``k`` holds samples ``k * batch …`` unflipped (the rows a cache looks up)."""
    gen = torch.Generator().manual_seed(seed)
    made = [Batch((torch.rand(batch, 3, 112, 112, generator=gen) * 2 - 1).to(device),
                  torch.randint(0, num_classes, (batch,), generator=gen).to(device),
                  torch.arange(k * batch, (k + 1) * batch), torch.zeros(batch, dtype=torch.bool))
            for k in range(count)]
    return itertools.cycle(made)


def loader_batches(path: str, batch: int, device: torch.device, workers: int) -> Iterator[Batch]:
    """Batches of the project's training loader over ``path`` (1 rank)."""
    from fr_distill.data import build_train_loader, preflight

    cfg = DataConfig(train=path, batch_size=batch, num_workers=workers)
    info = preflight(cfg)
    loader = build_train_loader(cfg, info, 0, 1, device, seed=0)
    return loader.iterate(0)


def write_cache(models: Models, batches: Iterator[Batch], count: int, directory: Path,
                device: torch.device, amp_dtype: torch.dtype | None, placement: str):
    """A :class:`~fr_distill.teacher_cache.TeacherCache` (float16 rows) of the teacher's
    embeddings of the first ``count`` synthetic batches, which cover samples ``0 …``."""
    import numpy as np

    from fr_distill.models.teacher import teacher_embeddings
    from fr_distill.teacher_cache import TeacherCache
    from fr_distill.teacher_cache.store import ROWS_FILE

    rows = torch.cat([teacher_embeddings(models.teacher, next(batches).images, device, amp_dtype)
                      for _ in range(count)]).cpu().numpy().astype(np.float16)
    directory.mkdir(parents=True, exist_ok=True)
    rows.tofile(directory / ROWS_FILE)
    manifest = {"identity": {"data": {"num_samples": rows.shape[0]}, "dtype": "float16"},
                "flips": [False], "embedding_dim": rows.shape[1]}
    return TeacherCache(directory, manifest, device, placement)


def loss_config(distill: bool) -> LossConfig:
    """The unified objective (paper defaults), or SphereFace2 alone for plain training."""
    cfg = LossConfig()
    if not distill:
        cfg.iled.weight = 0.0
        cfg.rpsd.weight = 0.0
    return cfg


@torch.no_grad()
def calibrate_batchnorm(model: nn.Module, images: torch.Tensor) -> nn.Module:
    """Set every BatchNorm's running statistics to those of ``images`` (one train-mode pass).

    A randomly initialized deep IResNet in eval mode (unit running variance) overflows to
    NaN; with calibrated statistics its activations stay normalized, as a trained teacher's.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    model.train()
    model(images)
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    return model.eval()


def build_models(args: argparse.Namespace, device: torch.device, compiled: bool) -> Models:
    """Student (train mode) and frozen teacher (random weights, calibrated BatchNorm)."""
    torch.manual_seed(0)
    student = get_backbone(args.student, args.embedding_dim, width=args.width).to(
        device, memory_format=layout(device))
    calibration = torch.rand(8, 3, 112, 112, device=device) * 2 - 1
    backbone = get_backbone(args.teacher, args.embedding_dim, width=args.width).to(device)
    teacher = FrozenTeacher(calibrate_batchnorm(backbone, calibration),
                            source=f"random {args.teacher}", backend="torch",
                            embedding_dim=args.embedding_dim).to(
        device, memory_format=layout(device))
    student.train()
    if compiled:
        return Models(student, teacher, torch.compile(student), torch.compile(teacher))
    return Models(student, teacher, student, teacher)


def benchmark_config(amp: str, distill: bool) -> Config:
    """The trainer's config for a benchmark step: the unified objective (or SphereFace2 alone),
    ``amp``, no logging step (so no diagnostics), a constant learning rate of 0.01, and a
    non-finite step is an error (``max_nonfinite_steps`` 1)."""
    cfg = Config()
    cfg.loss = loss_config(distill)
    cfg.precision.amp = amp
    cfg.logging.diagnostics = False
    cfg.optim.lr = 0.01
    cfg.schedule = ScheduleConfig(name="multistep", milestones=[], total_steps=2 ** 62)
    cfg.run.max_nonfinite_steps = 1
    return cfg


def make_step(run: Run, batches: Iterator[Batch], timer: PhaseTimer) -> Callable[[], None]:
    """The trainer's step (:func:`fr_distill.engine.step.train_step`) on ``run``, with the
    timer marking the end of each of its phases."""
    stop = StopSignal()

    def step() -> None:
        timer.start()
        train_step(run, batches, stop, mark=timer.mark)

    return step


def count_step_flops(models: Models, args: argparse.Namespace, device: torch.device,
                     distill: bool) -> dict[str, float]:
    """GFLOP per image of the teacher forward, the student forward, and the whole step
    (teacher forward + student forward/backward + objective), counted on 2 images in fp32.

    FLOPs are 2 per multiply-add (the convention of the peak figures)."""
    images = torch.randn(2, 3, 112, 112, device=device).contiguous(memory_format=layout(device))
    labels = torch.arange(2, device=device) % args.classes
    objective = build_objective(loss_config(distill), args.classes, args.embedding_dim,
                                args.embedding_dim, 2, device=device)
    teacher, student = models.teacher, models.student
    counts = {}
    with FlopCounterMode(display=False) as teacher_flops:
        f_t = teacher(images) if distill else None
    with FlopCounterMode(display=False) as student_flops:
        f_s = student(images)
    with FlopCounterMode(display=False) as rest_flops:
        objective(f_s, f_t, labels).total.backward()
    student.zero_grad(set_to_none=True)
    counts["teacher_fwd"] = teacher_flops.get_total_flops() / 2e9
    counts["student_fwd"] = student_flops.get_total_flops() / 2e9
    counts["step"] = (teacher_flops.get_total_flops() + student_flops.get_total_flops()
                      + rest_flops.get_total_flops()) / 2e9
    return counts


def build_step(models: Models, args: argparse.Namespace, device: torch.device, batch: int,
               amp: str, variant: str, batches: Iterator[Batch],
               timer: PhaseTimer) -> Callable[[], None]:
    """A fresh objective, optimizer and scaler around the shared models: one variant's step
    (``plain``, ``distill``, or ``cached``: ``distill`` reading the teacher from a cache)."""
    amp_dtype = resolve_amp(amp, device)  # of the teacher's cached rows
    distill = variant != "plain"
    cache = None
    if variant == "cached":
        cache = write_cache(models, batches, SYNTHETIC_BATCHES, Path(args.cache_dir), device,
                            amp_dtype, args.cache_placement)
    cfg = benchmark_config(amp, distill)
    objective = build_objective(cfg.loss, args.classes, args.embedding_dim, args.embedding_dim,
                                batch, device=device)
    run = assemble_run(cfg, dist.DistInfo(device=device), models.student, objective,
                       model=models.student_step,
                       teacher=models.teacher_step if distill and cache is None else None,
                       teacher_cache=cache)
    return make_step(run, batches, timer)


def measure(models: Models, args: argparse.Namespace, device: torch.device, batch: int,
            amp: str, mode: str, variants: dict[str, Iterator]) -> list[Result]:
    """Time the ``variants`` (name ``distill``/``plain``/``cached`` → batches) of one configuration.

    After each variant's warm-up, the measured steps take turns (plain, distill, plain, …), so
    a load change on a shared machine hits all alike; step time and each phase are the median
    over the measured steps. Peak memory is per variant (the peak is reset before each step and
    read after it).
    """
    cuda = device.type == "cuda"
    timers = {name: PhaseTimer(device) for name in variants}
    steps = {name: build_step(models, args, device, batch, amp, name, batches, timers[name])
             for name, batches in variants.items()}
    warmup_s = {}
    for name, step in steps.items():
        started = time.perf_counter()
        for _ in range(args.warmup):
            step()
            timers[name].finish()
        warmup_s[name] = time.perf_counter() - started
    phase_ms = {name: {phase: [] for phase in PHASES} for name in variants}
    step_ms = {name: [] for name in variants}
    peak = dict.fromkeys(variants, 0.0)
    for _ in range(args.steps):
        for name, step in steps.items():
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats(device)
            started = time.perf_counter()
            step()
            phases = timers[name].finish()  # synchronizes on a GPU
            step_ms[name].append((time.perf_counter() - started) * 1e3)
            for phase in PHASES:
                phase_ms[name][phase].append(phases.get(phase, 0.0))
            if cuda:
                peak[name] = max(peak[name], torch.cuda.max_memory_allocated(device) / 2 ** 30)
    return [Result(batch=batch, amp=amp, mode=mode, variant=name,
                   images_per_s=batch * 1e3 / statistics.median(step_ms[name]),
                   step_ms=statistics.median(step_ms[name]),
                   phases_ms={k: statistics.median(v) for k, v in phase_ms[name].items()},
                   warmup_s=warmup_s[name], peak_memory_gib=peak[name] if cuda else None)
            for name in variants]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="tools/benchmark.py train", description=__doc__.split("\n")[0])
    parser.add_argument("--teacher", default="iresnet100")
    parser.add_argument("--student", default="iresnet18")
    parser.add_argument("--width", type=float, default=1.0, help="channel multiplier of both")
    parser.add_argument("--embedding-dim", type=int, default=512)
    parser.add_argument("--classes", type=int, default=8631, help="SphereFace2 head (VGGFace2: 8631)")
    parser.add_argument("--batch", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--amp", nargs="+", choices=AMPS, default=["bf16", "fp16"])
    parser.add_argument("--compile", nargs="*", choices=AMPS, default=None,
                        help="also run compiled variants (for the precisions named, default all)")
    parser.add_argument("--steps", type=int, default=20, help="measured steps per variant")
    parser.add_argument("--warmup", type=int, default=5, help="unmeasured steps per variant")
    parser.add_argument("--cache", action="store_true",
                        help="also time the step reading the teacher from a teacher-embedding "
                             "cache (variant cached), against the FLOP bound of its speed-up")
    parser.add_argument("--cache-placement", choices=["auto", "host", "device"], default="auto",
                        help="teacher.cache_placement of the cached variant")
    parser.add_argument("--cache-dir", default="",
                        help="where the cached variant's rows file is written (default: a "
                             "temporary directory)")
    parser.add_argument("--data", default="", help="training data: also time the real loader")
    parser.add_argument("--workers", type=int, default=4, help="loader workers with --data")
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="dense bf16 peak of the card (default: known H100/H200 by name)")
    parser.add_argument("--json", default="", help="write the results here")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or min(args.batch) < 2:
        parser.error("--steps >= 1, --warmup >= 0 and every --batch >= 2 are required")
    return args


def machine(device: torch.device) -> dict:
    info = {"torch": torch.__version__, "python": platform.python_version(),
            "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "device": str(device), "threads": torch.get_num_threads()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def format_table(results: list[Result], peak: float | None) -> str:
    head = (f"{'batch':>5} {'amp':>4} {'mode':>8} {'variant':>7} {'img/s':>9} {'ms/step':>8} "
            + " ".join(f"{p[:12]:>12}" for p in PHASES)
            + f" {'GFLOP/img':>9} {'%peak':>6} {'mem GiB':>7} {'x plain':>7}")
    lines = [head, "-" * len(head)]
    plain = {(r.batch, r.amp, r.mode): r for r in results if r.variant == "plain"}
    for r in results:
        base = plain.get((r.batch, r.amp, r.mode))
        ratio = f"{r.step_ms / base.step_ms:7.2f}" if base else f"{'':>7}"
        share = f"{100 * r.peak_share:6.1f}" if r.peak_share is not None else f"{'-':>6}"
        mem = f"{r.peak_memory_gib:7.2f}" if r.peak_memory_gib is not None else f"{'-':>7}"
        lines.append(f"{r.batch:>5} {r.amp:>4} {r.mode:>8} {r.variant:>7} {r.images_per_s:9.1f} "
                     f"{r.step_ms:8.1f} " + " ".join(f"{r.phases_ms[p]:12.2f}" for p in PHASES)
                     + f" {r.step_gflop_per_image:9.2f} {share} {mem} {ratio}")
    lines.append("")
    lines.append(f"medians in ms/step; %peak: model FLOPs x img/s over the dense bf16 peak "
                 f"({peak:.0f} TFLOP/s)" if peak else
                 "medians in ms/step; %peak not reported (unknown device: pass --peak-tflops)")
    for key, base in plain.items():
        distilled = next(r for r in results
                         if (r.batch, r.amp, r.mode) == key and r.variant == "distill")
        extra = distilled.step_ms - base.step_ms
        lines.append(f"batch {key[0]} {key[1]} {key[2]}: distillation adds {extra:.1f} ms/step over "
                     f"plain; teacher forward {distilled.phases_ms['teacher']:.1f} ms "
                     f"(added / teacher = {extra / distilled.phases_ms['teacher']:.2f})")
    for key, gain in cache_speedups(results).items():
        lines.append(f"batch {key[0]} {key[1]} {key[2]}: teacher cache speed-up "
                     f"{gain['speedup']:.2f}x (distill / cached step), FLOP bound "
                     f"{gain['bound']:.2f}x, reached {100 * gain['share_of_bound']:.0f} %")
    return "\n".join(lines)


def cache_speedups(results: list[Result]) -> dict[tuple, dict[str, float]]:
    """Per (batch, amp, mode) with a ``cached`` variant: its measured speed-up over
    ``distill`` (step time ratio), the bound of the FLOP counts (distill step / cached step
    GFLOP), and the share of the bound reached."""
    out = {}
    distill = {(r.batch, r.amp, r.mode): r for r in results if r.variant == "distill"}
    for r in results:
        base = distill.get((r.batch, r.amp, r.mode))
        if r.variant == "cached" and base is not None:
            speedup = base.step_ms / r.step_ms
            bound = base.step_gflop_per_image / r.step_gflop_per_image
            out[(r.batch, r.amp, r.mode)] = {"speedup": speedup, "bound": bound,
                                            "share_of_bound": speedup / bound}
    return out


def cache_report(results: list[Result]) -> list[dict]:
    """:func:`cache_speedups` as JSON rows."""
    return [{"batch": b, "amp": a, "mode": m, **gain}
            for (b, a, m), gain in cache_speedups(results).items()]


def summary_table(report: dict) -> str:
    """images/s, share of the bf16 peak and peak memory of every variant of a ``report``."""
    head = f"{'batch':>5} {'amp':>4} {'mode':>8} {'variant':>7} {'img/s':>9} {'%bf16 peak':>10} {'peak GiB':>8}"
    lines = [head, "-" * len(head)]
    for r in report["results"]:
        share = f"{100 * r['peak_share']:10.1f}" if r["peak_share"] is not None else f"{'-':>10}"
        mem = f"{r['peak_memory_gib']:8.2f}" if r["peak_memory_gib"] is not None else f"{'-':>8}"
        lines.append(f"{r['batch']:>5} {r['amp']:>4} {r['mode']:>8} {r['variant']:>7} "
                     f"{r['images_per_s']:9.1f} {share} {mem}")
    return "\n".join(lines)


def write_report(path: str, report: dict) -> None:
    with open(path, "w") as f:
        json.dump(report, f, indent=2)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.cache and not args.cache_dir:
        args.cache_dir = tempfile.mkdtemp(prefix="fr_distill_bench_cache_")
    use_cuda = torch.cuda.is_available() if args.device == "auto" else args.device == "cuda"
    device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
    torch.backends.cudnn.benchmark = True
    peak = args.peak_tflops if args.peak_tflops is not None else detect_peak_tflops(device)
    modes = [("eager", False)] + ([("compiled", True)] if args.compile is not None else [])
    compile_amps = set(args.compile or args.amp)
    results: list[Result] = []
    flops: dict[str, dict[str, float]] = {}
    report = {"benchmark": "train", "machine": machine(device), "peak_bf16_tflops": peak,
              "args": vars(args), "gflop_per_image": flops, "results": [], "real_loader": None}
    for mode, compiled in modes:
        models = build_models(args, device, compiled)
        if not flops:
            flops.update({v: count_step_flops(models, args, device, v == "distill")
                          for v in ("distill", "plain")})
            flops["cached"] = {**flops["distill"], "teacher_fwd": 0.0,
                               "step": flops["distill"]["step"] - flops["distill"]["teacher_fwd"]}
        for amp, batch in itertools.product(args.amp, args.batch):
            if compiled and amp not in compile_amps:
                continue
            variants = {name: synthetic_batches(batch, args.classes, device)
                        for name in ("plain", "distill") + (("cached",) if args.cache else ())}
            for result in measure(models, args, device, batch, amp, mode, variants):
                result.step_gflop_per_image = flops[result.variant]["step"]
                if peak:
                    result.peak_share = (result.step_gflop_per_image * 1e9 * result.images_per_s
                                         / (peak * 1e12))
                results.append(result)
                print(f"  {mode} {amp} batch {batch} {result.variant}: "
                      f"{result.images_per_s:.1f} img/s", flush=True)
            if args.json:  # after every configuration: a run cut short keeps what it measured
                report["results"] = [dataclasses.asdict(r) for r in results]
                report["teacher_cache"] = cache_report(results)
                write_report(args.json, report)
    loader = None
    if args.data:
        batch = args.batch[0]
        models = build_models(args, device, compiled=False)
        (real,) = measure(models, args, device, batch, args.amp[0], "eager",
                          {"distill": loader_batches(args.data, batch, device, args.workers)})
        loader = {"batch": batch, "amp": args.amp[0], "images_per_s": real.images_per_s,
                  "data_wait_ms": real.phases_ms["data"], "step_ms": real.step_ms}
    print(format_table(results, peak))
    if loader:
        print(f"real loader ({args.data}, batch {loader['batch']}): data wait "
              f"{loader['data_wait_ms']:.1f} ms of {loader['step_ms']:.1f} ms/step, "
              f"{loader['images_per_s']:.1f} img/s")
    report["results"] = [dataclasses.asdict(r) for r in results]
    report["real_loader"] = loader
    report["teacher_cache"] = cache_report(results)
    if args.json:
        write_report(args.json, report)
    return report

"""The export report: model cost, file sizes, CPU latency, and the printed table.

* parameters: the number of elements of the model's parameters (buffers not counted);
* GFLOPs per image: :class:`torch.utils.flop_counter.FlopCounterMode` on one 112×112 image,
  which counts convolutions and matrix products with a multiply-add as 2 FLOPs and does not
  count element-wise layers (BatchNorm, PReLU, additions);
* latency: on the CPU, milliseconds per batch, the median of ``repeats`` timed runs after
  ``warmup`` untimed ones, on random inputs, with the thread count the report states.
"""
from __future__ import annotations

import statistics
import time

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

FLOP_CONVENTION = ("torch.utils.flop_counter.FlopCounterMode, 1 image 3x112x112: convolutions "
                   "and matrix products, a multiply-add = 2 FLOPs; element-wise layers not counted")


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def gflops_per_image(model: nn.Module) -> float:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.zeros(1, 3, 112, 112))
    return counter.get_total_flops() / 1e9


def latency_ms(module: nn.Module, batch: int, warmup: int, repeats: int) -> float:
    """Median wall time of ``module`` on a random ``[batch,3,112,112]`` input, in ms."""
    inputs = torch.randn(batch, 3, 112, 112, generator=torch.Generator().manual_seed(0))
    times = []
    with torch.no_grad():
        for run in range(warmup + repeats):
            start = time.perf_counter()
            module(inputs)
            if run >= warmup:
                times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def format_table(report: dict) -> str:
    """The printed summary of an ``export.json`` report."""
    sets = list(report["reference"]["accuracy"])
    batches = [str(b) for b in report["latency"]["batches"]]
    header = (["file", "format", "runtime", "MiB", "max rel. err"]
              + [f"{name} acc % (diff)" for name in sets] + [f"ms @ batch {b}" for b in batches])
    rows = [header]
    for art in report["artifacts"]:
        errors = art["embedding_rel_error"].values()
        rows.append([art["file"], art["format"], art["runtime"], f"{art['bytes'] / 2**20:.2f}",
                     f"{max(errors):.1e}"]
                    + [f"{art['accuracy'][s]:.2f} ({art['accuracy_diff_points'][s]:+.2f})"
                       for s in sets]
                    + [f"{art['latency_ms'][b]:.2f}" for b in batches])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    reference = ", ".join(f"{s} {a:.2f} %" for s, a in report["reference"]["accuracy"].items())
    latency = report["latency"]
    return "\n".join([
        f"{report['checkpoint']}: {report['architecture']}",
        f"parameters {report['parameters']:,}; {report['gflops_per_image']:.3f} GFLOPs per image "
        f"({report['flop_convention']})",
        f"PyTorch model accuracy (10-fold): {reference}",
        f"latency: CPU, {latency['threads']} threads, median of {latency['repeats']} runs after "
        f"{latency['warmup']} warm-up; machine: {report['machine']}",
        *lines])

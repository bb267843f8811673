"""Checkpoint save and load of a class-sharded SphereFace2 head: single file against DCP.

The objective alone (no backbone): a ``[C, D]`` float32 head, class-sharded over the ranks of
``torchrun`` (gloo on the CPU), with its SGD momentum, checkpointed by the two paths of
:mod:`fr_distill.engine.state`:

* ``file`` (``checkpoint.format=file``) — every rank gathers the head and its momentum whole
  into host memory, rank 0 writes one file; on load every rank reads the whole file and
  keeps its rows;
* ``dcp`` (``checkpoint.format=dcp``) — every rank writes its own rows into a checkpoint
  directory and reads back only the rows it holds;
* ``dcp_async`` (and ``checkpoint.async_save``) — the same save from a copy in host memory,
  in a background thread: the step waits for the copy (``seconds``) and, at the next
  checkpoint, for the commit (``commit_seconds``: checksums and rename); copy, write and
  commit take ``total_seconds``.

Each (path, save|load) runs in fresh worker processes, so each peak resident memory
(``VmHWM``) is that phase's alone; the worker reports it with the resident memory before the
phase (the head's rows, and for a save their momentum) and the phase's wall time (slowest rank, between
barriers). Prints the table with old/new ratios, the bytes each rank wrote, and the per-row
costs the projection to other sizes uses; ``--json PATH`` writes them.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RUNS = (("file", "save"), ("dcp", "save"), ("dcp_async", "save"), ("file", "load"),
        ("dcp", "load"))

#: the checkout holding ``benchmarks/``, put on the workers' path (``-m benchmarks.checkpoint``)
REPO = Path(__file__).resolve().parents[1]


def _memory_kib(field: str) -> int:
    """``VmHWM`` (peak) or ``VmRSS`` (now) of this process, in KiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _build(classes: int, dim: int, with_momentum: bool):
    """An objective holding only the class-sharded head, and an SGD optimizer over it; with
    ``with_momentum`` one step is taken, so the momentum exists (what a save finds; a resumed
    run loads into an optimizer without state)."""
    import torch

    from fr_distill.losses.objective import Objective
    from fr_distill.losses.sphereface2 import SphereFace2Head

    torch.manual_seed(0)
    head = SphereFace2Head(classes, dim, class_sharded=True)
    optimizer = torch.optim.SGD([head.weight, head.bias], lr=0.1, momentum=0.9)
    if with_momentum:
        head.weight.grad = torch.full_like(head.weight, 1e-3)
        head.bias.grad = torch.zeros_like(head.bias)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return Objective(classes, dim, dim, head, 1.0, {}, None), optimizer


def worker(variant: str, phase: str, directory: Path, classes: int, dim: int) -> dict:
    """One phase in this process (a torchrun worker); rank 0 returns the ranks' records."""
    from fr_distill import dist
    from fr_distill.checkpoint import files as checkpoint, sharded as sharded_checkpoint
    from fr_distill.checkpoint.state import load_objective_state, load_sharded, objective_state

    dist.init("gloo", "cpu")
    objective, optimizer = _build(classes, dim, with_momentum=phase == "save")
    file = directory / "step.pt"
    before = _memory_kib("VmRSS")
    dist.barrier()
    start = time.perf_counter()
    if phase == "save":
        payload = {"format": checkpoint.FORMAT, "version": checkpoint.VERSION, "step": 1,
                   **objective_state(objective, optimizer, sharded=variant != "file")}
        if variant == "dcp":
            sharded_checkpoint.save(payload, directory / "step")
        elif variant == "dcp_async":
            pending = sharded_checkpoint.save(payload, directory / "step", background=True)
        elif dist.is_main():
            checkpoint.save(payload, file)
        del payload
    else:
        if variant == "dcp":
            path = directory / "step"
            ckpt = load_sharded(path, sharded_checkpoint.read_state(path), objective, optimizer)
        else:
            ckpt = checkpoint.load(file)
        load_objective_state(ckpt, objective, optimizer)
        del ckpt
    dist.barrier()
    seconds = time.perf_counter() - start  # what a training step waits for
    commit_seconds = 0.0
    if variant == "dcp_async":
        pending.future.result()  # the background write (training would go on meanwhile)
        dist.barrier()
        written_at = time.perf_counter()
        pending.finish()  # checksums and rename: what the next checkpoint's step waits for
        commit_seconds = time.perf_counter() - written_at
    total_seconds = time.perf_counter() - start
    written = sum(p.stat().st_size for p in (directory / "step").glob(f"__{dist.rank()}_*")) \
        if variant.startswith("dcp") else (file.stat().st_size if dist.is_main() else 0)
    record = {"rank": dist.rank(), "seconds": seconds, "total_seconds": total_seconds,
              "commit_seconds": commit_seconds,
              "rss_before_kib": before,
              "peak_kib": _memory_kib("VmHWM"), "bytes_written": written if phase == "save" else 0,
              "rows": int(objective.head.weight.shape[0])}
    records = dist.all_gather_object(record)
    dist.shutdown()
    return {"ranks": records} if records[0]["rank"] == record["rank"] == 0 else {}


def _run_phase(variant: str, phase: str, directory: Path, args) -> dict:
    out = directory / f"{variant}_{phase}.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(args.port), "-m",
           "benchmarks.checkpoint", "--worker", variant, phase, "--dir",
           str(directory), "--classes", str(args.classes), "--dim", str(args.dim),
           "--result", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def _summary(records: list[dict]) -> dict:
    gib = 1024 ** 2  # KiB per GiB
    return {"seconds": max(r["seconds"] for r in records),
            "total_seconds": max(r["total_seconds"] for r in records),
            "commit_seconds": max(r["commit_seconds"] for r in records),
            "peak_gib": max(r["peak_kib"] for r in records) / gib,
            "state_gib": max(r["rss_before_kib"] for r in records) / gib,
            "above_state_gib": max(r["peak_kib"] - r["rss_before_kib"] for r in records) / gib,
            "max_bytes_written_per_rank": max(r["bytes_written"] for r in records),
            "bytes_written": sum(r["bytes_written"] for r in records),
            "rows_per_rank": max(r["rows"] for r in records)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="benchmark.py checkpoint",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=500_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--nproc", type=int, default=2, help="torchrun ranks (gloo, CPU)")
    parser.add_argument("--port", type=int, default=29731)
    parser.add_argument("--workdir", help="where the checkpoints are written (default: a "
                                          "temporary directory, removed afterwards)")
    parser.add_argument("--json", help="write the results to this JSON file")
    parser.add_argument("--worker", nargs=2, metavar=("VARIANT", "PHASE"), help=argparse.SUPPRESS)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        result = worker(*args.worker, Path(args.dir), args.classes, args.dim)
        if result:
            Path(args.result).write_text(json.dumps(result))
        return result
    root = Path(args.workdir or tempfile.mkdtemp(prefix="fr_distill_ckpt_bench_"))
    root.mkdir(parents=True, exist_ok=True)
    results: dict = {"classes": args.classes, "dim": args.dim, "ranks": args.nproc}
    try:
        for variant, phase in RUNS:
            records = _run_phase(variant, phase, root, args)["ranks"]
            results[f"{variant}_{phase}"] = {**_summary(records), "per_rank": records}
    finally:
        if not args.workdir:
            shutil.rmtree(root, ignore_errors=True)
    _report(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return results


def _report(results: dict) -> None:
    gib = 1024 ** 3
    print(f"head [{results['classes']}, {results['dim']}] float32 + SGD momentum, class-sharded "
          f"over {results['ranks']} ranks (gloo, CPU)")
    print(f"{'phase':<6} {'path':<10} {'step waits s':>12} {'commit s':>9} {'total s':>8} "
          f"{'peak GiB/rank':>14} "
          f"{'above state GiB':>16} {'written GiB/rank':>17}")
    for variant, phase in RUNS:
        r = results[f"{variant}_{phase}"]
        print(f"{phase:<6} {variant:<10} {r['seconds']:12.2f} {r['commit_seconds']:9.2f} "
              f"{r['total_seconds']:8.2f} "
              f"{r['peak_gib']:14.2f} {r['above_state_gib']:16.2f} "
              f"{r['max_bytes_written_per_rank'] / gib:17.2f}")
    for phase, new in (("save", "dcp"), ("save", "dcp_async"), ("load", "dcp")):
        old, ours = results[f"file_{phase}"], results[f"{new}_{phase}"]
        print(f"{phase} file/{new}: step wait {old['seconds'] / ours['seconds']:.2f}x, peak "
              f"memory {old['peak_gib'] / ours['peak_gib']:.2f}x, memory above the state "
              f"{old['above_state_gib'] / max(ours['above_state_gib'], 1e-9):.2f}x")


if __name__ == "__main__":
    main()

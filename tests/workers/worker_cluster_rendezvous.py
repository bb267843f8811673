"""Worker for tests/engine/test_cluster.py: joins the process group torchrun set up and reports.

    worker_cluster_rendezvous.py OUT_DIR MODE

Writes ``OUT_DIR/rank<R>.json`` with its rank, world size, node (group) rank, local rank and
the all-reduced sum of ``rank + 1``. MODE ``ok`` exits 0; ``exit:N`` exits with code N;
``wait_signal:N`` writes ``ready<R>`` and waits for SIGUSR1, then records it and exits with N.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import torch

from fr_distill import dist


def main() -> int:
    out_dir, mode = Path(sys.argv[1]), sys.argv[2]
    received: list[int] = []
    signal.signal(signal.SIGUSR1, lambda signum, frame: received.append(signum))
    info = dist.init(backend="gloo", device="cpu", timeout_s=60)
    total = dist.all_reduce_sum(torch.tensor([float(info.rank + 1)])).item()
    report = {"rank": info.rank, "world_size": info.world_size, "local_rank": info.local_rank,
              "group_rank": int(os.environ["GROUP_RANK"]), "sum": total}
    if mode.startswith("wait_signal:"):
        (out_dir / f"ready{info.rank}").write_text("")
        deadline = time.monotonic() + 60
        while not received and time.monotonic() < deadline:
            time.sleep(0.05)
        report["signals"] = received
    (out_dir / f"rank{info.rank}.json").write_text(json.dumps(report))
    dist.barrier()
    dist.shutdown()
    return 0 if mode == "ok" else int(mode.split(":", 1)[1])


if __name__ == "__main__":
    sys.exit(main())

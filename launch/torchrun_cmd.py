#!/usr/bin/env python3
"""The torchrun command of this SLURM node (c10d rendezvous from SLURM's variables).

    python launch/torchrun_cmd.py [options] -- launch/train.py --config X.yaml [key=value ...]

prints the torchrun line; with ``--exec`` it also runs it in this process (what each node of
``launch/slurm/train.sbatch`` does) and exits with the node's code, the trainer's
``REQUEUE_EXIT_CODE`` when the job should be requeued. ``--requeue-exit-code`` prints that code.
"""
from __future__ import annotations

import argparse
import os
import sys

from fr_distill.engine.faults import REQUEUE_EXIT_CODE
from fr_distill.engine.cluster import (ClusterError, command_line, run_torchrun,
                                       slurm_node_from_env, torchrun_args)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--exec", action="store_true", help="run torchrun after printing the line")
    parser.add_argument("--nproc-per-node", type=int, default=None,
                        help="processes per node (default: the node's SLURM GPU count)")
    parser.add_argument("--port", type=int, default=None,
                        help="rendezvous port (default: derived from the job id)")
    parser.add_argument("--rdzv-host", default=None,
                        help="rendezvous host (default: the first host of SLURM_JOB_NODELIST)")
    parser.add_argument("--max-restarts", type=int, default=0,
                        help="worker restarts (each resumes from the newest checkpoint)")
    parser.add_argument("--shutdown-timeout", type=int, default=90,
                        help="seconds the workers get to checkpoint after a preemption signal")
    parser.add_argument("--requeue-exit-code", action="store_true",
                        help="print the trainer's requeue exit code and exit")
    parser.add_argument("script", nargs="?", help="training script (after --)")
    parser.add_argument("script_args", nargs=argparse.REMAINDER, help="its arguments")
    args = parser.parse_args(argv)
    if args.requeue_exit_code:
        print(REQUEUE_EXIT_CODE)
        return 0
    if not args.script:
        parser.error("name the training script after --, e.g. -- launch/train.py --config X.yaml")
    try:
        node = slurm_node_from_env()
        targs = torchrun_args(node, args.script, args.script_args,
                              nproc_per_node=args.nproc_per_node, port=args.port,
                              rdzv_host=args.rdzv_host, max_restarts=args.max_restarts,
                              shutdown_timeout=args.shutdown_timeout)
    except ClusterError as err:
        print(f"torchrun_cmd: {err}", file=sys.stderr)
        return 2
    if not args.exec:
        print(command_line(targs))
        return 0
    print(f"node {node.node_id}/{node.num_nodes}: {command_line(targs)}", file=sys.stderr, flush=True)
    return run_torchrun(targs, REQUEUE_EXIT_CODE)


if __name__ == "__main__":
    code = main(sys.argv[1:])
    # Exit without the interpreter's shutdown: torchrun's agent leaves daemon threads blocked in
    # the c10d store, and when another node's agent has closed the store first, one of them
    # wakes while the interpreter finalizes and aborts the process ("terminate called without an
    # active exception"), so the node would end on SIGABRT instead of its code and srun would
    # report 134, not the requeue code.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)

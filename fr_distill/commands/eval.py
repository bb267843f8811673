"""``fr-distill eval`` and ``launch/eval.py``: evaluate a face model on verification ``.bin``
sets, folders of aligned faces, IJB-B/IJB-C and TinyFace, images sharded over torchrun's
ranks; exit status 2 with a one-line message for bad input."""
from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

from fr_distill import dist
from fr_distill.errors import FrDistillError, exit_with
from fr_distill.eval.errors import EvalDataError
from fr_distill.eval.extract import SHARD_SIZE
from fr_distill.eval.folder import folder_pair_set
from fr_distill.eval.report import format_table
from fr_distill.eval.runner import evaluate_model
from fr_distill.eval.verification import bin_set_name
from fr_distill.models import load_frozen_model
from fr_distill.paths import require_writable_dir
from fr_distill.precision import AMP_CHOICES, amp_dtype


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Evaluate a face model on verification .bin sets, folders of aligned faces, "
                    "IJB-B/IJB-C and TinyFace "
                    "(run under torchrun to shard the images over ranks).")
    parser.add_argument("--model", required=True, help="fr_distill checkpoint, InsightFace "
                        "state dict (with --arch), ONNX or TorchScript file")
    parser.add_argument("--arch", default="iresnet100", help="architecture of a plain state dict")
    parser.add_argument("--embedding-dim", type=int, default=512)
    parser.add_argument("--width", type=float, default=1.0, help="backbone width multiplier")
    parser.add_argument("--input-mean", type=float, default=None,
                        help="feed the model (pixels - mean) / std (default: (pixels - 127.5) / "
                             "127.5, or raw pixels for an ONNX graph that normalizes itself)")
    parser.add_argument("--input-std", type=float, default=None, help="see --input-mean")
    parser.add_argument("--bin", nargs="*", default=[], help="verification .bin files")
    parser.add_argument("--folder", nargs="*", default=[], help="folders of aligned 112x112 "
                        "faces, one sub-folder per identity, scored as .bin sets are")
    parser.add_argument("--pairs", nargs="*", default=[], help="an LFW-format pairs.txt per "
                        "--folder (default: every genuine pair plus sampled impostor pairs)")
    parser.add_argument("--impostors", type=int, default=None, help="impostor pairs sampled per "
                        "--folder without --pairs (default: as many as its genuine pairs)")
    parser.add_argument("--pair-seed", type=int, default=0, help="seed of the impostor sampling")
    parser.add_argument("--ijb", nargs="*", default=[], help="IJB release roots (loose_crop/, meta/)")
    parser.add_argument("--ijb-name", nargs="*", default=[], help="set name per --ijb (IJBB, IJBC)")
    parser.add_argument("--tinyface", metavar="DIR", help="TinyFace release: the folder "
                        "holding tinyface/Testing_Set/, or Testing_Set/ itself (Probe/, "
                        "Gallery_Match/, Gallery_Distractor/)")
    parser.add_argument("--out", required=True, help="output directory (results, caches, plots)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--shard-size", type=int, default=SHARD_SIZE,
                        help="images per cached feature shard")
    parser.add_argument("--amp", choices=AMP_CHOICES, default="fp16",
                        help="autocast dtype on GPUs; fp32 (or off): float32, no autocast")
    parser.add_argument("--no-faceness", action="store_true", help="do not weight by faceness")
    parser.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    parser.add_argument("--aligner", default="auto", choices=("auto", "dali", "numpy"),
                        help="IJB face alignment: DALI decode+warp_affine (default on GPUs) or numpy")
    return parser


def _require_distinct_names(sets: list[tuple[str, str]]) -> None:
    """Refuse two sets (``(name, source)``) of one name: their results would collide."""
    first: dict[str, str] = {}
    for name, source in sets:
        if name in first:
            raise EvalDataError(f"{source}: same set name '{name}' as {first[name]}; their "
                                f"results would collide (rename one)")
        first[name] = source


def run_evaluation(argv: list[str] | None = None) -> dict:
    """``launch/eval.py``: load the model, evaluate, print the table (rank 0); returns results."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if len(args.ijb) != len(args.ijb_name):
        parser.error(f"{len(args.ijb)} --ijb roots but {len(args.ijb_name)} --ijb-name (one "
                     f"name per root, e.g. --ijb /data/IJB_release/IJBC --ijb-name IJBC)")
    if args.pairs and len(args.pairs) != len(args.folder):
        parser.error(f"{len(args.folder)} --folder but {len(args.pairs)} --pairs (one pairs.txt "
                     f"per folder, or none)")
    if not args.bin and not args.ijb and not args.folder and not args.tinyface:
        parser.error("nothing to evaluate: give --bin FILE ..., --folder DIR ..., --ijb ROOT ... "
                     "--ijb-name NAME ... and/or --tinyface DIR")
    require_writable_dir(Path(args.out), "--out")

    info = dist.init(device=args.device)
    try:
        pair_sets = [folder_pair_set(folder, pairs, args.impostors, args.pair_seed) for folder, pairs
                     in zip(args.folder, args.pairs or [None] * len(args.folder))]
        _require_distinct_names([(bin_set_name(path), path) for path in args.bin]
                                + [(pair_set.name, pair_set.source) for pair_set in pair_sets])
        model = load_frozen_model(args.model, name=args.arch, embedding_dim=args.embedding_dim,
                                  width=args.width, device=info.device,
                                  input_mean=args.input_mean, input_std=args.input_std)
        amp = amp_dtype(args.amp, info.device) if info.device.type == "cuda" else None
        stat = Path(args.model).stat()
        digest = hashlib.sha1(f"{Path(args.model).resolve()}:{stat.st_size}:{stat.st_mtime_ns}:"
                              f"{args.arch}:{args.width}:{amp}".encode()).hexdigest()
        results = evaluate_model(model, info.device, args.bin, list(zip(args.ijb, args.ijb_name)),
                                 args.out, args.batch_size, amp,
                                 not args.no_faceness, cache_key={"model": digest},
                                 shard_size=args.shard_size, aligner=args.aligner,
                                 pair_sets=pair_sets, tinyface=args.tinyface)
        if info.is_main:
            print(format_table(results))
            print(f"results written to {Path(args.out) / 'results.json'}")
        return results
    finally:
        dist.shutdown()


def eval_main(argv: list[str] | None = None) -> int:
    """``launch/eval.py`` / ``fr-distill eval``: exit status 2 with a one-line message for bad input."""
    try:
        run_evaluation(argv)
    except FrDistillError as err:
        return exit_with(err)
    return 0

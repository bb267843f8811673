#!/usr/bin/env python3
"""Write a folder of aligned faces (one sub-folder per identity) as a verification `.bin`.

    python tools/folder2bin.py /data/my_faces my_faces.bin [--impostors N] [--seed 0]
    python tools/folder2bin.py /data/lfw_112 lfw.bin --pairs /data/lfw/pairs.txt

The pairs are those ``launch/eval.py --folder`` scores: every genuine pair plus ``--impostors``
impostor pairs (default: as many as genuine pairs) sampled with ``--seed``, or the pairs of an
LFW-format pairs.txt (:mod:`fr_distill.eval.folder`). The file is InsightFace's format (a
pickle of the encoded images and the issame flags), read by ``launch/eval.py --bin``,
``eval.bin_sets`` and InsightFace's own ``load_bin``; evaluating it gives the metrics of the
folder itself.
"""
from __future__ import annotations

import argparse
import sys

from fr_distill.errors import FrDistillError, exit_with
from fr_distill.eval.folder import folder_pair_set
from fr_distill.eval.verification import check_bin_destination, write_bin


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", help="folder of aligned 112x112 faces, one sub-folder per identity")
    parser.add_argument("bin", help="output .bin path")
    parser.add_argument("--pairs", help="LFW-format pairs.txt (default: generated pairs)")
    parser.add_argument("--impostors", type=int, default=None,
                        help="impostor pairs to sample (default: as many as genuine pairs)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the impostor sampling")
    parser.add_argument("--force", action="store_true", help="overwrite an existing .bin")
    args = parser.parse_args(argv)
    try:
        check_bin_destination(args.bin, overwrite=args.force)  # before any image is read
        pair_set = folder_pair_set(args.folder, args.pairs, args.impostors, args.seed)
        write_bin(pair_set, args.bin, overwrite=args.force)
    except FrDistillError as err:
        return exit_with(err)
    same = int(pair_set.issame.sum())
    print(f"wrote {len(pair_set.issame)} pairs ({same} genuine, {len(pair_set.issame) - same} "
          f"impostor) to {args.bin}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

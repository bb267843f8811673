"""Convert an image folder (one sub-folder per identity) into a shuffled RecordIO pair.

    python tools/folder2rec.py data/train_folder data/out/train.rec [--seed 0] [--layout plain] [--force]

``--layout insightface`` (default) writes InsightFace's header record and ``property`` file;
``--layout plain`` writes a header-less file that DALI's ``readers.mxnet`` also reads.
"""
from __future__ import annotations

import argparse
import sys

from fr_distill.errors import FrDistillError, exit_with
from fr_distill.data.convert import folder_to_recordio


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="image folder, one sub-folder per identity")
    parser.add_argument("rec", help="output .rec path (the .idx is written next to it)")
    parser.add_argument("--seed", type=int, default=0, help="shuffle seed")
    parser.add_argument("--layout", choices=("insightface", "plain"), default="insightface")
    parser.add_argument("--force", action="store_true", help="overwrite an existing .rec/.idx")
    args = parser.parse_args(argv)
    try:
        count = folder_to_recordio(args.folder, args.rec, args.seed,
                                   insightface_header=args.layout == "insightface", progress=True,
                                   overwrite=args.force)
    except FrDistillError as err:
        return exit_with(err)
    print(f"wrote {count} images to {args.rec}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

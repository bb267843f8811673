#!/usr/bin/env python3
"""Align loose face images onto the ArcFace 112×112 template from their 5-point landmarks.

    python tools/align_faces.py --images IJBC/loose_crop \\
        --landmarks IJBC/meta/ijbc_name_5pts_score.txt --out IJBC/aligned

The landmarks file has one line per image: ``img x1 y1 x2 y2 x3 y3 x4 y4 x5 y5 [faceness]``
(left eye, right eye, nose tip, left and right mouth corners; ``img`` relative to --images).
Each image is warped by the least-squares similarity onto the template (METHOD V2) and written
under the same relative name in --out.
"""
from __future__ import annotations

import argparse
import sys

from fr_distill.errors import FrDistillError, exit_with
from fr_distill.data.align import align_folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", required=True, help="folder of loose images")
    parser.add_argument("--landmarks", required=True,
                        help="landmarks file (_name_5pts_score.txt format)")
    parser.add_argument("--out", required=True, help="output folder of aligned crops")
    parser.add_argument("--size", type=int, default=112, help="crop side (default 112)")
    parser.add_argument("--min-faceness", type=float, default=0.0,
                        help="skip entries whose faceness score is lower")
    parser.add_argument("--quality", type=int, default=95, help="JPEG quality of the crops")
    args = parser.parse_args(argv)
    try:
        count = align_folder(args.images, args.landmarks, args.out, size=args.size,
                             min_faceness=args.min_faceness, quality=args.quality)
    except FrDistillError as err:
        return exit_with(err)
    print(f"{count} faces aligned into {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

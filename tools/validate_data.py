"""Decode every image of a training set and report every problem by name; exit 1 if any.

    python tools/validate_data.py data/train_folder          # or data/train.rec
    python tools/validate_data.py data/train.rec --counts counts.csv
    python tools/validate_data.py data/set_a data/set_b/train.rec   # several sets, as data.train
"""
from __future__ import annotations

import argparse
import sys

from fr_distill.errors import FrDistillError, exit_with
from fr_distill.data.validate import validate_dataset


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("train", nargs="+", help="image folder, .rec file, or folder holding "
                                                 "train.rec; several: their concatenation")
    parser.add_argument("--format", choices=("auto", "folder", "recordio"), default="auto")
    parser.add_argument("--counts", help="write per-class image counts to this CSV file")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    try:
        train = args.train[0] if len(args.train) == 1 else args.train
        report = validate_dataset(train, args.format, progress=not args.no_progress)
    except FrDistillError as err:
        return exit_with(err)
    counts = report.class_counts
    for problem in report.problems:
        print(f"BAD {problem}")
    if args.counts:
        with open(args.counts, "w") as f:
            f.write("class,images\n" + "".join(f"{k},{v}\n" for k, v in counts.items()))
    shown = counts if len(counts) <= 50 else dict(sorted(counts.items(), key=lambda kv: kv[1])[:10])
    print(f"{report.root} ({report.format}): {report.num_images} images in {len(counts)} classes"
          + ("" if len(counts) <= 50 else "; 10 smallest classes:"))
    for name, count in shown.items():
        print(f"  {name}: {count}")
    if counts:
        print(f"per-class images: min {min(counts.values())}, max {max(counts.values())}")
    print("OK" if report.ok else f"{len(report.problems)} problem(s) found")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())

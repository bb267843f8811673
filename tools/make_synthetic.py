#!/usr/bin/env python3
"""Generate the synthetic face data set (training folder + RecordIO, .bin sets, IJB- and TinyFace-style releases).

    python tools/make_synthetic.py data/synthetic --identities 1000 --images 20 --seed 0

With ``--onnx-teachers MODEL`` it also writes ``OUT_DIR/onnx_teachers/teacher_normalized.onnx``
and ``teacher_raw_pixels.onnx``: the model as ONNX teachers of both model-zoo input
conventions (:mod:`fr_distill.synthetic.onnx_teachers`), each verified.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from fr_distill.errors import FrDistillError, exit_with
from fr_distill import synthetic
from fr_distill.synthetic.onnx_teachers import load_exportable_model, write_onnx_teachers


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], epilog=synthetic.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", help="output directory")
    parser.add_argument("--identities", type=int, default=200, help="training identities N")
    parser.add_argument("--images", type=int, default=20, help="images per training identity K")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--family-size", type=int, default=4,
                        help="identities per family (hard negatives)")
    parser.add_argument("--bin-identities", type=int, default=100,
                        help="held-out identities of the .bin sets")
    parser.add_argument("--bin-pairs", type=int, default=600, help="pairs per .bin set")
    parser.add_argument("--ijb-name", default="IJBS", help="release name (ijb/<NAME>/)")
    parser.add_argument("--ijb-subjects", type=int, default=40)
    parser.add_argument("--ijb-probe-templates", type=int, default=2,
                        help="probe templates per subject (plus one gallery template)")
    parser.add_argument("--ijb-max-media", type=int, default=3, help="media per template: 1..max")
    parser.add_argument("--ijb-max-images", type=int, default=3, help="images per media: 1..max")
    parser.add_argument("--ijb-crop-sizes", type=int, nargs=2, default=(150, 200),
                        metavar=("MIN", "MAX"), help="loose-crop side range in pixels")
    parser.add_argument("--tinyface-identities", type=int, default=20,
                        help="identities of the TinyFace-style release (tinyface/Testing_Set/)")
    parser.add_argument("--tinyface-gallery", type=int, default=2,
                        help="Gallery_Match images per identity")
    parser.add_argument("--tinyface-probes", type=int, default=2, help="Probe images per identity")
    parser.add_argument("--tinyface-distractors", type=int, default=60,
                        help="Gallery_Distractor images (one identity each)")
    parser.add_argument("--tinyface-sizes", type=int, nargs=2, default=(16, 32),
                        metavar=("MIN", "MAX"), help="low-resolution face height range in pixels")
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality")
    parser.add_argument("--workers", type=int, default=None,
                        help="render processes (default: one per CPU)")
    parser.add_argument("--force", action="store_true", help="regenerate even if up to date")
    parser.add_argument("--onnx-teachers", metavar="MODEL",
                        help="also write OUT_DIR/onnx_teachers/teacher_normalized.onnx and "
                             "teacher_raw_pixels.onnx from this trained model (an fr_distill "
                             "checkpoint, or an iresnet100 state dict)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        source = load_exportable_model(args.onnx_teachers) if args.onnx_teachers else None
        manifest = synthetic.generate(
            args.out_dir, args.identities, args.images, args.seed, family_size=args.family_size,
            bin_identities=args.bin_identities, bin_pairs=args.bin_pairs, ijb_name=args.ijb_name,
            ijb_subjects=args.ijb_subjects, ijb_probe_templates=args.ijb_probe_templates,
            ijb_max_media=args.ijb_max_media, ijb_max_images=args.ijb_max_images,
            ijb_crop_sizes=tuple(args.ijb_crop_sizes), tinyface_identities=args.tinyface_identities,
            tinyface_gallery=args.tinyface_gallery, tinyface_probes=args.tinyface_probes,
            tinyface_distractors=args.tinyface_distractors,
            tinyface_sizes=tuple(args.tinyface_sizes), quality=args.quality,
            workers=args.workers, force=args.force)
        teachers = {} if source is None else write_onnx_teachers(
            source, Path(args.out_dir) / "onnx_teachers")
    except FrDistillError as err:
        return exit_with(err)
    print(json.dumps(manifest["counts"], indent=2))
    for kind, path in teachers.items():
        print(f"onnx teacher, {kind}: {path}")
    print(f"{args.out_dir}: ready in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

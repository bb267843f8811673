"""2-rank evaluation under torchrun: evaluate_model with sharded, cached features, then resume.

Args: OUT_DIR BIN_PATH IJB_ROOT TINYFACE_ROOT. Rank 0 writes OUT_DIR/worker.json (results, shards computed
per rank on the resumed pass) and OUT_DIR/feats.npy (features of the `.bin`).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

from fr_distill import dist
from fr_distill.eval.extract import EncodedImages, extract_features, last_run
from fr_distill.eval.report import to_jsonable
from fr_distill.eval.runner import evaluate_model
from fr_distill.eval.verification import read_bin
from tests.eval_data import tiny_model


def main(out_dir: str, bin_path: str, ijb_root: str, tinyface_root: str) -> None:
    torch.set_num_threads(1)
    info = dist.init(backend="gloo", device="cpu")
    out = Path(out_dir)
    model = tiny_model()
    results = evaluate_model(model, info.device, [bin_path], [(ijb_root, "IJBC")], out,
                             batch_size=4, shard_size=8, tinyface=tinyface_root)
    cache = out / "features" / Path(bin_path).stem
    payloads, _ = read_bin(bin_path)
    if dist.is_main():
        sorted(cache.glob("feats_*.npy"))[1].unlink()  # simulate an interrupted run
    dist.barrier()
    feats = extract_features(model, EncodedImages(payloads, bin_path), info.device, 4,
                             cache_dir=cache, shard_size=8, progress=False)
    computed = dist.all_gather_object(last_run["computed_shards"])
    if dist.is_main():
        np.save(out / "feats.npy", feats.numpy())
        (out / "worker.json").write_text(json.dumps(
            {"results": to_jsonable(results), "computed": computed, "world": info.world_size}))
    dist.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:5])

"""Evaluation (METHOD §5): verification `.bin` sets (V1), IJB-B/IJB-C 1:1 (V2) and 1:N (V3),
TinyFace low-resolution identification (V4).

``verification`` (load_bin, evaluate), ``ijb`` (template_features, pair_scores, tar_at_far,
identification), ``ijb_meta`` (reading a release), ``tinyface`` (reading the release, CMC
ranks), ``extract`` (sharded, cached, flip-fused
features), ``runner`` (evaluate_bin_sets for the trainer, evaluate_model, the launch/eval.py
body), ``report`` and ``plots`` (table, JSON, TensorBoard, ROC figures).
"""
from __future__ import annotations

from .errors import EvalDataError
from .runner import evaluate_bin_sets, evaluate_model

__all__ = ["EvalDataError", "evaluate_bin_sets", "evaluate_model"]

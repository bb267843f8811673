"""Training data (METHOD §4): RecordIO/folder indexing, pre-flight checks, the world-size-invariant
sampler, and the DALI and PyTorch loaders behind one ``build_train_loader``."""
from __future__ import annotations

from .errors import DataError
from .recordio import RecordIOReader, RecordIOWriter
from .dataset import DatasetInfo, preflight, scan
from .loader import Batch, TrainLoader, build_train_loader
from .sampler import GlobalSampler
from .align import ARCFACE_TEMPLATE, align_face, estimate_similarity

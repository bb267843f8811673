"""What a teacher-embedding cache was computed from, and the one-line refusal when it differs.

A cache row is the teacher's embedding of one sample, unflipped or flipped. It equals what
the teacher would compute on the fly only for the same teacher file (its sha256, and for a
plain state dict the architecture keys that build it), the same samples (the data set's
identity), the same pixels (decoder, normalization, the teacher's input convention) and
flips the run can ask for. :func:`identity` records these; :func:`first_difference` names
the first that differs between a cache and a run. Settings that change only the last bits of
a row (batch size, precision, memory layout, compilation, device) are recorded under
``execution`` and compared by :func:`execution_differences`: the run is told, not refused.

The data identity is the sample list and the labels, not the images' bytes: images replaced
by others under the same names pass it. ``teacher.cache_verify_content`` adds a digest of
every image's bytes (:mod:`.content`).
"""
from __future__ import annotations

import hashlib
import json

import numpy as np
import torch

from fr_distill.config import Config
from fr_distill.data import DatasetInfo
from fr_distill.data.loader import select_backend
from fr_distill.data.recordio import RecordIOReader
from fr_distill.errors import FrDistillError
from fr_distill.precision import image_layout


class CacheError(FrDistillError):
    """A teacher cache that cannot be used for this run, or cannot be built (bad input: exit 2)."""


def data_identity(info: DatasetInfo) -> dict:
    """Format, sample and class counts, and a digest of the sample list: relative file paths
    and labels of an image folder; record keys, offsets, labels and the file size of RecordIO
    (the samples pre-flight kept, in order, so skipped bad records count). A concatenation of
    sets: the digest of its sets' identities in their order (``[a, b]`` is not ``[b, a]``)."""
    if info.parts:
        digest = hashlib.sha256(info.format.encode())
        for part in info.parts:
            digest.update(json.dumps(data_identity(part), sort_keys=True).encode())
        return {"format": info.format, "num_samples": int(info.num_samples),
                "num_classes": int(info.num_classes), "digest": digest.hexdigest()}
    digest = hashlib.sha256(info.format.encode())
    if info.format == "folder":
        for name in info.samples.tolist():
            digest.update(name + b"\0")
    else:
        reader = RecordIOReader(info.root, info.idx_path)
        positions = np.asarray(info.samples, dtype=np.int64)
        digest.update(np.asarray(reader.keys, dtype="<i8")[positions].tobytes())
        digest.update(np.asarray(reader.offsets, dtype="<i8")[positions].tobytes())
        digest.update(str(reader.file_size).encode())
    digest.update(np.asarray(info.labels, dtype="<i8").tobytes())
    return {"format": info.format, "num_samples": int(info.num_samples),
            "num_classes": int(info.num_classes), "digest": digest.hexdigest()}


def decoder_name(cfg: Config, device: torch.device) -> str:
    """The image decoder of the run's loader: ``dali-mixed`` (nvJPEG on the GPU), ``dali-cpu``
    or ``torch`` (libjpeg-turbo/PIL in DataLoader workers); decoders may differ in the last
    bit of a pixel, so a cache belongs to one."""
    if select_backend(cfg.data.loader) == "dali":
        return "dali-mixed" if device.type == "cuda" else "dali-cpu"
    return "torch"


def flips_of(cfg: Config) -> list[bool]:
    """The flips a run with ``cfg`` reads: unflipped, and flipped with ``data.flip``."""
    return [False, True] if cfg.data.flip else [False]


def identity(cfg: Config, info: DatasetInfo, device: torch.device, teacher_sha256: str,
             plain_state_dict: bool) -> dict:
    """The identity of the rows a run with ``cfg`` on ``info`` reads (see the module docstring).

    ``plain_state_dict``: the teacher file is a bare state dict, built from ``teacher.name``,
    ``teacher.embedding_dim`` and ``teacher.width`` (other formats describe themselves).
    """
    architecture = ({"name": cfg.teacher.name, "embedding_dim": cfg.teacher.embedding_dim,
                     "width": cfg.teacher.width} if plain_state_dict else None)
    return {
        "teacher": {"sha256": teacher_sha256, "architecture": architecture},
        "data": data_identity(info),
        "preprocessing": {"decoder": decoder_name(cfg, device),
                          "pixels": "RGB 112x112, (x - 127.5) / 127.5",
                          "teacher_input": [cfg.teacher.input_mean, cfg.teacher.input_std]},
        "dtype": cfg.teacher.cache_dtype,
    }


def execution(cfg: Config, device: torch.device, batch_size: int) -> dict:
    """Settings that change a row only in its last bits (recorded; compared with a warning)."""

    return {"batch_size": batch_size, "amp": cfg.precision.amp,
            "channels_last": image_layout(cfg.model.channels_last, device) == torch.channels_last,
            "compile": cfg.teacher.compile, "device": device.type,
            "threads": torch.get_num_threads() if device.type == "cpu" else None}


def first_difference(cache: dict, run: dict, where: str, cfg: Config) -> str | None:
    """The first identity field where the cache's manifest (``cache``) and the run differ, as
    the one line of a refusal, or None when they agree."""
    teacher, data, pre = cache["teacher"], cache["data"], cache["preprocessing"]
    if teacher["sha256"] != run["teacher"]["sha256"]:
        return (f"teacher.cache {where} was built for a teacher file with sha256 "
                f"{teacher['sha256'][:12]}…, but teacher.path {cfg.teacher.path} has "
                f"{run['teacher']['sha256'][:12]}…")
    mine, theirs = teacher["architecture"], run["teacher"]["architecture"]
    if mine is not None and theirs is not None:
        for key in ("embedding_dim", "name", "width"):
            if mine[key] != theirs[key]:
                size = " (embedding size)" if key == "embedding_dim" else ""
                return (f"teacher.cache {where} was built with teacher.{key}={mine[key]}{size}, "
                        f"the config has teacher.{key}={theirs[key]}")
    train = cfg.data.train if isinstance(cfg.data.train, str) else f"[{', '.join(cfg.data.train)}]"
    for key in ("format", "num_samples", "num_classes", "digest"):
        if data[key] != run["data"][key]:
            return (f"teacher.cache {where} was built for other data: its {key} is "
                    f"{data[key]}, data.train {train} has {run['data'][key]}")
    if pre["decoder"] != run["preprocessing"]["decoder"]:
        return (f"teacher.cache {where} was built from images decoded by {pre['decoder']}, this "
                f"run decodes with {run['preprocessing']['decoder']} (data.loader, device); "
                f"decoders differ in the last bit of a pixel: build the cache with this run's "
                f"loader")
    if pre["pixels"] != run["preprocessing"]["pixels"]:
        return (f"teacher.cache {where} was built from {pre['pixels']} images, this run feeds "
                f"{run['preprocessing']['pixels']}")
    if pre["teacher_input"] != run["preprocessing"]["teacher_input"]:
        mean, std = pre["teacher_input"]
        return (f"teacher.cache {where} was built with teacher.input_mean={mean}, "
                f"teacher.input_std={std}, the config has teacher.input_mean="
                f"{cfg.teacher.input_mean}, teacher.input_std={cfg.teacher.input_std}")
    if cache["dtype"] != run["dtype"]:
        return (f"teacher.cache {where} holds {cache['dtype']} rows, the config has "
                f"teacher.cache_dtype={run['dtype']}")
    return None


def execution_differences(cache: dict, run: dict) -> list[str]:
    """``key cache → run`` for each execution setting that differs."""
    return [f"{key} {cache.get(key)} → {run[key]}" for key in run if cache.get(key) != run[key]]

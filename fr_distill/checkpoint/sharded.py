"""Sharded checkpoint directories (``checkpoint.format=dcp``) on torch.distributed.checkpoint.

A checkpoint is a directory ``step_00002000/``::

    .metadata          DCP's index: every tensor's global shape and where its chunks lie
    __0_0.distcp ...   tensor data, one file per rank: its rows of a class-sharded head and of
                       their momentum, and its share of the replicated tensors (DCP writes each
                       replicated tensor once, spreading them over the ranks)
    state.pt           torch.save of everything else (step, config, param groups, scheduler,
                       scaler, sampler position, every rank's RNG states, fault counters,
                       metrics) and where each tensor goes back in the checkpoint dict
    SHA256SUMS         "<sha256>  <file>" of every other file (``sha256sum -c`` format)

Commit: every rank writes into ``.step_00002000.tmp/``; when all have finished, each rank
hashes its share of the files, rank 0 writes ``SHA256SUMS`` and renames the directory to its
final name. A checkpoint counts only when ``SHA256SUMS`` exists and every file it lists is
present and matches, so a crash at any point leaves the previous checkpoints valid, and a
missing or corrupt rank file is caught before loading. The memory a rank needs to save or
load is its own rows, never the whole head (:mod:`fr_distill.engine.state`).

With ``background=True`` (``checkpoint.async_save``) :func:`save` copies the rank's tensors
into host memory, starts DCP's ``async_save`` of the copy in a thread (on a process group of
its own, so its collectives never interleave with training's) and returns a
:class:`PendingSave`; :meth:`PendingSave.finish` waits for every rank's write and commits.
Until then the directory keeps its temporary name: a crash leaves the previous checkpoint
the newest valid one.

Loading reshards: a rank asks DCP for the block of rows its head holds (a
:func:`fr_distill.dist.row_block`), whatever world size or head mode wrote the checkpoint.
:func:`load_whole` reads a checkpoint into the dict of a single-file checkpoint (for export,
evaluation and comparisons), in one process.

Nothing read runs code. ``state.pt`` and the tensors of the rank files are read with
``torch.load(weights_only=True)``. DCP's own reader unpickles ``.metadata`` with
``pickle.load``, and whoever can write ``.metadata`` can write ``SHA256SUMS`` too, so the
checksums prove nothing against a planted file: here ``.metadata`` is only ever unpickled by
:func:`read_metadata`, which resolves DCP's metadata classes and the few torch types they
hold and refuses any other global before it is called. DCP gets it through
:class:`IndexReader`, a ``FileSystemReader`` whose ``read_metadata`` is that one (rather
than a check of the file before DCP reads it again: the file could change in between), and
:func:`verify` reads it too, so a checkpoint whose index is refused counts as unusable, like
a corrupt one, wherever a checkpoint directory is read.
"""
from __future__ import annotations

import os
import pathlib
import pickle
import re
import shutil
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.distributed as torch_dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.staging import AsyncStager

from fr_distill import dist
from fr_distill.errors import first_line
from fr_distill.paths import file_sha256, fsync_dir
from fr_distill.unpickling import AllowlistUnpickler, RefusedGlobal, refusal, refused_global

STATE_FILE = "state.pt"
METADATA = ".metadata"  # DCP's index of the tensors
MANIFEST = "SHA256SUMS"
_MANIFEST_LINE = re.compile(r"(?P<digest>[0-9a-f]{64})  (?P<name>[^/]+)")
TENSOR_PATHS = "tensor_paths"  # state.pt's map: DCP key -> path of the tensor in the dict

Destination = Callable[[str, torch.Size, torch.dtype], torch.Tensor]

# DCP warns, also when no_dist=True says so, that it "assumes the intent is to save (load) in
# a single process": what one process (and every rank reading its own rows) means to do
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or "
                                          "uninitialized, assuming the intent is to")


# ----------------------------------------------------------------------------------------
# The checkpoint dict, split into tensors (DCP) and the rest (state.pt)
# ----------------------------------------------------------------------------------------
def split_tensors(tree: dict) -> tuple[dict, dict[str, torch.Tensor], dict[str, list]]:
    """``tree`` without its tensors (nested dicts walked), the tensors under ``a/b/c`` keys,
    and each key's path (a list of the original dict keys, integers included)."""
    tensors, paths = {}, {}

    def walk(node: dict, path: list) -> dict:
        rest = {}
        for key, value in node.items():
            if torch.is_tensor(value):
                name = "/".join(map(str, [*path, key]))
                tensors[name], paths[name] = value, [*path, key]
            elif isinstance(value, dict):
                rest[key] = walk(value, [*path, key])
            else:
                rest[key] = value
        return rest

    return walk(tree, []), tensors, paths


def merge_tensors(rest: dict, tensors: dict[str, torch.Tensor], paths: dict[str, list]) -> dict:
    """The inverse of :func:`split_tensors` (``rest`` is filled in place and returned)."""
    for name, path in paths.items():
        node = rest
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = tensors[name]
    return rest


def verify(directory: str | os.PathLike) -> str | None:
    """``None`` when every file ``SHA256SUMS`` lists is present and matches and ``.metadata``
    is an index of those files (:func:`read_metadata`), else the reason (naming the file).
    The files are hashed in parallel threads (hashlib releases the GIL)."""
    directory = Path(directory)
    manifest = directory / MANIFEST
    if not manifest.is_file():
        return f"commit marker {MANIFEST} missing (write interrupted?)"
    try:
        listed = read_manifest(manifest)
    except ValueError as err:
        return str(err)
    for required in (METADATA, STATE_FILE):
        if required not in listed:
            return f"{MANIFEST} does not list {required}"
    missing = [name for name in sorted(listed) if not (directory / name).is_file()]
    if missing:
        return f"{missing[0]} missing"
    names = sorted(listed)
    with ThreadPoolExecutor(max_workers=min(8, len(names))) as pool:
        digests = list(pool.map(lambda name: file_sha256(directory / name), names))
    for name, digest in zip(names, digests):
        if digest != listed[name]:
            size = (directory / name).stat().st_size
            return f"{name}: sha256 mismatch (truncated or corrupt; {size} bytes)"
    return _index_problem(directory, listed)


def read_manifest(manifest: Path) -> dict[str, str]:
    """File name → sha256 of each line of ``SHA256SUMS``; :class:`ValueError` naming the
    first line that is not ``<sha256>  <file>`` (e.g. the file cut short)."""
    listed = {}
    lines = manifest.read_bytes().decode(errors="replace").splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        match = _MANIFEST_LINE.fullmatch(line)
        if match is None:
            raise ValueError(f"{MANIFEST} line {number} is not '<sha256>  <file>' (cut short?)")
        listed[match["name"]] = match["digest"]
    return listed


def _index_problem(directory: Path, listed: dict[str, str]) -> str | None:
    """Why ``.metadata`` of ``directory`` is not an index of the files ``listed`` (a pickle
    refused for the code it refers to, another object, a file not listed), else ``None``."""
    try:
        metadata = read_metadata(directory)
    except Exception as err:  # whatever a pickle that is no DCP index raises: one line
        return refusal(err) or f"{METADATA} is not a DCP index ({first_line(err)})"
    unlisted = sorted({info.relative_path for info in metadata.storage_data.values()}
                      - listed.keys())
    if unlisted:
        return f"{METADATA} names {unlisted[0]}, which {MANIFEST} does not list"
    return None


# ----------------------------------------------------------------------------------------
# DCP's index, read without running code
# ----------------------------------------------------------------------------------------
class _IndexUnpickler(AllowlistUnpickler):
    """Resolves what DCP's index of a checkpoint of tensors holds (a real ``.metadata``
    of this project, read with ``pickletools``): DCP's metadata classes, ``torch.Size``, the
    dtypes, the layout (``torch.serialization._get_layout``, a lookup by name), the memory
    format enum and the ``PosixPath`` it was written to. Not ``BytesStorageMetadata``: DCP
    reads a bytes entry with ``torch.load(weights_only=False)``, and these checkpoints hold
    none. The classes are keyed by where pickle finds them (``__module__``)."""

    allowed = {
        **{(obj.__module__, obj.__qualname__): obj for obj in (
            dcp_metadata.Metadata, dcp_metadata.TensorStorageMetadata,
            dcp_metadata.TensorProperties, dcp_metadata.ChunkStorageMetadata,
            dcp_metadata.MetadataIndex, dcp_metadata.StorageMeta,
            dcp_metadata._MEM_FORMAT_ENCODING, _StorageInfo, torch.Size,
            torch.serialization._get_layout, pathlib.PosixPath)},
        **{("torch", name): value for name, value in vars(torch).items()
           if isinstance(value, torch.dtype)},
    }


def read_metadata(directory: str | os.PathLike) -> dcp_metadata.Metadata:
    """DCP's index of ``directory`` (``.metadata``), unpickled by :class:`_IndexUnpickler`:
    :class:`~fr_distill.unpickling.RefusedGlobal` (``source`` ``.metadata``) for a pickle
    referring to anything else, :class:`ValueError` when it holds another object (a pickle of
    the allowed classes may leave out attributes)."""
    with open(Path(directory) / METADATA, "rb") as f:
        try:
            metadata = _IndexUnpickler(f).load()
        except RefusedGlobal as err:
            err.source = METADATA
            raise
    if not _is_index(metadata):
        raise ValueError(f"a {type(metadata).__name__}, not a Metadata naming each entry's "
                         f"file")
    return metadata


def _is_index(metadata: object) -> bool:
    """Whether ``metadata`` is DCP's ``Metadata`` naming each entry's file."""
    storage = getattr(metadata, "storage_data", None)
    return (isinstance(metadata, dcp_metadata.Metadata) and isinstance(storage, dict)
            and all(isinstance(info, _StorageInfo)
                    and isinstance(getattr(info, "relative_path", None), str)
                    for info in storage.values()))


class IndexReader(dcp.FileSystemReader):
    """DCP's reader of a checkpoint directory, reading ``.metadata`` with
    :func:`read_metadata` instead of ``pickle.load``."""

    def read_metadata(self, *args, **kwargs) -> dcp_metadata.Metadata:
        metadata = read_metadata(self.path)
        if metadata.storage_meta is None:  # what FileSystemReader.read_metadata adds
            metadata.storage_meta = dcp_metadata.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


# ----------------------------------------------------------------------------------------
# Save (a collective) and load
# ----------------------------------------------------------------------------------------
def temporary_path(directory: Path) -> Path:
    return directory.with_name(f".{directory.name}.tmp")


def remove_directory(directory: Path) -> None:
    """Delete a checkpoint directory: renamed aside first, so a crash midway never leaves a
    half-deleted directory under a checkpoint's name."""
    if not directory.exists():
        return
    aside = directory.with_name(f".{directory.name}.deleted")
    shutil.rmtree(aside, ignore_errors=True)
    os.replace(directory, aside)
    shutil.rmtree(aside)


class PendingSave:
    """A checkpoint being written in the background; :meth:`finish` (a collective) waits for
    every rank's write and commits it."""

    def __init__(self, future, tmp: Path, directory: Path) -> None:
        self.future, self.tmp, self.directory = future, tmp, directory

    def finish(self) -> Path:
        self.future.result()  # this rank's files, and .metadata once every rank has written
        commit(self.tmp, self.directory)
        return self.directory


class _AlreadyStaged(AsyncStager):
    """The tensors handed to ``async_save`` are copies already (:func:`_copy`): DCP's own
    staging would drop the row-block tags of :func:`fr_distill.dist.row_block`."""

    _synchronize_after_execute = False

    def stage(self, state_dict):
        return state_dict


def _copy(tensor: torch.Tensor) -> torch.Tensor:
    """A host-memory copy of ``tensor``, keeping its row-block tag."""
    copy = tensor.detach().to("cpu", copy=True)
    if hasattr(tensor, "global_offsets"):
        dist.row_block(copy, tensor.global_offsets[0][0], tensor.global_shape[0])
    return copy


_BACKGROUND_GROUP: list = []


def _background_group():
    """A gloo process group for the background writes (created once, on every rank)."""
    if not dist.is_dist():
        return None
    if not _BACKGROUND_GROUP:
        _BACKGROUND_GROUP.append(torch_dist.new_group(backend="gloo"))
    return _BACKGROUND_GROUP[0]


def save(checkpoint: dict, directory: str | os.PathLike,
         background: bool = False) -> Path | PendingSave:
    """Write ``checkpoint`` (this rank's view: class-sharded rows as
    :func:`fr_distill.dist.row_block`) as the sharded checkpoint ``directory``; call on every
    rank. Returns when the directory is committed on every rank, or with ``background`` a
    :class:`PendingSave` as soon as the tensors are copied."""
    directory = Path(directory)
    tmp = temporary_path(directory)
    if dist.is_main():
        directory.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # an earlier attempt's, interrupted
        tmp.mkdir()
    dist.barrier()
    rest, tensors, paths = split_tensors(checkpoint)
    writer = dcp.FileSystemWriter(tmp, sync_files=True)
    if background:
        future = dcp.async_save({key: _copy(t) for key, t in tensors.items()},
                                storage_writer=writer, async_stager=_AlreadyStaged(),
                                process_group=_background_group(), no_dist=not dist.is_dist())
    else:
        dcp.save(tensors, storage_writer=writer, no_dist=not dist.is_dist())
    if dist.is_main():
        with open(tmp / STATE_FILE, "wb") as f:
            torch.save({**rest, TENSOR_PATHS: paths}, f)
            f.flush()
            os.fsync(f.fileno())
    if background:
        return PendingSave(future, tmp, directory)
    dist.barrier()
    commit(tmp, directory)
    return directory


def commit(tmp: Path, directory: Path) -> None:
    """Checksum the files of ``tmp`` (each rank its share), write ``SHA256SUMS`` and rename
    ``tmp`` to ``directory`` (rank 0); a collective."""
    names = sorted(p.name for p in tmp.iterdir() if p.is_file())
    mine = names[dist.rank()::dist.world_size()]
    digests: dict[str, str] = {}
    for part in dist.all_gather_object({name: file_sha256(tmp / name) for name in mine}):
        digests.update(part)
    if dist.is_main():
        with open(tmp / MANIFEST, "w") as f:
            f.writelines(f"{digests[name]}  {name}\n" for name in names)
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(tmp)
        remove_directory(directory)  # a checkpoint of the same step from an earlier attempt
        os.replace(tmp, directory)
        fsync_dir(directory.parent)
    dist.barrier()


def read_state(directory: str | os.PathLike) -> dict:
    """``state.pt``: the checkpoint dict without its tensors, plus :data:`TENSOR_PATHS`; a
    pickle referring to code is refused (:class:`~fr_distill.unpickling.RefusedGlobal`,
    ``source`` ``state.pt``)."""
    try:
        return torch.load(Path(directory) / STATE_FILE, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        name = refused_global(err)
        if name is None:
            raise
        raise RefusedGlobal(name, STATE_FILE) from None


def tensor_shapes(directory: str | os.PathLike) -> dict[str, tuple[torch.Size, torch.dtype]]:
    """Every tensor of the checkpoint: its global shape and dtype (from DCP's metadata)."""
    metadata = read_metadata(directory)
    return {key: (md.size, md.properties.dtype)
            for key, md in metadata.state_dict_metadata.items() if hasattr(md, "size")}


def load(directory: str | os.PathLike, state: dict, destination: Destination) -> dict:
    """The checkpoint dict of ``directory``, ``state`` (:func:`read_state`) completed with its
    tensors; ``destination(key, global_shape, dtype)`` gives the tensor each is read into
    (a :func:`fr_distill.dist.row_block` for this rank's rows, else the whole tensor) or raises
    (e.g. a head of another size). No collective: each rank reads its own part."""
    tensors = {key: destination(key, size, dtype)
               for key, (size, dtype) in tensor_shapes(directory).items()}
    dcp.load(tensors, storage_reader=IndexReader(directory), no_dist=True)
    rest = {key: value for key, value in state.items() if key != TENSOR_PATHS}
    return merge_tensors(rest, tensors, state[TENSOR_PATHS])


def whole_tensor(key: str, size: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """The :data:`Destination` that reads every tensor whole."""
    return torch.empty(size, dtype=dtype)


def load_whole(directory: str | os.PathLike) -> dict:
    """The checkpoint of ``directory`` as one dict, class-sharded rows assembled (one process)."""
    return load(directory, read_state(directory), whole_tensor)

"""PyTorch DCP directories (torch.distributed.checkpoint.save): `.metadata` + `__{rank}_{i}.distcp`.

The catalogue comes from `.metadata` alone: every tensor's global size, dtype and chunks, and for
each chunk (file, byte offset, length). `.metadata` is a pickle, so it is read with a restricted
unpickler that knows only DCP's metadata classes (as plain records) and refuses anything else.
A chunk is either a torch.save blob (the default format: its tensor's bytes sit at a known offset
inside it) or raw bytes; either way the run stage preads only the bytes of the rows it needs.
File names never tell which shard is where: with fully-parallel saving any chunk may be in any file.

The trainers that save with DCP put the model in their own folders behind a wrapper key
(dcp_layouts.py: accelerate, NeMo-RL, torchtune): the source may be the folder a user naturally passes,
and the wrapper is stripped exactly, not guessed. torchtune's names are its own (torchtune.py).
"""
from __future__ import annotations

import functools
import math
import os
import pickle
import re

from ..dtypes import DType
from ..errors import MergeError, MergeIOError, one_line
from ..model import Catalogue, SourceTensor, dtype_size, dtype_str
from ..paths import check_file
from .chunks import PieceTable, gc_paused
from .dcp_layouts import Located, locate, strip_wrapper
from .dcp_pickle import MetadataTables, chunk_of, entry_kind, load_metadata, tensor_entry
from .layout import find_hf_dir
from .registry import ReadOptions, SourceFormat
from .torch_archive import FAST_PATH_MISSES, StoredTensor, load_tensor_blob

NAME = "dcp"
SAVER_RANK = re.compile(r"^__(\d+)_\d+\.distcp$")  # only to report the world size, never to find a shard
METADATA = ".metadata"


def detect(source: str, opts: ReadOptions = ReadOptions()) -> bool:
    """A DCP directory, or a trainer's folder that holds one (dcp_layouts.locate). A Megatron torch_dist
    checkpoint is DCP underneath but has its own reader (megatron.py). An ambiguous or unfinished
    trainer folder is refused here, with the fix."""
    return locate(source) is not None


def _unreadable(path: str, e: Exception) -> MergeError:
    """The refusal of a `.metadata` that does not read, with pickle's reason on one line."""
    return MergeError(f"{path} is not a readable DCP metadata file ({type(e).__name__}: {one_line(str(e))}); it is "
                      "corrupt or not from torch.distributed.checkpoint. Copy it again from the training job")


_read: dict[tuple, MetadataTables] = {}  # the last .metadata read, until its reader takes it


def read_metadata(path: str, root: str | None = None) -> MetadataTables:
    """The tables of a `.metadata` (dcp_pickle.MetadataTables): fqn -> tensor entry (or bytes
    entry), and the storage table of every chunk. Unpickled as the file streams in (never all its
    bytes at once). The result is kept until tensors_from_metadata takes it, so a format's detect
    that looks at the names (torchtitan) does not make the reader unpickle the file a second time.
    The file must resolve inside `root` (the source; by default its own directory) and be a
    regular file, checked before it is opened: a format's detect reads it too."""
    check_file(path, root or os.path.dirname(os.path.abspath(path)))
    try:
        st = os.stat(path)
        key = (os.path.realpath(path), st.st_mtime_ns, st.st_size)
        if key not in _read:
            _read.clear()
            _read[key] = _load_metadata(path)
        return _read[key]
    except OSError as e:
        raise MergeIOError(f"cannot read {path}: {e.strerror}") from None


def _take_metadata(path: str, root: str) -> MetadataTables:
    """read_metadata's result, no longer kept: the caller consumes it."""
    result = read_metadata(path, root)
    _read.clear()
    return result


def _load_metadata(path: str) -> MetadataTables:
    """One pause of the cycle collector over the unpickling: its passes would walk every record
    just made. A large `.metadata` goes through the lean unpickler (dcp_pickle.py)."""
    with gc_paused():
        try:
            return load_metadata(path)
        except (pickle.UnpicklingError, MemoryError, *FAST_PATH_MISSES) as e:
            raise _unreadable(path, e) from None


def strip_dcp_prefix(names: list[str]) -> dict[str, str]:
    """dcp.save({"model": sd}) prefixes every key with 'model.'; an HF CausalLM then shows
    'model.model.*' and 'model.lm_head.*'. Strip the prefix only when that is what we see."""
    wrapped = names and all(n.startswith("model.") for n in names) and any(
        n.startswith(("model.model.", "model.lm_head.")) for n in names)
    return {n: (n[len("model."):] if wrapped else n) for n in names}


SKIPPED_PREFIXES = ("optim.", "optimizer.", "lr_scheduler.", "dataloader.", "extra_state.", "rng_state")


class _DataFiles:
    """The data files chunks name, each stat'ed once (not once per chunk): index and size by relative name."""

    def __init__(self, ckpt_dir: str, root: str):
        self.dir, self.root = ckpt_dir, root
        self.paths: list[str] = []
        self.found: dict[str, tuple[int, int]] = {}

    def get(self, relative: str, fqn: str) -> tuple[int, int]:
        known = self.found.get(relative)
        if known is None:
            path = os.path.join(self.dir, relative)
            if not os.path.lexists(path):
                raise MergeError(f"missing {path}, which holds {fqn} (and maybe more); copy the complete "
                                 "checkpoint directory and rerun")
            checked = check_file(path, self.root)  # inside the source and a regular file, before it is opened
            known = self.found[relative] = (len(self.paths), checked.size)
            self.paths.append(path)
        return known


BLOB_FRAME_MAX = 1 << 16  # bytes of zip records and pickle around a blob's tensor data worth remembering


class _BlobFrames:
    """Where the tensor lies in a torch.save blob (dcp.save's default chunk format), parsed once per
    framing. torch.save writes every chunk of one shape and dtype with the same zip records and
    pickle around its data; every byte the parse reads lies in those frames. So a blob whose
    bytes before and after the data equal a parsed blob's, at the same length, has the same
    layout: two short preads instead of a zip and pickle parse per chunk."""

    def __init__(self):
        self.known: dict[tuple, tuple] = {}  # (length, dtype, shape) -> (head, tail, StoredTensor at 0)
        self.fds: dict[str, int] = {}

    def locate(self, path: str, start: int, length: int, dtype: DType, sizes: tuple) -> StoredTensor:
        fd = self.fds.get(path)
        if fd is None:
            fd = self.fds[path] = os.open(path, os.O_RDONLY)
        known = self.known.get((length, dtype, sizes))
        if known is not None:
            head, tail, at0 = known
            if os.pread(fd, len(head), start) == head and os.pread(fd, len(tail), start + length - len(tail)) == tail:
                return StoredTensor(start + at0.offset, start + at0.storage_end, at0.shape, at0.strides, at0.dtype)
        stored = load_tensor_blob(path, start, length)
        head_len, tail_len = stored.offset - start, start + length - stored.storage_end
        if 0 <= head_len <= BLOB_FRAME_MAX and 0 <= tail_len <= BLOB_FRAME_MAX:
            at0 = StoredTensor(head_len, stored.storage_end - start, stored.shape, stored.strides, stored.dtype)
            self.known[(length, dtype, sizes)] = (os.pread(fd, head_len, start),
                                                  os.pread(fd, tail_len, start + length - tail_len), at0)
        return stored

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


def tensors_from_metadata(ckpt_dir: str, rename=lambda names: {n: n for n in names}, root: str | None = None):
    """The SourceTensors of a DCP directory (metadata only), the data files, and notes on what was skipped.
    Each tensor's pieces are a PieceTable (ints in one array, not an object per chunk). `root`: the
    source the directory was found in; `.metadata` and every data file must resolve inside it."""
    root = root or ckpt_dir
    meta_path = os.path.join(ckpt_dir, METADATA)
    entries, storage = _take_metadata(meta_path, root)  # checked inside `root` before it is opened
    try:
        bytes_entries = [n for n, e in entries.items() if entry_kind(e) == "BytesStorageMetadata"]
        kinds = {entry_kind(e) for e in entries.values()} - {"BytesStorageMetadata", "TensorStorageMetadata"}
        if kinds:
            raise KeyError(kinds.pop())
    except FAST_PATH_MISSES as e:
        raise _unreadable(meta_path, e) from None
    for n in bytes_entries:
        del entries[n]
    optim = sum(n.startswith(SKIPPED_PREFIXES) for n in entries)
    extra = sum("._extra_state" in n for n in entries)
    entries = {n: e for n, e in entries.items() if not n.startswith(SKIPPED_PREFIXES) and "._extra_state" not in n}
    renamed = rename(list(entries))
    files, blobs = _DataFiles(ckpt_dir, root), _BlobFrames()
    tensors: dict[str, SourceTensor] = {}
    try:
        with gc_paused():
            for fqn in list(entries):
                tensors[renamed[fqn]] = _tensor(renamed[fqn], fqn, entries.pop(fqn), storage.take(fqn), files,
                                                blobs, meta_path)
    except FAST_PATH_MISSES as e:
        raise _unreadable(meta_path, e) from None
    except OSError as e:
        raise MergeIOError(f"cannot read {e.filename}: {e.strerror}") from None
    finally:
        blobs.close()
    notes = [note for count, note in ((optim, f"{optim} optimizer / scheduler / RNG entries"),
                                      (extra, f"{extra} _extra_state entries"),
                                      (len(bytes_entries), f"{len(bytes_entries)} non-tensor entries (extra state)"))
             if count]
    world = len({m.group(1) for m in (SAVER_RANK.match(os.path.basename(f)) for f in files.paths) if m})
    return tensors, files.paths, notes, world


def _tensor(name: str, fqn: str, entry, stored: dict, files: _DataFiles, blobs: _BlobFrames,
            meta_path: str) -> SourceTensor:
    """One tensor entry of `.metadata` and the storage of its chunks, as a SourceTensor."""
    entry = tensor_entry(entry)
    dtype = entry.dtype
    if not isinstance(dtype, DType):
        raise TypeError(f"a dtype that is a {type(dtype).__name__}")
    size = entry.size
    table = PieceTable(files.paths, dtype, len(size))
    for offsets, sizes in map(chunk_of, entry.chunks):
        if math.prod(sizes) == 0:
            continue
        where = stored.get(offsets)
        if where is None:
            raise MergeError(f"{meta_path} lists a chunk of {fqn} at {list(offsets)} but no storage for it; "
                             "the metadata is corrupt")
        relative, start, length = where
        if start < 0 or length < 0:
            raise MergeError(f"{meta_path}: the storage of {fqn} at {list(offsets)} has "
                             f"{'offset' if start < 0 else 'length'} {min(start, length)}, which is negative; the "
                             "metadata is corrupt. Copy it again from the training job")
        index, file_size = files.get(relative, fqn)
        if file_size < start + length:
            path = files.paths[index]
            raise MergeIOError(f"{path} has {file_size} bytes but {fqn} is stored up to byte "
                               f"{start + length}; the file is truncated, copy it again")
        _add_chunk(table, blobs, index, start, length, fqn, offsets, sizes)
    return SourceTensor(name, size, dtype, table)


def locate_or_refuse(source: str) -> Located:
    located = locate(source)
    if located is None:
        raise MergeError(f"{source} holds no {METADATA} (PyTorch DCP), nor a trainer's folder with one; pass the "
                         "checkpoint directory")
    return located


def catalogue_of(name: str, source: str, located: Located, rename) -> Catalogue:
    """The catalogue of the located DCP directory, its names renamed; the HF config is looked for
    beside the source, then beside the model directory."""
    tensors, files, notes, world = tensors_from_metadata(located.ckpt, rename, root=source)
    if not tensors:
        raise MergeError(f"{located.ckpt} holds no model weights ({'; '.join(notes) or 'nothing'}); pass the model's "
                         "directory (accelerate: pytorch_model_fsdp_0 beside optimizer_0; NeMo-RL: policy/weights "
                         "beside policy/optimizer)")
    return Catalogue(format=name, source=source, files=files, tensors=tensors,
                     hf_dir=find_hf_dir(source) or find_hf_dir(located.ckpt), world_size=world,
                     mesh="chunked (DCP)", notes=[*located.notes, *notes])


def read_catalogue(source: str, opts: ReadOptions = ReadOptions()) -> Catalogue:
    """HF names: a plain DCP directory's (an all-'model.' wrapper stripped when it wraps HF names), or
    a known writer's, its wrapper stripped exactly."""
    located = locate_or_refuse(source)
    writer = located.writer
    rename = strip_dcp_prefix if writer is None else (lambda names: strip_wrapper(names, writer, located.ckpt))
    return catalogue_of(NAME, source, located, rename)


@functools.lru_cache(maxsize=4096)
def _contiguous(sizes: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(math.prod(sizes[i + 1:]) for i in range(len(sizes)))


def _add_chunk(table: PieceTable, blobs: _BlobFrames, index: int, start: int, length: int, fqn: str, offsets,
               sizes) -> None:
    """A chunk is raw bytes (contiguous row-major) when its length says so, else a torch.save blob."""
    dtype = table.dtype
    if length == math.prod(sizes) * dtype_size(dtype):
        table.add(index, start, offsets, sizes, _contiguous(sizes))
        return
    path = table.files[index]
    stored = blobs.locate(path, start, length, dtype, sizes)
    if stored.shape != sizes or stored.dtype != dtype:
        raise MergeError(f"{path}: the chunk of {fqn} at {list(offsets)} holds {list(stored.shape)} "
                         f"{dtype_str(stored.dtype)}, the metadata says {list(sizes)} {dtype_str(dtype)}")
    table.add(index, stored.offset, offsets, stored.shape, stored.strides)


FORMAT = SourceFormat(name=NAME, family="hf", detect=detect, read_catalogue=read_catalogue,
                      describe=".metadata (PyTorch DCP, or accelerate's / NeMo-RL's folders holding one)")

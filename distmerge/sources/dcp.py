"""PyTorch DCP directories (torch.distributed.checkpoint.save): `.metadata` + `__{rank}_{i}.distcp`.

The catalogue comes from `.metadata` alone: every tensor's global size, dtype and chunks, and for
each chunk (file, byte offset, length). `.metadata` is a pickle, so it is read with a restricted
unpickler that knows only DCP's metadata classes (as plain records) and refuses anything else.
A chunk is either a torch.save blob (the default format: its tensor's bytes sit at a known offset
inside it) or raw bytes; either way the run stage preads only the bytes of the rows it needs.
File names never tell which shard is where: with fully-parallel saving any chunk may be in any file.
"""
from __future__ import annotations

import io
import math
import os
import pickle
import re


from ..errors import MergeError, MergeIOError
from ..model import Catalogue, Piece, SourceTensor, dtype_size, dtype_str
from .coverage import check_coverage
from .layout import find_hf_dir
from .registry import ReadOptions, SourceFormat
from .torch_archive import FAST_PATH_MISSES, RecordClasses, StoredTensor, load_tensor_blob, plain_global

NAME = "dcp"
SAVER_RANK = re.compile(r"^__(\d+)_\d+\.distcp$")  # only to report the world size, never to find a shard
METADATA = ".metadata"


def detect(source: str, opts: ReadOptions = ReadOptions()) -> bool:
    # a Megatron torch_dist checkpoint is DCP underneath, but has its own reader (megatron.py)
    return os.path.isfile(os.path.join(source, METADATA)) and not os.path.isfile(os.path.join(source, "metadata.json"))


class _MetadataUnpickler(pickle.Unpickler):
    """DCP's metadata classes become records; torch dtypes and sizes become values; nothing else loads."""

    def __init__(self, data: bytes):
        super().__init__(io.BytesIO(data))
        self.classes = RecordClasses()

    def find_class(self, module, name):
        # any DCP (or Megatron) metadata class becomes an inert record: none of their code runs
        if module.startswith(("torch.distributed.checkpoint", "megatron.core.dist_checkpointing")):
            return self.classes[name]
        plain = plain_global(module, name)
        if plain is not None:
            return plain
        if module == "pathlib" and name in ("PosixPath", "PurePosixPath", "Path", "WindowsPath", "PureWindowsPath"):
            return lambda *parts: "/".join(map(str, parts))
        raise pickle.UnpicklingError(f"{module}.{name} is not part of DCP metadata")


def _field(record, name, position=None):
    if name in record.state:
        return record.state[name]
    if position is not None and len(record.args) > position:
        return record.args[position]
    raise KeyError(f"{record.kind}.{name}")


def read_metadata(path: str) -> tuple[dict, dict, list]:
    """Tensors: fqn -> (size, dtype, [(chunk offsets, chunk sizes)]); storage: (fqn, chunk offsets) ->
    (relative file, byte offset, length); and the names of non-tensor (bytes) entries."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise MergeIOError(f"cannot read {path}: {e.strerror}") from None
    try:
        meta = _MetadataUnpickler(data).load()
        tensors, bytes_entries = {}, []
        for fqn, entry in _field(meta, "state_dict_metadata", 0).items():
            if entry.kind == "BytesStorageMetadata":
                bytes_entries.append(fqn)
                continue
            if entry.kind != "TensorStorageMetadata":
                raise KeyError(entry.kind)
            props = _field(entry, "properties", 0)
            dtype = props.state["value"][0] if "value" in props.state else _field(props, "dtype", 0)
            chunks = [(tuple(_field(c, "offsets", 0)), tuple(_field(c, "sizes", 1))) for c in _field(entry, "chunks", 2)]
            tensors[fqn] = (tuple(_field(entry, "size", 1)), dtype, chunks)
        storage = {}
        for index, info in _field(meta, "storage_data", 2).items():
            key = (_field(index, "fqn", 0), tuple(index.state.get("offset") or ()))  # None for bytes entries
            if info.state.get("transform_descriptors"):
                raise MergeError(f"{path}: {key[0]} is stored with transforms {info.state['transform_descriptors']} "
                                 "(e.g. compression), which distmerge does not read yet")
            storage[key] = (str(_field(info, "relative_path", 0)), int(_field(info, "offset", 1)),
                            int(_field(info, "length", 2)))
    except MergeError:
        raise
    except (pickle.UnpicklingError, *FAST_PATH_MISSES) as e:
        raise MergeError(f"{path} is not a readable DCP metadata file ({type(e).__name__}: {e}); it is corrupt or "
                         "not from torch.distributed.checkpoint. Copy it again from the training job") from None
    return tensors, storage, bytes_entries


def strip_dcp_prefix(names: list[str]) -> dict[str, str]:
    """dcp.save({"model": sd}) prefixes every key with 'model.'; an HF CausalLM then shows
    'model.model.*' and 'model.lm_head.*'. Strip the prefix only when that is what we see."""
    wrapped = names and all(n.startswith("model.") for n in names) and any(
        n.startswith(("model.model.", "model.lm_head.")) for n in names)
    return {n: (n[len("model."):] if wrapped else n) for n in names}


SKIPPED_PREFIXES = ("optim.", "optimizer.", "lr_scheduler.", "dataloader.", "extra_state.", "rng_state")


def tensors_from_metadata(ckpt_dir: str, rename=lambda names: {n: n for n in names}):
    """The SourceTensors of a DCP directory (metadata only), the data files, and notes on what was skipped."""
    meta_path = os.path.join(ckpt_dir, METADATA)
    entries, storage, bytes_entries = read_metadata(meta_path)
    optim = sum(n.startswith(SKIPPED_PREFIXES) for n in entries)
    extra = sum("._extra_state" in n for n in entries)
    entries = {n: e for n, e in entries.items() if not n.startswith(SKIPPED_PREFIXES) and "._extra_state" not in n}
    renamed = rename(list(entries))
    tensors: dict[str, SourceTensor] = {}
    files: dict[str, None] = {}
    for fqn, (size, dtype, chunks) in entries.items():
        pieces = []
        for offsets, sizes in chunks:
            if math.prod(sizes) == 0:
                continue
            try:
                relative, start, length = storage[(fqn, offsets)]
            except KeyError:
                raise MergeError(f"{meta_path} lists a chunk of {fqn} at {list(offsets)} but no storage for it; "
                                 "the metadata is corrupt") from None
            path = os.path.join(ckpt_dir, relative)
            if not os.path.isfile(path):
                raise MergeError(f"missing {path}, which holds {fqn} (and maybe more); copy the complete "
                                 "checkpoint directory and rerun")
            if os.path.getsize(path) < start + length:
                raise MergeIOError(f"{path} has {os.path.getsize(path)} bytes but {fqn} is stored up to byte "
                                   f"{start + length}; the file is truncated, copy it again")
            files[path] = None
            pieces.append(_piece(path, start, length, fqn, offsets, sizes, dtype))
        t = tensors[renamed[fqn]] = SourceTensor(renamed[fqn], size, dtype, pieces)
        check_coverage(t)
    notes = [note for count, note in ((optim, f"{optim} optimizer / scheduler / RNG entries"),
                                      (extra, f"{extra} _extra_state entries"),
                                      (len(bytes_entries), f"{len(bytes_entries)} non-tensor entries (extra state)"))
             if count]
    world = len({m.group(1) for m in (SAVER_RANK.match(os.path.basename(f)) for f in files) if m})
    return tensors, list(files), notes, world



def read_catalogue(source: str, opts: ReadOptions = ReadOptions()) -> Catalogue:
    tensors, files, notes, world = tensors_from_metadata(source, strip_dcp_prefix)
    return Catalogue(format=NAME, source=source, files=files, tensors=tensors, hf_dir=find_hf_dir(source),
                     world_size=world, mesh="chunked (DCP)", notes=notes)


def _piece(path, start, length, fqn, offsets, sizes, dtype) -> Piece:
    raw_bytes = math.prod(sizes) * dtype_size(dtype)
    if length == raw_bytes:  # raw-bytes format: contiguous row-major data
        strides = tuple(math.prod(sizes[i + 1:]) for i in range(len(sizes)))
        stored = StoredTensor(start, start + length, tuple(sizes), strides, dtype)
    else:  # torch.save blob
        stored = load_tensor_blob(path, start, length)
    if stored.shape != tuple(sizes) or stored.dtype != dtype:
        raise MergeError(f"{path}: the chunk of {fqn} at {list(offsets)} holds {list(stored.shape)} "
                         f"{dtype_str(stored.dtype)}, the metadata says {list(sizes)} {dtype_str(dtype)}")
    return Piece(file=path, offset=stored.offset, shape=stored.shape, strides=stored.strides,
                 region=tuple(offsets), dtype=dtype)


FORMAT = SourceFormat(name=NAME, family="hf", detect=detect, read_catalogue=read_catalogue,
                      describe=".metadata (PyTorch DCP)")

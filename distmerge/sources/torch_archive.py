"""Metadata of a torch.save archive: which bytes of the file hold each tensor, without reading them.

The fast path is a restricted unpickler: it resolves only an allow-list of torch globals, each to a
stand-in of our own that records its arguments (no torch class is built, no other code runs), and
it does not import torch.distributed.tensor (0.5 s of imports). Anything it does not know falls
back to torch.load(map_location="meta", weights_only=True), torch's own safe loader, whose
results are turned into the same records. Either way: no pickle code from the file is executed.
"""
from __future__ import annotations

import collections
import io
import logging
import pickle
import struct
import zipfile
from dataclasses import dataclass

import torch

from ..errors import MergeError, MergeIOError

# A placement as plain data: ("shard", dim), ("strided", dim, split_factor) or ("replicate",)
Placement = tuple


@dataclass
class StoredTensor:
    """A tensor's block in the archive: offset of element 0, its shape and strides in elements."""

    offset: int
    storage_end: int          # file offset one past the storage's last byte (bounds check)
    shape: tuple[int, ...]
    strides: tuple[int, ...]
    dtype: torch.dtype


@dataclass
class StoredDTensor:
    local: StoredTensor
    shape: tuple[int, ...]                # global shape
    placements: tuple[Placement, ...]
    mesh_shape: tuple[int, ...]
    coordinate: tuple[int, ...]           # the saving rank's coordinate on the (sub-)mesh
    mesh_dim_names: tuple[str, ...] | None


class _Unsupported(Exception):
    """The fast path met something it does not know; torch's loader decides."""


FAST_PATH_MISSES = (_Unsupported, pickle.UnpicklingError, EOFError, AttributeError, TypeError, KeyError,
                    IndexError, ValueError)
_missed: list[str] = []  # the first fast-path miss of this process, reported once


def _fast_path_missed(path: str, e: Exception) -> None:
    """Say once why metadata goes through torch.load: it is ~10x slower per file and imports
    torch.distributed.tensor, so a slow catalogue stage has a named cause."""
    if not _missed:
        _missed.append(path)
        logging.getLogger("distmerge").info("%s: reading metadata through torch.load (slower): the fast reader does not "
                                            "know %s", path, f"{type(e).__name__} {e}".strip()[:200])


def _read_archive(f, path: str, start: int = 0) -> tuple[bytes, str, dict]:
    """The pickle, its record prefix and every record's (file offset, size) of the archive in f."""
    with zipfile.ZipFile(f) as archive:
        offsets = _record_offsets(f, archive, start)
        pkl = next((n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"), None)
        if pkl is None:
            raise MergeError(f"{path} is not a torch.save archive (no data.pkl); it is not a checkpoint file")
        return archive.read(pkl), pkl[: -len("data.pkl")], offsets


def _io_error(path: str, e: Exception) -> MergeIOError:
    return MergeIOError(f"cannot read {path}: {e}. The file is truncated or corrupt; "
                        "copy it again from the training job's storage")


def load_state_metadata(path: str) -> dict:
    """name -> StoredTensor | StoredDTensor for a torch.save'd state dict (other values are dropped)."""
    state = _fast_load(path, inert_unknown=False)
    if state is not None:
        try:
            return _convert_fast(state, path)
        except FAST_PATH_MISSES as e:
            _fast_path_missed(path, e)
    return _load_with_torch(path)


def load_megatron_legacy(path: str) -> tuple[list[dict], dict]:
    """Megatron-LM's legacy model_optim_rng.pt: its model chunks as load_state_metadata gives them
    (`model`, or `model0`, `model1`, ... with virtual pipeline stages) and the plain values of its
    `args` Namespace. The other entries may hold any class: the fast path reads them as inert
    records (never calling them) and leaves them alone."""
    top = _fast_load(path, inert_unknown=True)
    if top is not None:
        try:
            chunks = [_convert_fast(chunk, path) for chunk in _model_chunks(top, path)]
            args = top.get("args")
            if not isinstance(args, _Record):
                return chunks, {}
            return chunks, {k: v for k, v in args.state.items() if isinstance(v, (int, str, type(None)))}
        except FAST_PATH_MISSES as e:
            _fast_path_missed(path, e)
    return _load_with_torch(path, megatron_chunks=True), {}


def _fast_load(path: str, inert_unknown: bool):
    """The file's top-level object through the restricted unpickler; None where it meets something unknown."""
    try:
        with open(path, "rb") as f:
            data, prefix, offsets = _read_archive(f, path)
        try:
            return _FastUnpickler(data, prefix, offsets, inert_unknown=inert_unknown).load()
        except FAST_PATH_MISSES as e:
            _fast_path_missed(path, e)
            return None
    except (zipfile.BadZipFile, EOFError, OSError, struct.error) as e:
        raise _io_error(path, e) from None


def _model_chunks(top, path: str) -> list[dict]:
    if isinstance(top, dict) and isinstance(top.get("model"), dict):
        return [top["model"]]
    chunks = []
    while isinstance(top, dict) and isinstance(top.get(f"model{len(chunks)}"), dict):
        chunks.append(top[f"model{len(chunks)}"])
    if not chunks:
        raise MergeError(f"{path} has no state dict under 'model' (or 'model0', 'model1', ... for virtual "
                         "pipeline stages); it is not a Megatron-LM model checkpoint")
    return chunks


class _Window(io.RawIOBase):
    """Bytes [start, start + length) of a file, seekable: a torch.save blob inside a .distcp file."""

    def __init__(self, f, start: int, length: int):
        self.f, self.start, self.length, self.pos = f, start, length, 0

    def seekable(self):
        return True

    def readable(self):
        return True

    def seek(self, pos, whence=0):
        self.pos = {0: pos, 1: self.pos + pos, 2: self.length + pos}[whence]
        return self.pos

    def tell(self):
        return self.pos

    def readinto(self, b):
        n = max(0, min(len(b), self.length - self.pos))
        self.f.seek(self.start + self.pos)
        got = self.f.readinto(memoryview(b)[:n])
        self.pos += got
        return got


def load_tensor_blob(path: str, start: int, length: int) -> StoredTensor:
    """Where the bytes of the one tensor torch.save'd at [start, start + length) of a file lie."""
    try:
        with open(path, "rb") as f:
            window = _Window(f, start, length)
            data, prefix, offsets = _read_archive(window, path, start)
            try:
                value = _FastUnpickler(data, prefix, offsets).load()
                if isinstance(value, _TensorRef):
                    return _stored(value)
            except FAST_PATH_MISSES:
                pass
            window.seek(0)
            blob = io.BytesIO(window.read(length))
    except (zipfile.BadZipFile, EOFError, OSError, struct.error) as e:
        raise _io_error(path, e) from None
    try:
        t = torch.load(blob, map_location="meta", weights_only=True)
    except pickle.UnpicklingError as e:
        raise MergeError(f"refusing to load a tensor at byte {start} of {path}: it is not a plain tensor ({e}). "
                         "distmerge never runs code from a checkpoint") from None
    except (RuntimeError, EOFError) as e:
        raise _io_error(path, e) from None
    if not isinstance(t, torch.Tensor):
        raise MergeError(f"{path}: the item at byte {start} is not a tensor")
    storage = t.untyped_storage()
    base = start + storage._checkpoint_offset
    return StoredTensor(offset=base + t.storage_offset() * t.element_size(), storage_end=base + storage.nbytes(),
                        shape=tuple(t.shape), strides=tuple(t.stride()), dtype=t.dtype)


# ---------------------------------------------------------------- the fast path

def _record_offsets(f, archive: zipfile.ZipFile, start: int = 0) -> dict[str, tuple[int, int]]:
    """Archive member name -> (data offset in the file, size). torch stores members uncompressed.
    `f` is the archive's file (or window of a file starting at byte `start`)."""
    out = {}
    for info in archive.infolist():
        if info.compress_type != zipfile.ZIP_STORED:
            raise _Unsupported(info.filename)
        f.seek(info.header_offset)
        header = f.read(30)
        if len(header) < 30:
            raise zipfile.BadZipFile(f"truncated record {info.filename}")
        name_len, extra_len = struct.unpack("<HH", header[26:30])
        out[info.filename] = (start + info.header_offset + 30 + name_len + extra_len, info.file_size)
    return out


class _Record:
    """Stand-in for an allowed torch class: keeps constructor arguments and pickled state."""

    def __init__(self, kind: str, args=(), state=None):
        self.kind, self.args, self.state = kind, args, state or {}

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) == 2:  # (dict, slots)
            state = {**(state[0] or {}), **(state[1] or {})}
        self.state = state if isinstance(state, dict) else {"value": state}


def record_class(kind: str) -> type:
    """A _Record subclass for one allowed class: NEWOBJ (cls.__new__(cls, *args)) and REDUCE
    (cls(*args)) both give a _Record of that kind holding the arguments."""
    def new(cls, *args):
        obj = object.__new__(cls)
        obj.kind, obj.args, obj.state = kind, args, {}
        return obj

    return type(f"_{kind}", (_Record,), {"__new__": new, "__init__": lambda self, *args: None, "kind": kind})


class RecordClasses(dict):
    """One record class per allowed class name, made on first use (an unpickler's cache)."""

    def __missing__(self, name: str) -> type:
        self[name] = record_class(name)
        return self[name]


def plain_global(module: str, name: str):
    """The value-like globals every metadata unpickler here accepts (dtypes, sizes, layouts,
    ordered dicts), as harmless values or constructors; None for anything else."""
    if module == "collections" and name == "OrderedDict":
        return collections.OrderedDict
    if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
        return getattr(torch, name)
    if module == "torch" and name == "Size":
        return tuple
    if module == "torch.serialization" and name == "_get_layout":
        return str
    return None


_DIST_CLASSES = {"DTensor", "DTensorSpec", "TensorMeta", "ShardOrderEntry", "DeviceMesh", "_MeshLayout",
                 "_FlatLayout", "Shard", "_StridedShard", "Replicate", "Partial", "_Partial"}
_STORAGE_DTYPES = {"DoubleStorage": torch.float64, "FloatStorage": torch.float32, "HalfStorage": torch.float16,
                   "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
                   "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
                   "BoolStorage": torch.bool}


class _StorageRef:
    __slots__ = ("dtype", "offset", "nbytes")  # one per tensor: slots keep 100-shard metadata fast

    def __init__(self, dtype: torch.dtype, offset: int, nbytes: int):
        self.dtype, self.offset, self.nbytes = dtype, offset, nbytes


class _TensorRef:
    __slots__ = ("storage", "storage_offset", "shape", "strides")

    def __init__(self, storage: _StorageRef, storage_offset: int, shape: tuple, strides: tuple):
        self.storage, self.storage_offset, self.shape, self.strides = storage, storage_offset, shape, strides


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    return _TensorRef(storage, storage_offset, tuple(size), tuple(stride))


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
    return data


def _rebuild_wrapper_subclass(cls, dtype, size, stride, storage_offset, layout, device, requires_grad):
    return _Record("wrapper", (cls, dtype, tuple(size)))


def _rebuild_from_type_v2(func, new_type, args, state):
    obj = func(*args)
    if isinstance(obj, _Record):
        obj.kind = getattr(new_type, "kind", "wrapper")
        obj.__setstate__(state)
    elif state:
        raise _Unsupported("state on a plain tensor")
    return obj


class _FastUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, prefix: str, offsets: dict, inert_unknown: bool = False):
        super().__init__(io.BytesIO(data))
        self.prefix, self.offsets, self.inert_unknown = prefix, offsets, inert_unknown
        self.classes = RecordClasses()

    def find_class(self, module, name):
        plain = plain_global(module, name)
        if plain is not None:
            return plain
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor_v2
        if module == "torch._utils" and name in ("_rebuild_parameter", "_rebuild_parameter_with_state"):
            return _rebuild_parameter
        if module == "torch._utils" and name == "_rebuild_wrapper_subclass":
            return _rebuild_wrapper_subclass
        if module == "torch._tensor" and name == "_rebuild_from_type_v2":
            return _rebuild_from_type_v2
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        if module == "torch" and name == "device":
            return str
        if (module.startswith("torch.distributed") and name in _DIST_CLASSES) or self.inert_unknown:
            # a stand-in that records its arguments: the real class (or function) is never called
            return self.classes[name]
        raise _Unsupported(f"{module}.{name}")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise _Unsupported(f"persistent id {pid!r}")
        _, dtype, key, _location, numel = pid
        if not isinstance(dtype, torch.dtype):
            raise _Unsupported("untyped storage")
        offset, size = self.offsets[f"{self.prefix}data/{key}"]
        nbytes = numel * dtype.itemsize
        if size < nbytes:
            raise MergeIOError(f"a storage record holds {size} of its {nbytes} bytes; the file is corrupt")
        return _StorageRef(dtype, offset, nbytes)


def _stored(ref: _TensorRef) -> StoredTensor:
    itemsize = ref.storage.dtype.itemsize
    return StoredTensor(offset=ref.storage.offset + ref.storage_offset * itemsize,
                        storage_end=ref.storage.offset + ref.storage.nbytes,
                        shape=ref.shape, strides=ref.strides, dtype=ref.storage.dtype)


def _placement(p: _Record) -> Placement:
    s, a = p.state, p.args
    if p.kind == "Replicate":
        return ("replicate",)
    if p.kind == "Shard":
        return ("shard", int(s.get("dim", a[0] if a else 0)))
    if p.kind == "_StridedShard":
        dim = s.get("dim", a[0] if a else None)
        split = s.get("split_factor", a[1] if len(a) > 1 else None)
        if dim is None or split is None:
            raise _Unsupported("_StridedShard fields")
        return ("strided", int(dim), int(split))
    raise _Unsupported(f"placement {p.kind}")  # Partial: not a stored layout we can merge


def _size(shape) -> int:
    """A (possibly nested) layout shape flattened to its number of ranks."""
    if isinstance(shape, (tuple, list)):
        n = 1
        for x in shape:
            n *= _size(x)
        return n
    return int(shape)


def _mesh_shape(mesh: _Record) -> tuple[int, ...]:
    """Mesh dim sizes from the pickled layout (torch 2.13: _MeshLayout(axes=(_FlatLayout(shape, stride), ...)));
    releases before _MeshLayout pickle the mesh's rank tensor itself (`mesh`, shaped like the mesh)."""
    layout = mesh.state.get("_layout")
    if layout is None and isinstance(mesh.state.get("mesh"), _TensorRef):
        return tuple(mesh.state["mesh"].shape)
    if not isinstance(layout, _Record) or not isinstance(layout.state.get("axes"), tuple):
        raise _Unsupported("mesh layout")
    shapes = []
    for axis in layout.state["axes"]:
        if not isinstance(axis, _Record) or "shape" not in axis.state:
            raise _Unsupported("mesh layout axis")
        shapes.append(_size(axis.state["shape"]))
    return tuple(shapes)


def _convert_fast(state, path: str) -> dict:
    if not isinstance(state, dict):
        raise MergeError(f"{path} does not hold a state dict (found {type(state).__name__})")
    out = {}
    meshes = {}  # the pickled mesh is one object shared by a file's DTensors: convert it once
    for name, value in state.items():
        if isinstance(value, _TensorRef):
            out[name] = _stored(value)
        elif isinstance(value, _Record) and value.kind == "DTensor":
            local, spec = value.state["_local_tensor"], value.state["_spec"]
            mesh = spec.state["mesh"]
            if id(mesh) not in meshes:
                coordinate = mesh.state.get("_coordinate_on_dim")
                names = mesh.state.get("_mesh_dim_names")
                meshes[id(mesh)] = (_mesh_shape(mesh), None if coordinate is None else tuple(coordinate),
                                    tuple(names) if names else None)
            mesh_shape, coordinate, names = meshes[id(mesh)]
            if not isinstance(local, _TensorRef) or coordinate is None:
                raise _Unsupported("DTensor without local tensor or coordinate")
            stored = StoredDTensor(local=_stored(local), shape=tuple(value.args[2]),
                                   placements=tuple(_placement(p) for p in spec.state["placements"]),
                                   mesh_shape=mesh_shape, coordinate=coordinate, mesh_dim_names=names)
            # another torch release may pickle meshes differently: anything inconsistent goes to torch.load
            dims = len(stored.mesh_shape)
            if not (dims == len(stored.placements) == len(stored.coordinate) >= 1
                    and all(0 <= c < n for c, n in zip(stored.coordinate, stored.mesh_shape))
                    and len(stored.local.shape) == len(stored.shape)):
                raise _Unsupported("inconsistent DTensor metadata")
            out[name] = stored
        elif isinstance(value, _Record):
            raise _Unsupported(value.kind)
    return out


# ---------------------------------------------------------------- the fallback: torch's own safe loader

def _load_with_torch(path: str, megatron_chunks: bool = False):
    """torch's own safe loader: a state dict's records, or with `megatron_chunks` a list of them, one per
    model chunk of a Megatron-LM legacy file."""
    import torch.distributed.tensor  # noqa: F401  registers DTensor and its placements as safe globals
    from torch.distributed.tensor.placement_types import _StridedShard

    # torch warns on every DeviceMesh unpickled without process groups; we never use those groups
    logging.getLogger("torch.distributed.device_mesh").setLevel(logging.ERROR)
    # Some torch releases (2.11) write _StridedShard in FSDP+TP checkpoints without allow-listing it.
    # Registered globally: the safe_globals context manager would unregister what the import registered.
    torch.serialization.add_safe_globals([_StridedShard])
    try:
        state = torch.load(path, map_location="meta", weights_only=True)
    except pickle.UnpicklingError as e:
        text = str(e)
        if "ShardedTensor" in text:
            raise MergeError(f"{path} holds FSDP1 ShardedTensors (FSDP1 saved without a device mesh); "
                             "these cannot be read without the original process group. Re-save with "
                             "FSDP(..., device_mesh=mesh) so that the state dict holds DTensors") from None
        culprit = next((line.strip() for line in text.splitlines() if "GLOBAL" in line or "Unsupported" in line),
                       text.strip().splitlines()[0] if text.strip() else "unknown")
        raise MergeError(f"refusing to load {path}: it needs pickle code that is not a plain tensor "
                         f"or DTensor ({culprit}). distmerge never runs code from a checkpoint") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise _io_error(path, e) from None
    if megatron_chunks:
        return [_convert_torch(chunk, path) for chunk in _model_chunks(state, path)]
    return _convert_torch(state, path)


def _convert_torch(state, path: str) -> dict:
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    if not isinstance(state, dict):
        raise MergeError(f"{path} does not hold a state dict (found {type(state).__name__})")

    def stored(t: torch.Tensor) -> StoredTensor:
        storage = t.untyped_storage()
        base = getattr(storage, "_checkpoint_offset", None)
        if base is None:
            raise MergeError(f"{path}: cannot locate a tensor's bytes; the file was not written by torch.save")
        return StoredTensor(offset=base + t.storage_offset() * t.element_size(), storage_end=base + storage.nbytes(),
                            shape=tuple(t.shape), strides=tuple(t.stride()), dtype=t.dtype)

    def placement(p) -> Placement:
        if isinstance(p, _StridedShard):
            return ("strided", p.dim, p.split_factor)
        if isinstance(p, Shard):
            return ("shard", p.dim)
        if isinstance(p, Replicate):
            return ("replicate",)
        raise MergeError(f"{path}: unsupported placement {p}; only Shard, _StridedShard and Replicate are merged")

    out = {}
    for name, value in state.items():
        if isinstance(value, DTensor):
            mesh = value.device_mesh
            out[name] = StoredDTensor(local=stored(value._local_tensor), shape=tuple(value.shape),
                                      placements=tuple(placement(p) for p in value.placements),
                                      mesh_shape=tuple(mesh.shape), coordinate=tuple(mesh.get_coordinate()),
                                      mesh_dim_names=mesh.mesh_dim_names)
        elif isinstance(value, torch.Tensor):
            out[name] = stored(value)
    return out

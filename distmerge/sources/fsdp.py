"""verl FSDP checkpoints: model_world_size_{W}_rank_{r}.pt + fsdp_config.json + huggingface/.

Each rank file is a torch.save of the sharded model's state_dict(): DTensors (FSDP2, FSDP1 with a
device mesh, HSDP, FSDP+TP) or plain tensors (a one-rank save). Files are loaded on the `meta`
device with weights_only=True: no pickle code runs and no tensor data is read; torch records each
storage's byte offset in the zip archive, which is all the run stage needs to pread the bytes.
"""
from __future__ import annotations

import json
import logging
import os
import pickle
import re
import zipfile

import torch
import torch.distributed.tensor  # noqa: F401  registers DTensor & placements as safe globals
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.placement_types import _StridedShard

from ..errors import MergeError, MergeIOError
from ..model import Catalogue, Piece, SourceTensor, dtype_str

RANK_FILE = re.compile(r"^model_world_size_(\d+)_rank_(\d+)\.pt$")
FORMAT = "verl-fsdp"
# torch warns on every DeviceMesh unpickled without process groups; we never use those groups
logging.getLogger("torch.distributed.device_mesh").setLevel(logging.ERROR)


def detect(source: str) -> bool:
    return any(RANK_FILE.match(n) for n in os.listdir(source))


def _rank_files(source: str) -> tuple[int, list[str]]:
    """The world size and the rank files in rank order, after checking the set is complete."""
    found: dict[int, dict[int, str]] = {}
    for name in sorted(os.listdir(source)):
        m = RANK_FILE.match(name)
        if m:
            found.setdefault(int(m.group(1)), {})[int(m.group(2))] = os.path.join(source, name)
    if len(found) > 1:
        sizes = ", ".join(str(w) for w in sorted(found))
        raise MergeError(f"{source} holds rank files of {len(found)} world sizes ({sizes}); "
                         "keep the files of one save only (move the others away) and rerun")
    (world, by_rank), = found.items()
    config_path = os.path.join(source, "fsdp_config.json")
    if os.path.exists(config_path):
        try:
            with open(config_path) as f:
                declared = int(json.load(f)["world_size"])
        except (ValueError, KeyError, TypeError) as e:
            raise MergeError(f"{config_path} is not valid ({e}); fix or remove it "
                             "(the world size is then taken from the file names)") from None
        if declared != world:
            raise MergeError(f"{config_path} says world_size={declared} but the rank files are "
                             f"model_world_size_{world}_rank_*.pt; the checkpoint is incomplete or mixed")
    missing = [r for r in range(world) if r not in by_rank]
    if missing:
        first = os.path.join(source, f"model_world_size_{world}_rank_{missing[0]}.pt")
        raise MergeError(f"missing rank file {first} ({len(missing)} of {world} rank files missing); "
                         "copy the complete checkpoint and rerun")
    extra = [r for r in by_rank if r >= world]
    if extra:
        raise MergeError(f"{by_rank[extra[0]]} has rank {extra[0]} >= world size {world}")
    return world, [by_rank[r] for r in range(world)]


def load_meta(path: str) -> dict:
    """Load a rank file's state dict as meta tensors (no data read, no code executed)."""
    try:
        with zipfile.ZipFile(path) as z:  # catches truncation before torch does, with a clearer message
            z.namelist()
        return torch.load(path, map_location="meta", weights_only=True)
    except pickle.UnpicklingError as e:
        text = str(e)
        if "ShardedTensor" in text:
            raise MergeError(f"{path} holds FSDP1 ShardedTensors (FSDP1 saved without a device mesh); "
                             "these cannot be read without the original process group. Re-save with "
                             "FSDP(..., device_mesh=mesh) so that the state dict holds DTensors") from None
        first = text.strip().splitlines()[0] if text.strip() else text
        raise MergeError(f"refusing to load {path}: it needs pickle code that is not a plain tensor "
                         f"or DTensor ({first}). distmerge never runs code from a checkpoint") from None
    except (zipfile.BadZipFile, RuntimeError, EOFError, OSError) as e:
        raise MergeIOError(f"cannot read {path}: {e}. The file is truncated or corrupt; "
                           "copy it again from the training job's storage") from None


def shard_region(shape, mesh_shape, coord, placements) -> tuple[list[int], list[int]]:
    """The block of a global tensor that the rank at `coord` of the mesh holds.

    Shards nest: each Shard(d) splits the current block on dim d with torch.chunk semantics
    (the last ranks may get fewer rows, or none). A _StridedShard is a shard that was applied
    after the later mesh dims' shards (FSDP over TP), so it is applied last.
    """
    offsets, sizes = [0] * len(shape), list(shape)
    order = [i for i, p in enumerate(placements) if not isinstance(p, _StridedShard)]
    order += [i for i, p in enumerate(placements) if isinstance(p, _StridedShard)]
    for i in order:
        p = placements[i]
        if isinstance(p, Replicate):
            continue
        if not isinstance(p, (Shard, _StridedShard)):
            raise MergeError(f"unsupported placement {p}; only Shard, _StridedShard and Replicate are merged")
        d, n, c = p.dim, mesh_shape[i], coord[i]
        chunk = -(-sizes[d] // n) if sizes[d] else 0  # torch.chunk: ceil-sized chunks
        start = min(c * chunk, sizes[d])
        offsets[d] += start
        sizes[d] = min(chunk, sizes[d] - start)
    return offsets, sizes


def _pieces_of(name: str, value, path: str) -> tuple[tuple[int, ...], torch.dtype, Piece] | None:
    if isinstance(value, DTensor):
        local = value._local_tensor
        mesh = value.device_mesh
        offsets, sizes = shard_region(tuple(value.shape), tuple(mesh.shape), mesh.get_coordinate(), value.placements)
        if tuple(sizes) != tuple(local.shape):
            raise MergeError(f"{path}: tensor {name} has placements {value.placements} on mesh "
                             f"{tuple(mesh.shape)} that give a local block of {tuple(sizes)}, but the "
                             f"file holds {tuple(local.shape)}; this sharding is not supported")
        global_shape = tuple(value.shape)
    elif isinstance(value, torch.Tensor):
        local, offsets, global_shape = value, [0] * value.dim(), tuple(value.shape)
    else:
        return None
    storage = local.untyped_storage()
    base = getattr(storage, "_checkpoint_offset", None)
    if base is None:
        raise MergeError(f"{path}: cannot locate the bytes of {name}; the file was not written by torch.save")
    itemsize = local.element_size()
    piece = Piece(file=path, offset=base + local.storage_offset() * itemsize, shape=tuple(local.shape),
                  strides=tuple(local.stride()), region=tuple(offsets), dtype=local.dtype)
    if piece.numel and piece.offset + piece.span_elements * itemsize > base + storage.nbytes():
        raise MergeError(f"{path}: tensor {name} lies outside its stored record; the file is corrupt")
    return global_shape, local.dtype, piece


def read_catalogue(source: str) -> Catalogue:
    world, paths = _rank_files(source)
    tensors: dict[str, SourceTensor] = {}
    seen_regions: dict[str, set] = {}
    mesh_desc, mesh_ndim = "", 0
    for path in paths:
        state = load_meta(path)
        if not isinstance(state, dict):
            raise MergeError(f"{path} does not hold a state dict (found {type(state).__name__})")
        for raw_name, value in state.items():
            got = _pieces_of(raw_name, value, path)
            if got is None:
                continue
            shape, dtype, piece = got
            if isinstance(value, DTensor) and value.device_mesh.ndim > mesh_ndim:  # describe the fullest mesh
                mesh = value.device_mesh
                mesh_ndim = mesh.ndim
                names = mesh.mesh_dim_names or tuple(f"dim{i}" for i in range(mesh.ndim))
                mesh_desc = " x ".join(f"{n}={s}" for n, s in zip(names, mesh.shape))
            name = strip_wrapper_prefixes(raw_name)
            known = tensors.get(name)
            if known is None:
                known = tensors[name] = SourceTensor(name, shape, dtype, [])
                seen_regions[name] = set()
            elif known.shape != shape or known.dtype != dtype:
                raise MergeError(f"shards of tensor {name} disagree: {known.pieces[0].file if known.pieces else paths[0]} "
                                 f"says {list(known.shape)} {dtype_str(known.dtype)}, {path} says {list(shape)} "
                                 f"{dtype_str(dtype)}; the rank files come from different saves")
            key = (piece.region, piece.shape)
            if piece.numel and key not in seen_regions[name]:  # replicas (HSDP, TP) are read once
                seen_regions[name].add(key)
                known.pieces.append(piece)
        del state
    for t in tensors.values():
        check_coverage(t)
    hf_dir = os.path.join(source, "huggingface")
    mesh_desc = mesh_desc or ("single rank" if world == 1 else f"{world} ranks")
    return Catalogue(format=FORMAT, source=source, files=paths, tensors=tensors,
                     hf_dir=hf_dir if os.path.isdir(hf_dir) else None, world_size=world, mesh=mesh_desc)


def strip_wrapper_prefixes(name: str) -> str:
    """FSDP1 / activation checkpointing wrappers may leave their module names in keys."""
    for prefix in ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod."):
        name = name.replace(prefix, "")
    return name


def check_coverage(t: SourceTensor) -> None:
    """The pieces must tile the global tensor exactly: inside its bounds, together all of it."""
    total = 0
    for p in t.pieces:
        if any(o + s > n for o, s, n in zip(p.region, p.shape, t.shape)):
            raise MergeError(f"{p.file}: a piece of {t.name} at {list(p.region)} of shape {list(p.shape)} "
                             f"lies outside the tensor's shape {list(t.shape)}")
        total += p.numel
    numel = 1
    for n in t.shape:
        numel *= n
    if total != numel:
        files = sorted({p.file for p in t.pieces})
        raise MergeError(f"the pieces of tensor {t.name} cover {total} of its {numel} elements "
                         f"(files: {', '.join(os.path.basename(f) for f in files)}); shards are missing or overlap")

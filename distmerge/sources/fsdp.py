"""verl FSDP checkpoints: model_world_size_{W}_rank_{r}.pt + fsdp_config.json + huggingface/.

Each rank file is a torch.save of the sharded model's state_dict(): DTensors (FSDP2, FSDP1 with a
device mesh, HSDP, FSDP+TP) or plain tensors (a one-rank save). Only metadata is read (see
torch_archive.py: no pickle code runs, no tensor data is read): each tensor's byte offset in the
zip archive, shape, strides, and for a DTensor its global shape, placements and mesh coordinate.
"""
from __future__ import annotations

import json
import logging
import os
import re

from ..errors import MergeError
from ..model import Catalogue, Piece, SourceTensor, dtype_size, dtype_str
from ..paths import check_file
from .chunks import PieceTable, gc_paused
from .registry import ReadOptions, SourceFormat
from .torch_archive import StoredDTensor, load_state_metadata

RANK_FILE = re.compile(r"^model_world_size_(\d+)_rank_(\d+)\.pt$")
NAME = "verl-fsdp"
log = logging.getLogger("distmerge")


def detect(source: str, opts: ReadOptions = ReadOptions()) -> bool:
    return any(RANK_FILE.match(n) for n in os.listdir(source))


def _rank_files(source: str) -> tuple[int, list[str], str | None]:
    """The world size, the rank files in rank order (after checking the set is complete), and a note
    when the world size comes from the file names alone (older verl releases wrote no fsdp_config.json)."""
    found: dict[int, dict[int, str]] = {}
    for name in sorted(os.listdir(source)):
        m = RANK_FILE.match(name)
        if m:
            path = os.path.join(source, name)
            check_file(path, source)  # before it is opened: inside the source, a regular file
            found.setdefault(int(m.group(1)), {})[int(m.group(2))] = path
    if len(found) > 1:
        sizes = ", ".join(str(w) for w in sorted(found))
        raise MergeError(f"{source} holds rank files of {len(found)} world sizes ({sizes}); "
                         "keep the files of one save only (move the others away) and rerun")
    (world, by_rank), = found.items()
    config_path = os.path.join(source, "fsdp_config.json")
    note = None
    if not os.path.lexists(config_path):
        note = (f"no fsdp_config.json: the world size {world} is taken from the file names "
                f"(model_world_size_{world}_rank_*.pt)")
        log.warning("%s: %s", source, note)
    else:
        check_file(config_path, source)
        try:
            with open(config_path) as f:
                declared = int(json.load(f)["world_size"])
        except (ValueError, KeyError, TypeError, RecursionError) as e:
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
    return world, [by_rank[r] for r in range(world)], note


def shard_region(shape, mesh_shape, coord, placements) -> tuple[list[int], list[int]]:
    """The block of a global tensor that the rank at `coord` of the mesh holds.

    Shards nest: each Shard(d) splits the current block on dim d with torch.chunk semantics
    (the last ranks may get fewer rows, or none). A _StridedShard is a shard that was applied
    after the later mesh dims' shards (FSDP over TP), so it is applied last.
    """
    offsets, sizes = [0] * len(shape), list(shape)
    order = [i for i, p in enumerate(placements) if p[0] != "strided"]
    order += [i for i, p in enumerate(placements) if p[0] == "strided"]
    for i in order:
        p = placements[i]
        if p[0] == "replicate":
            continue
        d, n, c = p[1], mesh_shape[i], coord[i]
        chunk = -(-sizes[d] // n) if sizes[d] else 0  # torch.chunk: ceil-sized chunks
        start = min(c * chunk, sizes[d])
        offsets[d] += start
        sizes[d] = min(chunk, sizes[d] - start)
    return offsets, sizes


def _piece_of(name: str, value, path: str) -> tuple[tuple[int, ...], Piece]:
    """The global shape of a stored tensor and the piece of it this file holds."""
    if isinstance(value, StoredDTensor):
        local = value.local
        offsets, sizes = shard_region(value.shape, value.mesh_shape, value.coordinate, value.placements)
        if tuple(sizes) != local.shape:
            raise MergeError(f"{path}: tensor {name} has placements {value.placements} on mesh "
                             f"{value.mesh_shape} that give a local block of {tuple(sizes)}, but the "
                             f"file holds {local.shape}; this sharding is not supported")
        global_shape = value.shape
    else:
        local, offsets, global_shape = value, [0] * len(value.shape), value.shape
    piece = Piece(file=path, offset=local.offset, shape=local.shape, strides=local.strides,
                  region=tuple(offsets), dtype=local.dtype)
    if piece.numel and piece.offset + piece.span_elements * dtype_size(piece.dtype) > local.storage_end:
        raise MergeError(f"{path}: tensor {name} lies outside its stored record; the file is corrupt")
    return global_shape, piece


def read_catalogue(source: str, opts: ReadOptions = ReadOptions()) -> Catalogue:
    """opts.quick (inspect): every rank file lists every tensor with its global shape and
    dtype, so rank 0's metadata alone describes the model and the plan; the pieces of the other
    ranks are not located (a merge always reads them all, and validation checks the tiling).
    Each tensor's pieces go into one PieceTable over the rank files: W files of a record per
    tensor make W x tensors pieces, kept as ints rather than an object each."""
    world, paths, note = _rank_files(source)
    tensors: dict[str, SourceTensor] = {}
    mesh = _Mesh()
    with gc_paused():
        for index, path in enumerate(paths[:1] if opts.quick else paths):
            for raw_name, value in load_state_metadata(path).items():
                mesh.see(value)
                _add_record(tensors, strip_wrapper_prefixes(raw_name), value, paths, index)
        for t in tensors.values():
            t.pieces.drop_repeats()  # replicas (HSDP, TP, a tensor on a sub-mesh) are read once
    hf_dir = os.path.join(source, "huggingface")
    mesh_desc = mesh.desc or ("single rank" if world == 1 else f"{world} ranks")
    return Catalogue(format=NAME, source=source, files=paths, tensors=tensors,
                     hf_dir=hf_dir if os.path.isdir(hf_dir) else None, world_size=world, mesh=mesh_desc,
                     partial=opts.quick and world > 1, notes=[note] if note else [])


class _Mesh:
    """The fullest device mesh the records show, described for the user ("fsdp=2 x tp=2")."""

    def __init__(self):
        self.desc, self.ndim = "", 0

    def see(self, value) -> None:
        if isinstance(value, StoredDTensor) and len(value.mesh_shape) > self.ndim:
            self.ndim = len(value.mesh_shape)
            names = value.mesh_dim_names or tuple(f"dim{i}" for i in range(self.ndim))
            self.desc = " x ".join(f"{n}={s}" for n, s in zip(names, value.mesh_shape))


def _add_record(tensors: dict[str, SourceTensor], name: str, value, paths: list[str], index: int) -> None:
    """One rank file's record of a tensor, added to its table (empty blocks are left out)."""
    path = paths[index]
    shape, piece = _piece_of(name, value, path)
    known = tensors.get(name)
    if known is None:
        known = tensors[name] = SourceTensor(name, shape, piece.dtype, PieceTable(paths, piece.dtype, len(shape)))
    elif known.shape != shape or known.dtype != piece.dtype:
        raise MergeError(f"shards of tensor {name} disagree: {known.pieces[0].file if known.pieces else paths[0]} "
                         f"says {list(known.shape)} {dtype_str(known.dtype)}, {path} says {list(shape)} "
                         f"{dtype_str(piece.dtype)}; the rank files come from different saves")
    if piece.numel:
        known.pieces.add(index, piece.offset, piece.region, piece.shape, piece.strides)


def strip_wrapper_prefixes(name: str) -> str:
    """FSDP1 / activation checkpointing wrappers may leave their module names in keys."""
    for prefix in ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod."):
        name = name.replace(prefix, "")
    return name


FORMAT = SourceFormat(name=NAME, family="hf", detect=detect, read_catalogue=read_catalogue,
                      describe="model_world_size_W_rank_R.pt files (verl FSDP)", verl_backend="fsdp")

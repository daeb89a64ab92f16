"""Megatron-LM's legacy checkpoints: iter_XXXXXXX/mp_rank_TT[_PPP][_EEE]/model_optim_rng.pt.

Each file holds one (TP, PP, EP) rank's `model` state dict (`model0`, `model1`, ... with virtual
pipeline stages) with local layer and expert numbers. The catalogue presents them exactly like a
torch_dist checkpoint (one key per module with a leading global layer axis, and an expert axis
for experts), so the same mapping table (arch/megatron_gpt.py) applies.
- Layers: chunk v of PP rank p holds the layers after those of every chunk (v', p') with v' < v,
  or v' = v and p' < p (Megatron's interleaved schedule).
- Experts: `local_experts.{j}.` (and the grouped-GEMM spelling `linear_fc1.weight{j}`) of EP rank r
  is global expert r * (experts per rank) + j. Everything else is replicated over EP: rank 0's is read.
- TP shards join per tensor, as the mapping rule of the tensor says (arch/megatron_gpt.tp_split):
  column-parallel (QKV, MLA's projections, embedding and output layer) along rows; a fused gate/up
  fc1 holds [gate_r; up_r] on TP rank r, which belong at rows r*F/tp and F + r*F/tp of the global
  [gate; up]; row-parallel (linear_proj, linear_fc2) along columns. Everything else (norms, the
  router) is replicated: TP rank 0's copy is read. Experts are split over TP like the dense MLP
  (expert TP = TP, megatron-core's default). MLA's down projections are column-parallel in
  megatron-core's local spec and whole on every rank in Transformer Engine's, whose saves are told
  by their fused layer norms (`*.layer_norm_weight`).
- LoRA factors (`<linear>.adapter.linear_in/out.weight`) split as their rule says (tp_split), and
  verl's adapter files (adapter_checkpoint/mp_rank_*_adapter.pt, read_adapter_files) join the same way.
"""
from __future__ import annotations

import os
import re
from collections import defaultdict

from ..arch.megatron_gpt import COLUMN, COLUMN_LOCAL, GATE_UP, REPLICATED, ROW, tp_split
from ..errors import MergeError
from ..model import Catalogue, Piece, SourceTensor, dtype_size
from ..paths import check_dir, check_file
from .layout import find_hf_dir, latest_iteration
from .registry import ReadOptions, SourceFormat
from .torch_archive import (FAST_PATH_MISSES, StoredTensor, _convert_fast, _fast_load, _fast_path_missed,
                            _load_with_torch, _Record)

NAME = "megatron-legacy"
RANK_DIR = re.compile(r"^mp_rank_(\d{2})(?:_(\d{3}))?(?:_(\d{3}))?$")
LAYER_KEY = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
ADAPTER_DIR = "adapter_checkpoint"  # verl's Megatron LoRA adapters, beside dist_ckpt/
ADAPTER_FILE = re.compile(r"^mp_rank_(\d{2})(?:_(\d{3}))?(?:_(\d{3}))?_adapter\.pt$")
# an expert's tensor inside a layer: SequentialMLP's local_experts.{j}.X or TEGroupedMLP's X{j}
EXPERT_KEY = re.compile(r"^mlp\.experts\.(?:local_experts\.(\d+)\.(.+)|(linear_fc[12]\.(?:weight|bias))(\d+))$")
ARG_VALUES = (int, str, type(None))  # the saved args kept: plain values only


def resolve(source: str, iteration: int | None = None) -> str | None:
    """The iter_XXXXXXX directory with mp_rank_* subdirectories that `source` names, if any."""
    def has_ranks(d):
        return os.path.isdir(d) and any(RANK_DIR.match(n) for n in os.listdir(d))
    if has_ranks(source):
        return source
    iteration = iteration if iteration is not None else latest_iteration(source)
    if iteration is None:
        return None
    path = check_dir(os.path.join(source, f"iter_{iteration:07d}"), source)  # a link out: refused, not listed
    return path if has_ranks(path) else None


def detect(source: str, opts: ReadOptions = ReadOptions()) -> bool:
    return resolve(source, opts.iteration) is not None


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
            return chunks, {k: v for k, v in args.state.items() if isinstance(v, ARG_VALUES)}
        except FAST_PATH_MISSES as e:
            _fast_path_missed(path, e)
    return _load_with_torch(path, _model_chunks), {}


def _model_chunks(top, path: str) -> list[dict]:
    """The model's state dicts: `model`, or `model0`, `model1`, ... (virtual pipeline stages)."""
    if isinstance(top, dict) and isinstance(top.get("model"), dict):
        return [top["model"]]
    chunks = []
    while isinstance(top, dict) and isinstance(top.get(f"model{len(chunks)}"), dict):
        chunks.append(top[f"model{len(chunks)}"])
    if not chunks:
        raise MergeError(f"{path} has no state dict under 'model' (or 'model0', 'model1', ... for virtual "
                         "pipeline stages); it is not a Megatron-LM model checkpoint")
    return chunks


def _rank_files(iter_dir: str, source: str) -> dict[tuple[int, ...], str]:
    """(tp, suffix...) -> model_optim_rng.pt for every mp_rank_* directory."""
    files = {}
    for name in sorted(os.listdir(iter_dir)):
        m = RANK_DIR.match(name)
        if m:
            path = os.path.join(iter_dir, name, "model_optim_rng.pt")
            if not os.path.isfile(path):
                raise MergeError(f"missing {path}; copy the complete checkpoint and rerun")
            check_file(path, source)  # before it is opened: inside the source, a regular file
            files[tuple(int(g) for g in m.groups() if g is not None)] = path
    if len({len(k) for k in files}) > 1:
        raise MergeError(f"{iter_dir} mixes mp_rank_* directory names of different forms; "
                         "it holds files of more than one save")
    return files


def _rank_grid(iter_dir: str, files: dict, states: dict) -> dict[tuple[int, int, int], str]:
    """(tp, pp, ep) -> file. mp_rank_TT_XXX names a PP rank or, with PP=1, an EP rank: the saved
    args say which, or else the content (PP stages hold different keys, EP ranks the same ones)."""
    is_ep = False
    if any(len(key) == 2 for key in files):  # one save: the names all have the same form
        args = states[next(iter(files.values()))][1]
        if args.get("pipeline_model_parallel_size") is not None:
            is_ep = args["pipeline_model_parallel_size"] == 1
        else:
            is_ep = len({frozenset(k for chunk in states[p][0] for k in chunk) for p in files.values()}) == 1
    grid = {}
    for key, path in files.items():
        if len(key) == 1:
            grid[(key[0], 0, 0)] = path
        elif len(key) == 3:
            grid[key] = path
        else:
            grid[(key[0], 0, key[1]) if is_ep else (key[0], key[1], 0)] = path
    tp, pp, ep = (max(k[d] for k in grid) + 1 for d in range(3))
    missing = [(t, p, e) for t in range(tp) for p in range(pp) for e in range(ep) if (t, p, e) not in grid]
    if missing:
        t, p, e = missing[0]
        name = f"mp_rank_{t:02d}" + (f"_{p:03d}" if pp > 1 else "") + (f"_{e:03d}" if ep > 1 else "")
        raise MergeError(f"{iter_dir} lacks {name} ({len(missing)} of {tp * pp * ep} TP x PP x EP ranks missing); "
                         "copy the complete checkpoint")
    return grid


def read_catalogue(source: str, opts: ReadOptions = ReadOptions()) -> Catalogue:
    iter_dir = resolve(source, opts.iteration)
    if iter_dir is None:
        raise MergeError(f"{source} holds no iter_XXXXXXX/mp_rank_* directories")
    files = _rank_files(iter_dir, source)
    states = {path: load_megatron_legacy(path) for path in files.values()}
    grid = _rank_grid(iter_dir, files, states)
    tp, pp, ep = (max(k[d] for k in grid) + 1 for d in range(3))
    args = states[grid[(0, 0, 0)]][1]
    if args.get("expert_tensor_parallel_size") not in (None, tp):
        raise MergeError(f"{grid[(0, 0, 0)]} was saved with expert_tensor_parallel_size="
                         f"{args['expert_tensor_parallel_size']} != tensor_model_parallel_size={tp}, "
                         "which distmerge does not read yet; save with --use-dist-ckpt (torch_dist) instead")
    vpp = len(states[grid[(0, 0, 0)]][0])
    if any(len(states[path][0]) != vpp for path in grid.values()):
        raise MergeError(f"the files of {iter_dir} hold different numbers of model chunks; "
                         "they come from different saves")
    offsets, layer_total = _layer_offsets(states, grid, pp, vpp)
    te = any(key.endswith(".layer_norm_weight") for chunk in states[grid[(0, 0, 0)]][0] for key in chunk)
    blocks = _per_layer_where_uneven(_blocks(states, grid, offsets), layer_total)
    tensors = {name: _stack(name, parts, tp, _split(name, te)) for name, parts in blocks.items()}
    mesh = f"tp={tp} x pp={pp}" + (f" x vpp={vpp}" if vpp > 1 else "") + (f" x ep={ep}" if ep > 1 else "")
    return Catalogue(format=NAME, source=source, files=sorted(grid.values()), tensors=tensors,
                     hf_dir=find_hf_dir(source) or find_hf_dir(iter_dir), world_size=tp * pp * ep, mesh=mesh)


def _layer_offsets(states: dict, grid: dict, pp: int, vpp: int) -> tuple[dict[tuple[int, int], int], int]:
    """The global number of the first layer of chunk v on PP rank p, for every (p, v), and the
    layer count. Megatron's interleaved order is v-major, then p."""
    offsets, layer_total = {}, 0
    for v in range(vpp):
        for p in range(pp):
            offsets[(p, v)] = layer_total
            layer_total += len({int(m.group(1)) for m in map(LAYER_KEY.match, states[grid[(0, p, 0)]][0][v]) if m})
    return offsets, layer_total


def _blocks(states: dict, grid: dict, offsets: dict) -> dict[str, list]:
    """Global name -> [(lead index, TP rank, stored tensor, file)] for every tensor of every rank
    file: layers renumbered globally, experts too (EP rank e's local expert j is e * local + j)."""
    blocks: dict[str, list] = defaultdict(list)
    for (t, p, e), path in grid.items():
        for v, chunk in enumerate(states[path][0]):
            local_experts = {int(x.group(1) or x.group(4)) for x in
                             (EXPERT_KEY.match(m.group(2)) for m in map(LAYER_KEY.match, chunk) if m) if x}
            for key, stored in chunk.items():
                m = LAYER_KEY.match(key)
                x = EXPERT_KEY.match(m.group(2)) if m else None
                if x:  # an expert's tensor: global expert e * local + j
                    j, rest = (int(x.group(1)), x.group(2)) if x.group(1) else (int(x.group(4)), x.group(3))
                    layer = offsets[(p, v)] + int(m.group(1))
                    blocks["decoder.layers.mlp.experts.experts." + rest].append(
                        ((layer, e * len(local_experts) + j), t, stored, path))
                elif e != 0:
                    continue  # replicated over EP
                elif m:
                    layer = offsets[(p, v)] + int(m.group(1))
                    blocks["decoder.layers." + m.group(2)].append(((layer,), t, stored, path))
                else:
                    blocks[key].append(((), t, stored, path))
    return blocks


def _per_layer_where_uneven(blocks: dict[str, list], layers: int) -> dict[str, list]:
    """A key that only some layers have (dense and MoE layers mixed) is kept per layer, as
    torch_dist saves it: decoder.layers.{i}.K (experts still stacked), not one stacked K."""
    result: dict[str, list] = {}
    for name, parts in blocks.items():
        held = {lead[0] for lead, *_ in parts} if parts[0][0] else None
        if held is None or held == set(range(layers)):
            result[name] = parts
            continue
        key = name.removeprefix("decoder.layers.")
        for lead, *rest in parts:
            result.setdefault(f"decoder.layers.{lead[0]}.{key}", []).append((lead[1:], *rest))
    return result


def _split(name: str, te: bool) -> str:
    """How TP splits the tensor `name` in this save (`te`: a Transformer Engine spec's save)."""
    split = tp_split(name)
    if split == COLUMN_LOCAL:
        return REPLICATED if te else COLUMN
    return split


def _stack(name: str, parts: list, tp: int, split: str) -> SourceTensor:
    """One global tensor (with leading layer and expert axes where the name has them) from the blocks."""
    first = parts[0][2]
    local = first.shape
    if split in (COLUMN, GATE_UP):
        global_shape = (local[0] * tp,) + local[1:]
    elif split == ROW:
        global_shape = (local[0], local[1] * tp) + local[2:]
    else:
        global_shape = local
    lead_shape = tuple(max(lead[k] for lead, *_ in parts) + 1 for k in range(len(parts[0][0])))
    pieces = []
    for lead, t, stored, path in parts:
        if stored.shape != local or stored.dtype != first.dtype:
            raise MergeError(f"{path}: {name} has {list(stored.shape)} {stored.dtype}, another rank's has "
                             f"{list(local)} {first.dtype}; the rank files come from different saves")
        zeros = (0,) * (len(local) - 1)
        if split == GATE_UP:  # [gate_t; up_t] -> rows t*F/tp and F + t*F/tp
            half = local[0] // 2
            for k, start in enumerate((t * half, tp * half + t * half)):
                pieces.append(_piece(path, stored, lead, (start,) + zeros, k * half, half))
        elif split == COLUMN:
            pieces.append(_piece(path, stored, lead, (t * local[0],) + zeros, 0, local[0]))
        elif split == ROW:
            pieces.append(_piece(path, stored, lead, (0, t * local[1]) + zeros[1:], 0, local[0]))
        elif t == 0:  # replicated across TP: rank 0's is read
            pieces.append(_piece(path, stored, lead, (0,) * len(local), 0, local[0] if local else 0))
    return SourceTensor(name, lead_shape + global_shape, first.dtype, pieces)


def read_adapter_files(folder: str, source: str, layers: int | None) -> tuple[dict[str, SourceTensor], list[str]]:
    """verl's Megatron LoRA adapters, ADAPTER_DIR/mp_rank_TT[_PPP][_EEE]_adapter.pt: each TP x PP (x EP)
    rank's {"adapter_state_dict": {name: local shard}}, names with `.adapter.` and local layer numbers,
    joined like legacy rank files into torch_dist's stacked names; and the files read. `layers` is the
    base model's layer count: with PP, a rank's first layer is counted from the ranks before it, so
    adapters on only some layers (or, with virtual stages, on the first chunk only, which is all verl
    saves) cannot be placed and are refused."""
    files = {}
    for name in sorted(os.listdir(folder)):
        m = ADAPTER_FILE.match(name)
        if m:
            path = os.path.join(folder, name)
            check_file(path, source)  # before it is opened: inside the source, a regular file
            files[tuple(int(g) for g in m.groups() if g is not None)] = path
    if not files:
        return {}, []
    if len({len(k) for k in files}) > 1:
        raise MergeError(f"{folder} mixes mp_rank_*_adapter.pt names of different forms; it holds files of "
                         "more than one save")
    chunks = {path: _adapter_state(path) for path in files.values()}
    args = {"pipeline_model_parallel_size": _adapter_stages(folder, files, chunks, layers)} \
        if any(len(key) == 2 for key in files) else {}
    states = {path: ([chunk], args) for path, chunk in chunks.items()}
    grid = _rank_grid(folder, files, states)
    tp, pp, _ = (max(k[d] for k in grid) + 1 for d in range(3))
    offsets, layer_total = _layer_offsets(states, grid, pp, 1)
    if pp > 1 and layers is not None and layer_total != layers:
        raise MergeError(f"the adapters of {folder} cover {layer_total} of the model's {layers} layers over {pp} "
                         "pipeline stages, so their layer numbers cannot be placed; merge the dist checkpoint's "
                         "adapters instead (a save with the model in dist_ckpt/)")
    blocks = _per_layer_where_uneven(_blocks(states, grid, offsets), layer_total)
    return {name: _stack(name, parts, tp, tp_split(name)) for name, parts in blocks.items()}, sorted(grid.values())


def _adapter_stages(folder: str, files: dict, chunks: dict, layers: int | None) -> int:
    """The PP size of adapter files named mp_rank_TT_XXX, where XXX is a PP rank or (PP=1) an EP rank.
    The files hold no args, and every stage numbers its layers from 0, so the base model's layer
    count decides: N stages of the same layer count make up the model, or one rank holds it all."""
    held = len({int(m.group(1)) for m in map(LAYER_KEY.match, chunks[files[min(files)]]) if m})
    second = len({key[1] for key in files})
    if layers is not None and held * second == layers and held != layers:
        return second
    if layers is not None and held == layers:
        return 1
    model = f"a {layers}-layer model" if layers is not None else "a checkpoint without base weights"
    raise MergeError(f"the adapter files of {folder} (mp_rank_TT_XXX, {held} layers each) fit neither {second} "
                     f"pipeline stages nor expert ranks of {model}; the files are incomplete or not this "
                     "checkpoint's, or the base model is missing")


def _adapter_state(path: str) -> dict:
    """The {name: StoredTensor} of one verl adapter file (restricted unpickler; torch's safe loader
    where the fast path cannot read it)."""
    top = _fast_load(path, inert_unknown=True)
    if top is not None:
        try:
            return _convert_fast(_adapter_dict(top, path), path)
        except FAST_PATH_MISSES as e:
            _fast_path_missed(path, e)
    return _load_with_torch(path, lambda state, where: [_adapter_dict(state, where)])[0]


def _adapter_dict(top, path: str) -> dict:
    state = top.get("adapter_state_dict") if isinstance(top, dict) else None
    if not isinstance(state, dict) or not all(isinstance(k, str) and ".adapter." in k for k in state):
        raise MergeError(f"{path} is not a verl adapter file: it needs {{'adapter_state_dict': {{name: tensor}}}} "
                         "with `.adapter.` in every name")
    return state


def _piece(path: str, stored: StoredTensor, lead: tuple, region: tuple, first_row: int, rows: int) -> Piece:
    """Rows [first_row, first_row + rows) of a stored local tensor as a piece of the global one."""
    itemsize = dtype_size(stored.dtype)
    shape = (1,) * len(lead) + ((rows,) + stored.shape[1:] if stored.shape else ())
    strides = (0,) * len(lead) + stored.strides
    offset = stored.offset + (first_row * stored.strides[0] * itemsize if stored.shape else 0)
    return Piece(file=path, offset=offset, shape=shape, strides=strides, region=lead + region, dtype=stored.dtype)


FORMAT = SourceFormat(name=NAME, family="megatron", detect=detect, read_catalogue=read_catalogue,
                      describe="iter_*/mp_rank_* (Megatron-LM legacy)", takes_iteration=True, verl_backend="megatron")

"""Megatron-LM's legacy checkpoints: iter_XXXXXXX/mp_rank_TT[_PPP]/model_optim_rng.pt.

Each file holds one (TP, PP) rank's `model` state dict (`model0`, `model1`, ... with virtual
pipeline stages) with local layer numbers. The catalogue presents them exactly like a torch_dist
checkpoint (one key per module with a leading global layer axis), so the same mapping table
(arch/megatron_gpt.py) applies. How the TP shards join:
- column-parallel (QKV, fc1, embedding and output layer) along rows. fc1 is special: each TP rank
  holds [gate_r; up_r], which belong at rows r*F/tp and F + r*F/tp of the global [gate; up];
- row-parallel (linear_proj, linear_fc2) along columns;
- everything else (norms) is replicated: TP rank 0's copy is read.
"""
from __future__ import annotations

import os
import re
from collections import defaultdict

from ..errors import MergeError
from ..model import Catalogue, Piece, SourceTensor, dtype_size
from .coverage import check_coverage
from .dcp import find_hf_dir
from .megatron import latest_iteration
from .torch_archive import StoredTensor, load_state_metadata

FORMAT = "megatron-legacy"
RANK_DIR = re.compile(r"^mp_rank_(\d{2})(?:_(\d{3}))?$")
LAYER_KEY = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
COLUMN = ("linear_qkv.weight", "linear_qkv.bias", "linear_fc1.weight", "word_embeddings.weight", "output_layer.weight")
ROW = ("linear_proj.weight", "linear_fc2.weight")


def resolve(source: str, iteration: int | None = None) -> str | None:
    """The iter_XXXXXXX directory with mp_rank_* subdirectories that `source` names, if any."""
    def has_ranks(d):
        return os.path.isdir(d) and any(RANK_DIR.match(n) for n in os.listdir(d))
    if has_ranks(source):
        return source
    iteration = iteration if iteration is not None else latest_iteration(source)
    if iteration is not None and has_ranks(os.path.join(source, f"iter_{iteration:07d}")):
        return os.path.join(source, f"iter_{iteration:07d}")
    return None


def detect(source: str) -> bool:
    return resolve(source) is not None


def _rank_files(iter_dir: str) -> dict[tuple[int, int], str]:
    files = {}
    for name in sorted(os.listdir(iter_dir)):
        m = RANK_DIR.match(name)
        if m:
            path = os.path.join(iter_dir, name, "model_optim_rng.pt")
            if not os.path.isfile(path):
                raise MergeError(f"missing {path}; copy the complete checkpoint and rerun")
            files[(int(m.group(1)), int(m.group(2) or 0))] = path
    tp, pp = max(t for t, _ in files) + 1, max(p for _, p in files) + 1
    missing = [(t, p) for t in range(tp) for p in range(pp) if (t, p) not in files]
    if missing:
        t, p = missing[0]
        raise MergeError(f"{iter_dir} lacks mp_rank_{t:02d}{f'_{p:03d}' if pp > 1 else ''} "
                         f"({len(missing)} of {tp * pp} TP x PP ranks missing); copy the complete checkpoint")
    return files, tp, pp


def read_catalogue(source: str, iteration: int | None = None) -> Catalogue:
    iter_dir = resolve(source, iteration)
    if iter_dir is None:
        raise MergeError(f"{source} holds no iter_XXXXXXX/mp_rank_* directories")
    files, tp, pp = _rank_files(iter_dir)
    # every rank's tensors, by (pp, tp); layers are numbered per pipeline stage
    states = {(t, p): load_state_metadata(path, "model") for (t, p), path in files.items()}
    offsets, layer_total = [], 0
    for p in range(pp):
        offsets.append(layer_total)
        layer_total += len({int(m.group(1)) for m in map(LAYER_KEY.match, states[(0, p)]) if m})
    blocks: dict[str, list] = defaultdict(list)   # global name -> [(layer or None, tp, stored, path)]
    for (t, p), state in states.items():
        for key, stored in state.items():
            m = LAYER_KEY.match(key)
            if m:
                blocks["decoder.layers." + m.group(2)].append((offsets[p] + int(m.group(1)), t, stored, files[(t, p)]))
            else:
                blocks[key].append((None, t, stored, files[(t, p)]))
    tensors = {}
    for name, parts in blocks.items():
        tensors[name] = _stack(name, parts, tp, layer_total)
        check_coverage(tensors[name])
    return Catalogue(format=FORMAT, source=source, files=sorted(files.values()), tensors=tensors,
                     hf_dir=find_hf_dir(source) or find_hf_dir(iter_dir),
                     world_size=tp * pp, mesh=f"tp={tp} x pp={pp}")


def _stack(name: str, parts: list, tp: int, layers: int) -> SourceTensor:
    """One global tensor (with a leading layer axis for per-layer keys) from the TP x PP blocks."""
    first = parts[0][2]
    column = name.endswith(COLUMN)
    row = name.endswith(ROW)
    local = first.shape
    if column:
        global_shape = (local[0] * tp,) + local[1:]
    elif row:
        global_shape = (local[0], local[1] * tp) + local[2:]
    else:
        global_shape = local
    stacked = parts[0][0] is not None
    shape = ((layers,) if stacked else ()) + global_shape
    pieces = []
    for layer, t, stored, path in parts:
        if stored.shape != local or stored.dtype != first.dtype:
            raise MergeError(f"{path}: {name} has {list(stored.shape)} {stored.dtype}, another rank's has "
                             f"{list(local)} {first.dtype}; the rank files come from different saves")
        if not column and not row and t != 0:
            continue  # replicated across TP: read rank 0's
        lead = (layer,) if stacked else ()
        if name.endswith("linear_fc1.weight"):  # [gate_t; up_t] -> rows t*F/tp and F + t*F/tp
            half = local[0] // 2
            for k, start in enumerate((t * half, tp * half + t * half)):
                pieces.append(_piece(path, stored, lead, (start,) + (0,) * (len(local) - 1), k * half, half))
        elif column:
            pieces.append(_piece(path, stored, lead, (t * local[0],) + (0,) * (len(local) - 1), 0, local[0]))
        elif row:
            pieces.append(_piece(path, stored, lead, (0, t * local[1]) + (0,) * (len(local) - 2), 0, local[0]))
        else:
            pieces.append(_piece(path, stored, lead, (0,) * len(local), 0, local[0] if local else 0))
    return SourceTensor(name, shape, first.dtype, pieces)


def _piece(path: str, stored: StoredTensor, lead: tuple, region: tuple, first_row: int, rows: int) -> Piece:
    """Rows [first_row, first_row + rows) of a stored local tensor as a piece of the global one."""
    itemsize = dtype_size(stored.dtype)
    shape = ((1,) if lead else ()) + ((rows,) + stored.shape[1:] if stored.shape else ())
    strides = ((0,) if lead else ()) + stored.strides
    offset = stored.offset + (first_row * stored.strides[0] * itemsize if stored.shape else 0)
    return Piece(file=path, offset=offset, shape=shape, strides=strides, region=lead + region, dtype=stored.dtype)


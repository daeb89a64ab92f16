"""Stage 2, validate: nothing is planned from a record that has not been checked.

Readers describe; this module distrusts. Every catalogue, whatever format it came from, passes
`validate_catalogue` before it is mapped, and every mapping passes `check_outputs` before it is
planned. A checkpoint may be hostile: a record may point outside the source, claim bytes its file
does not have, alias its own elements, or leave holes in a tensor. Each of those is refused here,
with the file and the record named (exit 2), before a byte of tensor data is read.
"""
from __future__ import annotations

import math
import os

import numpy as np

from .arch.config import text_config
from .errors import MergeError
from .dtypes import ALL as KNOWN_DTYPES
from .model import Catalogue, OutputTensor, Piece, SourceTensor, dtype_str
from .paths import SourceFile, check_file
from .sources.chunks import PieceTable, gc_paused

MAX_ELEMENTS = 1 << 50  # no real tensor comes near this; a larger claim is a corrupt or hostile record


def piece_problem(p: Piece, file: SourceFile) -> str | None:
    """What is wrong with one piece's geometry, or None. The strides must not let two elements share
    bytes (sorted by stride, each dim starts past the span of the smaller ones), so the bytes a piece
    claims are at least its element count: a size claim cannot outgrow the file behind it."""
    if p.dtype not in KNOWN_DTYPES:
        return f"dtype {p.dtype} is not one distmerge writes"
    if p.offset < 0:
        return f"byte offset {p.offset} is negative"
    if len(p.shape) != len(p.strides) or len(p.shape) != len(p.region):
        return f"shape {list(p.shape)}, strides {list(p.strides)} and region {list(p.region)} disagree in rank"
    if any(n < 0 for n in p.shape) or any(o < 0 for o in p.region):
        return f"shape {list(p.shape)} or region {list(p.region)} is negative"
    if p.numel == 0:
        return None
    span = 1
    for n, s in sorted(((n, s) for n, s in zip(p.shape, p.strides) if n > 1), key=lambda d: d[1]):
        if s < span:
            return f"strides {list(p.strides)} for shape {list(p.shape)} make elements overlap"
        span += (n - 1) * s
    end = p.offset + p.span_elements * p.dtype.itemsize
    if end > file.size:
        return f"needs bytes up to {end} but the file has {file.size} (truncated, or a corrupt record)"
    return None


def check_tensor(t: SourceTensor) -> None:
    """The pieces must tile the global tensor exactly: inside its bounds, no overlap, no hole."""
    if any(n < 0 for n in t.shape) or math.prod(t.shape) > MAX_ELEMENTS:
        raise MergeError(f"tensor {t.name} claims shape {list(t.shape)}; the checkpoint's metadata is corrupt")
    total = 0
    for p in t.pieces:
        if len(p.region) != len(t.shape) or p.dtype != t.dtype:
            raise MergeError(f"{p.file}: a piece of {t.name} is {len(p.region)}-d {dtype_str(p.dtype)}, the tensor is "
                             f"{len(t.shape)}-d {dtype_str(t.dtype)}; the checkpoint's metadata is corrupt")
        if any(o + s > n for o, s, n in zip(p.region, p.shape, t.shape)):
            raise MergeError(f"{p.file}: a piece of {t.name} at {list(p.region)} of shape {list(p.shape)} "
                             f"lies outside the tensor's shape {list(t.shape)}")
        total += p.numel
    numel = math.prod(t.shape)
    if total != numel or _overlap(t.pieces):
        files = sorted({p.file for p in t.pieces})
        shown = ", ".join(os.path.join(os.path.basename(os.path.dirname(f)), os.path.basename(f)) for f in files[:4])
        raise MergeError(f"the pieces of tensor {t.name} cover {total} of its {numel} elements with overlaps or holes "
                         f"(files: {shown}{', ...' if len(files) > 4 else ''}); shards are missing or overlap")


def _overlap(pieces: list[Piece]) -> bool:
    """Whether two non-empty pieces share an element: a sweep along dim 0, so row-sharded tensors
    (every piece its own rows) cost one sort."""
    boxes = sorted((p.region, p.shape) for p in pieces if p.numel)
    active: list[tuple] = []
    for region, shape in boxes:
        active = [b for b in active if b[0][0] + b[1][0] > region[0]]
        for other_region, other_shape in active:
            if all(o < r + s and r < o + n for r, s, o, n in zip(region, shape, other_region, other_shape)):
                return True
        active.append((region, shape))
    return False


def validate_catalogue(catalogue: Catalogue) -> None:
    """Refuse, naming the file and record, anything a plan must not be built from. PieceTables (the
    formats with millions of chunks) are screened in bulk first; a tensor the screen cannot clear
    goes through the piece-by-piece checks below, which name what is wrong."""
    checked: dict[str, SourceFile] = {}
    for path in catalogue.files:
        checked[path] = check_file(path, catalogue.source)
    with gc_paused():
        cleared = _bulk_screen(catalogue, checked)
        for t in catalogue.tensors.values():
            if t.name in cleared:
                continue
            for p in t.pieces:
                file = checked.get(p.file) or checked.setdefault(p.file, check_file(p.file, catalogue.source))
                problem = piece_problem(p, file)
                if problem:
                    raise MergeError(f"{p.file}: the record of tensor {t.name} at {list(p.region)}: {problem}; "
                                     "the checkpoint is corrupt or was not written by a trainer, copy it again")
            if not catalogue.partial:
                check_tensor(t)


def _bulk_screen(catalogue: Catalogue, checked: dict[str, SourceFile]) -> set[str]:
    """The names of the tensors whose PieceTables pass every check of piece_problem and check_tensor,
    computed over all their rows at once (grouped by rank and files list)."""
    groups: dict[tuple, list[SourceTensor]] = {}
    for t in catalogue.tensors.values():
        table = t.pieces
        if isinstance(table, PieceTable) and table.dtype == t.dtype and table.ndim == len(t.shape) >= 1 and \
                t.dtype in KNOWN_DTYPES and all(n >= 0 for n in t.shape) and math.prod(t.shape) <= MAX_ELEMENTS:
            groups.setdefault((table.ndim, id(table.files)), []).append(t)
    cleared: set[str] = set()
    for group in groups.values():
        files = group[0].pieces.files
        sizes = np.array([_file_size(f, checked, catalogue) for f in files] or [0], dtype=np.int64)
        bad = _screen_rows(group, sizes, catalogue.partial)
        cleared.update(t.name for k, t in enumerate(group) if not bad[k])
    return cleared


def _file_size(path: str, checked: dict[str, SourceFile], catalogue: Catalogue) -> int:
    file = checked.get(path) or checked.setdefault(path, check_file(path, catalogue.source))
    return file.size


def _screen_rows(group: list[SourceTensor], sizes: np.ndarray, partial: bool) -> np.ndarray:
    """Per tensor of `group` (same rank, same files list): True where some check may fail. Values
    are screened against MAX_ELEMENTS first, so no product below overflows int64."""
    d = group[0].pieces.ndim
    counts = np.array([len(t.pieces) for t in group], dtype=np.int64)
    rows = np.concatenate([t.pieces.rows() for t in group]) if counts.sum() else np.zeros((0, 2 + 3 * d), np.int64)
    tid = np.repeat(np.arange(len(group)), counts)
    bounds = np.array([t.shape for t in group], dtype=np.int64).reshape(len(group), d)[tid]
    itemsize = np.array([t.dtype.itemsize for t in group], dtype=np.int64)[tid]
    file, offset = rows[:, 0], rows[:, 1]
    region, shape, strides = rows[:, 2:2 + d], rows[:, 2 + d:2 + 2 * d], rows[:, 2 + 2 * d:]
    bad = (offset < 0) | (offset > MAX_ELEMENTS) | (file < 0) | (file >= len(sizes)) | (region < 0).any(axis=1) | \
        (shape < 0).any(axis=1) | (strides < 0).any(axis=1) | (strides > MAX_ELEMENTS).any(axis=1) | \
        (region + shape > bounds).any(axis=1)
    shape = np.where(bad[:, None], 0, shape)  # rows already refused take no part in the arithmetic below
    numel = shape.prod(axis=1)
    full = numel > 0
    spanf = 1 + ((shape - 1).astype(np.float64) * strides * full[:, None]).sum(axis=1)
    bad |= spanf > 2.0 ** 52  # spans this large go through the exact per-piece arithmetic
    full &= ~bad
    bad |= full & ~_strides_ok(shape, strides)
    span = 1 + ((shape - 1) * strides * full[:, None]).sum(axis=1)
    bad |= full & (offset + span * itemsize > sizes[np.clip(file, 0, len(sizes) - 1)])
    per_tensor = np.bincount(tid[bad], minlength=len(group)) > 0
    if partial:
        return per_tensor
    totals = np.bincount(tid, weights=numel, minlength=len(group))  # exact: each below 2**50
    per_tensor |= totals != np.array([math.prod(t.shape) for t in group], dtype=np.float64)
    return per_tensor | _rows_overlap(tid[full], region[full], shape[full], bounds[full], len(group))


def _strides_ok(shape: np.ndarray, strides: np.ndarray) -> np.ndarray:
    """piece_problem's stride rule, per row: sorted by stride, each dim of more than one element
    starts past the span of the smaller ones (no two elements share bytes)."""
    key = np.where(shape > 1, strides, np.iinfo(np.int64).max)
    order = np.argsort(key, axis=1, kind="stable")
    n, s = np.take_along_axis(shape, order, axis=1), np.take_along_axis(strides, order, axis=1)
    reach = np.where(n > 1, (n - 1) * s, 0)
    before = 1 + np.cumsum(reach, axis=1) - reach  # 1 + the span of the smaller dims
    return ((n <= 1) | (s >= before)).all(axis=1)


def _rows_overlap(tid: np.ndarray, region: np.ndarray, shape: np.ndarray, bounds: np.ndarray, n: int) -> np.ndarray:
    """Per tensor: True unless its non-empty pieces are blocks of whole rows (every later dim
    complete) that do not overlap: sorted by first row, each starts at or after the previous one's
    end. Other layouts are left to the exact sweep (check_tensor)."""
    flagged = np.zeros(n, dtype=bool)
    partial_rows = (region[:, 1:] != 0).any(axis=1) | (shape[:, 1:] != bounds[:, 1:]).any(axis=1)
    flagged[tid[partial_rows]] = True
    order = np.lexsort((region[:, 0], tid))
    t, first = tid[order], region[order, 0]
    stop = first + shape[order, 0]
    clash = (t[1:] == t[:-1]) & (first[1:] < stop[:-1])
    flagged[t[1:][clash]] = True
    return flagged


FINAL_NORM = "norm.weight"  # model.norm.weight, model.language_model.norm.weight


def _expected_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """The shapes a llama-like decoder's config implies for the name suffixes every such model has
    (a suffix matches whole name parts; FINAL_NORM only outside the layers, whose own `norm`s may
    have other sizes)."""
    c = text_config(config)
    ints = {k: c.get(k) for k in ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                                  "intermediate_size", "vocab_size")}
    if not all(isinstance(v, int) and v > 0 for k, v in ints.items() if k in ("hidden_size", "vocab_size")):
        return {}
    hidden, vocab = ints["hidden_size"], ints["vocab_size"]
    shapes = {"embed_tokens.weight": (vocab, hidden), "lm_head.weight": (vocab, hidden),
              "input_layernorm.weight": (hidden,), "post_attention_layernorm.weight": (hidden,),
              FINAL_NORM: (hidden,)}
    heads, kv = ints["num_attention_heads"], ints["num_key_value_heads"] or ints["num_attention_heads"]
    head_dim = ints["head_dim"] or (hidden // heads if isinstance(heads, int) and heads else None)
    if isinstance(heads, int) and isinstance(kv, int) and isinstance(head_dim, int) and "kv_lora_rank" not in c:
        shapes.update({"self_attn.q_proj.weight": (heads * head_dim, hidden),
                       "self_attn.k_proj.weight": (kv * head_dim, hidden),
                       "self_attn.v_proj.weight": (kv * head_dim, hidden),
                       "self_attn.o_proj.weight": (hidden, heads * head_dim)})
    inter = ints["intermediate_size"]
    if isinstance(inter, int):
        shapes.update({"mlp.gate_proj.weight": (inter, hidden), "mlp.up_proj.weight": (inter, hidden),
                       "mlp.down_proj.weight": (hidden, inter)})
    return shapes


def check_outputs(catalogue: Catalogue, outputs: list[OutputTensor], config: dict) -> None:
    """The outputs must be the config's model: the layer count and, for the parts every llama-like
    decoder shares, the shapes the config implies. A checkpoint merged with another model's config
    would load into nothing, or worse, into a model of other dimensions."""
    c = text_config(config)
    layers = c.get("num_hidden_layers")
    found = {int(m) for m in (_layer_index(o.name) for o in outputs) if m is not None}
    if isinstance(layers, int) and found and (len(found), min(found), max(found)) != (layers, 0, layers - 1):
        raise MergeError(f"config.json says num_hidden_layers={layers} but {catalogue.source} holds layers "
                         f"{min(found)}..{max(found)} ({len(found)} of them); the config is not this checkpoint's: "
                         "pass --hf-config with the trained model's config")
    expected = _expected_shapes(config)
    for out in outputs:
        if not _is_text_decoder_tensor(out.name):
            continue
        in_layer = _layer_index(out.name) is not None
        for suffix, shape in expected.items():
            if suffix == FINAL_NORM and in_layer:
                continue
            if out.name.endswith("." + suffix) or out.name == suffix:
                if tuple(out.shape) != shape:
                    raise MergeError(f"tensor {out.name} has shape {list(out.shape)} but config.json implies "
                                     f"{list(shape)}; the config is not this checkpoint's: pass --hf-config with "
                                     "the trained model's config")
                break


def _layer_index(name: str) -> str | None:
    if not _is_text_decoder_tensor(name):
        return None
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part == "layers" and parts[i + 1].isdigit():
            return parts[i + 1]
    return None


def _is_text_decoder_tensor(name: str) -> bool:
    """Vision towers, MTP layers and adapters have their own dimensions: only the text decoder is checked."""
    return not any(tag in name for tag in ("visual", "vision", "mtp", "lora_", "experts.", "shared_expert"))

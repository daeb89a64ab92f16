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
import stat
from dataclasses import dataclass

from .errors import MergeError
from .model import SAFETENSORS_DTYPES, Catalogue, OutputTensor, Piece, SourceTensor, dtype_str
from .arch.config import text_config

MAX_ELEMENTS = 1 << 50  # no real tensor comes near this; a larger claim is a corrupt or hostile record


@dataclass(frozen=True)
class SourceFile:
    """A data file as checked: its size, once (a piece's span is checked against it)."""

    path: str
    size: int


def inside(path: str, root: str) -> bool:
    """Whether `path`, with every symlink resolved, lies inside `root` (also resolved)."""
    real, real_root = os.path.realpath(path), os.path.realpath(root)
    return real == real_root or real.startswith(real_root.rstrip(os.sep) + os.sep)


def check_file(path: str, root: str) -> SourceFile:
    """A data file must resolve inside the source directory and be a regular file."""
    if not inside(path, root):
        raise MergeError(f"{path} resolves to {os.path.realpath(path)}, outside the source {root}; a checkpoint "
                         "may only name its own files. Copy the real files into the checkpoint directory")
    try:
        st = os.stat(path)
    except OSError as e:
        raise MergeError(f"{path} is named by the checkpoint's metadata but cannot be read ({e.strerror}); "
                         "copy the complete checkpoint") from None
    if not stat.S_ISREG(st.st_mode):
        raise MergeError(f"{path} is not a regular file; a checkpoint's data files must be plain files")
    return SourceFile(path, st.st_size)


def piece_problem(p: Piece, file: SourceFile) -> str | None:
    """What is wrong with one piece's geometry, or None. The strides must not let two elements share
    bytes (sorted by stride, each dim starts past the span of the smaller ones), so the bytes a piece
    claims are at least its element count: a size claim cannot outgrow the file behind it."""
    if p.dtype not in SAFETENSORS_DTYPES:
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
    """Refuse, naming the file and record, anything a plan must not be built from."""
    checked: dict[str, SourceFile] = {}
    for path in catalogue.files:
        checked[path] = check_file(path, catalogue.source)
    for t in catalogue.tensors.values():
        for p in t.pieces:
            file = checked.get(p.file) or checked.setdefault(p.file, check_file(p.file, catalogue.source))
            problem = piece_problem(p, file)
            if problem:
                raise MergeError(f"{p.file}: the record of tensor {t.name} at {list(p.region)}: {problem}; "
                                 "the checkpoint is corrupt or was not written by a trainer, copy it again")
        if not catalogue.partial:
            check_tensor(t)


def _expected_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """The shapes a llama-like decoder's config implies for the name suffixes every such model has."""
    c = text_config(config)
    ints = {k: c.get(k) for k in ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                                  "intermediate_size", "vocab_size")}
    if not all(isinstance(v, int) and v > 0 for k, v in ints.items() if k in ("hidden_size", "vocab_size")):
        return {}
    hidden, vocab = ints["hidden_size"], ints["vocab_size"]
    shapes = {"embed_tokens.weight": (vocab, hidden), "lm_head.weight": (vocab, hidden),
              "input_layernorm.weight": (hidden,), "post_attention_layernorm.weight": (hidden,)}
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
    if isinstance(layers, int) and found and found != set(range(layers)):
        raise MergeError(f"config.json says num_hidden_layers={layers} but {catalogue.source} holds layers "
                         f"{min(found)}..{max(found)} ({len(found)} of them); the config is not this checkpoint's: "
                         "pass --hf-config with the trained model's config")
    expected = _expected_shapes(config)
    for out in outputs:
        if not _is_text_decoder_tensor(out.name):
            continue
        for suffix, shape in expected.items():
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

"""The base model a LoRA-only checkpoint is folded into (`--base HF_DIR`): HF safetensors, one file or
sharded with model.safetensors.index.json, described from the file headers alone.

verl's `checkpoint.save_lora_only` keeps only the keys with "lora_" in them, and Megatron-Bridge's PEFT
saves only the `.adapter.` weights. The base weights are then the user's HF model. Each safetensors
header (8-byte little-endian length, then JSON: dtype, shape, data_offsets per tensor) says where
every tensor's bytes lie; no tensor data is read here, and each tensor becomes one contiguous piece
that the run stage streams like any other.
"""
from __future__ import annotations

import dataclasses
import math
import os

from ..errors import MergeError
from ..model import Catalogue, Piece, SourceTensor
from ..paths import check_file
from ..st_header import DTYPES, entry_problem, read_header, read_json_object
from .torch_archive import open_regular

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
MAX_INDEX_BYTES = 64 << 20


def read_base(base_dir: str) -> Catalogue:
    """Every tensor of the HF model in base_dir, as one piece each, in the files' order."""
    if not os.path.isdir(base_dir):
        raise MergeError(f"--base {base_dir} is not a directory; name the HF model directory the LoRA was trained on")
    files, weight_map = _weight_files(base_dir)
    tensors: dict[str, SourceTensor] = {}
    for path in files:
        for name, piece, shape in _header_pieces(path):
            if name in tensors:
                raise MergeError(f"--base {base_dir}: tensor {name} is stored in two files; the model is not "
                                 "one save")
            if weight_map is not None and weight_map.get(name) != os.path.basename(path):
                raise MergeError(f"--base {base_dir}: {INDEX} says {name} is in {weight_map.get(name)}, but "
                                 f"{os.path.basename(path)} holds it; the index is not this model's")
            tensors[name] = SourceTensor(name, shape, piece.dtype, [piece])
    if weight_map is not None and set(weight_map) - set(tensors):
        missing = sorted(set(weight_map) - set(tensors))
        raise MergeError(f"--base {base_dir}: {INDEX} lists {missing[0]} ({len(missing)} tensors) that no file holds")
    return Catalogue(format="hf-safetensors", source=base_dir, files=files, tensors=tensors, hf_dir=base_dir)


def _weight_files(base_dir: str) -> tuple[list[str], dict | None]:
    """The weight files (from the index when there is one) and the index's weight map."""
    index = os.path.join(base_dir, INDEX)
    if not os.path.lexists(index):
        single = os.path.join(base_dir, SINGLE)
        if not os.path.lexists(single):
            raise MergeError(f"--base {base_dir} holds neither {SINGLE} nor {INDEX}; name an HF model directory "
                             "saved with safetensors (save_pretrained's default)")
        check_file(single, base_dir)
        return [single], None
    check_file(index, base_dir)
    weight_map = _read_json(index, MAX_INDEX_BYTES).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise MergeError(f"{index} has no weight_map of tensor name -> file name; it is not an HF index")
    files = []
    for name in dict.fromkeys(weight_map.values()):
        path = os.path.join(base_dir, name)
        if os.path.dirname(name) or not name.endswith(".safetensors"):
            raise MergeError(f"{index} names {name!r}, not a .safetensors file beside it")
        check_file(path, base_dir)  # before it is opened: inside the base, a regular file
        files.append(path)
    return files, weight_map


def _read_json(path: str, limit: int) -> dict:
    """A JSON object from a regular file of at most `limit` bytes."""
    with open_regular(path) as f:
        try:
            return read_json_object(f, limit)
        except ValueError as e:
            raise MergeError(f"{path}: {e}; it is not an HF index") from None


def _header_pieces(path: str):
    """(name, piece, shape) for each tensor in a safetensors file's header, checked against the file size."""
    try:
        header, data_start = read_header(path)
    except ValueError as e:
        raise MergeError(str(e)) from None
    size = os.path.getsize(path)
    for name, entry in header.items():
        yield (name, *_piece(path, name, entry, data_start, size))


def _piece(path: str, name: str, entry, data_start: int, size: int) -> tuple[Piece, tuple[int, ...]]:
    """One header entry as a contiguous piece; refused unless its bytes are exactly its shape's, in the file."""
    problem = entry_problem(entry)
    if problem is not None:
        raise MergeError(f"{path}: the header entry of {name} {problem}; it is not a safetensors file distmerge can "
                         "read")
    dtype, shape = DTYPES[entry["dtype"]], tuple(entry["shape"])
    begin, end = entry["data_offsets"]
    if end - begin != math.prod(shape) * dtype.itemsize or data_start + end > size:
        raise MergeError(f"{path}: tensor {name} claims bytes {begin}..{end} for shape {list(shape)} "
                         f"{entry['dtype']}; the file is corrupt or truncated")
    strides = tuple(math.prod(shape[i + 1:]) for i in range(len(shape)))
    return Piece(file=path, offset=data_start + begin, shape=shape, strides=strides, region=(0,) * len(shape),
                 dtype=dtype), shape


def with_base(lora_only: Catalogue, base: Catalogue) -> Catalogue:
    """A LoRA-only catalogue completed by the base's tensors, under the names a full PEFT save gives
    them (`base_model.model.<name>`, `<module>.base_layer.weight` for an adapted module), so that the
    LoRA stage folds or writes it like any PEFT checkpoint; an adapter-only Megatron checkpoint
    (Megatron-Bridge's PEFT save) keeps its factors, and the base's tensors join them under
    megatron_gpt.HF_BASE + their HF names. Both were validated, each against its own directory; the
    pieces keep their files."""
    if lora_only.family == "megatron":
        return _megatron_with_base(lora_only, base)
    from ..arch.lora import LORA_NAME, PREFIX

    others = [name for name in lora_only.tensors if not LORA_NAME.match(name)]
    if others or not lora_only.tensors:
        what = f"tensor {others[0]}, which is not a LoRA factor" if others else "no tensors"
        raise MergeError(f"--base completes a LoRA-only checkpoint (verl's checkpoint.save_lora_only), but "
                         f"{lora_only.source} holds {what}; drop --base")
    adapted = {LORA_NAME.match(name)["module"] for name in lora_only.tensors}
    tensors = dict(lora_only.tensors)
    for name, t in base.tensors.items():
        module = name.removesuffix(".weight")
        adapted_weight = module in adapted and name.endswith(".weight")
        peft = f"{PREFIX}{module}.base_layer.weight" if adapted_weight else PREFIX + name
        tensors[peft] = SourceTensor(peft, t.shape, t.dtype, t.pieces)
    return _joined(lora_only, base, tensors)


def _megatron_with_base(adapters_only: Catalogue, base: Catalogue) -> Catalogue:
    """An adapter-only Megatron checkpoint plus the HF base model: every tensor of the checkpoint must
    be a LoRA factor (a checkpoint with base weights of its own takes no --base)."""
    from ..arch.megatron_gpt import HF_BASE

    others = [name for name in adapters_only.tensors if ".adapter." not in name]
    if others or not adapters_only.tensors:
        what = f"tensor {others[0]}, which is not a LoRA adapter" if others else "no tensors"
        raise MergeError(f"--base completes an adapter-only Megatron checkpoint (Megatron-Bridge's PEFT save), but "
                         f"{adapters_only.source} holds {what}; drop --base")
    tensors = dict(adapters_only.tensors)
    for name, t in base.tensors.items():
        tensors[HF_BASE + name] = SourceTensor(HF_BASE + name, t.shape, t.dtype, t.pieces)
    return _joined(adapters_only, base, tensors)


def _joined(lora_only: Catalogue, base: Catalogue, tensors: dict[str, SourceTensor]) -> Catalogue:
    """The LoRA-only catalogue with `tensors`, the base's files and a note that says where they came from."""
    note = f"base weights: {len(base.tensors)} tensors of {base.source} (--base)"
    return dataclasses.replace(lora_only, tensors=tensors, files=lora_only.files + base.files,
                               hf_dir=lora_only.hf_dir or base.hf_dir, notes=lora_only.notes + [note])


def is_lora_only(catalogue: Catalogue) -> bool:
    """Every tensor is a LoRA factor: a save_lora_only checkpoint, which needs --base."""
    from ..arch.lora import LORA_NAME

    return bool(catalogue.tensors) and all(LORA_NAME.match(name) for name in catalogue.tensors)

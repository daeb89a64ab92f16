"""Megatron-core `torch_dist` checkpoints: DCP underneath plus metadata.json and common.pt.

Layouts recognised (the source directory may be any of them):
- the dist checkpoint itself: metadata.json {"sharded_backend": "torch_dist"}, .metadata, *.distcp;
- verl: <step>/actor/dist_ckpt/ + <step>/actor/huggingface/ (pass <step>/actor or its dist_ckpt);
- Megatron-LM: iter_XXXXXXX/ directories + latest_checkpointed_iteration.txt (latest unless --iteration);
- verl's model/dist_ckpt, Megatron-Bridge's iter_N + latest_train_state.pt, NeMo 2's weights/ + context/
  (see megatron_layouts.py and docs/megatron.md).
TP, PP, VPP and EP are already resolved into global tensors with a leading layer (and expert)
axis, so no model, GPU or process group is needed. Optimizer, RNG and _extra_state entries are skipped.
LoRA adapters are read from the dist checkpoint, or else from verl's adapter_checkpoint/ beside it.
"""
from __future__ import annotations

import os
import re

from ..errors import MergeError
from ..model import Catalogue
from ..paths import check_dir
from .dcp import tensors_from_metadata
from .layout import find_hf_dir
from .megatron_layouts import find_layout, strip_prefix
from .megatron_legacy import ADAPTER_DIR, read_adapter_files
from .registry import ReadOptions, SourceFormat

NAME = "megatron-torch_dist"
STACKED = re.compile(r"^decoder\.layers\.(?!\d+\.)")   # decoder.layers.K: every layer stacked
NUMBERED = re.compile(r"^decoder\.layers\.(\d+)\.")    # decoder.layers.{i}.K: one layer


def resolve(source: str, iteration: int | None = None) -> str | None:
    """The dist checkpoint directory that `source` names, or None when it names none."""
    layout = find_layout(source, iteration)
    return layout.ckpt if layout else None


def detect(source: str, opts: ReadOptions = ReadOptions()) -> bool:
    return resolve(source, opts.iteration) is not None


def read_catalogue(source: str, opts: ReadOptions = ReadOptions()) -> Catalogue:
    layout = find_layout(source, opts.iteration)
    if layout is None:
        raise MergeError(f"{source} holds no torch_dist checkpoint (metadata.json with sharded_backend torch_dist)")
    tensors, files, notes, world = tensors_from_metadata(layout.ckpt, strip_prefix(layout.key_prefix), root=source)
    hf_dir = layout.hf_dir or find_hf_dir(source) or find_hf_dir(layout.ckpt)
    notes = [f"layout: {layout.name}"] + notes + _verl_adapters(layout.root, source, tensors, files)
    return Catalogue(format=NAME, source=source, files=files, tensors=tensors, hf_dir=hf_dir, world_size=world,
                     mesh="resolved by dist_checkpointing", notes=notes)


def _verl_adapters(root: str, source: str, tensors: dict, files: list[str]) -> list[str]:
    """verl's LoRA adapter files (adapter_checkpoint/ beside dist_ckpt/): added to `tensors` and
    `files` where the dist checkpoint holds no adapters of its own; the notes say what was read."""
    folder = os.path.join(root, ADAPTER_DIR)
    if not os.path.isdir(folder):
        return []
    if any(".adapter." in name for name in tensors):
        return [f"LoRA adapters read from the dist checkpoint ({ADAPTER_DIR}/ holds the same)"]
    check_dir(folder, source)  # a link out of the source is refused before it is listed
    adapters, read = read_adapter_files(folder, source, layer_count(tensors))
    tensors.update(adapters)
    files += read
    return [f"LoRA adapters read from {ADAPTER_DIR}/ ({len(read)} rank files)"] if read else []


def layer_count(tensors: dict) -> int | None:
    """The decoder's layer count: the leading dim of a stacked per-layer tensor, else the highest
    per-layer key's number + 1; None without layers."""
    counts = [t.shape[0] for name, t in tensors.items() if STACKED.match(name) and t.shape]
    numbered = [int(m.group(1)) + 1 for m in map(NUMBERED.match, tensors) if m]
    return max(counts + numbered, default=None)


FORMAT = SourceFormat(name=NAME, family="megatron", detect=detect, read_catalogue=read_catalogue,
                      describe="metadata.json / dist_ckpt / iter_* (Megatron torch_dist)", takes_iteration=True,
                      verl_backend="megatron")

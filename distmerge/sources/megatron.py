"""Megatron-core `torch_dist` checkpoints: DCP underneath plus metadata.json and common.pt.

Layouts recognised (the source directory may be any of them):
- the dist checkpoint itself: metadata.json {"sharded_backend": "torch_dist"}, .metadata, *.distcp;
- verl: <step>/actor/dist_ckpt/ + <step>/actor/huggingface/ (pass <step>/actor or its dist_ckpt);
- Megatron-LM: iter_XXXXXXX/ directories + latest_checkpointed_iteration.txt (latest unless --iteration);
- verl's model/dist_ckpt, Megatron-Bridge's iter_N + latest_train_state.pt, NeMo 2's weights/ + context/
  (see megatron_layouts.py and docs/megatron.md).
TP, PP, VPP and EP are already resolved into global tensors with a leading layer (and expert)
axis, so no model, GPU or process group is needed. Optimizer, RNG and _extra_state entries are skipped.
"""
from __future__ import annotations

from ..errors import MergeError
from ..model import Catalogue
from .dcp import tensors_from_metadata
from .layout import find_hf_dir
from .megatron_layouts import find_layout, strip_prefix
from .registry import ReadOptions, SourceFormat

NAME = "megatron-torch_dist"


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
    tensors, files, notes, world = tensors_from_metadata(layout.ckpt, strip_prefix(layout.key_prefix))
    hf_dir = layout.hf_dir or find_hf_dir(source) or find_hf_dir(layout.ckpt)
    return Catalogue(format=NAME, source=source, files=files, tensors=tensors, hf_dir=hf_dir, world_size=world,
                     mesh="resolved by dist_checkpointing", notes=[f"layout: {layout.name}"] + notes)


FORMAT = SourceFormat(name=NAME, family="megatron", detect=detect, read_catalogue=read_catalogue,
                      describe="metadata.json / dist_ckpt / iter_* (Megatron torch_dist)", takes_iteration=True,
                      verl_backend="megatron")

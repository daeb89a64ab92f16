"""Megatron-core `torch_dist` checkpoints: DCP underneath plus metadata.json and common.pt.

Layouts recognised (the source directory may be any of them):
- the dist checkpoint itself: metadata.json {"sharded_backend": "torch_dist"}, .metadata, *.distcp;
- verl: <step>/actor/dist_ckpt/ + <step>/actor/huggingface/ (pass <step>/actor or its dist_ckpt);
- Megatron-LM: iter_XXXXXXX/ directories + latest_checkpointed_iteration.txt (latest unless --iteration).
TP, PP, VPP and EP are already resolved into global tensors with a leading layer (and expert)
axis, so no model, GPU or process group is needed. Optimizer, RNG and _extra_state entries are skipped.
"""
from __future__ import annotations

import json
import os

from ..errors import MergeError
from ..model import Catalogue
from .dcp import tensors_from_metadata
from .layout import find_hf_dir, latest_iteration
from .registry import ReadOptions, SourceFormat

NAME = "megatron-torch_dist"


def _is_dist_ckpt(d: str) -> bool:
    path = os.path.join(d, "metadata.json")
    if not os.path.isfile(path):
        return False
    try:
        with open(path) as f:
            return json.load(f).get("sharded_backend") == "torch_dist"
    except (OSError, ValueError, AttributeError):
        return False



def resolve(source: str, iteration: int | None = None) -> str | None:
    """The dist checkpoint directory that `source` names, or None when it names none."""
    if _is_dist_ckpt(source):
        return source
    if _is_dist_ckpt(os.path.join(source, "dist_ckpt")):
        return os.path.join(source, "dist_ckpt")
    iteration = iteration if iteration is not None else latest_iteration(source)
    if iteration is not None:
        path = os.path.join(source, f"iter_{iteration:07d}")
        if not _is_dist_ckpt(path):
            raise MergeError(f"{path} is not a torch_dist checkpoint (no metadata.json with sharded_backend "
                             "torch_dist); pick another --iteration")
        return path
    return None


def detect(source: str, opts: ReadOptions = ReadOptions()) -> bool:
    return resolve(source, opts.iteration) is not None


def read_catalogue(source: str, opts: ReadOptions = ReadOptions()) -> Catalogue:
    ckpt = resolve(source, opts.iteration)
    if ckpt is None:
        raise MergeError(f"{source} holds no torch_dist checkpoint (metadata.json with sharded_backend torch_dist)")
    tensors, files, notes, world = tensors_from_metadata(ckpt)
    return Catalogue(format=NAME, source=source, files=files, tensors=tensors, hf_dir=find_hf_dir(source)
                     or find_hf_dir(ckpt), world_size=world, mesh="resolved by dist_checkpointing", notes=notes)


FORMAT = SourceFormat(name=NAME, family="megatron", detect=detect, read_catalogue=read_catalogue,
                      describe="metadata.json / dist_ckpt / iter_* (Megatron torch_dist)", takes_iteration=True, verl_backend="megatron")

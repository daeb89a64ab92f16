"""torchtitan checkpoints: `<dump>/checkpoint/step-N/`, a PyTorch DCP directory under torchtitan's names.

torchtitan's CheckpointManager saves the model's state dict flat at the top level (`tok_embeddings.weight`,
`layers.N.attention...`, `lm_head.weight`) beside `optimizer.*`, `lr_scheduler.*`, `dataloader` and
`train_state.*`; those are skipped. The format is recognised by those model names in `.metadata`, so a
DCP directory of HF names still goes to the plain DCP reader. torchtitan stores no model args: the HF
config comes from --hf-config (what torchtitan's own converter takes as --hf_assets_path).

The source may be one step directory, the checkpoint folder that holds them, or the dump folder
that holds that: then the highest step-N is read, or the one --iteration N names.
"""
from __future__ import annotations

import functools
import os
import re

from ..errors import MergeError
from ..paths import check_dir
from ..model import Catalogue
from .dcp import METADATA, read_metadata, tensors_from_metadata
from .layout import find_hf_dir
from .registry import ReadOptions, SourceFormat

NAME = "torchtitan"
STEP_DIR = re.compile(r"^step-(\d+)$")
# a torchtitan model key of either name generation; HF names start with "model." and Megatron's with
# "decoder." / "embedding.", so none of theirs match
MODEL_KEY = re.compile(r"^(tok_embeddings\.weight|(mtp_)?layers\.\d+\.(attention|attention_norm|ffn_norm|"
                       r"feed_forward|moe)\.)")
TRAIN_STATE = "train_state."
CHECKPOINT_FOLDER = "checkpoint"  # torchtitan's default --checkpoint.folder inside the dump folder


def step_dirs(source: str) -> dict[int, str]:
    """step number -> directory, for the step-N directories of `source` that hold a DCP save."""
    try:
        entries = os.listdir(source)
    except OSError:
        return {}
    steps = {}
    for entry in entries:
        m = STEP_DIR.match(entry)
        if m and os.path.isfile(os.path.join(source, entry, METADATA)):
            steps[int(m.group(1))] = os.path.join(source, entry)
    return steps


def checkpoint_dir(source: str, iteration: int | None) -> str | None:
    """The DCP directory to read: `source` itself, or the latest (or --iteration N's) step-N of
    `source` or of its checkpoint/ (torchtitan's dump folder); None when it is none of those.
    Never raises for a directory that is not torchtitan's; refuses a step directory that resolves
    outside the source (a link out of it) before anything in it is read."""
    if iteration is None and os.path.isfile(os.path.join(source, METADATA)):
        return source
    steps = step_dirs(source) or step_dirs(os.path.join(source, CHECKPOINT_FOLDER))
    if not steps:
        return None
    if iteration is None:
        return check_dir(steps[max(steps)], source)
    if iteration not in steps:
        folder = os.path.dirname(next(iter(steps.values())))
        raise MergeError(f"{folder} has no step-{iteration}/ (it has steps {', '.join(map(str, sorted(steps)))}); "
                         "pass one of those to --iteration")
    return check_dir(steps[iteration], source)


@functools.lru_cache(maxsize=8)
def _has_model_keys(metadata: str, mtime_ns: int, size: int) -> bool:
    """Whether a DCP .metadata names torchtitan model keys (cached: detect and read both ask)."""
    try:
        entries = read_metadata(metadata)[0]  # fqn -> entry
    except MergeError:  # unreadable: the plain DCP reader reports it
        return False
    return any(MODEL_KEY.match(name) for name in entries)


def detect(source: str, opts: ReadOptions = ReadOptions()) -> bool:
    """A DCP directory (or a folder of step-N/ ones) whose metadata names torchtitan model keys."""
    try:
        ckpt = checkpoint_dir(source, opts.iteration)
    except MergeError:  # step-N/ directories, but not that step, or linked out: read_catalogue says so
        return True
    if ckpt is None or os.path.isfile(os.path.join(ckpt, "metadata.json")):  # metadata.json: Megatron torch_dist
        return False
    st = os.stat(os.path.join(ckpt, METADATA))
    return _has_model_keys(os.path.join(ckpt, METADATA), st.st_mtime_ns, st.st_size)


def read_catalogue(source: str, opts: ReadOptions = ReadOptions()) -> Catalogue:
    """The model tensors of the step directory, metadata only; optimizer, scheduler, dataloader and
    train_state entries are skipped and counted in the notes."""
    ckpt = checkpoint_dir(source, opts.iteration)
    if ckpt is None:
        raise MergeError(f"{source} holds neither {METADATA} nor step-N/ directories with one; pass a torchtitan "
                         "checkpoint directory (<dump>/checkpoint/step-N)")
    tensors, files, notes, world = tensors_from_metadata(ckpt, root=source)
    state = [name for name in tensors if name.startswith(TRAIN_STATE)]
    for name in state:
        del tensors[name]
    if state:
        notes.append(f"{len(state)} train_state entries")
    if ckpt != source:
        count = len(step_dirs(os.path.dirname(ckpt)))
        which = "named by --iteration" if opts.iteration is not None else f"the latest of {count}"
        notes.append(f"read {os.path.relpath(ckpt, source)}/ ({which})")
    return Catalogue(format=NAME, source=source, files=files, tensors=tensors, hf_dir=find_hf_dir(ckpt),
                     world_size=world, mesh="chunked (DCP)", notes=notes)


FORMAT = SourceFormat(name=NAME, family="torchtitan", detect=detect, read_catalogue=read_catalogue,
                      describe="torchtitan's DCP step-N/.metadata", takes_iteration=True)

"""Where each Megatron-family trainer puts its torch_dist checkpoint, its model settings and its tokenizer.

Layouts (the directory a user passes as --source; each is told by its files):
- torch_dist: the dist checkpoint itself (metadata.json {"sharded_backend": "torch_dist"}).
- verl: dist_ckpt/ + huggingface/ (config.json and tokenizer).
- verl-model: verl's newer layout, model/{dist_ckpt,huggingface} + transformer_config.json.
- nemo2: weights/ (a dist checkpoint whose keys start with `module.`) + context/ (model.yaml, tokenizer).
- megatron-bridge: iter_N/ (dist checkpoint + run_config.yaml + tokenizer/) + latest_train_state.pt.
- megatron-lm: iter_N/ + latest_checkpointed_iteration.txt (Megatron-LM, slime); args in common.pt.

Only metadata and small text files are read here; pickles go through the restricted unpickler.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

from ..errors import MergeError
from ..paths import check_dir
from .layout import latest_iteration

ITER_DIR = re.compile(r"^iter_(\d{7})$")
BRIDGE_TRACKER = "latest_train_state.pt"
NEMO_PREFIX = "module."
MAX_TEXT_BYTES = 16 << 20  # a settings file is a few KB; larger is not one


@dataclass(frozen=True)
class Layout:
    """A recognised Megatron-family checkpoint: its name, the torch_dist directory, where its HF
    config is (if any), and the prefix its trainer puts before every key."""

    name: str
    root: str          # the directory the user passed
    ckpt: str          # the torch_dist directory
    hf_dir: str | None = None
    key_prefix: str = ""


def is_dist_ckpt(d: str) -> bool:
    """A Megatron torch_dist checkpoint directory: metadata.json says sharded_backend torch_dist."""
    path = os.path.join(d, "metadata.json")
    if not os.path.isfile(path) or os.path.getsize(path) > MAX_TEXT_BYTES:
        return False
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f).get("sharded_backend") == "torch_dist"
    except (OSError, ValueError, AttributeError, UnicodeDecodeError, RecursionError):
        return False


def _dir(*parts: str) -> str | None:
    path = os.path.join(*parts)
    return path if os.path.isdir(path) else None


def _holds(source: str, *parts: str) -> bool:
    """Whether source/parts is a torch_dist checkpoint directory; one that resolves outside the
    source (a link out of it) is refused before its metadata.json is opened."""
    path = check_dir(os.path.join(source, *parts), source)  # a path that does not exist resolves inside
    return is_dist_ckpt(path)


def find_layout(source: str, iteration: int | None = None) -> Layout | None:
    """The layout `source` holds, or None when it holds no torch_dist checkpoint."""
    if is_dist_ckpt(source):  # NeMo 2's weights/ passed by itself keeps its prefix
        nemo = os.path.basename(os.path.normpath(source)) == "weights" and os.path.isdir(
            os.path.join(os.path.dirname(os.path.abspath(source)), "context"))
        return Layout("nemo2" if nemo else "torch_dist", source, source, key_prefix=NEMO_PREFIX if nemo else "")
    if _holds(source, "dist_ckpt"):
        return Layout("verl", source, os.path.join(source, "dist_ckpt"), _dir(source, "huggingface"))
    if _holds(source, "model", "dist_ckpt"):
        return Layout("verl-model", source, os.path.join(source, "model", "dist_ckpt"),
                      _dir(source, "model", "huggingface") or _dir(source, "huggingface"))
    if _holds(source, "weights") and os.path.isdir(os.path.join(source, "context")):
        return Layout("nemo2", source, os.path.join(source, "weights"), key_prefix=NEMO_PREFIX)
    return _iteration_layout(source, iteration)


def _iteration_layout(source: str, iteration: int | None) -> Layout | None:
    """Megatron-LM / slime (tracker file) and Megatron-Bridge (latest_train_state.pt) runs: iter_N/."""
    bridge = os.path.isfile(os.path.join(source, BRIDGE_TRACKER))
    if iteration is None:
        iteration = latest_iteration(source)
    if iteration is None and bridge:
        iterations = [int(m.group(1)) for m in map(ITER_DIR.match, os.listdir(source)) if m]
        iteration = max(iterations, default=None)
        if iteration is None:
            raise MergeError(f"{source} has {BRIDGE_TRACKER} but no iter_NNNNNNN directory; pass the directory "
                             "that holds the iterations")
    if iteration is None:
        return None
    path = os.path.join(source, f"iter_{iteration:07d}")
    if not _holds(source, f"iter_{iteration:07d}"):
        raise MergeError(f"{path} is not a torch_dist checkpoint (no metadata.json with sharded_backend "
                         "torch_dist); pick another --iteration")
    return Layout("megatron-bridge" if bridge else "megatron-lm", source, path)


def strip_prefix(prefix: str):
    """A rename for dcp.tensors_from_metadata that drops the trainer's key prefix (NeMo 2's `module.`)."""
    def rename(names: list[str]) -> dict[str, str]:
        return {n: n[len(prefix):] if prefix and n.startswith(prefix) else n for n in names}
    return rename

"""Directory conventions shared by several formats: where the HF config lives, which iteration is latest."""
from __future__ import annotations

import os

from ..errors import MergeError


def find_hf_dir(source: str) -> str | None:
    """SOURCE/huggingface, or a huggingface/ beside SOURCE (verl: actor/dist_ckpt + actor/huggingface)."""
    beside = os.path.join(os.path.dirname(os.path.abspath(source)), "huggingface")
    for d in (os.path.join(source, "huggingface"), beside):
        if os.path.isdir(d):
            return d
    return None


def latest_iteration(source: str) -> int | None:
    """The iteration Megatron-LM's latest_checkpointed_iteration.txt names, None without the file."""
    tracker = os.path.join(source, "latest_checkpointed_iteration.txt")
    if not os.path.isfile(tracker):
        return None
    try:
        with open(tracker) as f:
            text = f.read(64).strip()
    except (OSError, UnicodeDecodeError) as e:
        raise MergeError(f"{tracker} cannot be read ({e}); pass --iteration N") from None
    if not text.isdigit():
        raise MergeError(f"{tracker} says {text!r}, not an iteration number; pass --iteration N")
    return int(text)

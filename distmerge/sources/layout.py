"""Directory conventions shared by several formats: where the HF config lives, which iteration is latest."""
from __future__ import annotations

import os

from ..errors import MergeError
from ..paths import read_tracker

FIX = "pass --iteration N"


def find_hf_dir(source: str) -> str | None:
    """SOURCE/huggingface, or a huggingface/ beside SOURCE (verl: actor/dist_ckpt + actor/huggingface)."""
    beside = os.path.join(os.path.dirname(os.path.abspath(source)), "huggingface")
    for d in (os.path.join(source, "huggingface"), beside):
        if os.path.isdir(d):
            return d
    return None


def latest_iteration(source: str) -> int | None:
    """The iteration Megatron-LM's latest_checkpointed_iteration.txt names, None without the file.
    The tracker is checked like a data file (inside the source, regular, short ASCII text) before it
    is read, so a link to another file is refused without its bytes reaching the message."""
    tracker = os.path.join(source, "latest_checkpointed_iteration.txt")
    if not os.path.lexists(tracker):
        return None
    text = read_tracker(tracker, source, FIX)
    if not text.isdigit():  # ASCII only (read_tracker): int() parses every digit isdigit() accepts
        raise MergeError(f"{tracker} says {text[:64]!r}, not an iteration number; {FIX}")
    return int(text)

"""A check every source format runs on its catalogue before anything is written."""
from __future__ import annotations

import os

from ..errors import MergeError
from ..model import SourceTensor


def check_coverage(t: SourceTensor) -> None:
    """The pieces must tile the global tensor exactly: inside its bounds, together all of it."""
    total = 0
    for p in t.pieces:
        if any(o + s > n for o, s, n in zip(p.region, p.shape, t.shape)):
            raise MergeError(f"{p.file}: a piece of {t.name} at {list(p.region)} of shape {list(p.shape)} "
                             f"lies outside the tensor's shape {list(t.shape)}")
        total += p.numel
    numel = 1
    for n in t.shape:
        numel *= n
    if total != numel:
        files = sorted({p.file for p in t.pieces})
        raise MergeError(f"the pieces of tensor {t.name} cover {total} of its {numel} elements "
                         f"(files: {', '.join(os.path.join(os.path.basename(os.path.dirname(f)), os.path.basename(f)) for f in files)}); "
                         "shards are missing or overlap")

"""Stage 1, detect/read: recognise the source format and build its Catalogue (metadata only).

The registry: one line per format, in detection order. A format is a module that defines
`FORMAT = SourceFormat(...)` (see registry.py); nothing else in distmerge names a format.
"""
from __future__ import annotations

import os

from ..errors import MergeError
from ..model import Catalogue
from . import dcp, deepspeed, fsdp, megatron, megatron_legacy, torchtitan, torchtune
from .registry import ReadOptions, SourceFormat

# order matters: a legacy Megatron-LM run also has latest_checkpointed_iteration.txt; DCP's .metadata
# is also inside a Megatron torch_dist checkpoint
FORMATS: list[SourceFormat] = [
    fsdp.FORMAT,
    megatron_legacy.FORMAT,
    torchtitan.FORMAT,  # before megatron (whose --iteration claims any folder) and dcp (same .metadata)
    megatron.FORMAT,
    deepspeed.FORMAT,
    torchtune.FORMAT,  # before dcp: the same .metadata, recognised by torchtune's names
    dcp.FORMAT,
]


def _check_directory(source: str) -> None:
    if not os.path.exists(source):
        raise MergeError(f"source {source} does not exist")
    if not os.path.isdir(source):
        raise MergeError(f"source {source} is not a directory; pass the checkpoint directory "
                         "(e.g. checkpoints/global_step_100/actor)")
    if not os.listdir(source):
        raise MergeError(f"source {source} is empty; pass the directory that holds the checkpoint files")


def detect_format(source: str, opts: ReadOptions = ReadOptions()) -> SourceFormat:
    """The first registered format that recognises `source`. With --iteration only formats that
    take one are asked (a Megatron-LM run directory)."""
    _check_directory(source)
    candidates = [f for f in FORMATS if f.takes_iteration] if opts.iteration is not None else FORMATS
    for fmt in candidates:
        if fmt.detect(source, opts):
            return fmt
    looked_for = ", ".join(f.describe for f in FORMATS)
    raise MergeError(f"{source} is not a checkpoint distmerge knows: none of {looked_for} found. "
                     "Pass the directory that holds them")


def read_source(source: str, opts: ReadOptions = ReadOptions()) -> tuple[SourceFormat, Catalogue]:
    """Detect the format and read its catalogue (metadata only); the catalogue carries the family."""
    fmt = detect_format(source, opts)
    catalogue = fmt.read_catalogue(source, opts)
    catalogue.family = fmt.family
    return fmt, catalogue

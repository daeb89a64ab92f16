"""The format registry's types: what a source format is, and what every reader is given.

A format is one module under sources/ that defines `FORMAT = SourceFormat(...)`; sources/__init__.py
lists them in detection order. Nothing outside sources/ compares format names: arch/ dispatches on
the naming `family`, and the user sees `name`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..model import Catalogue


@dataclass(frozen=True)
class ReadOptions:
    """What a user may tell a reader. A reader ignores what does not concern it."""

    iteration: int | None = None     # Megatron-LM runs: iter_N instead of the latest
    quick: bool = False              # inspect without --check-all: a reader may read less (verl: rank 0 only)
    zero_weights: str = "master"     # DeepSpeed ZeRO-1/2: "master" (fp32 optimizer copy) or "module" (16-bit)


@dataclass(frozen=True)
class SourceFormat:
    """One checkpoint format: how to recognise it, how to read its metadata, how its tensors are named."""

    name: str                                           # shown to users and stored in Catalogue.format
    family: str                                         # naming family arch/ maps from: "hf", "megatron", "torchtitan"
    detect: Callable[[str, ReadOptions], bool]          # detect(source_dir, opts): cheap, reads no tensor data
    read_catalogue: Callable[[str, ReadOptions], Catalogue]
    describe: str = ""                                  # what `detect` looks for, for the "not a checkpoint" message
    takes_iteration: bool = False                       # --iteration N names one of its saves
    verl_backend: str | None = None                     # verl's --backend value for this format, if any

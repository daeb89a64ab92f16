"""Catalogue once, scatter the work: one rank reads the metadata, the others get their share.

A checkpoint saved by many training ranks has millions of chunks (DeepSeek-V3 from 64 ranks: 2.9M).
Reading them on every merge rank costs each rank the whole catalogue's time and memory. Instead
the reader rank (rank 0) detects, validates, maps and plans; then each rank receives a `Share`:
- the plan as a `RankPlan`: every file, header, entry and segment (output names and byte ranges do
  not depend on who writes them), with only that rank's segments scheduled on it;
- a catalogue holding only the source tensors its segments read (their pieces, LoRA factors included).
The reader keeps the whole plan for `finish` but runs the write stage from its own share too, so the
full catalogue is dropped before any byte moves. Output bytes do not change: each segment is made
from the same pieces, by the same code, whichever rank writes it.

The collective transport is the exception: there a rank also sends the pieces of the source files
it reads, for tensors other ranks write, and numbers every piece of the whole schedule alike, so
its share is the whole catalogue and the whole plan.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from .model import Catalogue, OutputFile, Plan, Segment
from .prepare import Prepared


class RankPlan(Plan):
    """The plan as one rank runs it: the same files, entries and segments, but `segments_of` gives
    only this rank's work (a rank never schedules, nor looks up the pieces of, another's segments)."""

    def __init__(self, plan: Plan, rank: int):
        super().__init__(files=plan.files, world_size=plan.world_size, transport=plan.transport,
                         readers=plan.readers, config_dtype=plan.config_dtype)
        self.rank = rank

    def segments_of(self, rank: int) -> list[tuple[OutputFile, Segment]]:
        return super().segments_of(rank) if rank == self.rank else []


@dataclass
class Share:
    """What one rank needs to write its segments."""

    prepared: Prepared
    plan: Plan


def needed_sources(plan: Plan, rank: int) -> set[str]:
    """The source tensors whose pieces this rank's segments read: parts and LoRA factors."""
    names: set[str] = set()
    for f, seg in plan.segments_of(rank):
        for entry in f.entries[seg.first:seg.stop]:
            names |= entry.tensor.sources
            if entry.tensor.lora is not None:
                names |= {entry.tensor.lora.a, entry.tensor.lora.b}
    return names


def share_of(prepared: Prepared, plan: Plan, rank: int) -> Share:
    """Rank `rank`'s share: its catalogue subset (whole catalogue for the collective transport) and
    its RankPlan. Small: the catalogue is the dominant part, and only its own tensors are in it."""
    c = prepared.catalogue
    if plan.transport == "collective" and plan.world_size > 1:  # every rank walks every segment
        return Share(replace(prepared, outputs=[]), plan)
    catalogue = replace(c, tensors={n: c.tensors[n] for n in needed_sources(plan, rank)})
    return Share(replace(prepared, catalogue=catalogue, outputs=[]), RankPlan(plan, rank))


def scatter_shares(rt, prepared: Prepared | None, plan: Plan | None) -> Share:
    """On the reader (rank 0, which passes the prepared job and the whole plan): give every rank
    its share and return its own; the others pass None and get theirs. What every rank gets alike
    (the plan, the config, the catalogue without its tensors) is pickled once and broadcast; only
    each rank's tensors go to it alone, one rank at a time."""
    if rt.world_size == 1:
        return share_of(prepared, plan, 0)
    collective = rt.rank == 0 and plan.transport == "collective"
    common = None
    if rt.rank == 0:
        bare = prepared if collective else replace(prepared, catalogue=replace(prepared.catalogue, tensors={}))
        common = (replace(bare, outputs=[]), plan)
    bare, plan_ = rt.group.broadcast(common)
    if plan_.transport == "collective":
        return Share(replace(prepared, outputs=[]) if rt.rank == 0 else bare, plan_)
    if rt.rank == 0:
        for rank in range(1, rt.world_size):
            rt.group.send(share_of(prepared, plan, rank).prepared.catalogue.tensors, rank)
        return share_of(prepared, plan, 0)
    bare.catalogue.tensors = rt.group.recv(0)
    return Share(bare, RankPlan(plan_, rt.rank))


def catalogue_size(catalogue: Catalogue) -> tuple[int, int]:
    """(tensors, pieces) a catalogue holds: what the scatter keeps off the non-reader ranks."""
    return len(catalogue.tensors), sum(len(t.pieces) for t in catalogue.tensors.values())

"""The band geometry of the run stage: how an output tensor is cut into bands of rows, which
stored blocks each band needs, and how those blocks make the band. Pure functions of the plan's
data: no file is opened here, so every rank cuts the same bands and numbers the same reads.

A band is at most BAND_BYTES (at least one row), inside one part of the recipe and, where the
part takes rows in their stored order and the pieces are row blocks, inside one piece, so that a
band stored exactly as it goes out can be copied file to file. A part with a row order (a
gather) is cut into whole blocks of its period where one fits in a band: the source rows of such
a band are then one run, read in one go per piece and reordered in memory.
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np

from . import values
from .errors import MergeError
from .model import Catalogue, LoraDelta, OutputTensor, Piece, SourceRows, SourceTensor, dtype_size

BAND_BYTES = 16 * 2**20  # rows of a tensor assembled, cast and written at a time


@dataclass(frozen=True)
class Read:
    """One stored block a band needs: rows [first, stop) of piece number `piece` of the band's
    source, at the piece's own index `lead` for the leading dims (piece coordinates). It lands at
    row `at` of the band's assembled block."""

    piece: int
    lead: tuple[int, ...]
    first: int
    stop: int
    at: int


@dataclass(frozen=True)
class Gathered:
    """A band of a part with a row order: output rows [first, stop) of that part."""

    part: SourceRows
    first: int
    stop: int

    def source_rows(self) -> np.ndarray:
        return self.part.source_rows(self.first, self.stop)


@dataclass(frozen=True)
class Band:
    """Output rows [first, stop) of one tensor, all taken from one SourceRows part of
    source[index]. `runs` are the source rows it reads, [a, b) each, assembled one after the other
    in this order; `reads` are the stored blocks that hold them. Without `gathered` the assembled
    rows are the band; with it, they are the sorted source rows, reordered into the band."""

    first: int
    stop: int
    source: SourceTensor
    index: tuple[int, ...]
    runs: tuple[tuple[int, int], ...]
    reads: tuple[Read, ...]
    gathered: Gathered | None = None


def bands(out: OutputTensor, catalogue: Catalogue) -> list[Band]:
    """Cut an output tensor into bands (see the module's docstring). Identical on every rank."""
    if out.lora is not None and any(part.order for part in out.parts):
        raise MergeError(f"{out.name}: a LoRA fold of a tensor whose rows are gathered is not supported")
    result, out_row = [], 0
    for part in out.parts:
        result += _part_bands(part, catalogue.tensors[part.source], out_row)
        out_row += part.stop - part.start
    return result


def _part_bands(part: SourceRows, source: SourceTensor, out_row: int) -> list[Band]:
    """The bands of one part, whose first row is output row `out_row`."""
    if not source.shape:  # a 0-d tensor: one band of one "row"
        reads = tuple(Read(i, (), 0, 1, 0) for i in range(len(source.pieces)))
        return [Band(0, 1, source, (), ((0, 1),), reads)]
    d = len(part.index)
    held = [(i, p) for i, p in enumerate(source.pieces)
            if all(o <= x < o + n for x, o, n in zip(part.index, p.region, p.shape))]
    row_bytes = math.prod(source.shape[d + 1:]) * dtype_size(source.dtype)
    per_band = max(1, BAND_BYTES // max(row_bytes, 1))
    if part.order:
        return _gathered_bands(part, source, held, out_row, per_band)
    cuts = {part.start, part.stop}
    for _, p in held:
        cuts.update(r for r in (p.region[d], p.region[d] + p.shape[d]) if part.start < r < part.stop)
    cuts = sorted(cuts)
    result = []
    for (lo, hi), covering in zip(zip(cuts, cuts[1:]), _covering(held, cuts, d)):
        for first in range(lo, hi, per_band):
            stop = min(first + per_band, hi)
            result.append(Band(out_row + first - part.start, out_row + stop - part.start, source, part.index,
                               ((first, stop),), _reads(part.index, covering, ((first, stop),))))
    return result


def _covering(held: list[tuple[int, Piece]], cuts: list[int], d: int) -> list[list[tuple[int, Piece]]]:
    """For each interval between consecutive cuts, the held pieces whose rows cover it, in held
    order. Every piece's first and last row are cuts (or lie outside them), so a piece covers an
    interval whole or not at all: one pass over the pieces, not one per interval."""
    where = {cut: k for k, cut in enumerate(cuts)}
    covering: list[list[tuple[int, Piece]]] = [[] for _ in cuts[1:]]
    for item in held:
        first, stop = item[1].region[d], item[1].region[d] + item[1].shape[d]
        if first < cuts[-1] and stop > cuts[0]:  # else none of the part's rows
            for k in range(where[max(first, cuts[0])], where[min(stop, cuts[-1])]):
                covering[k].append(item)
    return covering


def _gathered_bands(part: SourceRows, source: SourceTensor, held: list, out_row: int, per_band: int) -> list[Band]:
    """Bands of a part with a row order: whole periods per band where one fits, so that each
    band's source rows are one run; else runs of whatever rows the band's output rows take."""
    period = len(part.order)
    if period <= per_band:
        per_band -= per_band % period
    result = []
    for first in range(0, part.stop - part.start, per_band):
        gathered = Gathered(part, first, min(first + per_band, part.stop - part.start))
        runs = row_runs(gathered.source_rows())
        result.append(Band(out_row + gathered.first, out_row + gathered.stop, source, part.index, runs,
                           _reads(part.index, held, runs), gathered))
    return result


def row_runs(rows: np.ndarray) -> tuple[tuple[int, int], ...]:
    """Distinct rows as runs of consecutive rows [a, b), ascending."""
    rows = np.unique(rows)  # sorted
    if not rows.size:
        return ()
    breaks = np.flatnonzero(np.diff(rows) != 1).tolist()
    starts = [0] + [b + 1 for b in breaks]
    stops = [b + 1 for b in breaks] + [rows.size]
    return tuple((int(rows[a]), int(rows[b - 1]) + 1) for a, b in zip(starts, stops))


def _reads(index: tuple[int, ...], held: list[tuple[int, Piece]], runs) -> tuple[Read, ...]:
    """The blocks of the held pieces that cover each run of source rows, in run then piece order."""
    d, reads, at = len(index), [], 0
    for a, b in runs:
        for i, p in held:
            lo, hi = max(a, p.region[d]), min(b, p.region[d] + p.shape[d])
            if lo < hi:
                lead = tuple(x - o for x, o in zip(index, p.region))
                reads.append(Read(i, lead, lo - p.region[d], hi - p.region[d], at + lo - a))
        at += b - a
    return tuple(reads)


def whole_rows(piece: Piece, source: SourceTensor, d: int) -> bool:
    """True when the piece spans every dim after the row dim d completely."""
    return all(o == 0 for o in piece.region[d + 1:]) and piece.shape[d + 1:] == source.shape[d + 1:]


def whole_block(band: Band) -> Read | None:
    """The band's one read when it is a block of whole rows of one piece in stored order (the
    band is that block as stored); else None."""
    source = band.source
    if band.gathered is None and len(band.reads) == 1 \
            and whole_rows(source.pieces[band.reads[0].piece], source, len(band.index)):
        return band.reads[0]
    return None


def assemble(band: Band, get, phase=lambda name: nullcontext()) -> np.ndarray:
    """The band's rows, from its reads: get(k, piece, read) returns the k-th read's block. A band
    read from one piece of whole rows is that block itself."""
    source, d = band.source, len(band.index)
    read = whole_block(band)
    if read is not None:
        return get(0, source.pieces[read.piece], read)
    rows = sum(b - a for a, b in band.runs)
    assembled = values.empty((rows,) + source.shape[d + 1:] if source.shape else (), source.dtype)
    for k, read in enumerate(band.reads):
        p = source.pieces[read.piece]
        block = get(k, p, read)
        with phase("assemble"):
            if not source.shape:
                assembled[()] = block
                continue
            at = slice(read.at, read.at + read.stop - read.first)
            assembled[(at,) + tuple(slice(o, o + n) for o, n in zip(p.region[d + 1:], p.shape[d + 1:]))] = block
    if band.gathered is None:
        return assembled
    with phase("assemble"):
        return assembled[_positions(band)]


def _positions(band: Band) -> np.ndarray:
    """For each output row of a gathered band, its row in the assembled block (the runs' rows in order)."""
    assembled_rows = np.concatenate([np.arange(a, b, dtype=np.int64) for a, b in band.runs])
    return np.searchsorted(assembled_rows, band.gathered.source_rows())


def fold_lora(block, lora: LoraDelta, a, b_rows):
    """The band's rows of W + scale * B @ A in fp32 (cast to the output dtype later), torch tensors:
    `block` is W's rows, `b_rows` the same rows of B, `a` all of A."""
    return block.float() + (b_rows.float() @ a.float()) * lora.scale

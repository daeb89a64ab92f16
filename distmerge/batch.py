"""Small tensors in bulk: consecutive small output tensors whose bytes are all stored as they go
out (each band one run of a source file, no cast, no LoRA fold) are gathered into one buffer,
filled with one preadv per run of adjacent source bytes, then written and hashed once.

A checkpoint saved by many ranks holds millions of chunks of a few hundred bytes (a
DeepSeek-V3 layout saved by 64 ranks: 2.9 million). Band by band, each chunk would cost a
writer-thread hand-off, a copy call, a page-cache drop and a hash read back from the output.
Here a chunk costs a slice of the buffer: a rank file holds its chunks of consecutive tensors one
after the other, so one preadv fills the chunks of hundreds of tensors from that file.
"""
from __future__ import annotations

import math
import operator
import os
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from .model import Catalogue, OutputTensor
from .reader import PieceReader, drop_cached, pread_exactly

BATCH_BYTES = 16 * 2**20        # output bytes gathered before they are written (one buffer)
BATCH_RUNS = 2**15              # ... and at most this many byte runs (their records are memory too)
SMALL_TENSOR_BYTES = 2**20      # a tensor of at most this many bytes may join a batch
IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 16  # buffers one preadv may fill


class ByteRun(NamedTuple):
    """nbytes of source file `path` from `offset`, going to data offset `out` of the output file (a
    named tuple: millions are made, each at C speed)."""

    out: int
    path: str
    offset: int
    nbytes: int


@dataclass
class Batch:
    """Output bytes [begin, end) of one segment's writer, and the byte runs that make them. Bytes
    no run covers are zeros (a tensor with no parts: a bias the source model does without)."""

    writer: object = None
    begin: int = 0
    end: int = 0
    runs: list[ByteRun] = field(default_factory=list)

    def fits(self, writer, begin: int, end: int) -> bool:
        """Whether output bytes [begin, end) of `writer` extend this batch."""
        if self.writer is None:
            return True
        return writer is self.writer and begin == self.end and end - self.begin <= BATCH_BYTES \
            and len(self.runs) < BATCH_RUNS

    def add(self, writer, begin: int, end: int, runs: list[ByteRun]) -> None:
        if self.writer is None:
            self.writer, self.begin = writer, begin
        self.end = end
        self.runs.extend(run for run in runs if run.nbytes)

    def fill(self, reader: PieceReader) -> memoryview:
        """The batch's bytes: the runs of each source file in file order, adjacent runs read by
        one preadv into their places in the buffer."""
        buf = memoryview(bytearray(self.end - self.begin))
        by_file: dict[str, list[ByteRun]] = {}
        for run in self.runs:
            by_file.setdefault(run.path, []).append(run)
        for path, runs in by_file.items():
            runs.sort(key=operator.itemgetter(2))  # by offset
            fd, views, start, at = reader.fd(path), [], 0, 0
            for run in runs:
                if views and (run.offset != at or len(views) == IOV_MAX):
                    _read_into(fd, path, views, start, at)
                    views = []
                if not views:
                    start = at = run.offset
                views.append(buf[run.out - self.begin:run.out - self.begin + run.nbytes])
                at += run.nbytes
            if views:
                _read_into(fd, path, views, start, at)
        return buf


def stored_runs(out: OutputTensor, catalogue: Catalogue, begin: int) -> list[ByteRun] | None:
    """The byte runs of an output tensor that is a whole source tensor held in a PieceTable, as
    it goes out: no cast, contiguous blocks of whole rows that cover each row once. Computed in
    bulk from the table (the tensor's band-by-band geometry gives the same runs, one Python step
    per chunk); None for any other tensor. `begin`: the tensor's data offset in its file."""
    if len(out.parts) != 1 or out.lora is not None:
        return None
    part = out.parts[0]
    source = catalogue.tensors[part.source]
    table = source.pieces
    if not hasattr(table, "rows") or part.index or part.order or not source.shape or part.start != 0 \
            or part.stop != source.shape[0] or tuple(out.shape) != tuple(source.shape) or source.dtype != out.dtype:
        return None
    rows, d = table.rows(), table.ndim
    region, shape, strides = rows[:, 2:2 + d], rows[:, 2 + d:2 + 2 * d], rows[:, 2 + 2 * d:]
    contiguous = [math.prod(source.shape[k + 1:]) for k in range(d)]
    if (region[:, 1:] != 0).any() or (shape[:, 1:] != source.shape[1:]).any() \
            or ((strides != contiguous) & (shape > 1)).any():
        return None
    kept = np.argsort(region[:, 0], kind="stable")
    kept = kept[shape[kept, 0] > 0]
    starts, counts = region[kept, 0], shape[kept, 0]
    ends = np.cumsum(counts)
    if len(kept) == 0 or starts[0] != 0 or (starts[1:] != ends[:-1]).any() or ends[-1] != source.shape[0]:
        return None  # rows held twice (replicas) or not at all: the bands decide
    row_bytes = contiguous[0] * out.dtype.itemsize
    files, offsets = rows[kept, 0].tolist(), rows[kept, 1].tolist()
    paths = [table.files[f] for f in files]
    return list(map(ByteRun._make, zip((begin + starts * row_bytes).tolist(), paths, offsets,
                                       (counts * row_bytes).tolist())))


def _read_into(fd: int, path: str, views: list[memoryview], start: int, end: int) -> None:
    """Fill the views from bytes [start, end) of a file, in order; the source's pages are then
    dropped from the cache (as the band-by-band reads do)."""
    done = os.preadv(fd, views, start)
    if done < end - start:  # a short read: the rest view by view (a file that ends first is truncated)
        at = start
        for view in views:
            if at + len(view) > start + done:
                skip = max(0, start + done - at)
                pread_exactly(fd, path, view[skip:], at + skip, end)
            at += len(view)
    drop_cached(fd, start, end - start)

"""The pieces of a tensor saved in many chunks, kept as one flat array of ints instead of an object each.

A DeepSeek-V3-sized checkpoint saved by 64 ranks has 2.9 million chunks. As `Piece` objects (a
frozen dataclass and three tuples each) they take several hundred bytes apiece; here a 2-d chunk
takes 8 ints, and a `Piece` is built only when one is asked for. `PieceTable` is a read-only
sequence of `Piece`s, so every stage that walks `SourceTensor.pieces` works unchanged; stages that
walk millions of them (validation) read `rows()` in bulk instead.
"""
from __future__ import annotations

import contextlib
import gc
from array import array
from collections.abc import Sequence

import numpy as np

from ..dtypes import DType
from ..errors import MergeError
from ..model import Piece


class PieceTable(Sequence):
    """One tensor's pieces: per piece [file index, byte offset, region (ndim), shape (ndim), strides (ndim)]."""

    __slots__ = ("files", "dtype", "ndim", "data")

    def __init__(self, files: list[str], dtype: DType, ndim: int):
        self.files = files          # shared by every table of a catalogue: index -> path
        self.dtype = dtype
        self.ndim = ndim
        self.data = array("q")

    @property
    def width(self) -> int:
        return 2 + 3 * self.ndim

    def add(self, file_index: int, offset: int, region, shape, strides) -> None:
        """Append one piece; a value no int64 holds is a corrupt record (refused here, exit 2)."""
        if len(region) != self.ndim or len(shape) != self.ndim or len(strides) != self.ndim:
            raise MergeError(f"{self.files[file_index]}: a chunk's region {list(region)}, shape {list(shape)} and "
                             f"strides {list(strides)} do not have the tensor's {self.ndim} dims; "
                             "the metadata is corrupt")
        try:
            self.data.extend((file_index, offset, *region, *shape, *strides))
        except (OverflowError, TypeError):  # the table is dropped with the catalogue read
            raise MergeError(f"{self.files[file_index]}: a chunk at byte {offset} has region {list(region)}, shape "
                             f"{list(shape)}: values no file or tensor can have; the metadata is corrupt") from None

    def rows(self) -> np.ndarray:
        """The table as an (n, width) int64 array (a view: no copy)."""
        return np.frombuffer(self.data, dtype=np.int64).reshape(-1, self.width) if self.data else \
            np.zeros((0, self.width), dtype=np.int64)

    def __len__(self) -> int:
        return len(self.data) // self.width

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(i)
        d, w = self.ndim, self.width
        row = self.data[i * w:(i + 1) * w]
        return Piece(file=self.files[row[0]], offset=row[1], shape=tuple(row[2 + d:2 + 2 * d]),
                     strides=tuple(row[2 + 2 * d:]), region=tuple(row[2:2 + d]), dtype=self.dtype)

    def __iter__(self):
        d, files, dtype = self.ndim, self.files, self.dtype
        for row in self.rows().tolist():
            yield Piece(file=files[row[0]], offset=row[1], shape=tuple(row[2 + d:2 + 2 * d]),
                        strides=tuple(row[2 + 2 * d:]), region=tuple(row[2:2 + d]), dtype=dtype)

    def bytes_by_file(self) -> dict[str, int]:
        """Bytes of tensor data per file, in bulk (what plan.make_plan sums piece by piece)."""
        rows = self.rows()
        numel = rows[:, 2 + self.ndim:2 + 2 * self.ndim].prod(axis=1) * self.dtype.itemsize
        totals = np.bincount(rows[:, 0], weights=numel, minlength=len(self.files)) if len(rows) else []
        return {self.files[k]: int(n) for k, n in enumerate(totals) if n}

    def __repr__(self) -> str:
        return f"PieceTable({len(self)} pieces, {self.ndim}-d, {self.dtype})"

    def drop_repeats(self) -> None:
        """Keep the first of pieces that cover the same block (same region and shape): replicas
        saved by several ranks are read once, from the first file that holds them."""
        if len(self) < 2:
            return
        rows = self.rows()
        if self.ndim == 0:  # a scalar: every piece is the whole tensor
            self.data = array("q", rows[:1].tobytes())
            return
        _, first = np.unique(rows[:, 2:2 + 2 * self.ndim], axis=0, return_index=True)
        if len(first) < len(rows):
            self.data = array("q", rows[np.sort(first)].tobytes())


@contextlib.contextmanager
def gc_paused():
    """Python's cycle collector paused while millions of small acyclic records are built: its
    passes walk the live containers again and again, which made unpickling a large `.metadata`
    several times slower (docs/performance.md, "Metadata at scale"). These records hold no
    cycles, so nothing is leaked."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()

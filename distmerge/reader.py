"""The piece reader of the run stage: source bytes into values (values.py: raw elements in numpy
arrays), and a band's values from them.

Rows are read with pread into fresh buffers (never a whole-file mmap, whose touched pages would
count towards RSS), so a rank holds at most a few bands, never a whole file or model. Source
pages already read are dropped from the page cache (POSIX_FADV_DONTNEED), so a model whose
source and output together exceed RAM does not evict source bytes it has yet to read.
"""
from __future__ import annotations

import math
import os
from contextlib import nullcontext
from typing import NamedTuple

import numpy as np

from . import values
from .bands import Band, Read, assemble, bands, fold_lora
from .dtypes import FLOAT32, DType
from .errors import MergeIOError, truncated_source
from .model import Catalogue, OutputTensor, Piece, SourceRows, dtype_size

IO_CHUNK = 8 * 2**20  # bytes per pread/pwrite call: one huge call is several times slower than 8 MiB ones


def pread_exactly(fd: int, path: str, view: memoryview, offset: int, needed: int) -> None:
    """Fill `view` from byte `offset` of a file, IO_CHUNK at a time; a file that ends first is
    truncated (`needed`: the end of the whole range being read, for the message)."""
    at = offset
    while len(view):
        n = os.preadv(fd, [view[:IO_CHUNK]], at)
        if n == 0:
            raise truncated_source(path, at, needed)
        view, at = view[n:], at + n


def drop_cached(fd: int, offset: int, nbytes: int) -> None:
    """These source pages are done with: free them for the output's, so that source bytes not yet
    read stay cached when source and output together exceed RAM."""
    if hasattr(os, "posix_fadvise"):  # Linux; elsewhere the cache is left alone
        os.posix_fadvise(fd, offset, nbytes, os.POSIX_FADV_DONTNEED)


class PieceReader:
    """Reads rows of a piece with pread into a fresh buffer; keeps file descriptors open."""

    def __init__(self):
        self.fds: dict[str, int] = {}

    def fd(self, path: str) -> int:
        fd = self.fds.get(path)
        if fd is None:
            try:
                fd = self.fds[path] = os.open(path, os.O_RDONLY)
            except OSError as e:
                raise MergeIOError(f"cannot open {path}: {e.strerror}") from None
        return fd

    @staticmethod
    def locate(piece: Piece, lead: tuple[int, ...], first: int, stop: int):
        """Where piece[lead][first:stop] lies in its file: (shape, element strides, byte offset,
        byte span). `lead` fixes the piece's leading dims, rows run along the next dim (the whole
        piece for a 0-d tensor); piece coordinates."""
        d = len(lead)
        shape = (stop - first,) + piece.shape[d + 1:] if piece.shape else ()
        strides = piece.strides[d:]
        skip = sum(i * st for i, st in zip(lead, piece.strides)) + (first * strides[0] if piece.shape else 0)
        span = 1 + sum((n - 1) * st for n, st in zip(shape, strides)) if math.prod(shape) else 0
        return shape, strides, piece.offset + skip * dtype_size(piece.dtype), span * dtype_size(piece.dtype)

    def byte_run(self, piece: Piece, lead: tuple[int, ...], first: int, stop: int) -> tuple[int, int] | None:
        """(byte offset, byte count) when those rows are one run of bytes in the file, in row-major
        order: then they can be copied file to file without passing through this process."""
        shape, _, offset, nbytes = self.locate(piece, lead, first, stop)
        return (offset, nbytes) if nbytes == math.prod(shape) * dtype_size(piece.dtype) else None

    def read_rows(self, piece: Piece, lead: tuple[int, ...], first: int, stop: int) -> np.ndarray:
        """piece[lead][first:stop] (see locate) as values of their own."""
        fd = self.fd(piece.file)
        shape, strides, offset, nbytes = self.locate(piece, lead, first, stop)
        buf = np.empty(nbytes, dtype=np.uint8)
        pread_exactly(fd, piece.file, memoryview(buf), offset, offset + nbytes)
        drop_cached(fd, offset, nbytes)
        elements = values.from_buffer(buf, piece.dtype)
        if nbytes == math.prod(shape) * dtype_size(piece.dtype):
            return elements.reshape(shape)
        byte_strides = tuple(st * piece.dtype.itemsize for st in strides)
        return np.lib.stride_tricks.as_strided(elements, shape, byte_strides, writeable=False).copy()

    def read(self, piece: Piece, read: Read) -> np.ndarray:
        """The block a band's read names."""
        return self.read_rows(piece, read.lead, read.first, read.stop)

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


def read_source_rows(catalogue: Catalogue, name: str, first: int, stop: int, reader: PieceReader) -> np.ndarray:
    """Rows [first, stop) of a source tensor, from whatever pieces hold them."""
    source = catalogue.tensors[name]
    view = OutputTensor(name, (stop - first,) + source.shape[1:], source.dtype, [SourceRows(name, (), first, stop)])
    blocks = [assemble(b, lambda k, p, read: reader.read(p, read)) for b in bands(view, catalogue)]
    return np.concatenate(blocks) if len(blocks) > 1 else blocks[0]


class Block(NamedTuple):
    """A band's values and their element type (the source's; fp32 after a LoRA fold)."""

    values: np.ndarray
    dtype: DType


class BandProducer:
    """A band's values before the cast: its reads assembled, its LoRA delta folded in. The one
    producer of the merge's bands and of `verify --source`'s, so both see the same values."""

    def __init__(self, catalogue: Catalogue, reader: PieceReader):
        self.catalogue, self.reader = catalogue, reader
        self.lora_a: dict = {}  # the current tensor's lora_A, a torch fp32 tensor (small: r x in)

    def produce(self, out: OutputTensor, band: Band, get=None, phase=lambda name: nullcontext()) -> Block:
        """get(k, piece, read) returns the k-th read's block; by default this rank preads it."""
        block = assemble(band, get or (lambda k, piece, read: self.reader.read(piece, read)), phase)
        if out.lora is None:
            return Block(block, band.source.dtype)
        with phase("lora"):
            lora, tensors = out.lora, self.catalogue.tensors
            if lora.a not in self.lora_a:  # A once per tensor, B a band of rows at a time
                self.lora_a.clear()
                a = read_source_rows(self.catalogue, lora.a, 0, tensors[lora.a].shape[0], self.reader)
                self.lora_a[lora.a] = values.to_torch(a, tensors[lora.a].dtype).float()
            b_rows = read_source_rows(self.catalogue, lora.b, band.first, band.stop, self.reader)
            folded = fold_lora(values.to_torch(block, band.source.dtype), lora, self.lora_a[lora.a],
                               values.to_torch(b_rows, tensors[lora.b].dtype))
            return Block(values.from_torch(folded), FLOAT32)

"""Stage 4, run: each rank walks its part of the plan, gets the pieces of each of its tensors
and writes them into its files.

Two transports move the pieces:
- direct: the rank that writes a tensor preads its pieces straight from the (shared) filesystem;
- collective: each source file is read by one rank, which sends each piece to the rank that
  writes it (gloo on CPU, NCCL with CUDA tensors).
A band whose bytes lie in a source file exactly as they go out is copied file to file by the
kernel (writer.py). Other bands are read with pread into fresh buffers (never a whole-file mmap,
whose touched pages would count towards RSS), and a tensor stored as row blocks is written block
by block at its offsets, so a rank holds at most a few pieces at once, never a whole file or
model. Source pages already read or copied are dropped from the page cache (POSIX_FADV_DONTNEED),
so a model whose source and output together exceed RAM does not evict source bytes it has yet to
read.
"""
from __future__ import annotations

import collections
import math
import os
import resource
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import MergeIOError
from .integrity import record_done
from .model import (Catalogue, FileEntry, LoraDelta, OutputFile, OutputTensor, Piece, Plan, Segment, SourceRows,
                    SourceTensor, dtype_size)
from .runtime import Runtime
from .writer import SafetensorsWriter, as_bytes, pread_exactly

BAND_BYTES = 16 * 2**20         # rows of a tensor assembled, cast and written at a time
SEND_WINDOW_BYTES = 64 * 2**20  # bytes in flight per sending rank before it waits for the oldest send
WRITES_IN_FLIGHT = 2            # bands handed to the writer thread and not yet written


class Timers:
    """Seconds per phase on this rank; printed in the closing summary."""

    def __init__(self):
        self.seconds = collections.Counter()

    @contextmanager
    def phase(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - start


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

    def locate(self, piece: Piece, lead: tuple[int, ...], first: int, stop: int):
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

    def read_rows(self, piece: Piece, lead: tuple[int, ...], first: int, stop: int) -> torch.Tensor:
        """piece[lead][first:stop] (see locate) as a tensor of its own."""
        fd = self.fd(piece.file)
        shape, strides, offset, nbytes = self.locate(piece, lead, first, stop)
        buf = torch.empty(nbytes, dtype=torch.uint8)
        pread_exactly(fd, piece.file, memoryview(buf.numpy()), offset, offset + nbytes)
        drop_cached(fd, offset, nbytes)
        values = buf.view(piece.dtype)
        if nbytes == math.prod(shape) * dtype_size(piece.dtype):
            return values.view(shape)
        return values.as_strided(shape, strides).contiguous()

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


def drop_cached(fd: int, offset: int, nbytes: int) -> None:
    """These source pages are done with: free them for the output's, so that source bytes not yet
    read stay cached when source and output together exceed RAM (11 GB fp32 here: ~2x faster)."""
    if hasattr(os, "posix_fadvise"):  # Linux; elsewhere the cache is left alone
        os.posix_fadvise(fd, offset, nbytes, os.POSIX_FADV_DONTNEED)


@dataclass(frozen=True)
class Band:
    """Output rows [first, stop) of one tensor, all taken from one SourceRows part: rows
    [src_first, src_first + stop - first) of source[index]. `reads` are the blocks that make it:
    (piece number, the piece's own index for the leading dims, first row, stop row) in piece
    coordinates."""

    first: int
    stop: int
    source: SourceTensor
    index: tuple[int, ...]
    src_first: int
    reads: tuple[tuple[int, tuple[int, ...], int, int], ...]


def bands(out: OutputTensor, catalogue: Catalogue) -> list[Band]:
    """Cut an output tensor into bands of at most BAND_BYTES (at least one row), each inside one
    part and, where the pieces are row blocks, inside one piece. Identical on every rank."""
    result, out_row = [], 0
    for part in out.parts:
        source = catalogue.tensors[part.source]
        d = len(part.index)
        if not source.shape:  # a 0-d tensor: one band of one "row"
            result.append(Band(0, 1, source, (), 0, tuple((i, (), 0, 1) for i in range(len(source.pieces)))))
            continue
        held = [(i, p) for i, p in enumerate(source.pieces)
                if all(o <= x < o + n for x, o, n in zip(part.index, p.region, p.shape))]
        row_bytes = math.prod(source.shape[d + 1:]) * dtype_size(source.dtype)
        per_band = max(1, BAND_BYTES // max(row_bytes, 1))
        cuts = {part.start, part.stop}
        for _, p in held:
            cuts.update(r for r in (p.region[d], p.region[d] + p.shape[d]) if part.start < r < part.stop)
        cuts = sorted(cuts)
        for lo, hi in zip(cuts, cuts[1:]):
            for first in range(lo, hi, per_band):
                stop = min(first + per_band, hi)
                reads = tuple((i, tuple(x - o for x, o in zip(part.index, p.region)),
                               max(first, p.region[d]) - p.region[d], min(stop, p.region[d] + p.shape[d]) - p.region[d])
                              for i, p in held if p.region[d] < stop and p.region[d] + p.shape[d] > first)
                result.append(Band(out_row + first - part.start, out_row + stop - part.start, source, part.index,
                                   first, reads))
        out_row += part.stop - part.start
    return result


def whole_rows(piece: Piece, source: SourceTensor, d: int) -> bool:
    """True when the piece spans every dim after the row dim d completely."""
    return all(o == 0 for o in piece.region[d + 1:]) and piece.shape[d + 1:] == source.shape[d + 1:]


def whole_block(band: Band):
    """The band's one read when it is a block of whole rows of one piece (the band is that block
    as stored); else None."""
    source = band.source
    if len(band.reads) == 1 and whole_rows(source.pieces[band.reads[0][0]], source, len(band.index)):
        return band.reads[0]
    return None


def assemble(band: Band, get, phase=lambda name: nullcontext()) -> torch.Tensor:
    """The band's rows of its source part, from its reads: get(k, piece, lead, first, stop) returns
    the k-th read's block. A band read from one piece of whole rows is that block itself."""
    source, d = band.source, len(band.index)
    read = whole_block(band)
    if read is not None:
        i, lead, lo, hi = read
        return get(0, source.pieces[i], lead, lo, hi)
    shape = (band.stop - band.first,) + source.shape[d + 1:] if source.shape else ()
    assembled = torch.empty(shape, dtype=source.dtype)
    for k, (i, lead, lo, hi) in enumerate(band.reads):
        p = source.pieces[i]
        block = get(k, p, lead, lo, hi)
        with phase("assemble"):
            if not source.shape:
                assembled.copy_(block)
                continue
            rows = slice(p.region[d] + lo - band.src_first, p.region[d] + hi - band.src_first)
            assembled[(rows,) + tuple(slice(o, o + n) for o, n in zip(p.region[d + 1:], p.shape[d + 1:]))] = block
    return assembled


def read_source_rows(catalogue: Catalogue, name: str, first: int, stop: int, reader: PieceReader) -> torch.Tensor:
    """Rows [first, stop) of a source tensor, from whatever pieces hold them."""
    source = catalogue.tensors[name]
    view = OutputTensor(name, (stop - first,) + source.shape[1:], source.dtype, [SourceRows(name, (), first, stop)])
    blocks = [assemble(b, lambda k, p, lead, lo, hi: reader.read_rows(p, lead, lo, hi)) for b in bands(view, catalogue)]
    return torch.cat(blocks) if len(blocks) > 1 else blocks[0]


def fold_lora(block: torch.Tensor, lora: LoraDelta, first: int, stop: int, catalogue: Catalogue,
              reader: PieceReader, cache: dict) -> torch.Tensor:
    """Rows [first, stop) of W + scale * B @ A, computed in fp32 (cast to the output dtype later).
    The writer reads the small factors itself: A once per tensor, B a band of rows at a time."""
    if lora.a not in cache:
        cache.clear()
        cache[lora.a] = read_source_rows(catalogue, lora.a, 0, catalogue.tensors[lora.a].shape[0], reader).float()
    b_rows = read_source_rows(catalogue, lora.b, first, stop, reader).float()
    return block.float() + (b_rows @ cache[lora.a]) * lora.scale


def schedule(plan: Plan) -> list[tuple[OutputFile, Segment, FileEntry]]:
    """All ranks' work in one global order, interleaved so that every rank's k-th tensor comes
    around the same point: ranks write in parallel and sends never wait on a rank far behind."""
    per_rank = [[(f, seg, e) for f, seg in plan.segments_of(r) for e in f.entries[seg.first:seg.stop]]
                for r in range(plan.world_size)]
    order = []
    for k in range(max((len(w) for w in per_rank), default=0)):
        order.extend(work[k] for work in per_rank if k < len(work))
    return order


class RankRunner:
    def __init__(self, plan: Plan, catalogue: Catalogue, staging: str, runtime: Runtime, progress,
                 skip: set[str] = frozenset(), fsync: bool = False):
        self.plan, self.catalogue, self.staging, self.fsync = plan, catalogue, staging, fsync
        self.skip = skip  # segments a --resume kept: no rank reads, sends or writes their pieces
        self.rt = runtime
        self.progress = progress
        self.reader = PieceReader()
        self.timers = Timers()
        self.writers: dict[str, SafetensorsWriter] = {}
        self.remaining = {plan.segment_name(f, seg): seg.stop - seg.first for f, seg in plan.segments_of(runtime.rank)}
        self.in_flight: collections.deque = collections.deque()
        self.in_flight_bytes = 0
        self.written = 0
        # write-behind: one thread writes band k while this thread reads and casts band k+1
        # (pread/pwrite release the GIL); at most WRITES_IN_FLIGHT bands wait, which bounds memory
        self.write_pool = ThreadPoolExecutor(1, thread_name_prefix="distmerge-write")
        self.pending_writes: collections.deque = collections.deque()
        self.closed: list[str] = []   # the segments this rank wrote, in the order it finished them
        self.hashes: dict[str, str] = {}
        self.lora_a: dict[str, torch.Tensor] = {}  # the current tensor's lora_A (small: r x in)

    def run(self) -> dict:
        collective = self.plan.transport == "collective" and self.rt.world_size > 1
        tag = 0  # every (band, part) has a tag, numbered identically on all ranks
        try:
            for out_file, seg, entry in schedule(self.plan):
                unit = self.plan.segment_name(out_file, seg)
                if unit in self.skip:
                    tag += sum(len(band.reads) for band in bands(entry.tensor, self.catalogue))
                    continue
                owner = seg.rank
                writer = self._writer(out_file, seg, unit) if owner == self.rt.rank else None
                for band in bands(entry.tensor, self.catalogue):
                    if writer is not None:
                        self._produce(writer, entry, band, tag if collective else None)
                    elif collective:
                        self._send_parts(band, owner, tag)
                    tag += len(band.reads)
                if writer is not None and not entry.tensor.parts:  # zeros (small: a bias)
                    self._write(writer, entry.begin, torch.zeros(entry.tensor.shape, dtype=entry.tensor.dtype))
                if owner == self.rt.rank:
                    self._entry_done(seg, unit)
            self._drain(0)
            self._wait_writes(0)
        finally:
            self.write_pool.shutdown(wait=True)  # before the reader closes the files it copies from
            self.reader.close()
        peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
        return {"bytes": self.written, "files": self.closed, "hashes": self.hashes,
                "seconds": dict(self.timers.seconds), "peak_rss_mb": round(peak_rss_mb, 1)}

    # ---- the owner's side
    def _writer(self, out_file: OutputFile, seg: Segment, unit: str) -> SafetensorsWriter:
        if unit not in self.writers:
            self.writers[unit] = SafetensorsWriter(os.path.join(self.staging, out_file.name), out_file, seg, self.fsync)
        return self.writers[unit]

    def _produce(self, writer: SafetensorsWriter, entry: FileEntry, band: Band, tag: int | None) -> None:
        """Make one band of an output tensor from its reads and hand it to the writer."""
        out = entry.tensor
        row_bytes = math.prod(out.shape[1:]) * dtype_size(out.dtype)

        def get(k, piece, lead, lo, hi):
            return self._get(piece, lead, lo, hi, None if tag is None else tag + k)

        run = self._byte_run(entry, band, tag)
        if run is not None:  # bytes go out as they are stored: file to file, in the writer thread
            path, offset, nbytes = run
            begin = entry.begin + band.first * row_bytes
            self._submit(writer, begin, nbytes, None, self._timed_copy, writer, begin, self.reader.fd(path), path,
                         offset, nbytes)
            return
        block = assemble(band, get, self.timers.phase)
        if out.lora is not None:
            with self.timers.phase("lora"):
                block = fold_lora(block, out.lora, band.first, band.stop, self.catalogue, self.reader, self.lora_a)
        self._write(writer, entry.begin + band.first * row_bytes, self._cast(block, out.dtype))

    def _byte_run(self, entry: FileEntry, band: Band, tag: int | None) -> tuple[str, int, int] | None:
        """(source file, byte offset, byte count) when the band's output bytes are one run of a
        file this rank reads: one read of whole rows, no cast, no LoRA fold."""
        read, out = whole_block(band), entry.tensor
        if read is None or out.lora is not None or band.source.dtype != out.dtype:
            return None
        i, lead, lo, hi = read
        piece = band.source.pieces[i]
        if tag is not None and self.plan.readers.get(piece.file, self.rt.rank) != self.rt.rank:
            return None
        run = self.reader.byte_run(piece, lead, lo, hi)
        return None if run is None else (piece.file, *run)

    def _entry_done(self, seg: Segment, unit: str) -> None:
        self.remaining[unit] -= 1
        if self.remaining[unit] == 0:
            self._wait_writes(0)
            with self.timers.phase("close"):
                digest = self.hashes[unit] = self.writers.pop(unit).close()
                record_done(self.staging, unit, seg.start, seg.end, digest)
            self.closed.append(unit)

    def _get(self, piece: Piece, lead: tuple[int, ...], first: int, stop: int, tag: int | None) -> torch.Tensor:
        reader_rank = self.plan.readers.get(piece.file, self.rt.rank)
        if tag is None or reader_rank == self.rt.rank:
            with self.timers.phase("read"):
                return self.reader.read_rows(piece, lead, first, stop)
        shape = (stop - first,) + piece.shape[len(lead) + 1:] if piece.shape else ()
        with self.timers.phase("exchange"):
            buf = torch.empty(math.prod(shape) * dtype_size(piece.dtype), dtype=torch.uint8, device=self.rt.device)
            dist.recv(buf, src=reader_rank, tag=tag)
            return buf.cpu().view(piece.dtype).view(shape)

    def _cast(self, tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if tensor.dtype == dtype:
            return tensor
        with self.timers.phase("cast"):
            return tensor.to(dtype)

    def _write(self, writer: SafetensorsWriter, begin: int, tensor: torch.Tensor) -> None:
        data = as_bytes(tensor)
        self._submit(writer, begin, len(data), data, self._timed_write, writer, begin, data)

    def _submit(self, writer: SafetensorsWriter, begin: int, nbytes: int, data, job, *args) -> None:
        """Hand a job to the writer thread, once fewer than WRITES_IN_FLIGHT wait there; the bytes
        it writes (`data`, or None: read back from the file) are hashed when it is done."""
        self._wait_writes(WRITES_IN_FLIGHT - 1)
        self.pending_writes.append((self.write_pool.submit(job, *args), writer, begin, nbytes, data))

    def _timed_write(self, writer: SafetensorsWriter, begin: int, data: memoryview) -> None:
        start = time.perf_counter()
        writer.write(begin, data)
        self.timers.seconds["write"] += time.perf_counter() - start  # only this thread adds "write"

    def _timed_copy(self, writer: SafetensorsWriter, begin: int, fd: int, path: str, offset: int, nbytes: int) -> None:
        start = time.perf_counter()
        writer.copy_from(begin, fd, path, offset, nbytes)
        drop_cached(fd, offset, nbytes)
        self.timers.seconds["copy"] += time.perf_counter() - start  # only this thread adds "copy"

    def _wait_writes(self, limit: int) -> None:
        """Wait for the oldest writes until at most `limit` are pending (re-raising their errors),
        and hash what they wrote: here, in the order they were handed over."""
        while len(self.pending_writes) > limit:
            done, writer, begin, nbytes, data = self.pending_writes.popleft()
            with self.timers.phase("wait-write"):
                done.result()
            with self.timers.phase("hash"):
                writer.hash_written(begin, nbytes, data)
            self.written += nbytes
            self.progress(nbytes)

    # ---- the reader's side (collective transport)
    def _send_parts(self, band: Band, owner: int, tag: int) -> None:
        for k, (i, lead, lo, hi) in enumerate(band.reads):
            p = band.source.pieces[i]
            if self.plan.readers.get(p.file) != self.rt.rank:
                continue
            with self.timers.phase("read"):
                block = self.reader.read_rows(p, lead, lo, hi)
            with self.timers.phase("exchange"):
                data = block.reshape(-1).view(torch.uint8).to(self.rt.device)
                self._drain(SEND_WINDOW_BYTES - data.numel())
                self.in_flight.append((dist.isend(data, dst=owner, tag=tag + k), data))
                self.in_flight_bytes += data.numel()

    def _drain(self, limit: int) -> None:
        """Wait for the oldest sends until at most `limit` bytes are in flight."""
        while self.in_flight and self.in_flight_bytes > max(limit, 0):
            work, data = self.in_flight.popleft()
            with self.timers.phase("exchange"):
                work.wait()
            self.in_flight_bytes -= data.numel()

"""The rank engine of the run stage: each rank walks its part of the plan, gets the pieces of each
of its tensors and writes them into its files.

Two transports move the pieces:
- direct: the rank that writes a tensor preads its pieces straight from the (shared) filesystem;
- collective: each source file is read by one rank, which sends each piece to the rank that
  writes it (gloo on CPU, NCCL with CUDA tensors).
A band whose bytes lie in a source file exactly as they go out is copied file to file by the
kernel (writer.py). Other bands are made by the band producer (reader.py) and written by a
writer thread, so a rank holds at most a few bands at once, never a whole tensor, file or model.
"""
from __future__ import annotations

import collections
import math
import os
import resource
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np

from . import values
from .bands import Band, Read, bands, whole_block
from .batch import SMALL_TENSOR_BYTES, Batch, ByteRun, stored_runs
from .dtypes import DType
from .integrity import record_done
from .model import Catalogue, FileEntry, OutputFile, Piece, Plan, Segment, dtype_size
from .reader import BandProducer, Block, PieceReader, drop_cached
from .runtime import Runtime
from .writer import SafetensorsWriter

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



def peak_rss_mb() -> float:
    """This process's peak resident set, MiB: VmHWM, the high-water mark of its own memory. Not
    ru_maxrss: Linux keeps in it the RSS of the process that started this one (exec keeps the
    larger), so a merge launched by a large process (a test runner that loaded a model) reported
    that process's size."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # elsewhere: KiB on Linux, the best there is


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
    """One rank's run: its segments written, the collective transport's sends served."""

    def __init__(self, plan: Plan, catalogue: Catalogue, staging: str, runtime: Runtime, progress,
                 skip: set[str] = frozenset(), fsync: bool = False):
        self.plan, self.catalogue, self.staging, self.fsync = plan, catalogue, staging, fsync
        self.skip = skip  # segments a --resume kept: no rank reads, sends or writes their pieces
        self.rt = runtime
        self.progress = progress
        self.reader = PieceReader()
        self.producer = BandProducer(catalogue, self.reader)
        self.timers = Timers()
        self.writers: dict[str, SafetensorsWriter] = {}
        self.remaining = {plan.segment_name(f, seg): seg.stop - seg.first
                          for f, seg in plan.segments_of(runtime.rank)}
        self.in_flight: collections.deque = collections.deque()
        self.in_flight_bytes = 0
        self.written = 0
        # write-behind: one thread writes band k while this thread reads and casts band k+1
        # (pread/pwrite release the GIL); at most WRITES_IN_FLIGHT bands wait, which bounds memory
        self.write_pool = ThreadPoolExecutor(1, thread_name_prefix="distmerge-write")
        self.pending_writes: collections.deque = collections.deque()
        self.closed: list[str] = []   # the segments this rank wrote, in the order it finished them
        self.hashes: dict[str, str] = {}
        self.batch = Batch()  # small tensors gathered for one read-write-hash (batch.py)

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
                if writer is not None and not collective and self._batched(writer, entry):
                    self._entry_done(seg, unit)
                    continue
                if writer is not None:
                    self._flush()
                for band in bands(entry.tensor, self.catalogue):
                    if writer is not None:
                        self._produce(writer, entry, band, tag if collective else None)
                    elif collective:
                        self._send_parts(band, owner, tag)
                    tag += len(band.reads)
                if writer is not None and not entry.tensor.parts:  # zeros (small: a bias)
                    self._write(writer, entry.begin, values.zeros(entry.tensor.shape, entry.tensor.dtype))
                if owner == self.rt.rank:
                    self._entry_done(seg, unit)
            self._flush()
            self._drain(0)
            self._wait_writes(0)
        finally:
            self.write_pool.shutdown(wait=True)  # before the reader closes the files it copies from
            self.reader.close()
        return {"bytes": self.written, "files": self.closed, "hashes": self.hashes,
                "seconds": dict(self.timers.seconds), "peak_rss_mb": round(peak_rss_mb(), 1)}

    # ---- the owner's side
    def _writer(self, out_file: OutputFile, seg: Segment, unit: str) -> SafetensorsWriter:
        if unit not in self.writers:
            path = os.path.join(self.staging, out_file.name)
            self.writers[unit] = SafetensorsWriter(path, out_file, seg, self.fsync)
        return self.writers[unit]

    def _produce(self, writer: SafetensorsWriter, entry: FileEntry, band: Band, tag: int | None) -> None:
        """Make one band of an output tensor from its reads and hand it to the writer."""
        out = entry.tensor
        row_bytes = math.prod(out.shape[1:]) * dtype_size(out.dtype)

        def get(k, piece, read):
            return self._get(piece, read, None if tag is None else tag + k)

        run = self._byte_run(entry, band, tag)
        if run is not None:  # bytes go out as they are stored: file to file, in the writer thread
            path, offset, nbytes = run
            begin = entry.begin + band.first * row_bytes
            self._submit(writer, begin, nbytes, None, self._timed_copy, writer, begin, self.reader.fd(path), path,
                         offset, nbytes)
            return
        block = self.producer.produce(out, band, get, self.timers.phase)
        self._write(writer, entry.begin + band.first * row_bytes, self._cast(block, out.dtype))

    def _batched(self, writer: SafetensorsWriter, entry: FileEntry) -> bool:
        """Add a small tensor stored as it goes out to the batch (batch.py); False when it is
        large or needs a cast, a fold or a gather (then it goes band by band)."""
        out = entry.tensor
        if out.nbytes > SMALL_TENSOR_BYTES or out.lora is not None or any(
                part.order or self.catalogue.tensors[part.source].dtype != out.dtype for part in out.parts):
            return False
        runs = stored_runs(out, self.catalogue, entry.begin)
        if runs is None:
            runs, row_bytes = [], math.prod(out.shape[1:]) * dtype_size(out.dtype)
            for band in bands(out, self.catalogue):
                run = self._byte_run(entry, band, None)
                if run is None:
                    return False
                runs.append(ByteRun(entry.begin + band.first * row_bytes, *run))
        if not self.batch.fits(writer, entry.begin, entry.end):
            self._flush()
        self.batch.add(writer, entry.begin, entry.end, runs)
        return True

    def _flush(self) -> None:
        """Read, write and hash the batch of small tensors gathered so far."""
        batch, self.batch = self.batch, Batch()
        if batch.writer is None:
            return
        with self.timers.phase("read"):
            data = batch.fill(self.reader)
        self._submit(batch.writer, batch.begin, len(data), data, self._timed_write, batch.writer, batch.begin, data)

    def _byte_run(self, entry: FileEntry, band: Band, tag: int | None) -> tuple[str, int, int] | None:
        """(source file, byte offset, byte count) when the band's output bytes are one run of a
        file this rank reads: one read of whole rows, no cast, no LoRA fold."""
        read, out = whole_block(band), entry.tensor
        if read is None or out.lora is not None or band.source.dtype != out.dtype:
            return None
        piece = band.source.pieces[read.piece]
        if tag is not None and self.plan.readers.get(piece.file, self.rt.rank) != self.rt.rank:
            return None
        run = self.reader.byte_run(piece, read.lead, read.first, read.stop)
        return None if run is None else (piece.file, *run)

    def _entry_done(self, seg: Segment, unit: str) -> None:
        self.remaining[unit] -= 1
        if self.remaining[unit] == 0:
            self._flush()
            self._wait_writes(0)
            with self.timers.phase("close"):
                digest = self.hashes[unit] = self.writers.pop(unit).close()
                record_done(self.staging, unit, seg.start, seg.end, digest)
            self.closed.append(unit)

    def _get(self, piece: Piece, read: Read, tag: int | None) -> np.ndarray:
        """A read's block: pread here, or received from the rank that reads its file."""
        reader_rank = self.plan.readers.get(piece.file, self.rt.rank)
        if tag is None or reader_rank == self.rt.rank:
            with self.timers.phase("read"):
                return self.reader.read(piece, read)
        import torch.distributed as dist

        shape = (read.stop - read.first,) + piece.shape[len(read.lead) + 1:] if piece.shape else ()
        with self.timers.phase("exchange"):
            torch = values.torch()
            buf = torch.empty(math.prod(shape) * dtype_size(piece.dtype), dtype=torch.uint8, device=self.rt.device)
            dist.recv(buf, src=reader_rank, tag=tag)
            return values.from_buffer(buf.cpu().numpy(), piece.dtype).reshape(shape)

    def _cast(self, block: Block, dtype: DType) -> np.ndarray:
        if block.dtype == dtype:
            return block.values
        with self.timers.phase("cast"):
            return values.cast(block.values, block.dtype, dtype)

    def _write(self, writer: SafetensorsWriter, begin: int, vals: np.ndarray) -> None:
        data = values.as_bytes(vals)
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

    def _timed_copy(self, writer: SafetensorsWriter, begin: int, fd: int, path: str, offset: int,
                    nbytes: int) -> None:
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
        import torch.distributed as dist

        for k, read in enumerate(band.reads):
            p = band.source.pieces[read.piece]
            if self.plan.readers.get(p.file) != self.rt.rank:
                continue
            with self.timers.phase("read"):
                block = self.reader.read(p, read)
            with self.timers.phase("exchange"):
                data = values.torch().from_numpy(values.byte_array(block)).to(self.rt.device)
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

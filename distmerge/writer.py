"""A streaming safetensors writer: the header comes from the plan, tensor bytes go to known offsets.

Bytes can arrive in any order (a tensor piece by piece), so a rank never holds a whole file.
The content hash of each segment is computed on the way when bytes arrive in order (they do in
the run stage); otherwise the range is read back once at close.
"""
from __future__ import annotations

import errno
import os

import torch

from .errors import MergeIOError
from .integrity import hash_range, new_hash
from .model import OutputFile, Segment

IO_CHUNK = 8 * 2**20  # bytes per pwrite call: one huge call is several times slower than 8 MiB ones


def as_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a CPU tensor, without a copy when it is contiguous."""
    flat = tensor.contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


class SafetensorsWriter:
    """Writes one segment of a file: bytes [segment.start, segment.end), the header too for segment
    0. Several ranks may write one file, each its own range; nobody truncates it (the staging
    directory starts without it, and a resumed run rewrites the same ranges)."""

    def __init__(self, path: str, plan_file: OutputFile, segment: Segment, fsync: bool = False):
        self.path, self.fsync = path, fsync
        self.segment = segment
        self.data_start = len(plan_file.header)
        self.hash, self.hashed_to = new_hash(), segment.start   # bytes [start, hashed_to) are in self.hash
        self.written = 0
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            self.fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
            if segment.index == 0:
                self._pwrite(memoryview(plan_file.header), 0)
        except OSError as e:
            raise _io_error(path, e) from None

    def write(self, begin: int, tensor: torch.Tensor) -> int:
        """Write a tensor's bytes at data offset `begin` (relative to the end of the header)."""
        data = as_bytes(tensor)
        try:
            self._pwrite(data, self.data_start + begin)
        except OSError as e:
            raise _io_error(self.path, e) from None
        return len(data)

    def _pwrite(self, data: memoryview, offset: int) -> None:
        data = data.cast("B")
        if self.hash is not None:
            if offset == self.hashed_to:
                self.hash.update(data)
                self.hashed_to += len(data)
            else:
                self.hash = None  # out of order: hash the range at close
        self.written += len(data)
        while len(data):
            n = os.pwrite(self.fd, data[:IO_CHUNK], offset)
            data, offset = data[n:], offset + n

    def close(self) -> str:
        """Check that the whole range was written and return its content hash."""
        seg = self.segment
        try:
            if self.written != seg.end - seg.start:
                raise MergeIOError(f"{self.path}: bytes {seg.start}..{seg.end} got {self.written} bytes written, "
                                   f"not {seg.end - seg.start}; a write was lost")
            if self.fsync:  # --fsync: the bytes are on disk before the segment counts as done
                os.fsync(self.fd)
        except OSError as e:
            raise _io_error(self.path, e) from None
        finally:
            os.close(self.fd)
        if self.hash is not None and self.hashed_to == seg.end:
            return self.hash.hexdigest()
        return hash_range(self.path, seg.start, seg.end)


def _io_error(path: str, e: OSError) -> MergeIOError:
    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return MergeIOError(f"cannot write {path}: {e.strerror}. Free space on the target's filesystem "
                            "(or choose another --target) and rerun")
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return MergeIOError(f"cannot write {path}: {e.strerror}. Choose a --target you may write to")
    return MergeIOError(f"cannot write {path}: {e}")

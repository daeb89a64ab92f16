"""A streaming safetensors writer: the header comes from the plan, tensor bytes go to known offsets.

Bytes can arrive in any order (a tensor piece by piece), so a rank never holds a whole file.
The content hash of each segment is computed on the way when bytes arrive in order (they do in
the run stage); otherwise the range is read back once at close. Writing and hashing are apart:
the run stage's writer thread moves bytes, its main thread hashes each write once it is done,
in order (the write side is the bottleneck, so it does nothing else).

Bytes that lie in a source file exactly as they go out (no cast, row blocks stored whole) are
copied file to file by the kernel (copy_file_range): one copy instead of pread's and pwrite's
two, and no buffer to fault in (docs/performance.md has the measurements).
"""
from __future__ import annotations

import errno
import logging
import mmap
import os

from .errors import MergeIOError, truncated_source
from .integrity import hash_range, new_hash
from .model import OutputFile, Segment
from .reader import IO_CHUNK, pread_exactly

HASH_MAP_BYTES = 64 * 2**20  # copied bytes are hashed through read-only maps of at most this much
# copy_file_range's answers for "not between these two files": copy through a buffer instead
KERNEL_COPY_REFUSED = {errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ETXTBSY}

log = logging.getLogger("distmerge")


class SafetensorsWriter:
    """Writes one segment of a file: bytes [segment.start, segment.end), the header too for segment
    0. Several ranks may write one file, each its own range; nobody truncates it (the staging
    directory starts without it, and a resumed run rewrites the same ranges)."""

    kernel_copy = hasattr(os, "copy_file_range")  # for the process: off after the kernel's first refusal

    def __init__(self, path: str, plan_file: OutputFile, segment: Segment, fsync: bool = False):
        self.path, self.fsync = path, fsync
        self.segment = segment
        self.data_start = len(plan_file.header)
        self.hash, self.hashed_to = new_hash(), segment.start   # bytes [start, hashed_to) are in self.hash
        self.written = 0
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # read: to hash copied bytes
            if segment.index == 0:
                self._pwrite(memoryview(plan_file.header), 0)
                self._hash(0, memoryview(plan_file.header))
        except OSError as e:
            raise _io_error(path, e) from None

    def write(self, begin: int, data: memoryview) -> None:
        """Write bytes at data offset `begin` (relative to the end of the header)."""
        try:
            self._pwrite(data, self.data_start + begin)
        except OSError as e:
            raise _io_error(self.path, e) from None

    def hash_written(self, begin: int, nbytes: int, data: memoryview | None = None) -> None:
        """Add bytes written at data offset `begin` to the segment's hash: `data` where the caller
        still holds them, else read through a read-only map of the file (no copy). Call in the
        order of the writes; out of order, the range is hashed at close instead."""
        offset = self.data_start + begin
        if data is not None:
            self._hash(offset, data)
            return
        end = offset + nbytes
        while offset < end and self.hash is not None:
            base = offset - offset % mmap.ALLOCATIONGRANULARITY
            length = min(end, base + HASH_MAP_BYTES) - base
            try:
                mapped = mmap.mmap(self.fd, length, prot=mmap.PROT_READ, offset=base)
            except OSError:  # a filesystem without mmap: the range is read back at close
                self.hash = None
                return
            with mapped, memoryview(mapped) as view:
                self._hash(offset, view[offset - base:])
            offset = base + length

    def _hash(self, offset: int, data: memoryview) -> None:
        if self.hash is not None and offset == self.hashed_to:
            self.hash.update(data)
            self.hashed_to += len(data)
        else:
            self.hash = None  # out of order: hash the range at close

    def copy_from(self, begin: int, src_fd: int, src_path: str, src_offset: int, nbytes: int) -> None:
        """Copy `nbytes` of a source file from `src_offset` to data offset `begin`: in the kernel
        where it can, else through a buffer."""
        offset, done = self.data_start + begin, 0  # (hash_written hashes them where they landed)
        try:
            if SafetensorsWriter.kernel_copy:
                done = self._kernel_copy(src_fd, src_path, src_offset, offset, nbytes)
                self.written += done
            buffer = memoryview(bytearray(min(IO_CHUNK, nbytes - done))) if done < nbytes else None
            while done < nbytes:
                chunk = buffer[:nbytes - done]
                pread_exactly(src_fd, src_path, chunk, src_offset + done, src_offset + nbytes)
                self._pwrite(chunk, offset + done)
                done += len(chunk)
        except OSError as e:
            raise _io_error(self.path, e) from None

    def _kernel_copy(self, src_fd: int, src_path: str, src_offset: int, offset: int, nbytes: int) -> int:
        """Bytes copied by copy_file_range: all of them, or fewer where the kernel refused (then
        every later copy of this process goes through a buffer)."""
        done = 0
        while done < nbytes:
            try:
                n = os.copy_file_range(src_fd, self.fd, nbytes - done, src_offset + done, offset + done)
            except OSError as e:
                if e.errno not in KERNEL_COPY_REFUSED:
                    raise
                return self._refused(src_path, e.strerror, done)
            if n == 0:  # the source's end, or a kernel or filesystem that copied nothing
                if os.fstat(src_fd).st_size < src_offset + nbytes:
                    raise truncated_source(src_path, src_offset + done, src_offset + nbytes)
                return self._refused(src_path, "it copied 0 bytes", done)
            done += n
        return done

    def _refused(self, src_path: str, why: str, done: int) -> int:
        SafetensorsWriter.kernel_copy = False
        log.info("copy_file_range from %s to %s refused (%s); copying through a buffer",
                 src_path, self.path, why)
        return done

    def _pwrite(self, data: memoryview, offset: int) -> None:
        data = data.cast("B")
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

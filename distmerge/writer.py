"""A streaming safetensors writer: the header comes from the plan, tensor bytes go to known offsets.

Bytes can arrive in any order (a tensor piece by piece), so a rank never holds a whole file.
The file's content hash is computed on the way when bytes arrive in file order (they do in the
run stage); otherwise the file is read back once at close.
"""
from __future__ import annotations

import errno
import os

import torch

from .errors import MergeIOError
from .integrity import hash_file, new_hash
from .model import OutputFile

IO_CHUNK = 8 * 2**20  # bytes per pwrite call: one huge call is several times slower than 8 MiB ones


def as_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a CPU tensor, without a copy when it is contiguous."""
    flat = tensor.contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


class SafetensorsWriter:
    def __init__(self, path: str, plan_file: OutputFile):
        self.path = path
        self.plan_file = plan_file
        self.data_start = len(plan_file.header)
        self.hash, self.hashed_to = new_hash(), 0   # bytes [0, hashed_to) are in self.hash
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
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
                self.hash = None  # out of order: hash the file at close
        while len(data):
            n = os.pwrite(self.fd, data[:IO_CHUNK], offset)
            data, offset = data[n:], offset + n

    def close(self) -> str:
        """Check the size and return the file's content hash."""
        try:
            size = os.fstat(self.fd).st_size
            if size != self.plan_file.size:
                raise MergeIOError(f"{self.path} has {size} bytes, the plan says {self.plan_file.size}; "
                                   "a write was lost")
        finally:
            os.close(self.fd)
        if self.hash is not None and self.hashed_to == size:
            return self.hash.hexdigest()
        return hash_file(self.path)


def _io_error(path: str, e: OSError) -> MergeIOError:
    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return MergeIOError(f"cannot write {path}: {e.strerror}. Free space on the target's filesystem "
                            "(or choose another --target) and rerun")
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return MergeIOError(f"cannot write {path}: {e.strerror}. Choose a --target you may write to")
    return MergeIOError(f"cannot write {path}: {e}")

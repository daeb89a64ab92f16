"""Tensor values in the run stage: numpy arrays of raw unsigned elements, each element's bytes as
stored and never interpreted. Reading, assembling, reordering and writing rows need nothing more,
so a merge that only moves bytes never imports torch (about a second of start-up). torch comes in
to compute on values: a cast, a LoRA fold, and the collective transport's sends.
"""
from __future__ import annotations

import numpy as np

from .dtypes import DType, raw_numpy

_threads = {"wanted": None, "before": None}  # intra-op threads for torch's casts (runtime.intra_op_threads)


def empty(shape: tuple[int, ...], dtype: DType) -> np.ndarray:
    return np.empty(shape, raw_numpy(dtype.itemsize))


def zeros(shape: tuple[int, ...], dtype: DType) -> np.ndarray:
    """All-zero bytes: zero in every dtype distmerge writes."""
    return np.zeros(shape, raw_numpy(dtype.itemsize))


def from_buffer(buf: np.ndarray, dtype: DType) -> np.ndarray:
    """A uint8 buffer seen as flat raw elements (no copy)."""
    return buf.view(raw_numpy(dtype.itemsize))


def torch():
    """torch, imported on first use, with the intra-op thread count the run stage asked for."""
    import torch as _torch
    if _threads["wanted"] and _threads["before"] is None:
        _threads["before"] = _torch.get_num_threads()
        _torch.set_num_threads(_threads["wanted"])
    return _torch


def set_threads(wanted: int | None) -> None:
    """torch's intra-op threads while computing (None: leave torch's, and restore what was changed)."""
    _threads["wanted"] = wanted
    if wanted is None and _threads["before"] is not None:
        torch().set_num_threads(_threads["before"])
        _threads["before"] = None


def to_torch(values: np.ndarray, dtype: DType):
    """The same bytes as a torch tensor of `dtype` (no copy when contiguous)."""
    return torch().from_numpy(byte_array(values)).view(dtype.torch).view(values.shape)


def from_torch(tensor) -> np.ndarray:
    """A CPU tensor's bytes as raw elements (no copy when contiguous)."""
    t = torch()
    flat = tensor.contiguous().reshape(-1).view(t.uint8).numpy()
    return flat.view(raw_numpy(tensor.element_size())).reshape(tuple(tensor.shape))


def cast(values: np.ndarray, source: DType, target: DType) -> np.ndarray:
    """The values converted from `source` to `target` by torch (round to nearest even, as .to() does)."""
    if source == target:
        return values
    return from_torch(to_torch(values, source).to(target.torch))


def byte_array(values: np.ndarray) -> np.ndarray:
    """The raw little-endian bytes as a flat uint8 array, without a copy when the array is contiguous."""
    return np.ascontiguousarray(values).reshape(-1).view(np.uint8)


def as_bytes(values: np.ndarray) -> memoryview:
    return memoryview(byte_array(values))

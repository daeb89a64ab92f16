"""Reading a safetensors header ourselves, so that every defect gets a message naming the file:
`verify` reads the files a merge wrote, `sources/hf_base.py` the `--base` model a LoRA-only
checkpoint is folded into. A header is 8 bytes of little-endian length, then a JSON object:
dtype, shape and data_offsets per tensor, and an optional `__metadata__` of strings.
"""
from __future__ import annotations

import json
import os
import struct

from .dtypes import BY_SAFETENSORS as DTYPES  # safetensors' dtype name -> DType
MAX_HEADER_BYTES = 100 * 2**20


def read_json_object(f, limit: int) -> dict:
    """A JSON object from an open binary file of at most `limit` bytes (no more is read); ValueError
    says what is wrong. An index names files: the size limit and the type are checked before any use."""
    text = f.read(limit + 1)
    if len(text) > limit:
        raise ValueError(f"it is larger than {limit} bytes")
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise ValueError(f"it is not valid JSON ({type(e).__name__})") from None
    if not isinstance(value, dict):
        raise ValueError("it is not a JSON object")
    return value


def read_header(path: str) -> tuple[dict, int]:
    """The header of a safetensors file and where its data starts; ValueError says what is wrong."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError(f"{path} is {size} bytes, too short for a safetensors header")
            n = struct.unpack("<Q", head)[0]
            if n > size - 8 or n > MAX_HEADER_BYTES:
                raise ValueError(f"{path}: header length {n} does not fit in the file ({size} bytes)")
            header = json.loads(f.read(n))
    except OSError as e:
        raise ValueError(f"{path} cannot be read ({e.strerror})") from None
    except (ValueError, RecursionError) as e:
        if str(e).startswith(path):
            raise
        raise ValueError(f"{path}: the header is not valid JSON ({type(e).__name__})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: the header is not a JSON object")
    meta = header.pop("__metadata__", None)
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise ValueError(f"{path}: __metadata__ is not an object of strings")
    return header, 8 + n


def count(v) -> bool:
    """A non-negative int (not a bool): a size, an offset."""
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def entry_problem(info) -> str | None:
    """What is wrong with the types of one header entry, or None: dtype a known name, shape a list of
    counts, data_offsets two counts in order."""
    if not isinstance(info, dict):
        return f"is {json.dumps(info)[:60]}, not an object"
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        return f"has dtype {json.dumps(dtype)[:40]}, not one of {', '.join(sorted(DTYPES))}"
    if not (isinstance(shape, list) and len(shape) <= 64 and all(count(n) for n in shape)):
        return f"has shape {json.dumps(shape)[:60]}, not a list of sizes"
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(count(n) for n in offsets)
            and offsets[0] <= offsets[1]):
        return f"has data_offsets {json.dumps(offsets)[:60]}, not [begin, end]"
    return None

"""Stage 3, plan: output tensors -> files with known headers, an owner rank per file, a reader per source file.

The plan is plain data, made from metadata alone on the reader rank (rank 0), which sends every
other rank its share (scatter.py); `distmerge inspect` prints it without moving a byte.
"""
from __future__ import annotations

import json
import re
import struct
from collections import Counter

from .errors import MergeError
from .model import Catalogue, FileEntry, OutputFile, OutputTensor, Plan, Segment

UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
         "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str | int) -> int:
    """'5GB' -> 5e9 (decimal, as transformers), '500MiB' -> binary, '1000' -> bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)?\s*", text.upper())
    if not m:
        raise MergeError(f"cannot read size {text!r}; use e.g. 5GB, 500MB, 2GiB or a number of bytes")
    size = int(float(m.group(1)) * UNITS[m.group(2) or ""])
    if size <= 0:
        raise MergeError(f"size {text!r} must be positive")
    return size


def safetensors_header(entries: list[FileEntry]) -> bytes:
    """8-byte little-endian length + JSON header padded with spaces to a multiple of 8."""
    header = {"__metadata__": {"format": "pt"}}
    for e in entries:
        header[e.tensor.name] = {"dtype": e.tensor.dtype.safetensors, "shape": list(e.tensor.shape),
                                 "data_offsets": [e.begin, e.end]}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def group_into_files(outputs: list[OutputTensor], max_shard_size: int) -> list[list[OutputTensor]]:
    """Cut the ordered tensors into files of at most max_shard_size bytes; a larger tensor gets its own file."""
    groups, current, size = [], [], 0
    for t in outputs:
        if current and size + t.nbytes > max_shard_size:
            groups.append(current)
            current, size = [], 0
        current.append(t)
        size += t.nbytes
    if current:
        groups.append(current)
    return groups


def balance(weights: list[int], bins: int) -> list[int]:
    """Longest-processing-time assignment: heaviest item to the lightest bin. Returns a bin per item."""
    load = [0] * bins
    assignment = [0] * len(weights)
    for i in sorted(range(len(weights)), key=lambda i: (-weights[i], i)):
        b = min(range(bins), key=lambda b: (load[b], b))
        assignment[i] = b
        load[b] += weights[i]
    return assignment


def in_runs(weights: list[int], bins: int) -> list[int]:
    """Consecutive items to each bin, balanced by weight (the bin holding each item's midpoint).
    Segments given this way keep ranks in different files at the same time: filesystems lock a
    file for each buffered write, so two ranks writing one file take turns (bench/copy_speed.py)."""
    total = sum(weights) or 1
    assignment, before = [], 0
    for w in weights:
        assignment.append(min(bins - 1, (2 * before + w) * bins // (2 * total)))
        before += w
    return assignment


SEGMENT_BYTES = 256 * 2**20  # default --segment-size: a file is cut into runs of tensors of this size
SEGMENTS_PER_MODEL = 64       # ... or smaller, down to MIN_SEGMENT_BYTES, so a model has this many:
MIN_SEGMENT_BYTES = 4 * 2**20  # a model of a few hundred MB still gives every rank of a node a share


def segment_size(files: list[OutputFile], segment_bytes: int) -> int:
    """The size segments are cut to: --segment-size, or less where the model is small, so that it
    has about SEGMENTS_PER_MODEL of them to share out (two 256 MiB segments of a 370 MB model gave
    one rank 70% of the work). It depends on the model only, never on the rank count: a --resume
    with another rank count keeps the segments a crashed run finished."""
    total = sum(e.end - e.begin for f in files for e in f.entries)
    return min(segment_bytes, max(MIN_SEGMENT_BYTES, total // SEGMENTS_PER_MODEL))


def cut_segments(f: OutputFile, segment_bytes: int = SEGMENT_BYTES) -> list[Segment]:
    """Consecutive entries of at most segment_bytes (at least one tensor each); the first segment
    starts at byte 0 (the header), the last ends at the end of the file. Independent of the rank count."""
    header = len(f.header)
    segments, first, size = [], 0, 0
    for i, e in enumerate(f.entries):
        if i > first and size + (e.end - e.begin) > segment_bytes:
            segments.append((first, i))
            first, size = i, 0
        size += e.end - e.begin
    segments.append((first, len(f.entries)))
    return [Segment(file=f.name, index=k, rank=0, first=a, stop=b,
                    start=0 if k == 0 else header + f.entries[a].begin, end=header + f.entries[b - 1].end)
            for k, (a, b) in enumerate(segments)]


def make_plan(catalogue: Catalogue, outputs: list[OutputTensor], world_size: int,
              max_shard_size: int, transport: str, config_dtype=None,
              extra_files: dict[str, list[OutputTensor]] | None = None, segment_bytes: int = SEGMENT_BYTES) -> Plan:
    """extra_files: whole files beside the model (a LoRA adapter), written by the same run."""
    groups = group_into_files(outputs, max_shard_size)
    n = len(groups)
    names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    for name, tensors in (extra_files or {}).items():
        names.append(name)
        groups.append(tensors)
    outputs = [t for g in groups for t in g]
    files = []
    for name, group in zip(names, groups):
        entries, offset = [], 0
        for t in group:
            entries.append(FileEntry(t, offset, offset + t.nbytes))
            offset += t.nbytes
        files.append(OutputFile(name=name, entries=entries, header=safetensors_header(entries)))
    # the unit of work is a segment: a file, or a run of its tensors when it is large, so that every
    # rank has work even when there are fewer files than ranks; each rank gets a run of segments
    # of about equal bytes, so that ranks write different files where there are several
    segments = [cut_segments(f, segment_size(files, segment_bytes)) for f in files]
    flat = [seg for segs in segments for seg in segs]
    for seg, rank in zip(flat, in_runs([seg.end - seg.start for seg in flat], world_size)):
        seg.rank = rank
    for f, segs in zip(files, segments):
        f.segments = segs

    held = Counter()
    for name in set().union(*(t.sources for t in outputs)):  # LoRA factors are read by their writer
        pieces = catalogue.tensors[name].pieces
        if hasattr(pieces, "bytes_by_file"):  # a PieceTable (millions of chunks): summed in bulk
            held.update(pieces.bytes_by_file())
        else:
            for p in pieces:
                held[p.file] += p.nbytes
    sources = [f for f in catalogue.files if held[f]]
    readers = dict(zip(sources, balance([held[f] for f in sources], world_size)))

    if config_dtype is None:
        by_bytes = Counter()
        for t in outputs:
            if t.dtype.is_floating_point:
                by_bytes[t.dtype] += t.nbytes
        config_dtype = by_bytes.most_common(1)[0][0] if by_bytes else None
    return Plan(files=files, world_size=world_size, transport=transport, readers=readers, config_dtype=config_dtype)


def describe(plan: Plan) -> str:
    """A human-readable plan: which rank writes which file."""
    lines = [f"{len(plan.files)} output file(s), {plan.total_bytes / 1e9:.3f} GB, {plan.world_size} rank(s), "
             f"transport {plan.transport}"]
    for f in plan.files:
        for seg in f.segments:
            what = "" if len(f.segments) == 1 else f" segment {seg.index + 1}/{len(f.segments)}"
            lines.append(f"  rank {seg.rank}: {f.name}{what}  {seg.stop - seg.first} tensors  "
                         f"{(seg.end - seg.start) / 1e6:.1f} MB")
    return "\n".join(lines)

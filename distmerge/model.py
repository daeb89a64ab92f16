"""The plain data passed between the stages: detect -> map -> plan -> run -> finish.

Everything here is printable and picklable; no stage reaches back into an earlier stage's files.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .dtypes import DType
from .errors import MergeError


def dtype_size(dtype: DType) -> int:
    return dtype.itemsize


def dtype_str(dtype: DType) -> str:
    return dtype.name


@dataclass(frozen=True)
class Piece:
    """One stored block of a source tensor: where its bytes are and which region it covers."""

    file: str                 # source file path
    offset: int               # byte offset in the file of the block's first element
    shape: tuple[int, ...]    # the block's shape
    strides: tuple[int, ...]  # element strides of the block inside its stored record
    region: tuple[int, ...]   # offset of the block in the global tensor, per dim
    dtype: DType

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * dtype_size(self.dtype)

    @property
    def span_elements(self) -> int:
        """Elements between the first and one past the last stored element (covers strided blocks)."""
        if self.numel == 0:
            return 0
        return 1 + sum((n - 1) * s for n, s in zip(self.shape, self.strides))


@dataclass
class SourceTensor:
    name: str
    shape: tuple[int, ...]
    dtype: DType
    pieces: list[Piece]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * dtype_size(self.dtype)


@dataclass
class Catalogue:
    """What a source directory holds: every logical tensor and the pieces it is stored in."""

    format: str                         # the format's user-facing name, e.g. "verl-fsdp"
    source: str                         # the source directory
    files: list[str]                    # every data file that holds pieces
    tensors: dict[str, SourceTensor]    # in the order the source lists them
    hf_dir: str | None                  # config / tokenizer directory, if any
    world_size: int = 1
    mesh: str = ""                      # human description, e.g. "fsdp=2" or "ddp=2 x fsdp=2"
    notes: list[str] = field(default_factory=list)
    family: str = "hf"                  # the naming family arch/ maps from: hf, megatron, torchtitan
    partial: bool = False               # only some files' metadata was read (inspect's quick read)
    hf_skip: tuple[str, ...] = ()       # names in hf_dir that are the training job's (DeepSpeed's tags, latest)


@dataclass(frozen=True)
class SourceRows:
    """Rows [start, stop) of source[index]: `index` fixes the leading dims (a stacked layer, an
    expert), the next dim is the row dim. A 0-d source is one row with start=0, stop=1.

    A row gather (`order`, a permutation of range(P)) takes those rows in another order, the same
    in each block of P rows: output row r is source row start + r - r % P + order[r % P]. RoPE's
    q/k permutation is one: P is head_dim, each head's rows reordered alike. The rows stream in
    bands like any other part; none of them is held whole."""

    source: str
    index: tuple[int, ...] = ()
    start: int = 0
    stop: int = 0
    order: tuple[int, ...] = ()

    def __post_init__(self):
        period = len(self.order)
        if period and (sorted(self.order) != list(range(period)) or (self.stop - self.start) % period):
            raise MergeError(f"{self.source}: a row order must permute range(P) for a P that divides the "
                             f"{self.stop - self.start} rows taken; got P={period}")

    def source_rows(self, first: int, stop: int) -> np.ndarray:
        """The source rows that output rows [first, stop) of this part take (int64, in output order)."""
        rows = np.arange(first, stop, dtype=np.int64)
        if not self.order:
            return rows + self.start
        period = len(self.order)
        return self.start + rows - rows % period + np.array(self.order, dtype=np.int64)[rows % period]


@dataclass(frozen=True)
class LoraDelta:
    """A LoRA fold: the tensor's rows get scale * (B @ A)[rows] added, in fp32 (B: [out, r], A: [r, in])."""

    a: str
    b: str
    scale: float


@dataclass
class OutputTensor:
    """One tensor of the HF checkpoint and its recipe: the concatenation, along the first dim, of
    row ranges of source tensors (identity, a layer of a stacked tensor, a head group of a fused
    QKV, the gate half of a fused gate/up, the first vocab_size rows of a padded embedding), each
    optionally gathered in a row order (RoPE's per-head permutation).
    No parts means zeros: a bias the HF class has and the source model computes without."""

    name: str
    shape: tuple[int, ...]
    dtype: DType        # as written
    parts: list[SourceRows]
    lora: LoraDelta | None = None

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * dtype_size(self.dtype)

    @property
    def sources(self) -> set[str]:
        return {p.source for p in self.parts}


@dataclass
class FileEntry:
    tensor: OutputTensor
    begin: int                # data offsets relative to the end of the header (safetensors data_offsets)
    end: int


@dataclass
class Segment:
    """A run of consecutive entries of one file, written by one rank: the unit of work. A large
    file is cut into several (at tensor boundaries, the same for any rank count), so ranks share
    it, each pwriting its own byte range. Segment 0 starts at byte 0: its writer writes the header."""

    file: str
    index: int
    rank: int
    first: int                # entries [first, stop) of the file
    stop: int
    start: int                # bytes [start, end) of the file, header included in segment 0
    end: int


@dataclass
class OutputFile:
    name: str                 # e.g. model-00001-of-00003.safetensors, lora_adapter/adapter_model.safetensors
    entries: list[FileEntry]
    header: bytes             # the complete safetensors header, length prefix included
    segments: list[Segment] = field(default_factory=list)

    @property
    def data_bytes(self) -> int:
        return self.entries[-1].end if self.entries else 0

    @property
    def size(self) -> int:
        return len(self.header) + self.data_bytes

    @property
    def rank(self) -> int:
        """The rank that writes the header (segment 0)."""
        return self.segments[0].rank


@dataclass
class Plan:
    files: list[OutputFile]
    world_size: int
    transport: str                      # "collective" or "direct"
    readers: dict[str, int]             # source file -> rank that reads it (collective transport)
    config_dtype: DType | None    # the dtype config.json states

    @property
    def total_bytes(self) -> int:
        return sum(f.data_bytes for f in self.files)

    @property
    def model_files(self) -> list[OutputFile]:
        """The files of the model itself (the index lists them); others live in subdirectories."""
        return [f for f in self.files if "/" not in f.name]

    def segments_of(self, rank: int) -> list[tuple[OutputFile, Segment]]:
        return [(f, seg) for f in self.files for seg in f.segments if seg.rank == rank]

    def segment_name(self, f: OutputFile, seg: Segment) -> str:
        """How summaries name a unit of work: the file, or file[k] for a file of several segments."""
        return f.name if len(f.segments) == 1 else f"{f.name}[{seg.index}]"

"""Element types as plain values, so that a merge that copies bytes never imports torch.

Importing torch costs about a second of start-up, as long as a whole small merge takes. The
catalogue, the plan and the byte copies need only a dtype's name, size and safetensors name;
torch is imported on first use of `DType.torch`, by the stages that compute on values (a cast,
a LoRA fold, verify) or talk to other ranks.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DType:
    """One element type: torch's name for it (`bfloat16`), its size in bytes, safetensors' name."""

    name: str
    itemsize: int
    safetensors: str
    is_floating_point: bool

    def __str__(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"DType({self.name})"

    @property
    def torch(self):
        """The torch.dtype of the same name (imports torch)."""
        import torch
        return getattr(torch, self.name)


FLOAT64 = DType("float64", 8, "F64", True)
FLOAT32 = DType("float32", 4, "F32", True)
FLOAT16 = DType("float16", 2, "F16", True)
BFLOAT16 = DType("bfloat16", 2, "BF16", True)
FLOAT8_E4M3FN = DType("float8_e4m3fn", 1, "F8_E4M3", True)
FLOAT8_E5M2 = DType("float8_e5m2", 1, "F8_E5M2", True)
INT64 = DType("int64", 8, "I64", False)
INT32 = DType("int32", 4, "I32", False)
INT16 = DType("int16", 2, "I16", False)
INT8 = DType("int8", 1, "I8", False)
UINT8 = DType("uint8", 1, "U8", False)
BOOL = DType("bool", 1, "BOOL", False)

ALL = (FLOAT64, FLOAT32, FLOAT16, BFLOAT16, FLOAT8_E4M3FN, FLOAT8_E5M2, INT64, INT32, INT16, INT8, UINT8, BOOL)
BY_NAME = {d.name: d for d in ALL}                  # torch's names: "bfloat16"
BY_SAFETENSORS = {d.safetensors: d for d in ALL}    # safetensors' names: "BF16"
CAST_NAMES = {"bf16": BFLOAT16, "fp16": FLOAT16, "fp32": FLOAT32}  # --dtype's choices
# torch's legacy typed storages, as torch.save (before the untyped storages) names them
STORAGE_NAMES = {"DoubleStorage": FLOAT64, "FloatStorage": FLOAT32, "HalfStorage": FLOAT16,
                 "BFloat16Storage": BFLOAT16, "LongStorage": INT64, "IntStorage": INT32, "ShortStorage": INT16,
                 "CharStorage": INT8, "ByteStorage": UINT8, "BoolStorage": BOOL}


# torch's other element types, known by name and size so that a tensor of one is read and then
# refused by name (validate.py), not mistaken for a damaged record
OTHER_TORCH = {"complex32": 4, "complex64": 8, "complex128": 16, "uint16": 2, "uint32": 4, "uint64": 8,
               "float8_e4m3fnuz": 1, "float8_e5m2fnuz": 1, "float8_e8m0fnu": 1, "float4_e2m1fn_x2": 1,
               "qint8": 1, "quint8": 1, "qint32": 4, "quint4x2": 1, "quint2x4": 1, "bits8": 1, "bits16": 2}


def named(name: str) -> DType | None:
    """The DType torch calls `name` (one distmerge writes, or one it refuses); None for no dtype."""
    if name in BY_NAME:
        return BY_NAME[name]
    if name in OTHER_TORCH:
        return DType(name, OTHER_TORCH[name], "", False)
    return None


def of_torch(dtype) -> DType:
    """The DType of a torch.dtype (one not in ALL is refused where a catalogue is validated)."""
    name = str(dtype).removeprefix("torch.")
    return named(name) or DType(name, dtype.itemsize, "", dtype.is_floating_point)


def raw_numpy(itemsize: int) -> str:
    """The numpy unsigned type of an element size: values moved as bytes, never interpreted."""
    return {1: "u1", 2: "<u2", 4: "<u4", 8: "<u8"}[itemsize]

"""A tied head must be the embedding: with tie_word_embeddings the head is not written, so a trained
head that differs from the embedding would be dropped without a word. Checked before planning."""
from __future__ import annotations

import copy

import numpy as np

from .errors import MergeError
from .model import Catalogue, OutputTensor, SourceTensor

BAND_BYTES = 16 << 20
# naming family -> (head, embedding) name suffixes
HEAD_AND_EMBEDDING = {"hf": ("lm_head.weight", "embed_tokens.weight"),
                      "megatron": ("output_layer.weight", "word_embeddings.weight")}
UNTIE_FLAG = "--untie-word-embeddings"


def untie(config: dict) -> dict:
    """The config with tie_word_embeddings false (top level, and text_config where there is one)."""
    config = copy.deepcopy(config)
    config["tie_word_embeddings"] = False
    if isinstance(config.get("text_config"), dict):
        config["text_config"]["tie_word_embeddings"] = False
    return config


def _one(catalogue: Catalogue, suffix: str) -> SourceTensor | None:
    found = [t for name, t in catalogue.tensors.items() if name.endswith(suffix) and "visual" not in name]
    return found[0] if len(found) == 1 else None


def _same_storage(a: SourceTensor, b: SourceTensor) -> bool:
    """Both names point at the same stored bytes (torch.save keeps a tied parameter once)."""
    key = lambda p: (p.file, p.offset, p.shape, p.strides, p.region)  # noqa: E731
    return a.shape == b.shape and sorted(map(key, a.pieces)) == sorted(map(key, b.pieces))


def heads_equal(catalogue: Catalogue, head: SourceTensor, embed: SourceTensor) -> bool:
    """Compare the two tensors band by band (bounded memory); equal bytes, not equal values."""
    from .reader import PieceReader, read_source_rows

    if head.shape != embed.shape or head.dtype != embed.dtype:
        return False
    if _same_storage(head, embed):
        return True
    rows = head.shape[0] if head.shape else 1
    row_bytes = max(1, head.nbytes // max(rows, 1))
    step = max(1, BAND_BYTES // row_bytes)
    reader = PieceReader()
    try:
        for first in range(0, rows, step):
            stop = min(rows, first + step)
            a = read_source_rows(catalogue, head.name, first, stop, reader)
            b = read_source_rows(catalogue, embed.name, first, stop, reader)
            if not np.array_equal(a, b):  # raw elements: equal bytes
                return False
    finally:
        reader.close()
    return True


def check_tied_head(catalogue: Catalogue, outputs: list[OutputTensor]) -> None:
    """Refuse a mapping that drops a head trained apart from the embedding (the config ties them).
    A head of another shape (a value model's score head) is not the tied one."""
    written = any(o.name.endswith("lm_head.weight") for o in outputs)
    if written or catalogue.partial or catalogue.family not in HEAD_AND_EMBEDDING:
        return
    head_name, embed_name = HEAD_AND_EMBEDDING[catalogue.family]
    head, embed = _one(catalogue, head_name), _one(catalogue, embed_name)
    if head is None or embed is None or not head.pieces or head.shape != embed.shape:
        return
    if not heads_equal(catalogue, head, embed):
        raise MergeError(f"config.json says tie_word_embeddings=true, but {catalogue.source} holds an "
                         f"{head.name} that differs from {embed.name}: merging with this config would drop the "
                         f"trained head. Pass {UNTIE_FLAG} to keep the head and write tie_word_embeddings: false, "
                         "or pass --hf-config with the trained model's config")

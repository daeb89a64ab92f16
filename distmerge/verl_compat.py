"""verl's model_merger flags that distmerge accepts for drop-in use, checked against the source."""
from __future__ import annotations

import logging

from .arch import hf
from .arch.config import architecture
from .errors import MergeError
from .sources.registry import SourceFormat

log = logging.getLogger("distmerge")

VERL_BACKENDS = ("fsdp", "megatron")


def source_kind(backend: str) -> str | None:
    """verl's --backend fsdp|megatron names the source's kind, not a process-group backend."""
    return backend if backend in VERL_BACKENDS else None


def check_verl_flags(source: str, kind: str | None, fmt: SourceFormat, config: dict,
                     tie_word_embedding: bool, is_value_model: bool) -> list[str]:
    """verl's --backend fsdp|megatron must match the source's format; --tie-word-embedding and
    --is-value-model are checked against config.json, which decides (a warning if they disagree)."""
    if kind and fmt.verl_backend != kind:
        raise MergeError(f"--backend {kind} (verl's flag) but {source} is a {fmt.name} checkpoint; "
                         "drop --backend: distmerge detects the format")
    warnings = []
    if tie_word_embedding and not hf.tie_word_embeddings(config):
        warnings.append("--tie-word-embedding was given but config.json says tie_word_embeddings=false; "
                        "following config.json (lm_head.weight is written)")
    if is_value_model and not hf.is_value_model(config):
        warnings.append(f"--is-value-model was given but config.json's architecture is {architecture(config)}; "
                        "following config.json (for a critic, use a config with *ForTokenClassification and "
                        "num_labels=1)")
    for w in warnings:
        log.warning("%s", w)
    return warnings

"""Sources whose tensor names are already HF names: keep each tensor, order it as HF does.

The only architecture knowledge needed is the tied head: with tie_word_embeddings the head is the
embedding, so no lm_head.weight is written; without it a missing head is an error.
"""
from __future__ import annotations

import re

from ..errors import MergeError
from ..model import Catalogue, OutputTensor, SourceRows
from .config import architecture, text_config

LAYER = re.compile(r"\.layers\.(\d+)\.")
HEADS = ("lm_head.weight", "score.weight", "v_head.weight")


def hf_order(names: list[str]) -> list[str]:
    """Embeddings first, then layer by layer, then the rest (final norm), then the head.
    Within a group the source's own order (module order) is kept."""
    def key(item):
        index, name = item
        m = LAYER.search(name)
        if m:
            return (1, int(m.group(1)), index)
        if name in HEADS:
            return (3, 0, index)
        if "embed" in name:
            return (0, 0, index)
        return (2, 0, index)
    return [n for _, n in sorted(enumerate(names), key=key)]


def tie_word_embeddings(config: dict) -> bool:
    tie = config.get("tie_word_embeddings")
    if tie is None:
        tie = (config.get("text_config") or {}).get("tie_word_embeddings", True)
    return bool(tie)


def is_value_model(config: dict) -> bool:
    """A critic / reward model: a classification head (score) instead of the LM head."""
    arch = architecture(config, "")
    return arch.endswith(("ForTokenClassification", "ForSequenceClassification"))


def check_vocab(catalogue: Catalogue, config: dict, sources: dict[str, str]) -> None:
    """The embedding and head rows must be the config's vocab_size: transformers refuses any other."""
    vocab = config.get("vocab_size") or text_config(config).get("vocab_size")
    if not vocab:
        return
    for name, source in sources.items():
        if name.endswith("embed_tokens.weight") or name == "lm_head.weight":
            rows = catalogue.tensors[source].shape[0]
            if rows != vocab:
                raise MergeError(f"{source} has {rows} rows but config.json says vocab_size={vocab}; the config is "
                                 f"not this checkpoint's: pass --hf-config with the trained model's config")


def map_outputs(catalogue: Catalogue, config: dict, cast, sources: dict[str, str] | None = None) -> list[OutputTensor]:
    """`sources` maps HF name -> source name where they differ (PEFT prefixes); identity otherwise."""
    sources = sources or {n: n for n in catalogue.tensors}
    names = list(sources)
    if tie_word_embeddings(config):
        names = [n for n in names if n != "lm_head.weight"]
    elif ("lm_head.weight" not in names and not is_value_model(config)
          and any(n.endswith("embed_tokens.weight") for n in names)):
        raise MergeError(f"config.json has tie_word_embeddings=false but {catalogue.source} holds no "
                         "lm_head.weight; the checkpoint is incomplete, or the config is not this model's")
    check_vocab(catalogue, config, sources)
    outputs = []
    for name in hf_order(names):
        t = catalogue.tensors[sources[name]]
        rows = SourceRows(sources[name], (), 0, t.shape[0] if t.shape else 1)
        outputs.append(OutputTensor(name=name, shape=t.shape, dtype=cast(t.dtype), parts=[rows]))
    return outputs

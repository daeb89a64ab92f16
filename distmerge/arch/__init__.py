"""Stage 2, map: turn a Catalogue into the list of HF OutputTensors.

One module per naming family. Sources whose keys are already HF names (verl FSDP, DCP) go through
`hf` (with `vlm` renaming older VLM names and `lora` folding PEFT adapters); families with fused
or stacked layouts (Megatron) get their own tables.
"""
from __future__ import annotations

import json
import os

from ..errors import MergeError
from ..model import Catalogue, OutputTensor
from . import hf, lora, megatron_gpt, vlm
from .lora import find_adapters  # noqa: F401  (re-exported: the stages call it through arch)


def load_config(hf_dir: str | None, source: str) -> dict:
    if hf_dir is None:
        raise MergeError(f"no Hugging Face config found: {source} has no huggingface/ directory; "
                         "pass --hf-config DIR (a directory with config.json and the tokenizer)")
    path = os.path.join(hf_dir, "config.json")
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise MergeError(f"{path} is missing; pass --hf-config DIR with the model's config.json") from None
    except json.JSONDecodeError as e:
        raise MergeError(f"{path} is not valid JSON ({e}); fix it or pass --hf-config DIR") from None


def map_outputs(catalogue: Catalogue, config: dict, cast, adapters: lora.Adapters | None = None,
                lora_mode: str = "merge") -> list[OutputTensor]:
    """The HF model's tensors. A LoRA checkpoint (adapters) maps its base weights, folded with
    the adapters for lora_mode merge/both, as they were trained for adapter."""
    if catalogue.format.startswith("megatron"):
        return megatron_gpt.map_outputs(catalogue, config, cast)
    sources = adapters.base_names if adapters else {name: name for name in catalogue.tensors}
    outputs = hf.map_outputs(catalogue, config, cast, vlm.current_names(sources, config))
    if adapters and lora_mode in ("merge", "both"):
        lora.attach_folds(outputs, adapters)
    return outputs

"""Stage 2, map: turn a Catalogue into the list of HF OutputTensors.

One module per naming family. Sources whose keys are already HF names (verl FSDP, DCP) go through
`hf` (with `vlm` renaming older VLM names and `lora` folding PEFT adapters); families with fused
or stacked layouts (Megatron) get their own tables.
"""
from __future__ import annotations

from ..model import Catalogue, OutputTensor
from . import hf, lora, megatron_gpt, torchtitan, vlm
from .config import load_config  # noqa: F401  (re-exported)


def find_adapters(catalogue: Catalogue, lora_alpha: float | None, config: dict | None = None):
    """The checkpoint's LoRA adapters (None without): PEFT's names, or Megatron-Bridge's adapters,
    which are told apart per HF weight by the config's heads and groups."""
    if catalogue.family == "megatron":
        return megatron_gpt.find_adapters(catalogue, config, lora_alpha)
    return lora.find_adapters(catalogue, lora_alpha)


def map_outputs(catalogue: Catalogue, config: dict, cast, adapters: lora.Adapters | None = None,
                lora_mode: str = "merge") -> list[OutputTensor]:
    """The HF model's tensors. A LoRA checkpoint (adapters) maps its base weights, folded with
    the adapters for lora_mode merge/both, as they were trained for adapter."""
    if catalogue.family == "megatron":
        outputs = megatron_gpt.map_outputs(catalogue, config, cast)
        if adapters and lora_mode in ("merge", "both"):
            megatron_gpt.attach_folds(outputs, adapters)
        return outputs
    if catalogue.family == "torchtitan":
        return torchtitan.map_outputs(catalogue, config, cast)
    sources = adapters.base_names if adapters else {name: name for name in catalogue.tensors}
    outputs = hf.map_outputs(catalogue, config, cast, vlm.current_names(sources, config))
    if adapters and lora_mode in ("merge", "both"):
        lora.attach_folds(outputs, adapters)
    return outputs

"""PEFT LoRA checkpoints (verl FSDP with LoRA): fold the adapters into the base weights, write
them as a PEFT adapter directory, or both.

verl saves the PEFT model's state dict: `base_model.model.<module>.base_layer.weight` for an
adapted module's base weight, `...<module>.lora_A.<adapter>.weight` `[r, in]` and
`...lora_B.<adapter>.weight` `[out, r]`, every other tensor as `base_model.model.<hf name>`; and
`lora_train_meta.json` (`{"r", "lora_alpha", "task_type"}`) beside the rank files. A PEFT model
trained under DeepSpeed ZeRO has the same names, and peft's `adapter_config.json` beside the
checkpoint (or in its HF directory) gives r and alpha. alpha decides
the scale (alpha / r) of every fold; when it cannot be known the merge stops and asks for
`--lora-alpha` (writing 0, as old verl did, silently gives back the base model).
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

from ..errors import MergeError
from ..model import Catalogue, LoraDelta, OutputTensor, SourceRows

PREFIX = "base_model.model."
LORA_NAME = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])\.(?P<adapter>[^.]+)\.weight$")
META = "lora_train_meta.json"
PEFT_CONFIG = "adapter_config.json"
ADAPTER_DIR = "lora_adapter"
ADAPTER_FILE = f"{ADAPTER_DIR}/adapter_model.safetensors"
MODES = ("merge", "adapter", "both")


@dataclass
class Adapters:
    r: int
    alpha: float
    task_type: str
    factors: dict[str, tuple[str, str]]   # HF module path -> (lora_A source name, lora_B source name)
    base_names: dict[str, str]            # HF tensor name -> source name, for every base tensor

    @property
    def scale(self) -> float:
        return self.alpha / self.r

    @property
    def target_modules(self) -> list[str]:
        return sorted({module.rsplit(".", 1)[-1] for module in self.factors})


def is_peft(catalogue: Catalogue) -> bool:
    return any(LORA_NAME.match(name) for name in catalogue.tensors)


def find_adapters(catalogue: Catalogue, lora_alpha: float | None) -> Adapters | None:
    """The checkpoint's LoRA adapters, or None when it is not a PEFT checkpoint."""
    return read_adapters(catalogue, lora_alpha) if is_peft(catalogue) else None


def read_adapters(catalogue: Catalogue, lora_alpha: float | None) -> Adapters:
    factors: dict[str, dict[str, str]] = {}
    adapter_names, base_names = set(), {}
    for name in catalogue.tensors:
        m = LORA_NAME.match(name)
        if m:
            factors.setdefault(m["module"], {})[m["ab"]] = name
            adapter_names.add(m["adapter"])
        elif name.startswith(PREFIX):
            base_names[name[len(PREFIX):].replace(".base_layer.", ".")] = name
        else:
            raise MergeError(f"{catalogue.source}: tensor {name} lacks PEFT's {PREFIX!r} prefix while others have "
                             "LoRA names; the checkpoint mixes two models")
    if len(adapter_names) > 1:
        raise MergeError(f"{catalogue.source} holds several LoRA adapters ({', '.join(sorted(adapter_names))}); "
                         "distmerge folds or writes one adapter per merge")
    pairs = {}
    for module, ab in factors.items():
        if set(ab) != {"A", "B"}:
            raise MergeError(f"{catalogue.source}: LoRA module {module} has lora_{''.join(ab)} but not the other "
                             "factor; the checkpoint is incomplete")
        if f"{module}.weight" not in base_names:
            raise MergeError(f"{catalogue.source}: LoRA module {module} has no base weight {module}.base_layer.weight")
        pairs[module] = (ab["A"], ab["B"])
    ranks = {catalogue.tensors[a].shape[0] for a, _ in pairs.values()}
    if len(ranks) != 1:
        raise MergeError(f"{catalogue.source}: LoRA factors of different ranks {sorted(ranks)}; per-module ranks "
                         "are not supported")
    r = ranks.pop()
    meta, meta_path = read_meta(catalogue)
    if meta:
        if "r" in meta and int(meta["r"]) != r:
            raise MergeError(f"{meta_path} says r={meta['r']} but the lora_A factors have rank {r}; "
                             "the file is not this checkpoint's")
    alpha = lora_alpha if lora_alpha is not None else meta.get("lora_alpha")
    if alpha is None:
        raise MergeError(f"{catalogue.source} is a LoRA checkpoint without {META} or {PEFT_CONFIG}, so lora_alpha is "
                         "unknown; pass "
                         "--lora-alpha ALPHA (the lora_alpha the training used: the fold scales B @ A by alpha / r)")
    if not float(alpha) > 0:
        raise MergeError(f"lora_alpha is {alpha} ({'--lora-alpha' if lora_alpha is not None else meta_path}); a fold "
                         "with alpha 0 gives back the base model: pass the training's --lora-alpha")
    return Adapters(r=r, alpha=float(alpha), task_type=str(meta.get("task_type", "CAUSAL_LM")), factors=pairs,
                    base_names=base_names)


def read_meta(catalogue: Catalogue) -> tuple[dict, str]:
    """The training's LoRA settings and the file they came from: verl's lora_train_meta.json beside the
    rank files, or the adapter_config.json that peft (TRL, accelerate under DeepSpeed) saves beside the
    checkpoint or in its HF directory; ({}, "") when there is neither."""
    candidates = [os.path.join(catalogue.source, META)]
    candidates += [os.path.join(d, PEFT_CONFIG) for d in dict.fromkeys((catalogue.source, catalogue.hf_dir)) if d]
    path = next((p for p in candidates if os.path.isfile(p)), None)
    if path is None:
        return {}, ""
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise MergeError(f"{path} cannot be read ({e}); fix it, or remove it and pass --lora-alpha") from None
    if not isinstance(meta, dict):
        raise MergeError(f"{path} is not a JSON object; fix it, or remove it and pass --lora-alpha")
    if os.path.basename(path) == PEFT_CONFIG:
        unsupported = [k for k in ("use_rslora", "use_dora", "rank_pattern", "alpha_pattern") if meta.get(k)]
        if unsupported:
            raise MergeError(f"{path} sets {unsupported[0]}; distmerge folds plain LoRA (one r and alpha for every "
                             "module) only: use --lora adapter to write the adapter as it was trained")
    return meta, path


def attach_folds(outputs: list[OutputTensor], adapters: Adapters) -> None:
    """--lora merge/both: every adapted weight is written as W + (alpha / r) * B @ A. Modules are
    matched by source name (an output may have been renamed), and every adapter must find its weight."""
    by_base_source = {adapters.base_names[f"{module}.weight"]: module for module in adapters.factors}
    folded = set()
    for out in outputs:
        module = by_base_source.get(out.parts[0].source) if len(out.parts) == 1 else None
        if module is not None:
            a, b = adapters.factors[module]
            out.lora = LoraDelta(a=a, b=b, scale=adapters.scale)
            folded.add(module)
    missing = sorted(set(adapters.factors) - folded)
    if missing:
        raise MergeError(f"LoRA module {missing[0]} has no output weight to fold into ({len(missing)} such modules)")


def adapter_outputs(catalogue: Catalogue, adapters: Adapters, cast) -> list[OutputTensor]:
    """The adapter's tensors under the names PEFT saves (`...lora_A.weight`, no adapter name)."""
    outputs = []
    for module in sorted(adapters.factors, key=lambda m: list(adapters.base_names).index(f"{m}.weight")):
        for source in adapters.factors[module]:
            t = catalogue.tensors[source]
            ab = LORA_NAME.match(source)["ab"]
            outputs.append(OutputTensor(name=f"{PREFIX}{module}.lora_{ab}.weight", shape=t.shape, dtype=cast(t.dtype),
                                        parts=[SourceRows(source, (), 0, t.shape[0])]))
    return outputs


def adapter_config(adapters: Adapters) -> dict:
    """adapter_config.json with the true r and alpha: what peft's from_pretrained needs."""
    return {"peft_type": "LORA", "task_type": adapters.task_type, "r": adapters.r, "lora_alpha": adapters.alpha,
            "target_modules": adapters.target_modules, "lora_dropout": 0.0, "bias": "none",
            "fan_in_fan_out": False, "inference_mode": True, "base_model_name_or_path": None,
            "use_rslora": False, "use_dora": False}

"""Vision-language models whose HF names changed between transformers versions.

transformers 4.52 moved Qwen2-VL / Qwen2.5-VL weights from `visual.*` + `model.*` (the language
model) to `model.visual.*` + `model.language_model.*` (`lm_head` stays). Checkpoints trained with
older transformers carry the old names; distmerge writes the names the current classes have, so
`from_pretrained` needs no conversion on load. Processor files (preprocessor_config.json, chat
template) are copied with the rest of the HF directory.
"""
from __future__ import annotations

import re

# model_type -> (old-name detector, ordered (pattern, replacement) renames)
LEGACY_NAMES = {
    "qwen2_vl": (re.compile(r"^visual\."), [(re.compile(r"^visual\."), "model.visual."),
                                            (re.compile(r"^model\.(?!visual\.|language_model\.)"),
                                             "model.language_model.")]),
}
LEGACY_NAMES["qwen2_5_vl"] = LEGACY_NAMES["qwen2_vl"]


def current_names(sources: dict[str, str], config: dict) -> dict[str, str]:
    """HF name -> source name, with a VLM's old names renamed to the current ones."""
    rule = LEGACY_NAMES.get(config.get("model_type", ""))
    if rule is None or not any(rule[0].match(name) for name in sources):
        return sources
    renamed = {}
    for name, source in sources.items():
        for pattern, replacement in rule[1]:
            if pattern.match(name):
                name = pattern.sub(replacement, name, count=1)
                break
        renamed[name] = source
    return renamed

"""The HF config.json: read once with its types checked, and the two fallbacks every family needs
(a VLM's text settings under text_config; the architecture name) written once."""
from __future__ import annotations

import json
import os

from ..errors import MergeError

MAX_CONFIG_BYTES = 16 << 20  # real configs are a few KB; a larger one is not a config


def load_config(hf_dir: str | None, source: str) -> dict:
    if hf_dir is None:
        raise MergeError(f"no Hugging Face config found: {source} has no huggingface/ directory; "
                         "pass --hf-config DIR (a directory with config.json and the tokenizer)")
    path = os.path.join(hf_dir, "config.json")
    fix = "fix it or pass --hf-config DIR with the model's config.json"
    try:
        if not os.path.isfile(path):
            raise FileNotFoundError
        if os.path.getsize(path) > MAX_CONFIG_BYTES:
            raise MergeError(f"{path} is {os.path.getsize(path)} bytes, not a model config; {fix}")
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except FileNotFoundError:
        raise MergeError(f"{path} is missing or not a regular file; pass --hf-config DIR with the model's "
                         "config.json") from None
    except (ValueError, RecursionError, UnicodeDecodeError) as e:
        raise MergeError(f"{path} is not valid JSON ({str(e)[:200]}); {fix}") from None
    except OSError as e:
        raise MergeError(f"{path} cannot be read ({e.strerror}); {fix}") from None
    if not isinstance(config, dict):
        raise MergeError(f"{path} holds a JSON {type(config).__name__}, not an object; {fix}")
    check_types(config, path)
    return config


# fields distmerge reads, and the JSON types they must have when present
FIELD_TYPES = {
    "architectures": list, "text_config": dict, "tie_word_embeddings": bool, "torch_dtype": str, "dtype": str,
    "vocab_size": int, "hidden_size": int, "num_hidden_layers": int, "num_attention_heads": int,
    "num_key_value_heads": int, "head_dim": int, "intermediate_size": int, "num_labels": int, "model_type": str,
}
# sizes: a model has at least one of each
POSITIVE = {"vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "head_dim", "intermediate_size", "num_labels"}


def check_types(config: dict, path: str, where: str = "") -> None:
    for key, kind in FIELD_TYPES.items():
        value = config.get(key)
        if value is None:
            continue
        ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
        ok = ok and not (key in POSITIVE and value < 1)
        if kind is list:
            ok = ok and all(isinstance(v, str) for v in value)
        if not ok:
            what = "a positive integer" if key in POSITIVE else f"a JSON {kind.__name__}"
            raise MergeError(f"{path}: {where}{key} is {json.dumps(value)[:80]}, not {what}; "
                             "fix it or pass --hf-config DIR with the model's config.json")
    if isinstance(config.get("text_config"), dict) and not where:
        check_types(config["text_config"], path, "text_config.")


def text_config(config: dict) -> dict:
    """A VLM's language-model settings live under text_config; other models have them at the top."""
    return config.get("text_config") or config


def architecture(config: dict, default: str = "?") -> str:
    return (config.get("architectures") or [default])[0]

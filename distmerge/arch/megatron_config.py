"""An HF config.json built from what a Megatron checkpoint stores, for checkpoints that carry none.

Where the model settings come from (TransformerConfig names after the renames below):
- verl's transformer_config.json (beside model/ or in it);
- Megatron-Bridge's iter_N/run_config.yaml (its `model:` section);
- NeMo 2's context/model.yaml (its `config:` section);
- Megatron-LM / slime `args` (an argparse Namespace pickled in common.pt, or in a legacy rank file),
  read by the restricted unpickler: nothing in it is called.
Tied embeddings and the dtype are read from the tensors themselves (no output_layer.weight = tied).

The true vocabulary size is not Megatron's padded one: it is taken from --vocab-size, else from a
tokenizer inside the checkpoint (tokenizer.json or vocab.json + added_tokens.json), else from a
`vocab_size` the settings state. Nothing is guessed: a field that cannot be known is refused by name.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field

from ..errors import MergeError, brief, one_line
from ..model import Catalogue
from ..paths import check_file, inside
from ..sources.megatron import layer_count as stored_layers
from ..sources.megatron_layouts import MAX_TEXT_BYTES
from ..sources.torch_archive import _fast_load, _Record

MAX_TOKENIZER_BYTES = 128 << 20
FIX = "pass --hf-config DIR with the model's config.json (and tokenizer)"
# Megatron-LM's argument names -> TransformerConfig's
ARG_RENAMES = {"norm_epsilon": "layernorm_epsilon", "num_experts": "num_moe_experts", "swiglu": "gated_linear_unit",
               "use_rope_scaling": "rope_scaling"}
EMBEDDING, HEAD = "embedding.word_embeddings.weight", "output_layer.weight"
# DeepSeek-V3's multi-latent attention sizes: Megatron's name -> HF's
MLA_DIMS = {"kv_lora_rank": "kv_lora_rank", "qk_head_dim": "qk_nope_head_dim",
            "qk_pos_emb_head_dim": "qk_rope_head_dim", "v_head_dim": "v_head_dim"}
TOKENIZER_DIRS = ("tokenizer", os.path.join("context", "nemo_tokenizer"), "context", "huggingface",
                  os.path.join("model", "huggingface"))


@dataclass
class Settings:
    """Model settings under TransformerConfig's names, and the files they were read from."""

    values: dict = field(default_factory=dict)
    sources: list[str] = field(default_factory=list)
    origins: dict = field(default_factory=dict)  # setting -> the file it was read from

    def where(self, name: str) -> str:
        """The file a setting came from, for messages (every settings file when it is not known)."""
        return self.origins.get(name) or ", ".join(self.sources) or "no settings file"

    def get(self, name: str, default=None):
        value = self.values.get(name)
        return default if value is None else value

    def need(self, name: str, hf_field: str):
        """The setting, or a refusal that names it and the HF field it would fill."""
        if self.values.get(name) is None:
            where = ", ".join(self.sources) or "no settings file"
            raise MergeError(f"cannot build an HF config: {hf_field} needs Megatron's {name}, which is not in "
                             f"{where}; {FIX}")
        return self.values[name]


@dataclass(frozen=True)
class Synthesized:
    """A config built from the checkpoint, what it was built from, and the tokenizer found (if any)."""

    config: dict
    description: str
    tokenizer_dir: str | None


def synthesize_config(catalogue: Catalogue, vocab_size: int | None = None) -> Synthesized:
    """The HF config of a Megatron checkpoint without config.json (the summary prints the description)."""
    root = catalogue.source
    settings = read_settings(catalogue)
    if not settings.sources:
        raise MergeError(f"no Hugging Face config found and {root} stores no model settings (args in common.pt, "
                         f"run_config.yaml, transformer_config.json, context/model.yaml); {FIX}")
    tokenizer_dir, counted = find_tokenizer(root, _ckpt_dir(catalogue))
    vocab, vocab_from = _vocab(catalogue, settings, vocab_size, counted, tokenizer_dir)
    config = build_config(catalogue, settings, vocab)
    rel = [os.path.relpath(p, root) for p in settings.sources]
    return Synthesized(config, f"built from {', '.join(rel)}; vocab_size {vocab} from {vocab_from}", tokenizer_dir)


def _ckpt_dir(catalogue: Catalogue) -> str:
    """The directory of the checkpoint's data (an iter_N/mp_rank_XX file's iteration for legacy)."""
    if not catalogue.files:
        return catalogue.source
    d = os.path.dirname(catalogue.files[0])
    return os.path.dirname(d) if os.path.basename(d).startswith("mp_rank_") else d


def _vocab(catalogue, settings: Settings, option: int | None, counted: int | None, tok_dir: str | None):
    rows = catalogue.tensors[EMBEDDING].shape[0] if EMBEDDING in catalogue.tensors else None
    if option is not None:
        vocab, origin = option, "--vocab-size"
    elif counted is not None:
        vocab, origin = counted, os.path.relpath(tok_dir, catalogue.source)
    elif isinstance(settings.values.get("vocab_size"), int):
        vocab, origin = settings.values["vocab_size"], f"the vocab_size in {settings.where('vocab_size')}"
    else:
        raise MergeError(f"cannot build an HF config: vocab_size is unknown (the embedding's {rows} rows are "
                         "Megatron's padded size, and no tokenizer was found in the checkpoint); pass "
                         "--vocab-size N (the tokenizer's size) or --hf-config DIR")
    if isinstance(vocab, bool) or not isinstance(vocab, int) or vocab < 1 or (rows is not None and vocab > rows):
        raise MergeError(f"vocab_size {brief(vocab)} from {origin} does not fit the embedding's {rows} rows; "
                         "pass --vocab-size N (the tokenizer's size) or --hf-config DIR")
    return vocab, origin


# ---------------------------------------------------------------- reading the settings

def read_settings(catalogue: Catalogue) -> Settings:
    """Every settings file the layouts define, inside the source; earlier ones win per field."""
    root, ckpt = catalogue.source, _ckpt_dir(catalogue)
    settings = Settings()
    candidates = [(os.path.join(d, "transformer_config.json"), _json_section, None) for d in (root, ckpt)]
    candidates += [(os.path.join(root, "model", "transformer_config.json"), _json_section, None),
                   (os.path.join(ckpt, "run_config.yaml"), _yaml_section, "model"),
                   (os.path.join(root, "context", "model.yaml"), _yaml_section, "config"),
                   (os.path.join(ckpt, "common.pt"), _args_section, None)]
    if catalogue.files and os.path.basename(catalogue.files[0]) == "model_optim_rng.pt":
        candidates.append((catalogue.files[0], _args_section, None))
    seen = set()
    for path, reader, section in candidates:
        if path in seen or not os.path.isfile(path) or not inside(path, root):
            continue
        seen.add(path)
        values = reader(path, section)
        if values:
            settings.values = {**values, **settings.values}
            settings.origins = {**dict.fromkeys(values, path), **settings.origins}
            settings.sources.append(path)
    return settings


def read_peft_settings(catalogue: Catalogue) -> tuple[dict, str]:
    """Megatron-Bridge's `peft:` section of iter_N/run_config.yaml (dim, alpha) and that file's path,
    or ({}, "") when there is none. Only plain LoRA is folded: DoRA and canonical LoRA are refused."""
    path = os.path.join(_ckpt_dir(catalogue), "run_config.yaml")
    if not os.path.isfile(path) or not inside(path, catalogue.source):
        return {}, ""
    values = _yaml_section(path, "peft")
    target = str(values.get("_target_", ""))
    if target and target.rsplit(".", 1)[-1] != "LoRA":
        raise MergeError(f"{path} says the adapters are {target}; distmerge folds Megatron-Bridge's plain LoRA "
                         "(megatron.bridge.peft.lora.LoRA) only")
    return values, path


def _read_text(path: str) -> str:
    if os.path.getsize(path) > MAX_TEXT_BYTES:
        raise MergeError(f"{path} is {os.path.getsize(path)} bytes, not a settings file; {FIX}")
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise MergeError(f"{path} cannot be read ({one_line(str(e))}); {FIX}") from None


def _plain(values: dict) -> dict:
    """Plain values only (numbers, strings, lists of numbers); a Hydra `_target_` dict becomes its name."""
    out = {}
    for key, value in values.items():
        if isinstance(value, dict) and isinstance(value.get("_target_"), str):
            value = value["_target_"]
        if isinstance(value, (list, tuple)) and all(isinstance(v, (int, float)) for v in value):
            value = list(value)
        if isinstance(key, str) and isinstance(value, (bool, int, float, str, list)):
            out[ARG_RENAMES.get(key, key)] = value
    return out


def _json_section(path: str, section) -> dict:
    try:
        data = json.loads(_read_text(path))
    except (ValueError, RecursionError) as e:
        raise MergeError(f"{path} is not valid JSON ({one_line(str(e))}); {FIX}") from None
    return _plain(data) if isinstance(data, dict) else {}


def _yaml_section(path: str, section: str) -> dict:
    import yaml

    try:
        data = yaml.safe_load(_read_text(path))  # safe_load builds plain values only, never objects
    except (yaml.YAMLError, RecursionError, ValueError) as e:  # ValueError: an int past 4300 digits
        raise MergeError(f"{path} is not YAML distmerge can read safely ({one_line(str(e))}); {FIX}") from None
    part = data.get(section) if isinstance(data, dict) else None
    return _plain(part) if isinstance(part, dict) else {}


def _args_section(path: str, section) -> dict:
    """Megatron-LM's `args` Namespace as the restricted unpickler records it (nothing is called)."""
    top = _fast_load(path, inert_unknown=True)
    args = top.get("args") if isinstance(top, dict) else None
    if not isinstance(args, _Record) or not isinstance(args.state, dict):
        return {}
    values = _plain(args.state)
    untie = args.state.get("untie_embeddings_and_output_weights")
    if isinstance(untie, bool):
        values["share_embeddings_and_output_weights"] = not untie
    if args.state.get("group_query_attention") is False:
        values.pop("num_query_groups", None)  # Megatron-LM ignores it: one group per head
    return values


# ---------------------------------------------------------------- the tokenizer's size

def find_tokenizer(root: str, ckpt: str) -> tuple[str | None, int | None]:
    """The first tokenizer directory inside the checkpoint, and its size (highest token id + 1)."""
    for base in dict.fromkeys((ckpt, root)):
        for sub in TOKENIZER_DIRS:
            d = os.path.join(base, sub)
            if os.path.isdir(d) and inside(d, root):
                size = tokenizer_size(d, root)
                if size is not None:
                    return d, size
    return None, None


def tokenizer_size(d: str, root: str | None = None) -> int | None:
    """Highest id + 1 over the vocabulary and the added tokens; None without a readable tokenizer.
    Each file must resolve inside `root` (the source; d itself by default) and be a regular file."""
    ids: list[int] = []
    root = d if root is None else root
    data = _json_file(os.path.join(d, "tokenizer.json"), root)
    if isinstance(data, dict):
        model = data.get("model")
        vocab = model.get("vocab") if isinstance(model, dict) else None
        if isinstance(vocab, dict):
            ids += list(vocab.values())
        elif isinstance(vocab, list):  # Unigram: a list of [piece, score], ids are positions
            ids.append(len(vocab) - 1)
        added = data.get("added_tokens")
        ids += [t.get("id") for t in added if isinstance(t, dict)] if isinstance(added, list) else []
    else:
        vocab = _json_file(os.path.join(d, "vocab.json"), root)
        if not isinstance(vocab, dict):
            return None
        added = _json_file(os.path.join(d, "added_tokens.json"), root)
        ids += list(vocab.values()) + (list(added.values()) if isinstance(added, dict) else [])
    ids = [i for i in ids if isinstance(i, int) and not isinstance(i, bool) and i >= 0]
    return max(ids) + 1 if ids else None


def _json_file(path: str, root: str):
    """A tokenizer file's JSON; None when it is absent, too large or not JSON. One that resolves
    outside the source or is not a regular file is refused before it is opened (check_file)."""
    if not os.path.lexists(path) or check_file(path, root).size > MAX_TOKENIZER_BYTES:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError, UnicodeDecodeError, RecursionError):
        return None


# ---------------------------------------------------------------- the HF config

def build_config(catalogue: Catalogue, s: Settings, vocab: int) -> dict:
    """The family's HF config: MLA -> DeepSeek-V3; MoE -> Qwen3-MoE (q/k norm), Qwen2-MoE (gated
    shared expert) or Mixtral; dense -> Qwen3 (q/k norm), Qwen2 (QKV bias) or Llama."""
    _check_supported(s)
    config = _common(catalogue, s, vocab)
    if s.get("multi_latent_attention", False):
        config.update(_deepseek_v3(s, config))
    elif s.get("num_moe_experts"):
        config.update(_moe(s, config))
    elif s.get("qk_layernorm", False):
        config.update(architectures=["Qwen3ForCausalLM"], model_type="qwen3", attention_bias=False)
    elif s.get("add_qkv_bias", False):
        config.update(architectures=["Qwen2ForCausalLM"], model_type="qwen2", use_sliding_window=False)
    else:
        config.update(architectures=["LlamaForCausalLM"], model_type="llama", attention_bias=False, mlp_bias=False)
    if s.get("qk_layernorm", False) and s.get("add_qkv_bias", False) and not s.get("multi_latent_attention"):
        _refuse("add_qkv_bias with qk_layernorm", "no HF family among Llama, Qwen2/3, Mixtral, Qwen2/3-MoE, "
                "DeepSeek-V3 has QKV bias and q/k norms")
    return config


def _refuse(what: str, why: str):
    raise MergeError(f"cannot build an HF config: {what}: {why}; {FIX}")


def _int(s: Settings, name: str, value, minimum: int = 1) -> int:
    """A size setting: an integer (not a bool) of at least `minimum`, else a refusal naming it and its file."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise MergeError(f"cannot build an HF config: {name}={brief(value)} in {s.where(name)} is not an integer "
                         f">= {minimum}; {FIX}")
    return value


def _real(s: Settings, name: str, value) -> float:
    """A real setting (an epsilon, a RoPE base, a scaling factor): a finite number, or text that reads as
    one (hand-written YAML says 1e-5); a bool, NaN or infinity is refused by name with its file."""
    number = math.nan
    if not isinstance(value, bool) and isinstance(value, (int, float, str)):
        try:
            number = float(value)
        except (ValueError, OverflowError):  # text that is no number; an integer past the float range
            pass
    if not math.isfinite(number):
        raise MergeError(f"cannot build an HF config: {name}={brief(value)} in {s.where(name)} is not a finite "
                         f"number; {FIX}")
    return number


def _check_supported(s: Settings) -> None:
    """Settings no supported HF family can express are refused by name."""
    if s.get("normalization", "RMSNorm") != "RMSNorm":
        _refuse(f"normalization={brief(s.get('normalization'))}", "the supported families use RMSNorm")
    if s.get("gated_linear_unit") is False:
        _refuse("gated_linear_unit=False", "the supported families use a SwiGLU MLP")
    act = s.get("activation_func")
    if isinstance(act, str) and "silu" not in act:
        _refuse(f"activation_func={brief(act)}", "the supported families use SiLU")
    if s.get("add_bias_linear", False):
        _refuse("add_bias_linear=True", "the supported families have no linear biases")
    if s.get("position_embedding_type", "rope") != "rope":
        _refuse(f"position_embedding_type={brief(s.get('position_embedding_type'))}",
                "the supported families use RoPE")
    if s.get("rotary_percent", 1.0) != 1.0:
        _refuse(f"rotary_percent={brief(s.get('rotary_percent'))}",
                "partial rotary is not in the supported families")


def _common(catalogue: Catalogue, s: Settings, vocab: int) -> dict:
    """The fields every family shares, each size a checked integer and each real a finite number."""
    heads = _int(s, "num_attention_heads", s.need("num_attention_heads", "num_attention_heads"))
    hidden = _int(s, "hidden_size", s.need("hidden_size", "hidden_size"))
    positions = "max_position_embeddings" if s.get("max_position_embeddings") else "seq_length"
    dtype = catalogue.tensors[EMBEDDING].dtype if EMBEDDING in catalogue.tensors else None
    config = dict(hidden_size=hidden, num_hidden_layers=_layers(catalogue, s), num_attention_heads=heads,
                  num_key_value_heads=_optional_int(s, "num_query_groups") or heads,
                  head_dim=_optional_int(s, "kv_channels") or hidden // heads,
                  intermediate_size=_int(s, "ffn_hidden_size", s.need("ffn_hidden_size", "intermediate_size")),
                  rms_norm_eps=_real(s, "layernorm_epsilon", s.need("layernorm_epsilon", "rms_norm_eps")),
                  rope_theta=_real(s, "rotary_base", s.need("rotary_base", "rope_theta")),
                  max_position_embeddings=_int(s, positions, s.need(positions, "max_position_embeddings")),
                  vocab_size=vocab, hidden_act="silu", tie_word_embeddings=HEAD not in catalogue.tensors)
    if dtype is not None:
        config["torch_dtype"] = str(dtype).removeprefix("torch.")
    if s.get("rope_scaling", False) is True:  # megatron-core's Llama 3.1 scaling, fixed but the factor
        factor = _real(s, "rope_scaling_factor", s.get("rope_scaling_factor", 8.0))
        config["rope_scaling"] = {"rope_type": "llama3", "factor": factor,
                                  "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                  "original_max_position_embeddings": 8192}
    return config


def _optional_int(s: Settings, name: str) -> int | None:
    """A size setting that may be absent (None), else checked like _int."""
    return None if s.get(name) is None else _int(s, name, s.get(name))


def _layers(catalogue: Catalogue, s: Settings) -> int:
    """num_layers, checked against the layers the checkpoint stores before any list is sized by it."""
    layers = _int(s, "num_layers", s.need("num_layers", "num_hidden_layers"))
    stored = stored_layers(catalogue.tensors)
    if stored is not None and layers != stored:
        raise MergeError(f"cannot build an HF config: num_layers={brief(layers)} in {s.where('num_layers')}, but "
                         f"the checkpoint stores {stored} layers; the settings are not this model's; {FIX}")
    return layers


def moe_layers(s: Settings, layers: int) -> list[bool]:
    """Which layers are MoE: moe_layer_freq is a period (every k-th layer) or a 0/1 list."""
    freq = s.get("moe_layer_freq", 1)
    if isinstance(freq, int) and not isinstance(freq, bool) and freq >= 1:
        return [i % freq == 0 for i in range(layers)]
    if isinstance(freq, list) and len(freq) == layers and set(freq) <= {0, 1}:
        return [bool(f) for f in freq]
    _refuse(f"moe_layer_freq={brief(freq)}", f"not a period or a 0/1 list of {layers} layers")


def _router(s: Settings, family: str, score: str) -> dict:
    """Top-k and renormalisation, refusing a router the family computes differently."""
    if s.get("moe_router_score_function", "softmax") != score:
        _refuse(f"moe_router_score_function={brief(s.get('moe_router_score_function'))}",
                f"{family} routes with {score}")
    if score == "softmax" and s.get("moe_router_topk_scaling_factor") not in (None, 1, 1.0):
        _refuse(f"moe_router_topk_scaling_factor={brief(s.get('moe_router_topk_scaling_factor'))}",
                f"{family} does not scale its routing weights")
    return {"num_experts_per_tok": _int(s, "moe_router_topk", s.need("moe_router_topk", "num_experts_per_tok")),
            "norm_topk_prob": not s.get("moe_router_pre_softmax", False)}


def _moe(s: Settings, config: dict) -> dict:
    experts, layers = _int(s, "num_moe_experts", s.get("num_moe_experts")), config["num_hidden_layers"]
    expert_ffn = _optional_int(s, "moe_ffn_hidden_size") or config["intermediate_size"]
    shared = _int(s, "moe_shared_expert_intermediate_size", s.get("moe_shared_expert_intermediate_size", 0), 0)
    qk_norm = s.get("qk_layernorm", False)
    dense = [i for i, moe in enumerate(moe_layers(s, layers)) if not moe]
    if qk_norm and not shared:
        return dict(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", num_experts=experts,
                    moe_intermediate_size=expert_ffn, decoder_sparse_step=1, mlp_only_layers=dense,
                    attention_bias=False, **_router(s, "Qwen3-MoE", "softmax"))
    if shared and s.get("moe_shared_expert_gate", False) and not qk_norm:
        return dict(architectures=["Qwen2MoeForCausalLM"], model_type="qwen2_moe", num_experts=experts,
                    moe_intermediate_size=expert_ffn, shared_expert_intermediate_size=shared,
                    decoder_sparse_step=1, mlp_only_layers=dense, use_sliding_window=False,
                    **_router(s, "Qwen2-MoE", "softmax"))
    if not shared and not qk_norm and not dense and not s.get("add_qkv_bias", False):
        router = _router(s, "Mixtral", "softmax")
        if not router.pop("norm_topk_prob"):
            _refuse("moe_router_pre_softmax=True", "Mixtral renormalises its top-k weights")
        return dict(architectures=["MixtralForCausalLM"], model_type="mixtral", num_local_experts=experts,
                    intermediate_size=expert_ffn, **router)
    _refuse("this MoE (shared expert {}, gate {}, q/k norm {}, dense layers {})".format(
        brief(shared), brief(s.get("moe_shared_expert_gate", False)), brief(qk_norm), brief(dense)),
        "it matches none of Mixtral, Qwen2-MoE, Qwen3-MoE")


def _deepseek_v3(s: Settings, config: dict) -> dict:
    """MLA + sigmoid routing with expert bias, shared experts, the first layers dense."""
    experts = _int(s, "num_moe_experts", s.need("num_moe_experts", "n_routed_experts"))
    expert_ffn = _int(s, "moe_ffn_hidden_size", s.need("moe_ffn_hidden_size", "moe_intermediate_size"))
    shared = _int(s, "moe_shared_expert_intermediate_size", s.get("moe_shared_expert_intermediate_size", 0), 0)
    layers = config["num_hidden_layers"]
    pattern = moe_layers(s, layers)
    first_dense = pattern.index(True) if True in pattern else layers
    if not all(pattern[first_dense:]) or shared % expert_ffn:
        _refuse(f"moe_layer_freq={brief(s.get('moe_layer_freq'))} / shared expert size {brief(shared)}",
                "DeepSeek-V3 has dense layers first, then MoE, and shared experts of the expert size")
    if not s.get("moe_router_enable_expert_bias", False):
        _refuse("moe_router_enable_expert_bias=False", "DeepSeek-V3 routes with e_score_correction_bias")
    router = _router(s, "DeepSeek-V3", "sigmoid")
    out = dict(architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3", n_routed_experts=experts,
               moe_intermediate_size=expert_ffn, n_shared_experts=shared // expert_ffn,
               routed_scaling_factor=_real(s, "moe_router_topk_scaling_factor",
                                           s.get("moe_router_topk_scaling_factor", 1.0)),
               n_group=_int(s, "moe_router_num_groups", s.get("moe_router_num_groups", 1)),
               topk_group=_int(s, "moe_router_group_topk", s.get("moe_router_group_topk", 1)),
               first_k_dense_replace=first_dense, num_experts_per_tok=router["num_experts_per_tok"],
               norm_topk_prob=True, num_key_value_heads=config["num_attention_heads"],
               q_lora_rank=_optional_int(s, "q_lora_rank"), attention_bias=False, rope_interleave=True,
               **{hf: _int(s, name, s.need(name, hf)) for name, hf in MLA_DIMS.items()})
    config.pop("head_dim", None)
    if s.get("rope_type", "rope") not in ("rope", "yarn"):
        _refuse(f"rope_type={brief(s.get('rope_type'))}", "DeepSeek-V3 takes plain or YaRN RoPE")
    if s.get("rope_type") == "yarn":
        out.update(_yarn(s))
    return out


def _yarn(s: Settings) -> dict:
    """DeepSeek-V3's YaRN rope_scaling, {} when its factor is 1 (plain RoPE)."""
    factor = _real(s, "rotary_scaling_factor", s.get("rotary_scaling_factor", 1.0))
    if factor == 1.0:
        return {}
    original = "original_max_position_embeddings"
    scaling = {"type": "yarn", "factor": factor, original: _int(s, original, s.need(original, "rope_scaling"))}
    scaling.update({name: _real(s, name, s.need(name, "rope_scaling"))
                    for name in ("beta_fast", "beta_slow", "mscale", "mscale_all_dim")})
    return {"rope_scaling": scaling}

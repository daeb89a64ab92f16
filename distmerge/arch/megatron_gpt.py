"""Megatron-core GPT (Llama/Mistral, Qwen2, Qwen3 dense) -> HF, as a table of typed rules.

Megatron stacks layers into one key with a leading layer axis. Each rule maps one Megatron key to
HF tensors of every layer:
- `Same`: the layer's slice as is (norms, linear_proj -> o_proj, linear_fc2 -> down_proj);
- `QKV`: linear_qkv is interleaved per query group, [q_g0 (nh/ng*d rows), k_g0 (d), v_g0 (d), q_g1, ...];
  q/k/v_proj each take their rows of every group (the bias uses the same layout);
- `GateUp`: linear_fc1 is stored as [gate (F rows); up (F rows)].
Embedding and head rows beyond the config's vocab_size are Megatron's vocab padding and are dropped.
A new family is mostly a new table.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import MergeError
from ..model import Catalogue, OutputTensor, SourceRows

LAYER = "model.layers.{i}."


@dataclass(frozen=True)
class Same:
    hf: str


@dataclass(frozen=True)
class QKV:
    suffix: str  # "weight" or "bias"


@dataclass(frozen=True)
class GateUp:
    """A fused [gate (F rows); up (F rows)], F from config key `size`."""

    gate: str = "mlp.gate_proj.weight"
    up: str = "mlp.up_proj.weight"
    size: str = "intermediate_size"


@dataclass(frozen=True)
class Router:
    """mlp.router.weight [L, E, H] -> the family's router (gate) weight."""


@dataclass(frozen=True)
class Experts:
    """Experts stacked twice, [L, E, rows, cols]: fc1 -> each expert's gate and up, fc2 -> its down."""

    fc1: bool


# per-layer keys (after "decoder.layers."); two spellings where local and TE specs differ
LAYER_RULES = {
    "self_attention.linear_qkv.layer_norm_weight": Same("input_layernorm.weight"),
    "input_layernorm.weight": Same("input_layernorm.weight"),
    "self_attention.linear_qkv.weight": QKV("weight"),
    "self_attention.linear_qkv.bias": QKV("bias"),
    "self_attention.q_layernorm.weight": Same("self_attn.q_norm.weight"),
    "self_attention.k_layernorm.weight": Same("self_attn.k_norm.weight"),
    "self_attention.linear_proj.weight": Same("self_attn.o_proj.weight"),
    "mlp.linear_fc1.layer_norm_weight": Same("post_attention_layernorm.weight"),
    "pre_mlp_layernorm.weight": Same("post_attention_layernorm.weight"),
    "mlp.linear_fc1.weight": GateUp(),
    "mlp.linear_fc2.weight": Same("mlp.down_proj.weight"),
    "mlp.router.weight": Router(),
    "mlp.experts.experts.linear_fc1.weight": Experts(fc1=True),
    "mlp.experts.experts.linear_fc2.weight": Experts(fc1=False),
    # Qwen2-MoE's shared expert and its sigmoid gate
    "mlp.shared_experts.linear_fc1.weight": GateUp("mlp.shared_expert.gate_proj.weight",
                                                   "mlp.shared_expert.up_proj.weight", "shared_expert_intermediate_size"),
    "mlp.shared_experts.linear_fc2.weight": Same("mlp.shared_expert.down_proj.weight"),
    "mlp.shared_experts.gate_weight": Same("mlp.shared_expert_gate.weight"),
}
# MoE names per family: router, expert prefix, and the expert's gate / up / down projections
MOE_NAMES = {
    "MixtralForCausalLM": ("block_sparse_moe.gate.weight", "block_sparse_moe.experts.{e}.", "w1", "w3", "w2"),
    "Qwen2MoeForCausalLM": ("mlp.gate.weight", "mlp.experts.{e}.", "gate_proj", "up_proj", "down_proj"),
    "Qwen3MoeForCausalLM": ("mlp.gate.weight", "mlp.experts.{e}.", "gate_proj", "up_proj", "down_proj"),
}
EMBEDDING = "embedding.word_embeddings.weight"
HEAD = "output_layer.weight"
FINAL_NORM = "decoder.final_layernorm.weight"
ARCHITECTURES = {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", *MOE_NAMES}


def _text_config(config: dict) -> dict:
    return config.get("text_config") or config


def map_outputs(catalogue: Catalogue, config: dict, cast) -> list[OutputTensor]:
    declared = (config.get("architectures") or ["?"])[0]
    # a value model (verl's critic: output_layer [1, H]) is the same network with a `score` head
    value_model = declared.endswith("ForTokenClassification")
    arch = declared.replace("ForTokenClassification", "ForCausalLM")
    if arch not in ARCHITECTURES:
        raise MergeError(f"config.json names architecture {declared}, which has no Megatron mapping "
                         f"(supported: {', '.join(sorted(ARCHITECTURES))}); pass --hf-config with a matching config")
    cfg = _text_config(config)
    heads, groups = cfg["num_attention_heads"], cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    layers, vocab = cfg["num_hidden_layers"], cfg["vocab_size"]
    expert_ffn = cfg.get("moe_intermediate_size") or cfg.get("intermediate_size")
    tied = bool(cfg.get("tie_word_embeddings", False))
    tensors = catalogue.tensors

    def out(name, source, parts, rows_shape):
        t = tensors[source]
        return OutputTensor(name, rows_shape, cast(t.dtype), parts)

    unmapped = [n for n in tensors if n not in (EMBEDDING, HEAD, FINAL_NORM)
                and n.removeprefix("decoder.layers.") not in LAYER_RULES]
    if unmapped:
        raise MergeError(f"no rule maps these Megatron tensors of {catalogue.source}: {', '.join(sorted(unmapped))}. "
                         f"Supported names are listed in distmerge/arch/megatron_gpt.py")

    def vocab_rows(name):
        t = tensors[name]
        if t.shape[0] < vocab:
            raise MergeError(f"{name} has {t.shape[0]} rows but config.json says vocab_size={vocab}; "
                             "the config is not this model's")
        return [SourceRows(name, (), 0, vocab)], (vocab,) + t.shape[1:]

    outputs = []
    if EMBEDDING not in tensors:
        raise MergeError(f"{catalogue.source} holds no {EMBEDDING}; the checkpoint is incomplete")
    parts, shape = vocab_rows(EMBEDDING)
    outputs.append(out("model.embed_tokens.weight", EMBEDDING, parts, shape))
    for i in range(layers):
        for key, rule in LAYER_RULES.items():
            name = "decoder.layers." + key
            if name not in tensors:
                continue
            t = tensors[name]
            if t.shape[0] != layers:
                raise MergeError(f"{name} stacks {t.shape[0]} layers but config.json says "
                                 f"num_hidden_layers={layers}; the config is not this model's")
            rest = t.shape[2:]
            prefix = LAYER.format(i=i)
            if isinstance(rule, Same):
                outputs.append(out(prefix + rule.hf, name, [SourceRows(name, (i,), 0, t.shape[1])], t.shape[1:]))
            elif isinstance(rule, QKV):
                q_rows = heads // groups * head_dim
                if t.shape[1] != groups * (q_rows + 2 * head_dim):
                    raise MergeError(f"{name} has {t.shape[1]} rows per layer, but config.json's "
                                     f"num_attention_heads={heads}, num_key_value_heads={groups}, head_dim={head_dim} "
                                     f"need {groups * (q_rows + 2 * head_dim)}; the config is not this model's")
                group = q_rows + 2 * head_dim
                for proj, first, n in (("q_proj", 0, q_rows), ("k_proj", q_rows, head_dim),
                                       ("v_proj", q_rows + head_dim, head_dim)):
                    parts = [SourceRows(name, (i,), g * group + first, g * group + first + n) for g in range(groups)]
                    outputs.append(out(f"{prefix}self_attn.{proj}.{rule.suffix}", name, parts, (groups * n,) + rest))
            elif isinstance(rule, (Router, Experts)):
                if arch not in MOE_NAMES:
                    raise MergeError(f"{name} is an MoE tensor but config.json's architecture {arch} is dense")
                router, expert, gate, up, down = MOE_NAMES[arch]
                if isinstance(rule, Router):
                    outputs.append(out(prefix + router, name, [SourceRows(name, (i,), 0, t.shape[1])], t.shape[1:]))
                    continue
                experts = t.shape[1]
                if experts != cfg.get("num_local_experts", cfg.get("num_experts")):
                    raise MergeError(f"{name} stacks {experts} experts but config.json says "
                                     f"{cfg.get('num_local_experts', cfg.get('num_experts'))}; the config is not this model's")
                rest = t.shape[3:]
                for e in range(experts):
                    at = prefix + expert.format(e=e)
                    if not rule.fc1:
                        outputs.append(out(at + down + ".weight", name, [SourceRows(name, (i, e), 0, t.shape[2])], t.shape[2:]))
                        continue
                    if t.shape[2] != 2 * expert_ffn:
                        raise MergeError(f"{name} has {t.shape[2]} rows per expert but config.json's expert "
                                         f"intermediate size {expert_ffn} needs {2 * expert_ffn}")
                    outputs.append(out(at + gate + ".weight", name, [SourceRows(name, (i, e), 0, expert_ffn)], (expert_ffn,) + rest))
                    outputs.append(out(at + up + ".weight", name, [SourceRows(name, (i, e), expert_ffn, 2 * expert_ffn)],
                                       (expert_ffn,) + rest))
            elif isinstance(rule, GateUp):
                size = cfg.get(rule.size)
                if t.shape[1] != 2 * (size or 0):
                    raise MergeError(f"{name} has {t.shape[1]} rows per layer but config.json's "
                                     f"{rule.size}={size} needs {2 * (size or 0)}; the config is not this model's")
                outputs.append(out(prefix + rule.gate, name, [SourceRows(name, (i,), 0, size)], (size,) + rest))
                outputs.append(out(prefix + rule.up, name, [SourceRows(name, (i,), size, 2 * size)], (size,) + rest))
    if FINAL_NORM in tensors:
        t = tensors[FINAL_NORM]
        outputs.append(out("model.norm.weight", FINAL_NORM, [SourceRows(FINAL_NORM, (), 0, t.shape[0])], t.shape))
    if value_model:
        labels = len(config.get("id2label") or {}) or 1
        if HEAD not in tensors or tensors[HEAD].shape[0] != labels:
            raise MergeError(f"config.json describes a value model ({declared}, {labels} label(s)) but "
                             f"{catalogue.source} has {HEAD} of shape {list(tensors[HEAD].shape) if HEAD in tensors else 'none'}")
        t = tensors[HEAD]
        outputs.append(out("score.weight", HEAD, [SourceRows(HEAD, (), 0, labels)], t.shape))
        # HF's score layer has a bias; the Megatron value head has none: it is exactly zero
        outputs.append(OutputTensor("score.bias", (labels,), cast(t.dtype), []))
    elif not tied:
        if HEAD not in tensors:
            raise MergeError(f"config.json has tie_word_embeddings=false but {catalogue.source} holds no {HEAD}")
        parts, shape = vocab_rows(HEAD)
        outputs.append(out("lm_head.weight", HEAD, parts, shape))
    return outputs

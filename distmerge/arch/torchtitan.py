"""torchtitan names -> HF names: one table per model family, chosen by the HF config's architecture.

Each table mirrors that family's `StateDictAdapter.to_hf` in torchtitan
(torchtitan/models/<family>/state_dict_adapter.py), for both name generations: the current one
(`layers.N.attention.qkv_linear.wq.weight`, `lm_head.weight`, `moe.routed_experts.inner_experts.w1_EFD`)
and the one before spring 2026, torchtitan <= 0.2.x (`layers.N.attention.wq.weight`, `output.weight`,
`moe.experts.w1`). A rule is one of:
- `Same`: the tensor as it is stored;
- `Rope`: Llama 3's q/k projections. torchtitan applies RoPE to interleaved pairs (rows 2i, 2i+1 of
  a head), HF's Llama rotates halves, so each head's rows are gathered as [0, 2, 4, ..., 1, 3, 5, ...]:
  a row order of period head_dim (`SourceRows.order`), streamed in bands like any other rows;
- `Experts`: stacked routed experts. Both generations store them as [E, out, in] (w1/w3 [E, F, D],
  w2 [E, D, F]), so expert e is source[e], already HF's [out, in] layout: no transpose;
- `Drop`: written nowhere, with a note saying why.
Qwen3 (CosSinRoPE, rotate-half like HF) and DeepSeek-V3 (HF's rope_interleave) need no permutation.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass

from ..errors import MergeError
from ..model import Catalogue, OutputTensor, SourceRows
from .config import architecture, text_config
from .hf import check_vocab, hf_order

LAYER = "model.layers.{i}."


@dataclass(frozen=True)
class Same:
    hf: str


@dataclass(frozen=True)
class Rope:
    """q or k of Llama 3: rows gathered within each head (`kv`: the head count is num_key_value_heads)."""

    hf: str
    kv: bool = False


class Experts(Same):
    """[E, out, in] stacked experts -> one HF [out, in] tensor per expert (`{e}` in the name)."""


@dataclass(frozen=True)
class Drop:
    why: str


def _both(current: str, old: str, rule) -> dict:
    """One rule under the current name and the 0.2.x one."""
    return {current: rule, old: rule}


def _dense(q, k=None) -> dict:
    """What Llama 3, Qwen3 and DeepSeek-V3's dense layers share; q and k are the family's rules
    (DeepSeek-V3's MLA has no k, v: its own rules add the rest)."""
    rules = {
        "tok_embeddings.weight": Same("model.embed_tokens.weight"),
        "norm.weight": Same("model.norm.weight"),
        **_both("lm_head.weight", "output.weight", Same("lm_head.weight")),
        **_both("layers.{i}.attention.qkv_linear.wq.weight", "layers.{i}.attention.wq.weight", q),
        **_both("layers.{i}.attention.qkv_linear.wk.weight", "layers.{i}.attention.wk.weight", k),
        **_both("layers.{i}.attention.qkv_linear.wv.weight", "layers.{i}.attention.wv.weight",
                k and Same(LAYER + "self_attn.v_proj.weight")),
        "layers.{i}.attention.wo.weight": Same(LAYER + "self_attn.o_proj.weight"),
        "layers.{i}.attention_norm.weight": Same(LAYER + "input_layernorm.weight"),
        "layers.{i}.ffn_norm.weight": Same(LAYER + "post_attention_layernorm.weight"),
        "layers.{i}.feed_forward.w1.weight": Same(LAYER + "mlp.gate_proj.weight"),
        "layers.{i}.feed_forward.w3.weight": Same(LAYER + "mlp.up_proj.weight"),
        "layers.{i}.feed_forward.w2.weight": Same(LAYER + "mlp.down_proj.weight"),
    }
    return {name: rule for name, rule in rules.items() if rule is not None}


def _moe(expert_bias) -> dict:
    """Routed experts and router, both generations; `expert_bias` is the family's rule for the
    aux-loss-free balancing bias."""
    experts = LAYER + "mlp.experts.{e}."
    return {
        **_both("layers.{i}.moe.routed_experts.inner_experts.w1_EFD", "layers.{i}.moe.experts.w1",
                Experts(experts + "gate_proj.weight")),
        **_both("layers.{i}.moe.routed_experts.inner_experts.w3_EFD", "layers.{i}.moe.experts.w3",
                Experts(experts + "up_proj.weight")),
        **_both("layers.{i}.moe.routed_experts.inner_experts.w2_EDF", "layers.{i}.moe.experts.w2",
                Experts(experts + "down_proj.weight")),
        "layers.{i}.moe.router.gate.weight": Same(LAYER + "mlp.gate.weight"),
        **_both("layers.{i}.moe.expert_bias_E", "layers.{i}.moe.expert_bias", expert_bias),
    }


LLAMA3 = _dense(Rope(LAYER + "self_attn.q_proj.weight"), Rope(LAYER + "self_attn.k_proj.weight", kv=True))
QWEN3 = {
    **_dense(Same(LAYER + "self_attn.q_proj.weight"), Same(LAYER + "self_attn.k_proj.weight")),
    "layers.{i}.attention.q_norm.weight": Same(LAYER + "self_attn.q_norm.weight"),
    "layers.{i}.attention.k_norm.weight": Same(LAYER + "self_attn.k_norm.weight"),
    **_moe(Drop("MoE load-balancing biases (HF's Qwen3-MoE routes without them; torchtitan's to_hf drops "
                "them too)")),
}
DEEPSEEK_V3 = {
    **_dense(Same(LAYER + "self_attn.q_proj.weight")),
    "layers.{i}.attention.wq_a.weight": Same(LAYER + "self_attn.q_a_proj.weight"),
    "layers.{i}.attention.q_norm.weight": Same(LAYER + "self_attn.q_a_layernorm.weight"),
    "layers.{i}.attention.wq_b.weight": Same(LAYER + "self_attn.q_b_proj.weight"),
    "layers.{i}.attention.wkv_a.weight": Same(LAYER + "self_attn.kv_a_proj_with_mqa.weight"),
    "layers.{i}.attention.kv_norm.weight": Same(LAYER + "self_attn.kv_a_layernorm.weight"),
    "layers.{i}.attention.wkv_b.weight": Same(LAYER + "self_attn.kv_b_proj.weight"),
    "layers.{i}.moe.shared_experts.w1.weight": Same(LAYER + "mlp.shared_experts.gate_proj.weight"),
    "layers.{i}.moe.shared_experts.w3.weight": Same(LAYER + "mlp.shared_experts.up_proj.weight"),
    "layers.{i}.moe.shared_experts.w2.weight": Same(LAYER + "mlp.shared_experts.down_proj.weight"),
    **_moe(Same(LAYER + "mlp.gate.e_score_correction_bias")),
    "mtp_layers": Drop("DeepSeek-V3 multi-token-prediction (mtp_layers) tensors dropped: transformers' "
                       "DeepseekV3ForCausalLM has no such layers"),
}
FAMILIES = {
    "LlamaForCausalLM": LLAMA3,
    "Qwen3ForCausalLM": QWEN3,
    "Qwen3MoeForCausalLM": QWEN3,
    "DeepseekV3ForCausalLM": DEEPSEEK_V3,
}
LAYER_KEY = re.compile(r"^layers\.(\d+)\.(.+)$")
MTP_KEY = re.compile(r"^mtp_layers\.\d+\.")  # DeepSeek-V3's multi-token prediction: one rule for all of it


def rope_order(head_dim: int) -> tuple[int, ...]:
    """The rows of one head in HF's order: the even rows (each pair's first), then the odd ones.
    Output row r takes source row 2r for r < head_dim/2, else 2(r - head_dim/2) + 1 (torchtitan's
    Llama3StateDictAdapter._permute)."""
    return tuple(range(0, head_dim, 2)) + tuple(range(1, head_dim, 2))


def _abstract(name: str) -> tuple[str, int | None]:
    """`layers.7.attention.wo.weight` -> (`layers.{i}.attention.wo.weight`, 7); `mtp_layers.0.*` ->
    `mtp_layers`; other names as they are."""
    if MTP_KEY.match(name):
        return "mtp_layers", None
    m = LAYER_KEY.match(name)
    return ("layers.{i}." + m.group(2), int(m.group(1))) if m else (name, None)


def _positive(cfg: dict, key: str, default=None) -> int:
    """A size the mapping needs from config.json: a positive integer (a missing one takes `default`)."""
    value = cfg.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise MergeError(f"config.json has {key}={json.dumps(value)[:40]}, not a positive integer; pass "
                         "--hf-config with the trained model's config")
    return value


def _rope(rule: Rope, name: str, shape: tuple, cfg: dict) -> SourceRows:
    """The gathered recipe of a q or k projection; its rows must be the config's heads x head_dim."""
    heads = _positive(cfg, "num_attention_heads")
    if rule.kv:
        heads = _positive(cfg, "num_key_value_heads", heads)
    head_dim = cfg.get("head_dim") or _positive(cfg, "hidden_size") // _positive(cfg, "num_attention_heads")
    if len(shape) != 2 or shape[0] != heads * head_dim or head_dim % 2:
        raise MergeError(f"{name} has shape {list(shape)}, not {heads} heads of {head_dim} rows as config.json "
                         "says; the config is not this model's: pass --hf-config with the trained model's config")
    return SourceRows(name, (), 0, shape[0], rope_order(head_dim))


def _experts(rule: Experts, name: str, shape: tuple, layer: int, cfg: dict) -> list[tuple[str, SourceRows]]:
    """Expert e's HF tensor is source[e], all its rows; the expert count must be the config's."""
    expected = cfg.get("num_experts") or cfg.get("n_routed_experts")
    if len(shape) != 3 or (expected and shape[0] != expected):
        raise MergeError(f"{name} has shape {list(shape)}, not [{expected or 'E'}, out, in] stacked experts as "
                         "config.json says; the config is not this model's")
    return [(rule.hf.format(i=layer, e=e), SourceRows(name, (e,), 0, shape[1])) for e in range(shape[0])]


def _parts(rule, name: str, shape: tuple, layer: int | None, cfg: dict) -> list[tuple[str, SourceRows]]:
    """(HF name, recipe) for each HF tensor one torchtitan tensor becomes."""
    if isinstance(rule, Experts):
        return _experts(rule, name, shape, layer, cfg)
    hf = rule.hf.format(i=layer)
    if isinstance(rule, Rope):
        return [(hf, _rope(rule, name, shape, cfg))]
    return [(hf, SourceRows(name, (), 0, shape[0] if shape else 1))]


def map_outputs(catalogue: Catalogue, config: dict, cast) -> list[OutputTensor]:
    """Every torchtitan tensor through its family's table; a name no rule knows is refused by name,
    and what is dropped on purpose is counted in the catalogue's notes."""
    arch = architecture(config)
    table = FAMILIES.get(arch)
    if table is None:
        raise MergeError(f"config.json names architecture {arch}, which has no torchtitan mapping (supported: "
                         f"{', '.join(sorted(FAMILIES))}); pass --hf-config with the trained model's config")
    cfg = text_config(config)
    layers = _positive(cfg, "num_hidden_layers")
    parts: dict[str, SourceRows] = {}
    dropped: dict[str, int] = {}
    unknown = []
    for name, t in catalogue.tensors.items():
        key, layer = _abstract(name)
        rule = table.get(key)
        if rule is None:
            unknown.append(name)
        elif isinstance(rule, Drop):
            dropped[rule.why] = dropped.get(rule.why, 0) + 1
        elif layer is not None and layer >= layers:
            raise MergeError(f"{name} is layer {layer} but config.json says num_hidden_layers={layers}; the config "
                             "is not this model's")
        else:
            for hf, part in _parts(rule, name, t.shape, layer, cfg):
                if hf in parts:  # e.g. lm_head.weight beside output.weight: two generations in one save
                    raise MergeError(f"{name} and {parts[hf].source} of {catalogue.source} both map to {hf}; a "
                                     "checkpoint holds each tensor once: this one is corrupt or mixes two saves")
                parts[hf] = part
    if unknown:
        shown = ", ".join(sorted(unknown)[:8]) + (f" and {len(unknown) - 8} more" if len(unknown) > 8 else "")
        raise MergeError(f"no rule maps these torchtitan tensors of {catalogue.source} to {arch}: {shown}. "
                         "Supported names are listed in distmerge/arch/torchtitan.py")
    catalogue.notes.extend(f"{count} {why}" for why, count in dropped.items())
    return _outputs(catalogue, config, cast, parts)


def _outputs(catalogue: Catalogue, config: dict, cast, parts: dict[str, SourceRows]) -> list[OutputTensor]:
    """The OutputTensors in HF order, the head dropped when tied (as to_hf does), the vocab checked."""
    if text_config(config).get("tie_word_embeddings", False):  # transformers' default for these families
        parts.pop("lm_head.weight", None)
    elif "lm_head.weight" not in parts:
        raise MergeError(f"config.json has tie_word_embeddings=false but {catalogue.source} holds no lm_head.weight "
                         "(output.weight); pass --hf-config with the trained model's config")
    check_vocab(catalogue, config, {name: p.source for name, p in parts.items()
                                    if name in ("model.embed_tokens.weight", "lm_head.weight")})
    outputs = []
    for name in hf_order(list(parts)):
        p = parts[name]
        t = catalogue.tensors[p.source]
        shape = t.shape[len(p.index):]
        outputs.append(OutputTensor(name=name, shape=shape, dtype=cast(t.dtype), parts=[p]))
    return outputs

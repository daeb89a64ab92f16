"""Megatron-core GPT (Llama/Mistral, Qwen2, Qwen3, Mixtral, Qwen2/3-MoE, DeepSeek-V3) -> HF, as
tables of rules.

Megatron stores each per-layer key once for all layers (see find_slots for the three ways). Each
rule maps one Megatron key to the HF tensors of a layer (`outputs`), and says how tensor
parallelism splits that key (`tp`, which the legacy reader joins TP ranks by):
- `Same`: the layer's slice as is (norms, linear_proj -> o_proj, linear_fc2 -> down_proj);
- `QKV`: linear_qkv is interleaved per query group, [q_g0 (nh/ng*d rows), k_g0 (d), v_g0 (d), q_g1,
  ...]; q/k/v_proj each take their rows of every group (the bias uses the same layout);
- `GateUp`: linear_fc1 is stored as [gate (F rows); up (F rows)];
- `Router`, `RouterBias`, `Experts`: MoE, named per family by MOE_NAMES.
Embedding and head rows beyond the config's vocab_size are Megatron's vocab padding and are dropped.
A new family is mostly a new entry in FAMILY_RULES and MOE_NAMES.
Megatron-Bridge's LoRA factors (`<linear>.adapter.linear_in/out.weight`) are taken up by
find_adapters, per HF weight, by the same rules (see the LoRA section at the end).
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from ..errors import MergeError
from ..model import Catalogue, LoraDelta, OutputTensor, Piece, SourceRows, SourceTensor, dtype_size
from . import hf, lora
from .config import architecture, text_config

LAYER = "model.layers.{i}."

# How Megatron's tensor parallelism splits a weight. Legacy saves hold each TP rank's part apart,
# and their reader joins them by the split of the rule that maps the tensor (tp_split).
REPLICATED = "replicated"      # every TP rank holds all of it: rank 0's copy is read
COLUMN = "column"              # rows split: TP rank t holds the t-th block of rows
ROW = "row"                    # columns split
GATE_UP = "gate_up"            # a fused [gate; up]: TP rank t holds [gate_t; up_t]
COLUMN_LOCAL = "column_local"  # column-parallel in megatron-core's local spec, duplicated (TELinear) in TE's


class Rule:
    """Maps one Megatron per-layer key to the HF tensors of one layer (see Mapping)."""

    tp = REPLICATED

    def outputs(self, m: Mapping, key: str, i: int) -> Iterator[OutputTensor]:
        raise NotImplementedError


@dataclass(frozen=True)
class Same(Rule):
    """The layer's slice as it is."""

    hf: str
    tp: str = REPLICATED

    def outputs(self, m: Mapping, key: str, i: int) -> Iterator[OutputTensor]:
        slot = m.slots.get((key, i, None, None))
        if slot is not None:
            yield m.whole(LAYER.format(i=i) + self.hf, slot)


@dataclass(frozen=True)
class QKV(Rule):
    """linear_qkv, interleaved per query group: [q_g0 (nh/ng*d rows), k_g0 (d), v_g0 (d), q_g1, ...];
    q/k/v_proj each take their rows of every group (the bias uses the same layout)."""

    suffix: str  # "weight" or "bias"
    tp = COLUMN

    def outputs(self, m: Mapping, key: str, i: int) -> Iterator[OutputTensor]:
        slot = m.slots.get((key, i, None, None))
        if slot is None:
            return
        heads, groups, head_dim = m.heads, m.groups, m.head_dim
        q_rows = heads // groups * head_dim
        group = q_rows + 2 * head_dim
        if slot.shape[0] != groups * group:
            raise MergeError(f"decoder.layers.{key} has {slot.shape[0]} rows per layer, but config.json's "
                             f"num_attention_heads={heads}, num_key_value_heads={groups}, head_dim={head_dim} "
                             f"need {groups * group}; the config is not this model's")
        for proj, first, n in (("q_proj", 0, q_rows), ("k_proj", q_rows, head_dim),
                               ("v_proj", q_rows + head_dim, head_dim)):
            parts = [slot.rows(g * group + first, g * group + first + n) for g in range(groups)]
            yield m.out(f"{LAYER.format(i=i)}self_attn.{proj}.{self.suffix}", slot, parts,
                        (groups * n,) + slot.shape[1:])


@dataclass(frozen=True)
class GateUp(Rule):
    """A fused [gate (F rows); up (F rows)], F from config key `size` (None: half the stored rows)."""

    gate: str = "mlp.gate_proj.weight"
    up: str = "mlp.up_proj.weight"
    size: str | None = "intermediate_size"
    tp = GATE_UP

    def outputs(self, m: Mapping, key: str, i: int) -> Iterator[OutputTensor]:
        if any((key, i, None, half) in m.slots for half in (None, "w", "v")):
            size = None if self.size is None else m.cfg.get(self.size) or 0
            prefix = LAYER.format(i=i)
            yield from m.gate_up(prefix + self.gate, prefix + self.up, key, i, None, size, "layer")


@dataclass(frozen=True)
class Router(Rule):
    """mlp.router.weight [L, E, H] -> the family's router (gate) weight."""

    def outputs(self, m: Mapping, key: str, i: int) -> Iterator[OutputTensor]:
        slot = m.slots.get((key, i, None, None))
        if slot is not None:
            yield m.whole(LAYER.format(i=i) + m.moe_names(key).router, slot)


@dataclass(frozen=True)
class RouterBias(Rule):
    """mlp.router.expert_bias [L, E] (aux-loss-free balancing) -> the family's score-correction bias."""

    def outputs(self, m: Mapping, key: str, i: int) -> Iterator[OutputTensor]:
        slot = m.slots.get((key, i, None, None))
        if slot is None:
            return
        names = m.moe_names(key)
        if names.router_bias is None:
            raise MergeError(f"decoder.layers.{key}: the model routes with Megatron's expert_bias "
                             f"(aux-loss-free balancing), but transformers' {m.arch} has no router bias, "
                             "so the merged model would route differently. Use an architecture with a "
                             "score-correction bias, or a checkpoint trained without expert_bias")
        yield m.whole(LAYER.format(i=i) + names.router_bias, slot)


@dataclass(frozen=True)
class Experts(Rule):
    """Experts stacked twice, [L, E, rows, cols]: fc1 -> each expert's gate and up, fc2 -> its down."""

    fc1: bool

    @property
    def tp(self) -> str:
        return GATE_UP if self.fc1 else ROW

    def outputs(self, m: Mapping, key: str, i: int) -> Iterator[OutputTensor]:
        if (key, i) not in m.experts_of:
            return
        names = m.moe_names(key)
        experts = m.cfg.get("num_local_experts") or m.cfg.get("num_experts") or m.cfg.get("n_routed_experts")
        if sorted(m.experts_of[(key, i)]) != list(range(experts or 0)):
            raise MergeError(f"decoder.layers.{key} of layer {i} holds {len(m.experts_of[(key, i)])} experts "
                             f"but config.json says {experts}; the config is not this model's")
        ffn = m.cfg.get("moe_intermediate_size") or m.cfg.get("intermediate_size")
        for e in range(experts):
            at = LAYER.format(i=i) + names.expert.format(e=e)
            if self.fc1:
                yield from m.gate_up(at + names.gate + ".weight", at + names.up + ".weight", key, i, e, ffn, "expert")
            else:
                yield m.whole(at + names.down + ".weight", m.slots[(key, i, e, None)])


# per-layer keys (after "decoder.layers."); two spellings where local and TE specs differ
LAYER_RULES = {
    "self_attention.linear_qkv.layer_norm_weight": Same("input_layernorm.weight"),
    "input_layernorm.weight": Same("input_layernorm.weight"),
    "self_attention.linear_qkv.weight": QKV("weight"),
    "self_attention.linear_qkv.bias": QKV("bias"),
    "self_attention.q_layernorm.weight": Same("self_attn.q_norm.weight"),
    "self_attention.k_layernorm.weight": Same("self_attn.k_norm.weight"),
    "self_attention.linear_proj.weight": Same("self_attn.o_proj.weight", ROW),
    "mlp.linear_fc1.layer_norm_weight": Same("post_attention_layernorm.weight"),
    "pre_mlp_layernorm.weight": Same("post_attention_layernorm.weight"),
    "mlp.linear_fc1.weight": GateUp(),
    "mlp.linear_fc2.weight": Same("mlp.down_proj.weight", ROW),
    "mlp.router.weight": Router(),
    "mlp.router.expert_bias": RouterBias(),
    "mlp.experts.experts.linear_fc1.weight": Experts(fc1=True),
    "mlp.experts.experts.linear_fc2.weight": Experts(fc1=False),
    # Qwen2-MoE's shared expert and its sigmoid gate
    "mlp.shared_experts.linear_fc1.weight": GateUp(gate="mlp.shared_expert.gate_proj.weight",
                                                   up="mlp.shared_expert.up_proj.weight",
                                                   size="shared_expert_intermediate_size"),
    "mlp.shared_experts.linear_fc2.weight": Same("mlp.shared_expert.down_proj.weight", ROW),
    "mlp.shared_experts.gate_weight": Same("mlp.shared_expert_gate.weight"),
}

# what differs per family: names that mean something else there, and names only it has
FAMILY_RULES = {
    # DeepSeek-V3's multi-latent attention (q_lora_rank > 0: q goes through a low-rank pair) and its
    # shared experts (plural, no gate). Local specs keep q/kv_layernorm apart, TE specs fuse them
    # into the up projections (layer_norm_weight). The up projections split their heads over TP; the
    # down projections too in the local spec, where TE's keep them whole on every rank.
    "DeepseekV3ForCausalLM": {
        "self_attention.linear_q_proj.weight": Same("self_attn.q_proj.weight", COLUMN),
        "self_attention.linear_q_down_proj.weight": Same("self_attn.q_a_proj.weight", COLUMN_LOCAL),
        "self_attention.q_layernorm.weight": Same("self_attn.q_a_layernorm.weight"),
        "self_attention.linear_q_up_proj.layer_norm_weight": Same("self_attn.q_a_layernorm.weight"),
        "self_attention.linear_q_up_proj.weight": Same("self_attn.q_b_proj.weight", COLUMN),
        "self_attention.linear_kv_down_proj.weight": Same("self_attn.kv_a_proj_with_mqa.weight", COLUMN_LOCAL),
        "self_attention.kv_layernorm.weight": Same("self_attn.kv_a_layernorm.weight"),
        "self_attention.linear_kv_up_proj.layer_norm_weight": Same("self_attn.kv_a_layernorm.weight"),
        "self_attention.linear_kv_up_proj.weight": Same("self_attn.kv_b_proj.weight", COLUMN),
        "mlp.shared_experts.linear_fc1.weight": GateUp("mlp.shared_experts.gate_proj.weight",
                                                       "mlp.shared_experts.up_proj.weight", None),
        "mlp.shared_experts.linear_fc2.weight": Same("mlp.shared_experts.down_proj.weight", ROW),
    },
}


@dataclass(frozen=True)
class MoeNames:
    """A family's HF names for the router, the experts' prefix and an expert's gate / up / down."""

    router: str
    expert: str
    gate: str
    up: str
    down: str
    router_bias: str | None = None  # where the family keeps Megatron's expert_bias, if it has one


MOE_NAMES = {
    "MixtralForCausalLM": MoeNames("block_sparse_moe.gate.weight", "block_sparse_moe.experts.{e}.", "w1", "w3", "w2"),
    "Qwen2MoeForCausalLM": MoeNames("mlp.gate.weight", "mlp.experts.{e}.", "gate_proj", "up_proj", "down_proj"),
    "Qwen3MoeForCausalLM": MoeNames("mlp.gate.weight", "mlp.experts.{e}.", "gate_proj", "up_proj", "down_proj"),
    "DeepseekV3ForCausalLM": MoeNames("mlp.gate.weight", "mlp.experts.{e}.", "gate_proj", "up_proj", "down_proj",
                                      router_bias="mlp.gate.e_score_correction_bias"),
}
EMBEDDING = "embedding.word_embeddings.weight"
HEAD = "output_layer.weight"
FINAL_NORM = "decoder.final_layernorm.weight"
ARCHITECTURES = {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", *MOE_NAMES}
# per-layer key -> its TP split, from the rules (a key means the same layer in every family)
TP_SPLITS = {key: rule.tp for rules in (LAYER_RULES, *FAMILY_RULES.values()) for key, rule in rules.items()}

# How a checkpoint may store a per-layer key. By default one key stacks all layers (and experts):
# decoder.layers.K [L, (E,) ...]. Heterogeneous layers (dense and MoE mixed) and saves with
# singleton_local_shards use a key per layer, decoder.layers.{i}.K, the latter also a key per
# expert (mlp.experts.experts.{e}.K) and separate GLU halves (linear_fc1.weight_w / _v).
LAYER_KEY = re.compile(r"^decoder\.layers\.(?:(\d+)\.)?(.+)$")
EXPERT_KEY = re.compile(r"^(mlp\.experts\.experts\.)(?:(\d+)\.)?(.+)$")
GLU_HALF = re.compile(r"^(.+linear_fc1\.weight)_([wv])$")


@dataclass(frozen=True)
class Slot:
    """One layer's (or one expert's) matrix of a per-layer key: catalogue tensor and the leading
    indices that select it."""

    name: str
    index: tuple[int, ...]
    shape: tuple[int, ...]

    def rows(self, first: int, last: int) -> SourceRows:
        return SourceRows(self.name, self.index, first, last)


def find_slots(tensors: dict, layers: int, rules: dict) -> tuple[dict, list[str]]:
    """(per-layer key, layer, expert or None, GLU half "w"/"v" or None) -> Slot for every per-layer
    tensor, however the checkpoint stores it; and the names no rule knows."""
    slots, unknown = {}, []
    for name, t in tensors.items():
        m = LAYER_KEY.match(name)
        if not m:
            continue
        layer, key = m.group(1), m.group(2)
        expert_match = EXPERT_KEY.match(key)
        expert = None
        if expert_match:
            key, expert = expert_match.group(1) + expert_match.group(3), expert_match.group(2)
        half_match = GLU_HALF.match(key)
        half = None
        if half_match:
            key, half = half_match.group(1), half_match.group(2)
        if key not in rules:
            unknown.append(name)
            continue
        if layer is None and t.shape[0] != layers:
            raise MergeError(f"{name} stacks {t.shape[0]} layers but config.json says "
                             f"num_hidden_layers={layers}; the config is not this model's")
        if layer is not None and int(layer) >= layers:
            raise MergeError(f"{name} is layer {layer} but config.json says num_hidden_layers={layers}; "
                             "the config is not this model's")
        for i in range(layers) if layer is None else (int(layer),):
            index = (i,) if layer is None else ()
            if not expert_match:
                slots[(key, i, None, half)] = Slot(name, index, t.shape[len(index):])
                continue
            for e in range(t.shape[len(index)]) if expert is None else (int(expert),):
                at = index + ((e,) if expert is None else ())
                slots[(key, i, e, half)] = Slot(name, at, t.shape[len(at):])
    return slots, unknown


@dataclass
class Mapping:
    """What the rules read while they map one checkpoint: its tensors, the config's dimensions,
    and the per-layer slots (find_slots)."""

    catalogue: Catalogue
    cast: Callable
    arch: str
    cfg: dict
    slots: dict
    experts_of: dict = field(default_factory=dict)  # (key, layer) -> the experts stored for it

    def __post_init__(self):
        self.heads = self.cfg["num_attention_heads"]
        self.groups = self.cfg.get("num_key_value_heads") or self.heads
        self.head_dim = self.cfg.get("head_dim") or self.cfg["hidden_size"] // self.heads
        for key, i, e, _ in self.slots:
            if e is not None:
                self.experts_of.setdefault((key, i), set()).add(e)

    def out(self, name: str, slot: Slot, parts: list[SourceRows], shape) -> OutputTensor:
        return OutputTensor(name, tuple(shape), self.cast(self.catalogue.tensors[slot.name].dtype), parts)

    def whole(self, name: str, slot: Slot) -> OutputTensor:
        return self.out(name, slot, [slot.rows(0, slot.shape[0])], slot.shape)

    def moe_names(self, key: str) -> MoeNames:
        if self.arch not in MOE_NAMES:
            raise MergeError(f"decoder.layers.{key} is an MoE tensor but config.json's architecture "
                             f"{self.arch} is dense")
        return MOE_NAMES[self.arch]

    def gate_up(self, hf_gate: str, hf_up: str, key: str, i: int, expert: int | None, size: int | None,
                what: str) -> Iterator[OutputTensor]:
        """A fused [gate; up] (one slot), or its two halves stored apart (singleton_local_shards)."""
        whole, w, v = (self.slots.get((key, i, expert, half)) for half in (None, "w", "v"))
        if whole is None and (w is None or v is None):
            raise MergeError(f"layer {i} of {self.catalogue.source} holds only one half of decoder.layers.{key}")
        rows = whole.shape[0] if whole is not None else w.shape[0] + v.shape[0]
        size = rows // 2 if size is None else size
        if rows != 2 * size:
            raise MergeError(f"decoder.layers.{key} has {rows} rows per {what} but config.json's "
                             f"size {size} needs {2 * size}; the config is not this model's")
        halves = [(hf_gate, whole, 0), (hf_up, whole, size)] if whole is not None else [(hf_gate, w, 0), (hf_up, v, 0)]
        for hf_name, slot, first in halves:
            yield self.out(hf_name, slot, [slot.rows(first, first + size)], (size,) + slot.shape[1:])


def tp_split(name: str) -> str:
    """How Megatron's tensor parallelism splits the catalogue tensor `name` (a stacked per-layer
    key, or a top-level one): the split of the rule that maps it, REPLICATED where none does."""
    if name in (EMBEDDING, HEAD):
        return COLUMN  # vocab-parallel
    adapter = ADAPTER_KEY.match(name)
    if adapter:
        return _adapter_split(tp_split(adapter["base"] + ".weight"), adapter["io"])
    m = LAYER_KEY.match(name)
    return TP_SPLITS.get(m.group(2), REPLICATED) if m else REPLICATED


def _adapter_split(base: str, io: str) -> str:
    """How TP splits a LoRA factor of a base weight split `base` (Megatron-Bridge's ParallelLinearAdapter):
    linear_in (A) is a RowParallelLinear over a row-parallel base (its columns split), else a
    ColumnParallelLinear (its r rows split); linear_out (B) is always a ColumnParallelLinear (rows
    split), over fc1 as [gate_t; up_t] like the base."""
    if io == "in":
        return ROW if base == ROW else COLUMN
    return GATE_UP if base == GATE_UP else COLUMN


def _family(config: dict) -> tuple[str, bool]:
    """The causal-LM architecture the config names, and whether it is a value model (verl's
    critic: output_layer [1, H] is the same network's `score` head)."""
    declared = architecture(config)
    arch = declared.replace("ForTokenClassification", "ForCausalLM")
    if arch not in ARCHITECTURES:
        raise MergeError(f"config.json names architecture {declared}, which has no Megatron mapping "
                         f"(supported: {', '.join(sorted(ARCHITECTURES))}); pass --hf-config with a matching config")
    return arch, declared.endswith("ForTokenClassification")


def map_outputs(catalogue: Catalogue, config: dict, cast) -> list[OutputTensor]:
    """The HF tensors of the base model: mapped from the Megatron weights; for an adapter-only
    checkpoint the --base model's tensors as they are, or none without --base (only the adapter can
    then be written: attach_folds refuses a fold). LoRA factors must have been taken up by
    find_adapters first (it re-presents them under PEFT's names): a stored adapter left here would
    be dropped without a word, so it is refused."""
    stored = [name for name in catalogue.tensors if ".adapter." in name]
    if stored:
        raise MergeError(f"{catalogue.source} holds LoRA adapters ({stored[0]}, ...) that this merge did not "
                         "read; distmerge must look for them (arch.find_adapters) before mapping")
    names = list(catalogue.tensors)
    if any(name.startswith(HF_BASE) for name in names):
        sources = {name[len(HF_BASE):]: name for name in names if name.startswith(HF_BASE)}
        return hf.map_outputs(catalogue, config, cast, sources)
    if names and all(name.startswith(lora.PREFIX) for name in names):
        return []
    return _map_base(catalogue, config, cast)


def _text_dims(config: dict) -> dict:
    """The text config, which must state the dimensions a Megatron checkpoint is mapped by."""
    cfg = text_config(config)
    missing = [k for k in ("num_hidden_layers", "num_attention_heads", "hidden_size", "vocab_size")
               if not isinstance(cfg.get(k), int) or cfg[k] < 1]
    if missing:
        raise MergeError(f"config.json has no {', '.join(missing)} (a positive integer), by which a Megatron "
                         "checkpoint is mapped; pass --hf-config DIR with the model's config.json")
    return cfg


def _map_base(catalogue: Catalogue, config: dict, cast) -> list[OutputTensor]:
    """map_outputs of a checkpoint that holds its base weights: every tensor but the LoRA factors."""
    arch, value_model = _family(config)
    cfg = _text_dims(config)
    tensors = {name: t for name, t in catalogue.tensors.items() if not is_adapter_tensor(name)}
    rules = {**LAYER_RULES, **FAMILY_RULES.get(arch, {})}
    slots, unmapped = find_slots(tensors, cfg["num_hidden_layers"], rules)
    unmapped += [n for n in tensors if not n.startswith("decoder.layers.") and n not in (EMBEDDING, HEAD, FINAL_NORM)]
    if unmapped:
        shown = ", ".join(sorted(unmapped)[:8]) + (f" and {len(unmapped) - 8} more" if len(unmapped) > 8 else "")
        raise MergeError(f"no rule maps these Megatron tensors of {catalogue.source}: {shown}. "
                         f"Supported names are listed in distmerge/arch/megatron_gpt.py")
    if EMBEDDING not in tensors:
        raise MergeError(f"{catalogue.source} holds no {EMBEDDING}; the checkpoint is incomplete")
    m = Mapping(catalogue, cast, arch, cfg, slots)
    outputs = [_vocab_rows(m, "model.embed_tokens.weight", EMBEDDING)]
    for i in range(cfg["num_hidden_layers"]):
        for key, rule in rules.items():
            outputs += rule.outputs(m, key, i)
    if FINAL_NORM in tensors:
        outputs.append(m.whole("model.norm.weight", Slot(FINAL_NORM, (), tensors[FINAL_NORM].shape)))
    return outputs + _head(m, config, value_model)


def _vocab_rows(m: Mapping, hf_name: str, name: str) -> OutputTensor:
    """The embedding or output layer without Megatron's vocab padding: the config's vocab_size rows."""
    vocab, shape = m.cfg["vocab_size"], m.catalogue.tensors[name].shape
    if shape[0] < vocab:
        raise MergeError(f"{name} has {shape[0]} rows but config.json says vocab_size={vocab}; "
                         "the config is not this model's")
    return m.out(hf_name, Slot(name, (), shape), [SourceRows(name, (), 0, vocab)], (vocab,) + shape[1:])


def _head(m: Mapping, config: dict, value_model: bool) -> list[OutputTensor]:
    """lm_head (none where tied), or a value model's score head."""
    tensors, source = m.catalogue.tensors, m.catalogue.source
    if value_model:
        labels = len(config.get("id2label") or {}) or 1
        if HEAD not in tensors or tensors[HEAD].shape[0] != labels:
            found = list(tensors[HEAD].shape) if HEAD in tensors else "none"
            raise MergeError(f"config.json describes a value model ({architecture(config)}, {labels} label(s)) "
                             f"but {source} has {HEAD} of shape {found}")
        score = m.whole("score.weight", Slot(HEAD, (), tensors[HEAD].shape))
        # HF's score layer has a bias; the Megatron value head has none: it is exactly zero
        return [score, OutputTensor("score.bias", (labels,), score.dtype, [])]
    if bool(m.cfg.get("tie_word_embeddings", False)):
        return []
    if HEAD not in tensors:
        raise MergeError(f"config.json has tie_word_embeddings=false but {source} holds no {HEAD}")
    return [_vocab_rows(m, "lm_head.weight", HEAD)]


# ---------------------------------------------------------------- LoRA: Megatron-Bridge's PEFT adapters
#
# Megatron-Bridge's LoRA (which verl's Megatron workers use) wraps a linear as `<linear>.to_wrap`
# plus `<linear>.adapter` (ParallelLinearAdapter), and the dist checkpoint keeps the base weight's
# key: decoder.layers.<linear>.weight, and beside it <linear>.adapter.linear_in.weight (A, [r, in])
# and .adapter.linear_out.weight (B, [out, r]) stacked like the base. The output is
# W + (alpha / r) * B @ A. B's rows are laid out like W's (a fused QKV's groups, fc1's [gate; up]),
# so the rows an HF weight takes of W are the rows its B takes of B; A is shared by q/k/v (and by
# gate/up). find_adapters re-presents each adapted HF weight's A and B as 2-d catalogue tensors
# under PEFT's names, so the fold (LoraDelta) and the PEFT adapter writer take them unchanged.
#
# Megatron-Bridge's PEFT saves keep only the adapters (its adapter_key_filter): the frozen base is the
# pretrained checkpoint the fine-tuning started from. The rows each HF weight takes of B then come
# from a stand-in base weight of the shape B @ A has ([.., out, in], no pieces: never read). The
# adapter alone can be written from the config; a fold needs the base as an HF model (--base), whose
# tensors sources/hf_base.py adds to the catalogue under HF_BASE + its HF name.

ADAPTER_KEY = re.compile(r"^(?P<base>.+)\.adapter\.linear_(?P<io>in|out)\.weight$")
ADAPTER_NAME = "default"  # the adapter name in the PEFT-style names of the re-presented factors
HF_BASE = "base:"  # catalogue names of the --base model's tensors beside adapter-only factors


def is_adapter_tensor(name: str) -> bool:
    """A LoRA factor as Megatron stores it, or as find_adapters re-presents it: not a base tensor."""
    return ".adapter." in name or name.startswith(lora.PREFIX)


def _adapter_pairs(catalogue: Catalogue) -> dict[str, tuple[str, str]]:
    """Base weight's catalogue name -> (linear_in (A), linear_out (B)) catalogue names. A checkpoint
    that holds base weights must hold each adapted one; an adapter-only one holds none of them."""
    found: dict[str, dict[str, str]] = {}
    for name in catalogue.tensors:
        m = ADAPTER_KEY.match(name)
        if m:
            found.setdefault(m["base"] + ".weight", {})[m["io"]] = name
        elif ".adapter." in name:
            raise MergeError(f"{catalogue.source} holds {name}: an adapter other than Megatron-Bridge's LoRA "
                             "(linear_in / linear_out), e.g. canonical LoRA or DoRA, which distmerge does not "
                             "read yet")
    holds_base = any(not is_adapter_tensor(n) and not n.startswith(HF_BASE) for n in catalogue.tensors)
    pairs = {}
    for base, io in found.items():
        if set(io) != {"in", "out"}:
            raise MergeError(f"{catalogue.source}: the LoRA adapter of {base} has linear_{''.join(io)} but not "
                             "the other factor; the checkpoint is incomplete")
        if holds_base and base not in catalogue.tensors:
            raise MergeError(f"{catalogue.source}: a LoRA adapter {io['in']} has no base weight {base} (the "
                             "checkpoint holds other base weights: it is neither a full save nor an adapter-only one)")
        if ".experts." in base or ".router." in base:
            raise MergeError(f"{catalogue.source} holds a LoRA adapter on {base}: adapters on MoE experts and "
                             "routers are not read yet (only attention and dense MLP linears)")
        _check_factors(catalogue, base, io["in"], io["out"])
        pairs[base] = (io["in"], io["out"])
    return pairs


def _check_factors(catalogue: Catalogue, base: str, a: str, b: str) -> None:
    """A is [.., r, in] and B [.., out, r] for a base weight [.., out, in], stacked alike (without a
    stored base weight, A and B must agree with each other)."""
    sa, sb = (tuple(catalogue.tensors[n].shape) for n in (a, b))
    w = tuple(catalogue.tensors[base].shape) if base in catalogue.tensors else sb[:-1] + sa[-1:]
    lead = w[:-2]
    if len(w) < 2 or len(sa) != len(w) or len(sb) != len(w) or sa[:-2] != lead or sb[:-2] != lead \
            or sa[-1] != w[-1] or sb[-2] != w[-2] or sb[-1] != sa[-2] or sa[-2] < 1:
        raise MergeError(f"{catalogue.source}: LoRA factors {a} {list(sa)} and {b} {list(sb)} do not fit their "
                         f"base weight {base} {list(w)} (A must be [.., r, in], B [.., out, r]): the adapters are "
                         "incomplete (a TP rank's file missing?) or not this model's")


def _adapted_bases(catalogue: Catalogue, pairs: dict[str, tuple[str, str]]) -> dict[str, SourceTensor]:
    """Each adapted linear's base weight: the stored one, or (adapter-only checkpoint) a stand-in of
    the shape B @ A has and no pieces, of which only the row arithmetic of the rules is used."""
    bases = {}
    for base, (a, b) in pairs.items():
        if base in catalogue.tensors:
            bases[base] = catalogue.tensors[base]
            continue
        sa, sb = catalogue.tensors[a].shape, catalogue.tensors[b].shape
        bases[base] = SourceTensor(base, tuple(sb[:-1]) + tuple(sa[-1:]), catalogue.tensors[a].dtype, [])
    return bases


def _adapted_outputs(catalogue: Catalogue, config: dict, bases: dict[str, SourceTensor]) -> Iterator[OutputTensor]:
    """The HF weights that the rules make of the adapted linears' base weights (their rows only)."""
    arch, _ = _family(config)
    cfg = _text_dims(config)
    rules = {**LAYER_RULES, **FAMILY_RULES.get(arch, {})}
    slots, _ = find_slots(bases, cfg["num_hidden_layers"], rules)  # an unknown base: find_adapters refuses it
    m = Mapping(dataclasses.replace(catalogue, tensors=bases), lambda dtype: dtype, arch, cfg, slots)
    for i in range(cfg["num_hidden_layers"]):
        for key, rule in rules.items():
            yield from rule.outputs(m, key, i)


def _derive_factors(catalogue: Catalogue, config: dict, pairs: dict[str, tuple[str, str]]):
    """Per adapted HF weight: its module -> (A, B) names, its name -> base name, and the derived 2-d
    factor tensors (A: the linear's linear_in; B: the rows of linear_out the weight takes of the base)."""
    factors, base_names, derived, used = {}, {}, {}, set()
    for out in _adapted_outputs(catalogue, config, _adapted_bases(catalogue, pairs)):
        base = out.parts[0].source if out.parts else None
        if base not in pairs or out.sources != {base}:
            continue
        a_src, b_src = pairs[base]
        module = out.name.removesuffix(".weight")
        a, b = (f"{lora.PREFIX}{module}.lora_{ab}.{ADAPTER_NAME}.weight" for ab in "AB")
        rank = catalogue.tensors[a_src].shape[-2]
        derived[a] = sub_tensor(catalogue, a, [SourceRows(a_src, out.parts[0].index, 0, rank)])
        derived[b] = sub_tensor(catalogue, b, [SourceRows(b_src, p.index, p.start, p.stop) for p in out.parts])
        factors[module], base_names[out.name] = (a, b), base
        used.add(base)
    if set(pairs) - used:
        unused = sorted(set(pairs) - used)
        raise MergeError(f"{catalogue.source}: the LoRA adapter of {unused[0]} adapts a weight that no rule of "
                         f"distmerge/arch/megatron_gpt.py maps ({len(unused)} such adapters)")
    return factors, base_names, derived


def find_adapters(catalogue: Catalogue, config: dict, lora_alpha: float | None) -> lora.Adapters | None:
    """The checkpoint's LoRA adapters as PEFT's per-module factors, or None when it has none.

    Every HF weight that an adapted linear maps to gets its A (the layer's linear_in) and its B (the
    rows of linear_out the weight takes of the base) as 2-d catalogue tensors named like PEFT's
    (`base_model.model.<module>.lora_A.default.weight`); they replace the stacked factors in
    `catalogue.tensors`. Their pieces are blocks of the stored pieces (prepare validates them too). With
    --base, each adapted weight must be in it, of the shape B @ A has."""
    pairs = _adapter_pairs(catalogue)
    if not pairs:
        return None
    hf_base = any(name.startswith(HF_BASE) for name in catalogue.tensors)
    try:
        factors, base_names, derived = _derive_factors(catalogue, config, pairs)
    except MergeError as e:
        if not hf_base:
            raise
        raise MergeError(f"the LoRA adapters of {catalogue.source} do not fit the config.json used with --base "
                         f"(--base's own, unless --hf-config or the checkpoint gives one): {e}") from None
    ranks = {catalogue.tensors[a].shape[-2] for a, _ in pairs.values()}
    if len(ranks) != 1:
        raise MergeError(f"{catalogue.source}: LoRA factors of different ranks {sorted(ranks)}; per-module ranks "
                         "are not supported")
    r = ranks.pop()
    alpha = _lora_alpha(catalogue, lora_alpha, r)
    if hf_base:
        _check_hf_base(catalogue, factors, derived)
    for a_src, b_src in pairs.values():
        del catalogue.tensors[a_src], catalogue.tensors[b_src]
    catalogue.tensors.update(derived)
    return lora.Adapters(r=r, alpha=alpha, task_type="CAUSAL_LM", factors=factors, base_names=base_names)


def _check_hf_base(catalogue: Catalogue, factors: dict[str, tuple[str, str]], derived: dict) -> None:
    """Each adapted weight must be in the --base model, [out, in] as B @ A is: refused by name."""
    for module, (a, b) in factors.items():
        name, want = f"{module}.weight", (derived[b].shape[0], derived[a].shape[1])
        found = catalogue.tensors.get(HF_BASE + name)
        if found is None or tuple(found.shape) != want:
            has = "no such tensor" if found is None else f"shape {list(found.shape)}"
            raise MergeError(f"the --base model has {has} for {name}, but the LoRA adapter of {catalogue.source} "
                             f"adapts a {list(want)} weight there: --base is not the model these adapters were "
                             "trained on")


def sub_tensor(catalogue: Catalogue, name: str, parts: list[SourceRows]) -> SourceTensor:
    """A tensor made of row ranges of catalogue tensors at fixed leading indices, one after the
    other: the same stored bytes, described by blocks of the source pieces (no data is read)."""
    pieces, at = [], 0
    for part in parts:
        source, d = catalogue.tensors[part.source], len(part.index)
        for p in source.pieces:
            if not all(o <= x < o + n for x, o, n in zip(part.index, p.region, p.shape)):
                continue
            lo, hi = max(part.start, p.region[d]), min(part.stop, p.region[d] + p.shape[d])
            if lo >= hi:
                continue
            skip = sum((x - o) * st for x, o, st in zip(part.index, p.region, p.strides)) \
                + (lo - p.region[d]) * p.strides[d]
            pieces.append(Piece(file=p.file, offset=p.offset + skip * dtype_size(p.dtype),
                                shape=(hi - lo,) + tuple(p.shape[d + 1:]), strides=tuple(p.strides[d:]),
                                region=(at + lo - part.start,) + tuple(p.region[d + 1:]), dtype=p.dtype))
        at += part.stop - part.start
    first = catalogue.tensors[parts[0].source]
    return SourceTensor(name, (at,) + tuple(first.shape[len(parts[0].index) + 1:]), first.dtype, pieces)


def _lora_alpha(catalogue: Catalogue, option: float | None, r: int) -> float:
    """alpha: --lora-alpha, else Megatron-Bridge's run_config.yaml `peft:` section, else peft's
    adapter_config.json or verl's lora_train_meta.json. verl's Megatron saves store none of them."""
    from .megatron_config import read_peft_settings

    meta, origin = read_peft_settings(catalogue)
    if not meta:
        meta, origin = lora.read_meta(catalogue)
    rank = meta.get("dim", meta.get("r"))
    if rank is not None and rank != r:
        raise MergeError(f"{origin} says the LoRA rank is {rank} but the adapters have rank {r}; "
                         "the file is not this checkpoint's")
    alpha = option if option is not None else meta.get("alpha", meta.get("lora_alpha"))
    if alpha is None:
        raise MergeError(f"{catalogue.source} holds LoRA adapters but no file of it says their alpha (verl's "
                         "Megatron checkpoints keep it in the training config only); pass --lora-alpha ALPHA "
                         "(the training's lora alpha: the fold scales B @ A by alpha / r)")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
        raise MergeError(f"lora alpha is {alpha} ({'--lora-alpha' if option is not None else origin}); a fold "
                         "with alpha 0 gives back the base model: pass the training's --lora-alpha")
    return float(alpha)


def attach_folds(outputs: list[OutputTensor], adapters: lora.Adapters) -> None:
    """--lora merge/both: each adapted HF weight is written as W + (alpha / r) * B @ A. An adapter-only
    checkpoint without --base has no weight to fold into: refused, never written without the fold."""
    by_name = {out.name: out for out in outputs}
    missing = sorted(module for module in adapters.factors if f"{module}.weight" not in by_name)
    if missing:
        raise MergeError(f"the checkpoint holds LoRA adapters only ({missing[0]} and {len(missing) - 1} more "
                         "adapted weights, no base weights: Megatron-Bridge's PEFT saves leave out the frozen base "
                         "model), so there is nothing to fold them into; pass --base HF_DIR, the HF model the "
                         "fine-tuning started from (or --lora adapter to write the PEFT adapter alone)")
    for module, (a, b) in adapters.factors.items():
        by_name[f"{module}.weight"].lora = LoraDelta(a=a, b=b, scale=adapters.scale)

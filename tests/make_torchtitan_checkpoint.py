"""Write real torchtitan checkpoints of tiny models, under torchrun with gloo on CPU.

Run:  torchrun --nproc-per-node W tests/make_torchtitan_checkpoint.py --out DIR --variants llama3,qwen3_moe,...
Variants: llama3, llama3_old, llama3_tied, qwen3, qwen3_moe, deepseek_v3 (see VARIANTS).

Each variant is built from torchtitan's own config objects (the layer builders its flavours use, at
tiny sizes, with its ScaledDotProductAttention: FlexAttention needs torch.compile), sharded with
FSDP2 over gloo (fully_shard per block, then the root, as torchtitan's apply_fsdp does), trained
one AdamW step with torchtitan's OptimizersContainer and LRSchedulersContainer, and saved by
torchtitan's CheckpointManager into DIR/VARIANT/checkpoint/step-1/: model keys flat at the top
level beside optimizer.*, lr_scheduler.*, dataloader and train_state.*.

Written by rank 0 beside it:
  hf/config.json                 the HF config of the same model (what --hf_assets_path would hold)
  reference/model.safetensors    the model's StateDictAdapter.to_hf of the full state dict
  reference/logits.safetensors   `tokens` and torchtitan's forward `logits` on them (fp32)

With --big (benchmarks) `llama3` is a ~1.6 GB model (dim 2048, 16 heads of 128, 6 layers, vocab
32000) and `qwen3_moe` a ~2.2 GB one (32 experts of 768); --no-reference skips the training step and the
reference, which need several copies of the model in memory.

`llama3_old` and `qwen3_moe_old` are those models saved under the names torchtitan used before
spring 2026 (0.2.x: layers.N.attention.wq.weight, output.weight, moe.experts.w1, moe.expert_bias):
a state-dict hook renames the keys at save time, so the stored tensors, their sharding and the
reference are those of the current generation.
"""
import argparse
import json
import os
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

STEP = 1
SEQ = 24
QK_SCALE = 25.0


@dataclass(frozen=True)
class Variant:
    """How to build one model: torchtitan config, its state-dict adapter, and the HF config."""

    build: Callable[[], object]          # () -> torchtitan model config
    adapter: Callable[[object], object]  # model config -> StateDictAdapter
    hf_config: Callable[[], dict]        # () -> HF config.json contents
    old_names: bool = False              # save under the 0.2.x names
    expert_bias: bool = False            # give the routers a random expert_bias (it changes the routing)
    final_dtype: str | None = None       # save as the last step: model only, in this export dtype


def sdpa(layers):
    """Use torchtitan's SDPA backend: FlexAttention goes through torch.compile, which CPU CI lacks."""
    from torchtitan.models.common.attention import ScaledDotProductAttention

    for layer in layers:
        layer.attention.inner_attention = ScaledDotProductAttention.Config()
    return layers


LLAMA = dict(dim=64, n_heads=4, n_kv_heads=2, n_layers=2, vocab=257, hidden=176)


def llama3_config(tied: bool = False):
    """Llama 3 as torchtitan's flavours build it (fused QKV, llama RoPE scaling), GQA 4/2 heads."""
    import torchtitan.models.llama3 as l3
    from torchtitan.models.common import ComplexRoPE, Embedding, Linear, RMSNorm

    s = LLAMA
    rope = ComplexRoPE.Config(dim=s["dim"] // s["n_heads"], max_seq_len=256, theta=500000, scaling="llama")
    layers = l3._build_llama3_layers(n_layers=s["n_layers"], dim=s["dim"], n_heads=s["n_heads"],
                                  n_kv_heads=s["n_kv_heads"], hidden_dim=s["hidden"], rope=rope,
                                  fuse_qkv=True, attn_backend="flex")
    return l3.Llama3Model.Config(
        dim=s["dim"], vocab_size=s["vocab"], enable_weight_tying=tied,
        tok_embeddings=Embedding.Config(num_embeddings=s["vocab"], embedding_dim=s["dim"],
                                        param_init=l3._EMBEDDING_INIT),
        norm=RMSNorm.Config(normalized_shape=s["dim"], param_init=l3._NORM_INIT),
        lm_head=Linear.Config(in_features=s["dim"], out_features=s["vocab"],
                              param_init=l3._output_linear_init(s["dim"])),
        layers=sdpa(layers))


def llama3_hf(tied: bool = False) -> dict:
    s = LLAMA
    return dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=s["dim"],
                intermediate_size=s["hidden"], num_attention_heads=s["n_heads"], num_key_value_heads=s["n_kv_heads"],
                num_hidden_layers=s["n_layers"], vocab_size=s["vocab"], rms_norm_eps=1e-5,
                max_position_embeddings=131072, rope_theta=500000.0,
                rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                  original_max_position_embeddings=8192),
                tie_word_embeddings=tied, hidden_act="silu", attention_bias=False, mlp_bias=False,
                bos_token_id=1, eos_token_id=2, torch_dtype="float32")


QWEN = dict(dim=64, n_heads=4, n_kv_heads=2, head_dim=32, n_layers=2, vocab=251, hidden=96,
            experts=4, top_k=2, moe_hidden=32)
BIG = {"llama3": (LLAMA, dict(dim=2048, n_heads=16, n_kv_heads=4, n_layers=6, vocab=32000, hidden=5632)),
       "qwen3_moe": (QWEN, dict(dim=1024, n_heads=16, n_kv_heads=4, head_dim=128, n_layers=6, vocab=32000,
                                experts=32, top_k=4, moe_hidden=768))}


def qwen3_config(moe: bool):
    """Qwen3 dense (tied embeddings) or MoE (4 experts, top-2), head_dim 32 != dim / heads."""
    import torchtitan.models.qwen3 as q3
    from torchtitan.models.common import CosSinRoPE, Embedding, Linear

    s = QWEN
    rope = CosSinRoPE.Config(dim=s["head_dim"], max_seq_len=256, theta=1000000.0)
    common = dict(n_layers=s["n_layers"], dim=s["dim"], n_heads=s["n_heads"], n_kv_heads=s["n_kv_heads"],
                  head_dim=s["head_dim"], fuse_qkv=True, attn_backend="flex", rope=rope)
    if moe:
        layers = q3._build_qwen3_moe_layers(**common, moe_hidden_dim=s["moe_hidden"], num_experts=s["experts"],
                                            top_k=s["top_k"], moe_comm_backend="standard")
    else:
        layers = q3._build_qwen3_layers(**common, hidden_dim=s["hidden"])
    return q3.Qwen3Model.Config(
        vocab_size=s["vocab"], dim=s["dim"], norm=q3._qwen3_norm(s["dim"]), enable_weight_tying=not moe,
        tok_embeddings=Embedding.Config(num_embeddings=s["vocab"], embedding_dim=s["dim"],
                                        param_init=q3._EMBEDDING_INIT),
        lm_head=Linear.Config(in_features=s["dim"], out_features=s["vocab"], param_init=q3._LINEAR_INIT),
        layers=sdpa(layers))


def qwen3_hf(moe: bool) -> dict:
    s = QWEN
    config = dict(architectures=["Qwen3MoeForCausalLM" if moe else "Qwen3ForCausalLM"],
                  model_type="qwen3_moe" if moe else "qwen3", hidden_size=s["dim"], intermediate_size=s["hidden"],
                  num_attention_heads=s["n_heads"], num_key_value_heads=s["n_kv_heads"], head_dim=s["head_dim"],
                  num_hidden_layers=s["n_layers"], vocab_size=s["vocab"], rms_norm_eps=1e-6,
                  max_position_embeddings=256, rope_theta=1000000.0, tie_word_embeddings=not moe,
                  hidden_act="silu", attention_bias=False, bos_token_id=1, eos_token_id=2, torch_dtype="float32")
    if moe:
        config.update(moe_intermediate_size=s["moe_hidden"], num_experts=s["experts"],
                      num_experts_per_tok=s["top_k"], norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[])
    return config


DSV3 = dict(dim=64, n_heads=4, n_layers=2, vocab=263, q_lora_rank=16, kv_lora_rank=32, qk_nope=16, qk_rope=8,
            v_head=16, dense_hidden=96, moe_hidden=32, experts=4, shared=1, top_k=2)


def deepseek_v3_config(q_lora_rank: int = DSV3["q_lora_rank"]):
    """Multi-latent attention with a q low-rank pair (as the 671B flavour; 0: one wq, as the debug
    flavour), layer 0 dense, sigmoid routing with expert_bias, one shared expert, and one
    multi-token-prediction layer."""
    import torchtitan.models.deepseek_v3 as ds
    from torchtitan.models.common import ComplexRoPE, Embedding, Linear, RMSNorm

    s = DSV3
    layers = sdpa(ds._build_dsv3_layers(
        n_layers=s["n_layers"], n_dense_layers=1, dim=s["dim"], n_heads=s["n_heads"], q_lora_rank=q_lora_rank,
        kv_lora_rank=s["kv_lora_rank"], qk_nope_head_dim=s["qk_nope"], qk_rope_head_dim=s["qk_rope"],
        v_head_dim=s["v_head"], mscale=1.0, dense_hidden_dim=s["dense_hidden"], moe_hidden_dim=s["moe_hidden"],
        num_experts=s["experts"], num_shared_experts=s["shared"], router_top_k=s["top_k"],
        router_score_func="sigmoid", router_route_norm=True, attn_backend="flex", moe_comm_backend="standard",
        non_blocking_capacity_factor=None, rope=ComplexRoPE.Config(dim=s["qk_rope"], max_seq_len=256, theta=10000.0)))
    return ds.DeepSeekV3Model.Config(
        vocab_size=s["vocab"], dim=s["dim"],
        tok_embeddings=Embedding.Config(num_embeddings=s["vocab"], embedding_dim=s["dim"],
                                        param_init=ds._EMBEDDING_INIT),
        norm=RMSNorm.Config(normalized_shape=s["dim"], param_init=ds._NORM_INIT),
        lm_head=Linear.Config(in_features=s["dim"], out_features=s["vocab"],
                              param_init=ds._output_linear_init(s["dim"])),
        layers=layers, mtp_layers=sdpa(ds._build_mtp_layers(layers[-1], dim=s["dim"], num_mtp_layers=1)))


def deepseek_v3_hf(q_lora_rank: int = DSV3["q_lora_rank"]) -> dict:
    """HF's DeepseekV3Config of the same model (q_lora_rank null: one q_proj)."""
    s = DSV3
    return dict(architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3", hidden_size=s["dim"],
                intermediate_size=s["dense_hidden"], moe_intermediate_size=s["moe_hidden"],
                num_attention_heads=s["n_heads"], num_key_value_heads=s["n_heads"], num_hidden_layers=s["n_layers"],
                vocab_size=s["vocab"], q_lora_rank=q_lora_rank or None, kv_lora_rank=s["kv_lora_rank"],
                qk_nope_head_dim=s["qk_nope"], qk_rope_head_dim=s["qk_rope"], v_head_dim=s["v_head"],
                head_dim=s["qk_rope"], n_routed_experts=s["experts"], n_shared_experts=s["shared"],
                num_experts_per_tok=s["top_k"], first_k_dense_replace=1, n_group=1, topk_group=1,
                norm_topk_prob=True, routed_scaling_factor=1.0, num_nextn_predict_layers=1, rms_norm_eps=1e-5,
                max_position_embeddings=256, rope_theta=10000.0, rope_scaling=None, rope_interleave=True,
                tie_word_embeddings=False, hidden_act="silu", attention_bias=False, bos_token_id=1, eos_token_id=2,
                torch_dtype="float32")


def llama3_adapter(cfg):
    from torchtitan.models.llama3 import Llama3StateDictAdapter
    return Llama3StateDictAdapter(cfg, None)


def qwen3_adapter(cfg):
    from torchtitan.models.qwen3 import Qwen3StateDictAdapter
    return Qwen3StateDictAdapter(cfg, None)


def deepseek_v3_adapter(cfg):
    from torchtitan.models.deepseek_v3.state_dict_adapter import DeepSeekV3StateDictAdapter
    return DeepSeekV3StateDictAdapter(cfg, None)


VARIANTS = {
    "llama3": Variant(llama3_config, llama3_adapter, llama3_hf),
    "llama3_old": Variant(llama3_config, llama3_adapter, llama3_hf, old_names=True),
    "llama3_final_bf16": Variant(llama3_config, llama3_adapter, llama3_hf, final_dtype="bfloat16"),
    "llama3_tied": Variant(lambda: llama3_config(tied=True), llama3_adapter, lambda: llama3_hf(tied=True)),
    "qwen3": Variant(lambda: qwen3_config(moe=False), qwen3_adapter, lambda: qwen3_hf(moe=False)),
    "qwen3_moe": Variant(lambda: qwen3_config(moe=True), qwen3_adapter, lambda: qwen3_hf(moe=True)),
    "qwen3_moe_old": Variant(lambda: qwen3_config(moe=True), qwen3_adapter, lambda: qwen3_hf(moe=True),
                             old_names=True),
    "deepseek_v3": Variant(deepseek_v3_config, deepseek_v3_adapter, deepseek_v3_hf, expert_bias=True),
    "deepseek_v3_q_full": Variant(lambda: deepseek_v3_config(0), deepseek_v3_adapter, lambda: deepseek_v3_hf(0),
                                  expert_bias=True),
}

# current name part -> torchtitan 0.2.x's (its model keys, checked against 0.2.2's own modules)
OLD_NAMES = ((".attention.qkv_linear.", ".attention."),
             (".moe.routed_experts.inner_experts.w1_EFD", ".moe.experts.w1"),
             (".moe.routed_experts.inner_experts.w2_EDF", ".moe.experts.w2"),
             (".moe.routed_experts.inner_experts.w3_EFD", ".moe.experts.w3"),
             (".moe.expert_bias_E", ".moe.expert_bias"))


def old_names_hook(module, state_dict, prefix, local_metadata) -> None:
    """Rename the current keys to the 0.2.x ones, in place and in order (a root state-dict post-hook)."""
    items = list(state_dict.items())
    state_dict.clear()
    for key, value in items:
        for current, old in OLD_NAMES:
            key = key.replace(current, old)
        state_dict["output." + key.removeprefix("lm_head.") if key.startswith("lm_head.") else key] = value


def main_logits(output):
    """The main head's logits: a model with multi-token prediction returns [main, mtp_1, ...]."""
    return output[0] if isinstance(output, list) else output


def randomise_expert_bias(model) -> None:
    """A non-zero expert_bias (torchtitan's optimizer hook would move it during training), so that
    HF's logits depend on e_score_correction_bias being mapped."""
    generator = torch.Generator().manual_seed(2)
    for module in model.modules():
        bias = getattr(module, "expert_bias_E", None)
        if isinstance(bias, torch.Tensor):
            bias.copy_(torch.randn(bias.shape, generator=generator) * 0.1)


def sharpen_attention(model) -> None:
    """Scale the q/k projections up (x QK_SCALE): at torchtitan's init std of 0.02 a tiny model's
    attention is nearly uniform, so a wrong RoPE row order would move its logits by only ~6e-4."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("qkv_linear.wqkv.weight", "qkv_linear.wq.weight", "qkv_linear.wk.weight")):
                param.mul_(QK_SCALE)


def build_sharded(variant: Variant, cfg, mesh):
    """torchtitan's model on CPU, its own parameter init, then FSDP2 per block and at the root."""
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = cfg.build()
    model.init_states()
    sharpen_attention(model)
    if variant.expert_bias:
        randomise_expert_bias(model)
    for block in model.layers.values():
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def train_step(model, tokens, optimizers, schedulers) -> None:
    """One AdamW step: the checkpoint then holds real optimizer and scheduler state beside the model."""
    main_logits(model(tokens)).float().pow(2).mean().backward()
    optimizers.step()
    schedulers.step()


class TrainState:
    """What torchtitan's Trainer contributes as `train_state` (its state_dict is step and tokens seen)."""

    def state_dict(self):
        return {"step": STEP, "ntokens_seen": STEP * SEQ}

    def load_state_dict(self, state_dict):
        pass


def full_state_dict(model) -> dict:
    """The unsharded state dict (collective): DTensor.full_tensor() over ModelWrapper's view, which is
    what torchtitan saves (get_model_state_dict fails on the fused QKV)."""
    from torch.distributed.tensor import DTensor
    from torchtitan.components.checkpoint import ModelWrapper

    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone()
            for k, v in ModelWrapper(model).state_dict().items()}


def save(model, optimizers, schedulers, dump: str, final_dtype: str | None) -> None:
    """torchtitan's CheckpointManager.save, as its Trainer calls it, into DUMP/checkpoint/step-1/: a
    full training state, or with `final_dtype` the last step's model-only export in that dtype."""
    from torch.distributed.checkpoint.stateful import Stateful
    from torchtitan.components.checkpoint import CheckpointManager

    Stateful.register(TrainState)
    config = CheckpointManager.Config(enable=True, interval=1, keep_latest_k=0, last_save_model_only=bool(final_dtype),
                                      export_dtype=final_dtype or "float32")
    manager = CheckpointManager(config, dataloader=None, model_parts=[model], optimizers=optimizers,
                                lr_schedulers=schedulers, states={"train_state": TrainState()}, sd_adapter=None,
                                base_folder=dump)
    manager.save(curr_step=STEP, last_step=final_dtype is not None)
    manager.close()


def write_reference(variant: Variant, cfg, full: dict, tokens, out: str) -> None:
    """Rank 0: to_hf of the full state dict, torchtitan's logits of an unsharded copy, the HF config."""
    from safetensors.torch import save_file

    hf = variant.adapter(cfg).to_hf(dict(full))
    os.makedirs(os.path.join(out, "reference"), exist_ok=True)
    save_file({k: v.contiguous() for k, v in hf.items()}, os.path.join(out, "reference", "model.safetensors"))
    model = cfg.build()
    model.load_state_dict(full)
    model.eval()
    with torch.no_grad():
        logits = main_logits(model(tokens)).float()
    save_file({"tokens": tokens, "logits": logits.contiguous()}, os.path.join(out, "reference", "logits.safetensors"))
    os.makedirs(os.path.join(out, "hf"), exist_ok=True)
    with open(os.path.join(out, "hf", "config.json"), "w") as f:
        json.dump(variant.hf_config(), f, indent=2)


def containers(model):
    """torchtitan's optimizer and scheduler containers, before any step (no optimizer state yet)."""
    from torchtitan.components.optimizer.lr_scheduler import LRSchedulersContainer
    from torchtitan.components.optimizer.optimizer import OptimizersContainer, ParamGroupConfig

    group = ParamGroupConfig(pattern=".*", optimizer_name="AdamW", optimizer_kwargs={"lr": 1e-2})
    optimizers = OptimizersContainer.Config(param_groups=[group], implementation="for-loop").build(model_parts=[model])
    return optimizers, LRSchedulersContainer.Config(warmup_steps=1).build(optimizers=optimizers, training_steps=10)


def make(name: str, out: str, mesh, reference: bool) -> None:
    """One variant, on every rank: build, shard, train a step, save; rank 0 writes the reference."""
    variant = VARIANTS[name]
    cfg = variant.build()
    model = build_sharded(variant, cfg, mesh)
    tokens = torch.randint(0, cfg.vocab_size, (2, SEQ), generator=torch.Generator().manual_seed(1))
    optimizers, schedulers = containers(model)
    if reference:
        train_step(model, tokens, optimizers, schedulers)
        full = full_state_dict(model)
        if variant.final_dtype:  # what the export writes (the reference logits are of these values)
            full = {k: v.to(getattr(torch, variant.final_dtype)) for k, v in full.items()}
    if variant.old_names:
        model.register_state_dict_post_hook(old_names_hook)
    save(model, optimizers, schedulers, out, variant.final_dtype)
    if reference and dist.get_rank() == 0:
        write_reference(variant, variant.build(), full, tokens[:1], out)
    dist.barrier()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--variants", required=True, help=f"comma-separated, of: {', '.join(VARIANTS)}")
    p.add_argument("--big", action="store_true", help="~1.5 GB llama3 / qwen3_moe (benchmarks)")
    p.add_argument("--no-reference", action="store_true", help="no training step, no reference (benchmarks)")
    args = p.parse_args()
    if args.big:
        for sizes, big in BIG.values():
            sizes.update(big)
    dist.init_process_group("gloo")
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("dp_shard",))
    for name in args.variants.split(","):
        make(name, os.path.join(args.out, name), mesh, reference=not args.no_reference)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

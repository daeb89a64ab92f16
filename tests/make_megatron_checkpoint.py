"""Write a real megatron-core `torch_dist` checkpoint of a tiny GPT on CPU, under torchrun with gloo.

    torchrun --nproc-per-node N tests/make_megatron_checkpoint.py --out DIR [--tp T --pp P] [--from REF]

Without --from it builds a seeded TP1/PP1 model (run with one process), saves it, and records
Megatron's own logits on a fixed input (DIR/reference/logits.pt). With --from REF it loads REF's
checkpoint into a model of the requested TP/PP with dist_checkpointing.load and saves that:
every layout holds the same logical model. DIR gets dist_ckpt/ + huggingface/ (verl's layout), or with
--layout the directories and files of verl's newer layout, Megatron-LM, Megatron-Bridge or NeMo 2.

megatron-core 0.16.1 needs a few patches to save on a CPU-only torch (see patch_for_cpu).
"""
import argparse
import contextlib
import json
import os
import sys

import torch
import torch.distributed as dist

FIXED_INPUT = [[1, 5, 9, 2, 7, 3, 11, 4]]
# verl: dist_ckpt/ + huggingface/; verl-model: model/{dist_ckpt,huggingface} + transformer_config.json;
# megatron-lm: iter_0000001/ (args in common.pt) + latest_checkpointed_iteration.txt; bridge: iter_0000001/
# + run_config.yaml + tokenizer/ + latest_train_state.pt; nemo2: weights/ (keys under module.) + context/
LAYOUTS = ["verl", "verl-model", "megatron-lm", "bridge", "nemo2"]
DIST_DIRS = {"verl": "dist_ckpt", "verl-model": os.path.join("model", "dist_ckpt"), "megatron-lm": "iter_0000001",
             "bridge": "iter_0000001", "nemo2": "weights"}


def parser() -> argparse.ArgumentParser:
    """The model and layout options; make_megatron_lora.py adds its own to the same parser."""
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--from", dest="ref", help="reference checkpoint (dist_ckpt dir) to load and re-save")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--vpp", type=int, default=None, help="virtual pipeline stages (model chunks) per PP rank")
    p.add_argument("--model", default="llama",
                   choices=["llama", "qwen2", "qwen3", "mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3"])
    p.add_argument("--experts", type=int, default=4, help="MoE experts (mixtral)")
    p.add_argument("--ep", type=int, default=1, help="expert parallel size")
    p.add_argument("--value-head", action="store_true",
                   help="a critic: replace the output layer by a [1, hidden] value head (as verl's critic)")
    p.add_argument("--legacy", action="store_true",
                   help="save Megatron-LM's legacy format: iter_0000001/mp_rank_TT[_PPP]/model_optim_rng.pt")
    p.add_argument("--singleton", action="store_true",
                   help="save with metadata singleton_local_shards: a key per layer and per expert, GLU halves apart")
    p.add_argument("--expert-bias", action="store_true",
                   help="MoE only: sigmoid routing with aux-loss-free expert_bias (DeepSeek-V3 style)")
    p.add_argument("--dense-first", action="store_true",
                   help="MoE only: layer 0 is a dense MLP (moe_layer_freq [0, 1, ...]; HF mlp_only_layers [0])")
    p.add_argument("--fully-parallel", action="store_true",
                   help="spread each tensor's chunks over the data-parallel ranks (FullyParallelSaveStrategyWrapper)")
    p.add_argument("--tie", action="store_true")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--groups", type=int, default=2)
    p.add_argument("--ffn", type=int, default=96)
    p.add_argument("--vocab", type=int, default=128, help="HF vocab_size")
    p.add_argument("--padded-vocab", type=int, default=None, help="rows of Megatron's embedding (>= vocab)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--layout", choices=LAYOUTS, default="verl",
                   help="where the torch_dist checkpoint and the files a trainer adds go (see save_layout_files)")
    return p


def parse_args():
    return parser().parse_args()


def patch_for_cpu():
    """Work around megatron-core 0.16.1's CUDA assumptions when saving on CPU."""
    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.synchronize = lambda *a, **k: None
    torch.Tensor.cuda = lambda self, *a, **k: self  # tied embeddings with PP > 1 call weight.data.cuda()
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    original = filesystem_async.FileSystemWriterAsync.preload_tensors  # a staticmethod

    def preload_tensors(write_buckets, non_blocking=True):
        return original(write_buckets, non_blocking=False)  # non_blocking calls torch.cuda.synchronize

    filesystem_async.FileSystemWriterAsync.preload_tensors = staticmethod(preload_tensors)
    from megatron.core import tensor_parallel

    null_tracker = type("NullTracker", (), {"fork": lambda self, *a, **k: contextlib.nullcontext(),
                                            "add": lambda self, *a, **k: None, "get_states": lambda self: {},
                                            "set_states": lambda self, s: None})()
    tensor_parallel.random.get_cuda_rng_tracker = lambda *a, **k: null_tracker
    tensor_parallel.get_cuda_rng_tracker = lambda *a, **k: null_tracker


def moe_settings(args) -> dict:
    """TransformerConfig arguments for the MoE and MLA parts of the model (empty for a dense one)."""
    moe = args.model in ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3")
    mla = args.model == "deepseek_v3"
    moe_args = dict(num_moe_experts=args.experts, moe_router_topk=2, moe_ffn_hidden_size=args.ffn,
                    moe_token_dispatcher_type="allgather", expert_model_parallel_size=args.ep) if moe else {}
    if args.model == "qwen2_moe":  # shared expert with a sigmoid gate; softmax over all experts, no renormalisation
        moe_args.update(moe_shared_expert_intermediate_size=2 * args.ffn, moe_shared_expert_gate=True,
                        moe_router_pre_softmax=True)
    if mla:  # DeepSeek-V3: sigmoid routing with expert_bias, scaled top-k, one shared expert, layer 0 dense
        args.expert_bias = args.dense_first = True
        moe_args.update(moe_shared_expert_intermediate_size=args.ffn, moe_router_topk_scaling_factor=2.5)
    if args.expert_bias:
        moe_args.update(moe_router_enable_expert_bias=True, moe_router_score_function="sigmoid")
    if args.dense_first:
        moe_args.update(moe_layer_freq=[0] + [1] * (args.layers - 1))
    if mla:
        moe_args.update(multi_latent_attention=True, q_lora_rank=32, kv_lora_rank=32, qk_head_dim=16,
                        qk_pos_emb_head_dim=8, v_head_dim=16, rope_type="rope", rotary_scaling_factor=1.0)
    return moe_args


def layer_spec(args, config, vp_stage, qk_norm: bool):
    """megatron-core's local (no Transformer Engine) layer spec: one per layer with --dense-first."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec, get_gpt_layer_local_spec

    if not args.dense_first:
        moe = args.model in ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3")
        return get_gpt_layer_local_spec(num_experts=args.experts if moe else None, moe_grouped_gemm=False,
                                        qk_layernorm=qk_norm)
    spec = get_gpt_decoder_block_spec(config, use_transformer_engine=False, normalization="RMSNorm",
                                      vp_stage=vp_stage)
    if args.model == "deepseek_v3":
        for layer_spec in spec.layer_specs:
            layer_spec.submodules.self_attention.submodules.core_attention = CausalAttention
    return spec


def build(args, vp_stage=None):
    """One model chunk: the whole stage without --vpp, else virtual stage `vp_stage` of this PP rank."""
    import torch.nn.functional as F
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.transformer_config import MLATransformerConfig

    dtype = getattr(torch, args.dtype)
    mla = args.model == "deepseek_v3"
    qk_norm = args.model in ("qwen3", "qwen3_moe") or mla  # MLA: q_a_layernorm / kv_a_layernorm
    moe_args = moe_settings(args)
    config = (MLATransformerConfig if mla else TransformerConfig)(
        num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads,
        num_query_groups=args.heads if mla else args.groups, ffn_hidden_size=args.ffn,
        kv_channels=args.hidden // args.heads,
        normalization="RMSNorm", layernorm_epsilon=1e-6, gated_linear_unit=True, activation_func=F.silu,
        add_bias_linear=False, add_qkv_bias=args.model in ("qwen2", "qwen2_moe"), use_cpu_initialization=True,
        params_dtype=dtype, bf16=dtype == torch.bfloat16, pipeline_dtype=dtype,
        tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp,
        virtual_pipeline_model_parallel_size=args.vpp,
        hidden_dropout=0.0, attention_dropout=0.0, perform_initialization=True, qk_layernorm=qk_norm,
        **moe_args,
    )
    torch.manual_seed(0)
    spec = layer_spec(args, config, vp_stage, qk_norm)
    first = ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
    last = ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
    model = GPTModel(config, transformer_layer_spec=spec, vocab_size=args.padded_vocab or args.vocab,
                     max_sequence_length=128, pre_process=first, post_process=last,
                     share_embeddings_and_output_weights=args.tie, position_embedding_type="rope",
                     rotary_base=10000, vp_stage=vp_stage)
    if args.value_head and last:
        model.output_layer = ValueHead(args.hidden)
    if not args.ref:  # make every tensor distinct from its default init (norms are all ones)
        with torch.no_grad():
            gen = torch.Generator().manual_seed(1)
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen).to(p.dtype) * 0.02)
            for name, b in model.named_buffers():  # a bias large enough to change which experts are picked
                if name.endswith("expert_bias"):
                    b.add_(torch.randn(b.shape, generator=gen).to(b.dtype))
    return model.to(dtype)


class CausalAttention(torch.nn.Module):
    """MLA's core attention on CPU: megatron-core's local DotProductAttention cannot take MLA's
    different q/k and v head sizes (only Transformer Engine's can). It has no weights."""

    def __init__(self, config, layer_number, attn_mask_type, attention_type, softmax_scale=None, **unused):
        super().__init__()
        self.scale = softmax_scale

    def forward(self, query, key, value, attention_mask, **unused):
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [s, b, h, d] -> [b, h, s, d]
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
        return out.permute(2, 0, 1, 3).reshape(out.shape[2], out.shape[0], -1)


class ValueHead(torch.nn.Linear):
    """A critic's value head [1, hidden], replicated over TP, called the way GPTModel calls its output layer."""

    def __init__(self, hidden):
        super().__init__(hidden, 1, bias=False)

    def forward(self, x, weight=None, runtime_gather_output=None):
        return super().forward(x), None


def hf_config(args):
    from transformers import (DeepseekV3Config, LlamaConfig, MixtralConfig, Qwen2Config, Qwen2MoeConfig, Qwen3Config,
                              Qwen3MoeConfig)

    cls, arch = {"llama": (LlamaConfig, "LlamaForCausalLM"), "qwen2": (Qwen2Config, "Qwen2ForCausalLM"),
                 "qwen3": (Qwen3Config, "Qwen3ForCausalLM"), "mixtral": (MixtralConfig, "MixtralForCausalLM"),
                 "qwen2_moe": (Qwen2MoeConfig, "Qwen2MoeForCausalLM"),
                 "qwen3_moe": (Qwen3MoeConfig, "Qwen3MoeForCausalLM"),
                 "deepseek_v3": (DeepseekV3Config, "DeepseekV3ForCausalLM")}[args.model]
    extra = dict(num_local_experts=args.experts, num_experts_per_tok=2) if args.model == "mixtral" else {}
    if args.model == "deepseek_v3":
        extra = dict(n_routed_experts=args.experts, num_experts_per_tok=2, moe_intermediate_size=args.ffn,
                     n_shared_experts=1, routed_scaling_factor=2.5, n_group=1, topk_group=1, norm_topk_prob=True,
                     first_k_dense_replace=1, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16,
                     qk_rope_head_dim=8, v_head_dim=16, rope_interleave=True)
    if args.value_head:
        arch, extra = arch.replace("ForCausalLM", "ForTokenClassification"), dict(extra, num_labels=1)
    if args.model == "qwen2_moe":
        extra = dict(num_experts=args.experts, num_experts_per_tok=2, moe_intermediate_size=args.ffn,
                     shared_expert_intermediate_size=2 * args.ffn, norm_topk_prob=False, decoder_sparse_step=1,
                     mlp_only_layers=[0] if args.dense_first else [])
    if args.model == "qwen3_moe":  # top-k, then softmax over the k (Megatron's default) = renormalised top-k
        extra = dict(num_experts=args.experts, num_experts_per_tok=2, moe_intermediate_size=args.ffn,
                     norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[])
    common = dict(hidden_size=args.hidden, num_attention_heads=args.heads, num_key_value_heads=args.groups,
                  head_dim=args.hidden // args.heads, intermediate_size=args.ffn, num_hidden_layers=args.layers,
                  vocab_size=args.vocab, tie_word_embeddings=args.tie, rms_norm_eps=1e-6, rope_theta=10000.0,
                  max_position_embeddings=128, bos_token_id=1, eos_token_id=2, dtype=args.dtype)
    if args.model == "deepseek_v3":  # MLA: every head has its own k and v; head sizes come from the qk/v dims
        common.update(num_key_value_heads=args.heads)
        del common["head_dim"]
    return cls(architectures=[arch], **{**common, **extra})


def save_legacy(args, names: list[str], chunks: list) -> None:
    """What Megatron-LM's save_checkpoint writes without --use-dist-ckpt: one file per TP x PP x EP rank."""
    from megatron.core import parallel_state as ps

    writer = ps.get_data_parallel_rank() == 0 if args.ep == 1 else ps.get_expert_data_parallel_rank() == 0
    if writer:
        name = f"mp_rank_{ps.get_tensor_model_parallel_rank():02d}"
        if args.pp > 1:
            name += f"_{ps.get_pipeline_model_parallel_rank():03d}"
        if args.ep > 1:
            name += f"_{ps.get_expert_model_parallel_rank():03d}"
        rank_dir = os.path.join(args.out, "iter_0000001", name)
        os.makedirs(rank_dir, exist_ok=True)
        megatron_args = megatron_lm_args(args, chunks[0].config)  # the parallel sizes and the model's settings
        megatron_args.virtual_pipeline_model_parallel_size = args.vpp
        state = {n: m.state_dict() for n, m in zip(names, chunks)}
        torch.save({**state, "args": megatron_args, "checkpoint_version": 3.0, "iteration": 1},
                   os.path.join(rank_dir, "model_optim_rng.pt"))
    if dist.get_rank() == 0:
        with open(os.path.join(args.out, "latest_checkpointed_iteration.txt"), "w") as f:
            f.write("1")


def save_dist(args, names: list[str], chunks: list) -> None:
    """megatron-core's torch_dist format, into OUT/dist_ckpt."""
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps

    ckpt = os.path.join(args.out, DIST_DIRS[args.layout])
    os.makedirs(ckpt, exist_ok=True)
    strategy = None
    if args.fully_parallel:
        from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
        from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelSaveStrategyWrapper

        strategy = FullyParallelSaveStrategyWrapper(get_default_save_sharded_strategy(),
                                                    ps.get_data_parallel_group(with_context_parallel=True))
    metadata = {"singleton_local_shards": True} if args.singleton else None
    prefix = "module." if args.layout == "nemo2" else ""  # NeMo 2 wraps the model: every key gains module.
    sharded = {n: m.sharded_state_dict(prefix=prefix, metadata=metadata) for n, m in zip(names, chunks)}
    state = sharded if args.vpp else sharded["model"]
    if args.layout == "megatron-lm":  # Megatron-LM's save_checkpoint: args and the rest go to common.pt
        state = {**sharded, "args": megatron_lm_args(args, chunks[0].config), "checkpoint_version": 3.0,
                 "iteration": 1}
    dist_checkpointing.save(state, ckpt, sharded_strategy=strategy)


def model_settings(args, config) -> dict:
    """The model's settings under TransformerConfig's names, read off the config the model was built
    with (plain values only), plus GPTModel's own arguments: what Bridge, NeMo and verl serialise."""
    import dataclasses

    out = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(value, (bool, int, float, str)) or (isinstance(value, list)
                                                         and all(isinstance(v, int) for v in value)):
            out[f.name] = value
    out["activation_func"] = {"_target_": f"torch.nn.functional.{config.activation_func.__name__}", "_call_": False}
    out.update(share_embeddings_and_output_weights=args.tie, vocab_size=args.vocab, seq_length=128,
               max_position_embeddings=128, rotary_base=10000, position_embedding_type="rope")
    return out


def megatron_lm_args(args, config) -> argparse.Namespace:
    """The `args` Megatron-LM pickles into every checkpoint: its own names where they differ."""
    values = model_settings(args, config)
    del values["activation_func"], values["share_embeddings_and_output_weights"]
    renames = {"layernorm_epsilon": "norm_epsilon", "num_moe_experts": "num_experts", "gated_linear_unit": "swiglu"}
    values = {renames.get(k, k): v for k, v in values.items()}
    values.update(untie_embeddings_and_output_weights=not args.tie, padded_vocab_size=args.padded_vocab or args.vocab,
                  group_query_attention=config.num_query_groups != config.num_attention_heads,
                  params_dtype=getattr(torch, args.dtype), tensor_model_parallel_size=args.tp,
                  pipeline_model_parallel_size=args.pp, expert_model_parallel_size=args.ep)
    del values["vocab_size"]  # Megatron-LM keeps it only for tokenizers without a vocabulary file
    return argparse.Namespace(**values)


def sized_tokenizer(size: int):
    """A word-level tokenizer with exactly `size` tokens (the HF vocab_size a synthesized config reads)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>", "<pad>"] + [f"w{i}" for i in range(size - 4)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")


def save_layout_files(args, config) -> None:
    """Rank 0: the files each trainer writes beside its torch_dist checkpoint."""
    import yaml

    out, settings = args.out, model_settings(args, config)
    if args.layout in ("verl", "verl-model"):
        hf_dir = os.path.join(out, "huggingface" if args.layout == "verl" else os.path.join("model", "huggingface"))
        hf_config(args).save_pretrained(hf_dir)
        sys.path.insert(0, os.path.dirname(__file__))
        from make_fsdp_checkpoint import tiny_tokenizer

        tiny_tokenizer().save_pretrained(hf_dir)
    if args.layout == "verl-model":
        with open(os.path.join(out, "transformer_config.json"), "w") as f:
            json.dump({k: v for k, v in settings.items() if k != "activation_func"}, f, indent=2)
        with open(os.path.join(out, "ckpt_contents.json"), "w") as f:
            json.dump(["model"], f)
    elif args.layout == "megatron-lm":
        with open(os.path.join(out, "latest_checkpointed_iteration.txt"), "w") as f:
            f.write("1")
    elif args.layout == "bridge":
        iter_dir = os.path.join(out, "iter_0000001")
        with open(os.path.join(iter_dir, "run_config.yaml"), "w") as f:
            yaml.safe_dump({"model": settings, "checkpoint": {"ckpt_format": "torch_dist"}}, f)
        sized_tokenizer(args.vocab).save_pretrained(os.path.join(iter_dir, "tokenizer"))
        for name in (os.path.join(out, "latest_train_state.pt"), os.path.join(iter_dir, "train_state.pt")):
            torch.save({"step": torch.tensor(1), "consumed_train_samples": torch.tensor(8)}, name)
    elif args.layout == "nemo2":
        context = os.path.join(out, "context")
        os.makedirs(context, exist_ok=True)
        with open(os.path.join(context, "model.yaml"), "w") as f:
            yaml.safe_dump({"_target_": "nemo.collections.llm.gpt.model.base.GPTModel",
                            "config": {"_target_": "nemo.collections.llm.gpt.model.base.GPTConfig", **settings}}, f)
        with open(os.path.join(context, "io.json"), "w") as f:
            json.dump({"root": {"type": "nemo.collections.llm.gpt.model.base.GPTModel"}}, f)
        sized_tokenizer(args.vocab).save_pretrained(os.path.join(context, "nemo_tokenizer"))


def save_reference(args, model) -> None:
    """Megatron's own logits on FIXED_INPUT: what the merged HF model must reproduce."""
    ids = torch.tensor(FIXED_INPUT)
    seq = ids.shape[1]
    mask = torch.triu(torch.ones(1, 1, seq, seq, dtype=torch.bool), diagonal=1)  # True = masked
    with torch.no_grad():
        logits = model.eval()(input_ids=ids, position_ids=torch.arange(seq).unsqueeze(0), attention_mask=mask)
    os.makedirs(os.path.join(args.out, "reference"), exist_ok=True)
    logits = logits if args.value_head else logits[..., : args.vocab]
    torch.save(logits.float(), os.path.join(args.out, "reference", "logits.pt"))


def main():
    args = parse_args()
    dist.init_process_group("gloo")
    patch_for_cpu()
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps

    ps.initialize_model_parallel(tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp,
                                 virtual_pipeline_model_parallel_size=args.vpp, expert_model_parallel_size=args.ep)
    if args.model == "deepseek_v3":  # without Transformer Engine, MLA still takes TE's classes as present
        from megatron.core.transformer import multi_latent_attention

        multi_latent_attention.HAVE_TE = False
    if args.model in ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3"):  # MoE forward on CPU
        from megatron.core.transformer.moe import moe_utils

        moe_utils.te_general_gemm = None
    chunks = [build(args, v) for v in range(args.vpp)] if args.vpp else [build(args)]
    names = [f"model{v}" for v in range(len(chunks))] if args.vpp else ["model"]
    if args.ref:
        state = dist_checkpointing.load({n: m.sharded_state_dict() for n, m in zip(names, chunks)}, args.ref)
        for n, m in zip(names, chunks):
            m.load_state_dict(state[n], strict=False)
    if args.legacy:
        save_legacy(args, names, chunks)
    else:
        save_dist(args, names, chunks)
    if dist.get_rank() == 0:
        save_layout_files(args, chunks[0].config)
    if not args.ref and dist.get_world_size() == 1:
        save_reference(args, chunks[0])
    dist.barrier()
    exit_now()


def exit_now() -> None:
    """Megatron's checkpoint writer leaves a spawned multiprocessing manager behind; it would keep
    our stdout open (a caller reading it would wait forever). End it, then leave without
    interpreter teardown (gloo teardown with live helper threads aborts now and then)."""
    import psutil

    for child in psutil.Process().children(recursive=True):
        child.kill()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()

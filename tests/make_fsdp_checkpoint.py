"""Write a real verl-style FSDP checkpoint of a tiny HF model, under torchrun with gloo.

Run:  torchrun --nproc-per-node W tests/make_fsdp_checkpoint.py --out DIR [--layout fsdp2] ...

It saves exactly what verl's FSDPCheckpointManager saves:
  model_world_size_{W}_rank_{r}.pt   (model.state_dict() of the sharded model, torch.save)
  fsdp_config.json                   ({"FSDP_version": 1|2, "world_size": W})
  huggingface/                       (config, generation config, tokenizer)
and, for the tests, the ground truth taken from the live sharded model:
  reference/model.safetensors        (every tensor gathered with full_tensor()) + config.json
  reference/logits.pt                (logits of the original model on a fixed input)
With --lora R:ALPHA the model is a PEFT LoRA model (q_proj, v_proj, down_proj adapted; lora_B
made non-zero) saved as verl saves it, with lora_train_meta.json; the reference then holds the
model folded by peft's merge_and_unload(), the unfolded base (reference/base.safetensors) and
the adapter as peft saves it (reference/adapter/).
"""
import argparse
import json
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard

FIXED_INPUT = [[1, 5, 9, 2, 7, 3, 11, 4]]


def parse_args():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--model", choices=["llama", "qwen2", "qwen2_vl", "qwen2_5_vl"], default="llama")
    p.add_argument("--old-vlm-names", action="store_true",
                   help="save a VLM under the names transformers < 4.52 used (visual.*, model.layers.*)")
    p.add_argument("--layout", choices=["fsdp2", "fsdp1", "fsdp1_nomesh", "hsdp", "tp", "single"], default="fsdp2")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--intermediate", type=int, default=96)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=1001)
    p.add_argument("--tie", action="store_true", help="tie_word_embeddings")
    p.add_argument("--optim-step", action="store_true", help="take one AdamW step before saving")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--meta-init", action="store_true",
                   help="init on meta, shard, then to_empty + seeded init of the local shards (big models)")
    p.add_argument("--value-head", action="store_true", help="a critic: *ForTokenClassification with num_labels=1")
    p.add_argument("--lora", metavar="R:ALPHA", help="a PEFT LoRA model with this rank and alpha (fsdp2 layout)")
    p.add_argument("--no-reference", action="store_true", help="skip reference weights and logits (benchmarks)")
    p.add_argument("--save", choices=["verl", "dcp"], default="verl",
                   help="verl: per-rank torch.save as verl does; dcp: torch.distributed.checkpoint.save of "
                        "{'model': state_dict} into OUT/dcp (as accelerate and torchtitan do)")
    return p.parse_args()


def vlm_config(args):
    """A tiny Qwen2-VL / Qwen2.5-VL: a 2-layer language model and a 2-block vision tower."""
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig

    text = dict(hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, vocab_size=args.vocab,
                max_position_embeddings=128, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
                bos_token_id=1, eos_token_id=2)
    if args.model == "qwen2_vl":
        vision = dict(depth=2, embed_dim=32, hidden_size=args.hidden, num_heads=2, mlp_ratio=2, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2)
        return Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=args.tie, bos_token_id=1,
                             eos_token_id=2, architectures=["Qwen2VLForConditionalGeneration"])
    vision = dict(depth=2, hidden_size=32, out_hidden_size=args.hidden, intermediate_size=48, num_heads=2,
                  patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                  fullatt_block_indexes=[1])
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=args.tie, bos_token_id=1,
                            eos_token_id=2, architectures=["Qwen2_5_VLForConditionalGeneration"])


def hf_config(args):
    from transformers import LlamaConfig, Qwen2Config

    if args.model.endswith("_vl"):
        return vlm_config(args)
    common = dict(
        hidden_size=args.hidden, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        intermediate_size=args.intermediate, num_hidden_layers=args.layers, vocab_size=args.vocab,
        tie_word_embeddings=args.tie, max_position_embeddings=128, bos_token_id=1, eos_token_id=2,
    )
    family, cls = ("Llama", LlamaConfig) if args.model == "llama" else ("Qwen2", Qwen2Config)
    if args.value_head:  # verl's critic: a token classifier with one label
        return cls(architectures=[f"{family}ForTokenClassification"], num_labels=1, **common)
    return cls(architectures=[f"{family}ForCausalLM"], **common)


def model_class(args):
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoModelForTokenClassification

    if args.model.endswith("_vl"):
        return AutoModelForImageTextToText
    return AutoModelForTokenClassification if args.value_head else AutoModelForCausalLM


def tiny_tokenizer():
    """A word-level tokenizer built offline; enough for AutoTokenizer to load."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>", "<pad>"] + [f"w{i}" for i in range(60)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="<pad>")


def verl_shard_placement_fn(fsdp_size):
    """verl's FSDP2 placement: shard the first dim that divides the mesh size, else dim 0."""
    def fn(param):
        for dim, size in enumerate(param.shape):
            if size % fsdp_size == 0:
                return Shard(dim)
        return Shard(0)
    return fn


def build_model(args):
    config = hf_config(args)
    AutoModelForCausalLM = model_class(args)  # noqa: N806
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    if args.meta_init:  # materialised after sharding (see materialise): each rank holds only its shards
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        with torch.no_grad():  # make every tensor distinct from its default init (norms are all ones)
            gen = torch.Generator().manual_seed(1)
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype) * 0.01)
    return model, config


def materialise(model, config, rank):
    """--meta-init: allocate and fill only this rank's shards (an 11 GB model on 2 ranks of a 24 GB
    machine), with a seeded normal init; the rotary buffer is recomputed."""
    model.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(rank)
    with torch.no_grad():
        for p in model.parameters():
            local = p.to_local() if isinstance(p, DTensor) else p
            local.normal_(0, 0.02, generator=gen)
    model.model.rotary_emb.__init__(config=config)  # to_empty left its inv_freq buffer uninitialised


LORA_TARGETS = ["q_proj", "v_proj", "down_proj"]


def lora_config(args):
    from peft import LoraConfig

    r, alpha = args.lora.split(":")
    return LoraConfig(r=int(r), lora_alpha=float(alpha), target_modules=LORA_TARGETS, lora_dropout=0.0,
                      task_type="CAUSAL_LM")


def add_lora(model, args):
    """A PEFT model whose lora_B is not zero (peft starts it at zero: folding would change nothing)."""
    from peft import get_peft_model

    model = get_peft_model(model, lora_config(args))
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return model


def wrap(model, args, world):
    """Shard the model the way verl does for the requested layout; returns the save mesh kind."""
    from torch.distributed.fsdp import fully_shard

    inner = (model.base_model.model if args.lora else model).model
    if hasattr(inner, "language_model"):  # a VLM: shard the vision blocks as well
        layers = list(inner.language_model.layers) + list(inner.visual.blocks)
    else:
        layers = inner.layers
    if args.layout == "fsdp2":
        mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("fsdp",))
        fn = verl_shard_placement_fn(world)
        for layer in layers:
            fully_shard(layer, mesh=mesh, shard_placement_fn=fn)
        fully_shard(model, mesh=mesh, shard_placement_fn=fn)
        return model, 2
    if args.layout == "hsdp":
        mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("ddp", "fsdp"))
        fn = verl_shard_placement_fn(world // 2)
        for layer in layers:
            fully_shard(layer, mesh=mesh, shard_placement_fn=fn)
        fully_shard(model, mesh=mesh, shard_placement_fn=fn)
        return model, 2
    if args.layout == "tp":
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

        mesh = init_device_mesh("cpu", (world // 2, 2), mesh_dim_names=("fsdp", "tp"))
        plan = {}
        for i in range(len(layers)):
            for name in ("q_proj", "k_proj", "v_proj"):
                plan[f"model.layers.{i}.self_attn.{name}"] = ColwiseParallel()
            plan[f"model.layers.{i}.self_attn.o_proj"] = RowwiseParallel()
            plan[f"model.layers.{i}.mlp.gate_proj"] = ColwiseParallel()
            plan[f"model.layers.{i}.mlp.up_proj"] = ColwiseParallel()
            plan[f"model.layers.{i}.mlp.down_proj"] = RowwiseParallel()
        parallelize_module(model, mesh["tp"], plan)
        for layer in layers:
            fully_shard(layer, mesh=mesh["fsdp"])
        fully_shard(model, mesh=mesh["fsdp"])
        return model, 2
    if args.layout in ("fsdp1", "fsdp1_nomesh"):  # without a mesh FSDP1 saves ShardedTensors
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp import ShardingStrategy

        mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("fsdp",)) if args.layout == "fsdp1" else None
        model = FSDP(model, device_mesh=mesh, use_orig_params=True, device_id=torch.device("cpu"),
                     sharding_strategy=ShardingStrategy.FULL_SHARD)
        return model, 1
    return model, 2  # single: a one-rank save holds plain tensors


def sharded_state_dict(model, fsdp_version):
    if fsdp_version == 1:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp import ShardedStateDictConfig, StateDictType

        with FSDP.state_dict_type(model, StateDictType.SHARDED_STATE_DICT, ShardedStateDictConfig(offload_to_cpu=True)):
            return model.state_dict()
    return model.state_dict()


def full_state_dict(model, fsdp_version):
    """Every tensor gathered from the live shards: the ground truth for the merge."""
    if fsdp_version == 1:
        from torch.distributed.fsdp import FullStateDictConfig, StateDictType
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        with FSDP.state_dict_type(model, StateDictType.FULL_STATE_DICT, FullStateDictConfig(rank0_only=False)):
            return {k: v.clone() for k, v in model.state_dict().items()}
    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).clone() for k, v in model.state_dict().items()}


def old_vlm_name(name):
    if name.startswith("model.visual."):
        return name[len("model."):]
    return name.replace("model.language_model.", "model.", 1)


def lora_reference(full, config, args, ref_dir):
    """The PEFT model rebuilt from the gathered tensors: its logits, its adapter as peft saves it,
    its base weights, and its weights folded by peft's merge_and_unload()."""
    from peft import get_peft_model
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    peft_model = get_peft_model(AutoModelForCausalLM.from_config(config, dtype=getattr(torch, args.dtype)),
                                lora_config(args))
    missing, unexpected = peft_model.load_state_dict(full, strict=False)
    assert not unexpected and all("lm_head" in k for k in missing), (missing, unexpected)
    peft_model.eval()
    with torch.no_grad():
        logits = peft_model(input_ids=torch.tensor(FIXED_INPUT)).logits
    peft_model.save_pretrained(os.path.join(ref_dir, "adapter"))
    prefix = "base_model.model."
    base = {k[len(prefix):].replace(".base_layer.", "."): v for k, v in full.items() if ".lora_" not in k}
    if config.tie_word_embeddings:
        base.pop("lm_head.weight", None)
    save_file(base, os.path.join(ref_dir, "base.safetensors"), metadata={"format": "pt"})
    merged = peft_model.merge_and_unload()
    return {k: v.contiguous() for k, v in merged.state_dict().items()}, logits


def main():
    args = parse_args()
    single = args.layout == "single"
    if not single:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if not single else 0
    world = dist.get_world_size() if not single else 1
    model, config = build_model(args)
    if args.lora:
        model = add_lora(model, args)
    model, fsdp_version = wrap(model, args, world)
    if args.meta_init:
        materialise(model, config, rank)

    if args.optim_step:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        ids = torch.tensor(FIXED_INPUT)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()

    os.makedirs(args.out, exist_ok=True)
    state = sharded_state_dict(model, fsdp_version)
    if args.save == "dcp":
        import torch.distributed.checkpoint as dcp

        dcp.save({"model": state}, checkpoint_id=os.path.join(args.out, "dcp"))
    else:
        if args.old_vlm_names:  # the same DTensors under the names older transformers gave them
            state = {old_vlm_name(k): v for k, v in state.items()}
        torch.save(state, os.path.join(args.out, f"model_world_size_{world}_rank_{rank}.pt"))
    if not args.no_reference:
        full = full_state_dict(model, fsdp_version)
    if rank == 0 and args.save == "verl":
        with open(os.path.join(args.out, "fsdp_config.json"), "w") as f:
            json.dump({"FSDP_version": fsdp_version, "world_size": world}, f, indent=4)
        if args.lora:  # what verl writes beside a LoRA checkpoint
            lc = lora_config(args)
            with open(os.path.join(args.out, "lora_train_meta.json"), "w") as f:
                json.dump({"r": lc.r, "lora_alpha": lc.lora_alpha, "task_type": "CAUSAL_LM"}, f)
    if rank == 0:
        hf_dir = os.path.join(args.out, "huggingface")
        config.save_pretrained(hf_dir)
        from transformers import GenerationConfig

        GenerationConfig(bos_token_id=1, eos_token_id=2, do_sample=False).save_pretrained(hf_dir)
        tiny_tokenizer().save_pretrained(hf_dir)
        if args.model.endswith("_vl"):  # the processor's files, which the merged directory must carry
            with open(os.path.join(hf_dir, "preprocessor_config.json"), "w") as f:  # as Qwen2VLImageProcessor saves it
                json.dump({"image_processor_type": "Qwen2VLImageProcessor", "min_pixels": 3136, "max_pixels": 50176,
                           "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
                           "image_mean": [0.48145466, 0.4578275, 0.40821073],
                           "image_std": [0.26862954, 0.26130258, 0.27577711]}, f, indent=2)
            with open(os.path.join(hf_dir, "chat_template.jinja"), "w") as f:
                f.write("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}")
    if not args.no_reference and rank == 0:
        from safetensors.torch import save_file

        ref_dir = os.path.join(args.out, "reference")
        os.makedirs(ref_dir, exist_ok=True)
        full = {k.replace("_fsdp_wrapped_module.", ""): v.contiguous() for k, v in full.items()}
        if args.lora:
            full, peft_logits = lora_reference(full, config, args, ref_dir)
        if config.tie_word_embeddings:
            full.pop("lm_head.weight", None)
        save_file(full, os.path.join(ref_dir, "model.safetensors"), metadata={"format": "pt"})
        config.save_pretrained(ref_dir)  # a complete HF directory, for `distmerge verify --reference`
        plain = model_class(args).from_config(config, dtype=getattr(torch, args.dtype))
        missing, unexpected = plain.load_state_dict(full, strict=False)
        assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
        plain.eval()
        with torch.no_grad():
            logits = plain(input_ids=torch.tensor(FIXED_INPUT)).logits
        torch.save(peft_logits if args.lora else logits, os.path.join(ref_dir, "logits.pt"))
    if not single:
        dist.barrier()
        # Leave without tearing down gloo: with FSDP's threads still alive, interpreter teardown
        # aborts now and then ("terminate called without an active exception") after a good save.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    main()

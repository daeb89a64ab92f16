"""Write the verl FSDP layouts users reported as refused or fragile, with real FSDP under torchrun (gloo).

Run:  torchrun --nproc-per-node W tests/make_verl_layouts.py --out DIR --layout LAYOUT [--lora R:ALPHA]

Each layout is saved as verl 0.9.1's FSDPCheckpointManager saves: model_world_size_W_rank_R.pt
(torch.save of the sharded model's state_dict()), fsdp_config.json, huggingface/, and for a LoRA
model lora_train_meta.json ({"r", "lora_alpha" as an int, "task_type"}); the ground truth is
written under reference/ as make_fsdp_checkpoint.py does (model.safetensors, logits.pt).
--model gemma4 is a tiny Gemma 4 with 0-dim buffers; --save dcp / deepspeed / megatron write the
same model (or, for megatron, a 0-dim tensor) with those writers instead. Layouts:
  fsdp2        FSDP2 on verl's mesh ("fsdp",) (with --model gemma4: the scalars case)
  veomni       FSDP2 on VeOmni's mesh: a root mesh ("dp_shard",) and its flattened views, sharded on
               parallel_state.fsdp_mesh = device_mesh["dp_shard"] (Shard(0), VeOmni's default)
  veomni_sp    VeOmni with Ulysses: root mesh (dp_shard, ulysses), parameters sharded over the flattened
               "dp_shard_sp" mesh
  veomni_hsdp  VeOmni with replicas: root mesh (dp_replicate, dp_shard), sharded on that 2-d mesh
  fsdp1_single FSDP1 on one rank (FSDP switches to NO_SHARD): plain tensors, not DTensors
  fsdp2_single FSDP2 on one rank: DTensors on a one-rank mesh
  no_config    FSDP2 saved without fsdp_config.json (verl before it wrote one)
  hsdp_2x1     FSDP2 HSDP on a (ddp=2, fsdp=1) mesh: each rank holds DTensors whose local block is whole
  hsdp1_2x1    FSDP1 HYBRID_SHARD on verl's (ddp=2, fsdp=1) mesh (fsdp_size=1): each rank holds the full
               tensors as plain tensors
  lora_only    a PEFT LoRA model saved with checkpoint.save_lora_only: only keys with "lora_" in them,
               plus lora_train_meta.json; the base model is written as HF safetensors to base/ (sharded,
               with an index), the adapter as peft saves it to reference/adapter/, and reference/ holds
               peft's merge_and_unload() of the live model
"""
import argparse
import json
import os
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # --save deepspeed: DeepSpeed's CPU accelerator

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.distributed.device_mesh import init_device_mesh  # noqa: E402
from torch.distributed.fsdp import fully_shard  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_fsdp_checkpoint import (FIXED_INPUT, add_lora, build_model, full_state_dict, lora_config,  # noqa: E402
                                  lora_reference, model_class, tiny_tokenizer, verl_shard_placement_fn)

LAYOUTS = ("fsdp2", "veomni", "veomni_sp", "veomni_hsdp", "fsdp1_single", "fsdp2_single", "no_config", "hsdp_2x1",
           "hsdp1_2x1", "lora_only")


def parse_args():
    """The layout, the model, and the fields make_fsdp_checkpoint's helpers read."""
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--layout", choices=LAYOUTS, required=True)
    p.add_argument("--model", choices=["llama", "qwen2", "gemma4"], default="llama",
                   help="gemma4: a tiny Gemma 4 with 0-dim buffers (Gemma-style scalars)")
    p.add_argument("--save", choices=["verl", "dcp", "deepspeed", "megatron"], default="verl",
                   help="dcp: torch.distributed.checkpoint.save of {'model': state_dict} into OUT/dcp; deepspeed: "
                        "ZeRO-2 training and engine.save_checkpoint into OUT/deepspeed/checkpoint-2; megatron: "
                        "megatron-core's torch_dist writer given a 0-dim tensor (no model), into OUT/dist_ckpt")
    p.add_argument("--lora", metavar="R:ALPHA", help="a PEFT LoRA model (lora_only needs one)")
    p.add_argument("--tie", action="store_true")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--intermediate", type=int, default=96)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=1001)
    args = p.parse_args()
    args.heads, args.kv_heads = 4, 2  # the other fields make_fsdp_checkpoint's helpers read
    args.value_head, args.meta_init, args.dtype, args.old_vlm_names = False, False, "float32", False
    return args


def gemma4_model():
    """A tiny Gemma 4 whose vision tower has clipped linears: 28 persistent 0-dim buffers (input_min,
    input_max, output_min, output_max), set to distinct finite values; FSDP shards the parameters only,
    so every rank file holds the scalars as plain 0-dim tensors."""
    from transformers import AutoModelForImageTextToText, Gemma4Config

    text = dict(vocab_size=1001, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, global_head_dim=16, max_position_embeddings=128,
                vocab_size_per_layer_input=1001,
                hidden_size_per_layer_input=8, layer_types=["sliding_attention", "full_attention"],
                sliding_window=16, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    vision = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=2, head_dim=16, use_clipped_linears=True, position_embedding_size=64,
                  patch_size=4)
    config = Gemma4Config(text_config=text, vision_config=vision, audio_config=None, boi_token_id=990,
                          eoi_token_id=991, image_token_id=992, video_token_id=993, boa_token_id=994,
                          eoa_token_index=995, audio_token_id=996, architectures=["Gemma4ForConditionalGeneration"])
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(config)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(1)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.01)
        for i, (name, b) in enumerate(model.named_buffers()):
            if b.dim() == 0:
                b.fill_((-1.0 if "min" in name else 1.0) * (20.0 + i))
    return model, config


def veomni_fsdp_mesh(world: int, replicate: int, ulysses: int):
    """The mesh VeOmni's parallel_state.init_parallel_state builds (dims of size 1 left out, but
    dp_shard always there), its flattened views, and its fsdp_mesh property."""
    sizes = {"dp_replicate": replicate, "dp_shard": world // replicate // ulysses, "ulysses": ulysses}
    names = [n for n, size in sizes.items() if size > 1 or n == "dp_shard"]
    mesh = init_device_mesh("cpu", tuple(sizes[n] for n in names), mesh_dim_names=tuple(names))
    dp = [n for n in names if n != "ulysses"]
    shard_sp = [n for n in names if n != "dp_replicate"]
    mesh[tuple(dp)]._flatten(mesh_dim_name="dp")
    mesh[tuple(shard_sp)]._flatten(mesh_dim_name="dp_shard_sp")
    mesh[tuple(names)]._flatten(mesh_dim_name="dp_sp")
    if ulysses > 1:
        mesh[("ulysses",)]._flatten(mesh_dim_name="sp")
    shard = "dp_shard_sp" if ulysses > 1 else "dp_shard"
    return mesh[("dp_replicate", shard)] if replicate > 1 else mesh[shard]


def shard(model, args, world: int):
    """Shard as the layout's engine does; returns the model and its FSDP version."""
    inner = (model.base_model.model if args.lora else model).model
    if args.model == "gemma4":
        layers = list(inner.language_model.layers) + list(inner.vision_tower.encoder.layers)
    else:
        layers = inner.layers
    if args.layout in ("fsdp1_single", "hsdp1_2x1"):
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp import ShardingStrategy

        if args.layout == "fsdp1_single":
            mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("fsdp",))
            strategy = ShardingStrategy.FULL_SHARD
        else:  # verl's create_device_mesh with fsdp_size=1 and get_sharding_strategy of a 2-d mesh
            mesh = init_device_mesh("cpu", (world, 1), mesh_dim_names=("ddp", "fsdp"))
            strategy = ShardingStrategy.HYBRID_SHARD
        return FSDP(model, device_mesh=mesh, use_orig_params=True, device_id=torch.device("cpu"),
                    sharding_strategy=strategy), 1
    if args.layout.startswith("veomni"):
        mesh = veomni_fsdp_mesh(world, 2 if args.layout == "veomni_hsdp" else 1, 2 if args.layout == "veomni_sp" else 1)
        fn = None
    elif args.layout == "hsdp_2x1":
        mesh, fn = init_device_mesh("cpu", (world, 1), mesh_dim_names=("ddp", "fsdp")), verl_shard_placement_fn(1)
    else:
        mesh, fn = init_device_mesh("cpu", (world,), mesh_dim_names=("fsdp",)), verl_shard_placement_fn(world)
    for layer in layers:
        fully_shard(layer, mesh=mesh, shard_placement_fn=fn)
    fully_shard(model, mesh=mesh, shard_placement_fn=fn)
    return model, 2


def sharded_state_dict(model, fsdp_version: int) -> dict:
    """What verl saves: FSDP1's SHARDED_STATE_DICT, or FSDP2's state_dict() (DTensors)."""
    if fsdp_version == 1:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp import ShardedStateDictConfig, StateDictType

        with FSDP.state_dict_type(model, StateDictType.SHARDED_STATE_DICT, ShardedStateDictConfig()):
            return model.state_dict()
    return model.state_dict()


def save_rank(model, fsdp_version: int, args, rank: int, world: int) -> None:
    """model_world_size_W_rank_R.pt as verl writes it; save_lora_only keeps the keys with "lora_" in them."""
    state = sharded_state_dict(model, fsdp_version)
    if args.layout == "lora_only":
        state = {k: v for k, v in state.items() if "lora_" in k or ".adapter_" in k}
    torch.save(state, os.path.join(args.out, f"model_world_size_{world}_rank_{rank}.pt"))


def save_rank0_files(config, args, fsdp_version: int, world: int) -> None:
    """fsdp_config.json, lora_train_meta.json (verl writes lora_alpha as an int) and huggingface/."""
    if args.layout != "no_config" and args.save == "verl":
        with open(os.path.join(args.out, "fsdp_config.json"), "w") as f:
            json.dump({"FSDP_version": fsdp_version, "world_size": world}, f, indent=4)
    if args.lora:
        lc = lora_config(args)
        with open(os.path.join(args.out, "lora_train_meta.json"), "w") as f:
            json.dump({"r": lc.r, "lora_alpha": int(lc.lora_alpha), "task_type": "CAUSAL_LM"}, f, indent=4)
    hf_dir = os.path.join(args.out, "huggingface")
    config.save_pretrained(hf_dir)
    tiny_tokenizer().save_pretrained(hf_dir)


def save_reference(full: dict, config, args) -> None:
    """reference/: the gathered tensors, their logits; for lora_only also base/ (the base model as HF
    sharded safetensors with an index, what --base names) and the peft adapter."""
    from safetensors.torch import save_file

    ref_dir = os.path.join(args.out, "reference")
    os.makedirs(ref_dir, exist_ok=True)
    full = {k.replace("_fsdp_wrapped_module.", ""): v.contiguous() for k, v in full.items()}
    if args.lora:
        full, logits = lora_reference(full, config, args, ref_dir)
        save_base(os.path.join(ref_dir, "base.safetensors"), config, os.path.join(args.out, "base"))
    if config.tie_word_embeddings:
        full.pop("lm_head.weight", None)
    save_file(full, os.path.join(ref_dir, "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(ref_dir)
    if not args.lora:
        plain = plain_model_class(args).from_config(config)
        plain.load_state_dict(full, strict=not config.tie_word_embeddings)
        plain.eval()
        with torch.no_grad():
            logits = plain(input_ids=torch.tensor(FIXED_INPUT)).logits
    torch.save(logits, os.path.join(ref_dir, "logits.pt"))


def plain_model_class(args):
    """The transformers class the reference logits come from."""
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText if args.model == "gemma4" else model_class(args)


def save_base(base_file: str, config, base_dir: str) -> None:
    """The base model as transformers saves it, cut into several shards (model-0000i-of-0000N + index)."""
    from safetensors.torch import load_file

    model = model_class(argparse.Namespace(model="llama", value_head=False)).from_config(config)
    model.load_state_dict(load_file(base_file), strict=not config.tie_word_embeddings)
    model.save_pretrained(base_dir, max_shard_size="100KB")
    tiny_tokenizer().save_pretrained(base_dir)


def save_deepspeed(model, config, args, rank: int) -> None:
    """DeepSpeed ZeRO-2 in bf16: two AdamW steps, then engine.save_checkpoint into OUT/deepspeed/checkpoint-2,
    with DeepSpeed's own fp32 reconstruction as the reference (as make_deepspeed_checkpoint.py does)."""
    import deepspeed
    from make_deepspeed_checkpoint import TAG, Variant, ds_config, write_reference

    variant = Variant(stage=2)
    engine, *_ = deepspeed.initialize(model=model, config=ds_config(variant), model_parameters=list(model.parameters()))
    gen = torch.Generator().manual_seed(100 + rank)
    for _ in range(2):
        ids = torch.randint(0, 990, (1, 16), generator=gen)
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        engine.step()
    ckpt = os.path.join(args.out, "deepspeed", "checkpoint-2")
    engine.save_checkpoint(ckpt, tag=TAG)
    if rank == 0:
        config.save_pretrained(ckpt)
        tiny_tokenizer().save_pretrained(ckpt)
        write_reference(ckpt, variant)
    dist.barrier()


def save_megatron_scalars(args, rank: int) -> None:
    """megatron-core's torch_dist writer (dist_checkpointing.save) given a 0-dim ShardedTensor beside a
    1-d one, into OUT/dist_ckpt; reference/scalars.safetensors holds both. No megatron-core model has a
    0-dim parameter, so the state dict is written directly: the question is what the writer stores."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    from make_megatron_checkpoint import exit_now, patch_for_cpu
    from safetensors.torch import save_file

    patch_for_cpu()
    tensors = {"decoder.layers.0.scalar": torch.tensor(2.5), "decoder.layers.0.vector": torch.arange(4.0)}
    state = {k: ShardedTensor.from_rank_offsets(k, v, replica_id=rank) for k, v in tensors.items()}
    ckpt = os.path.join(args.out, "dist_ckpt")
    os.makedirs(ckpt, exist_ok=True)  # every rank: the writer checks that it exists
    dist_checkpointing.save(state, ckpt)
    if rank == 0:
        os.makedirs(os.path.join(args.out, "reference"), exist_ok=True)
        save_file(tensors, os.path.join(args.out, "reference", "scalars.safetensors"))
    dist.barrier()
    exit_now()


def main():
    args = parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.save == "megatron":
        save_megatron_scalars(args, rank)
    if args.layout == "lora_only" and not args.lora:
        raise SystemExit("--layout lora_only needs --lora R:ALPHA")
    model, config = gemma4_model() if args.model == "gemma4" else build_model(args)
    if args.lora:
        model = add_lora(model, args)
    if args.save == "deepspeed":
        save_deepspeed(model, config, args, rank)
        os._exit(0)
    model, fsdp_version = shard(model, args, world)
    os.makedirs(args.out, exist_ok=True)
    if args.save == "dcp":
        import torch.distributed.checkpoint as dcp

        dcp.save({"model": sharded_state_dict(model, fsdp_version)}, checkpoint_id=os.path.join(args.out, "dcp"))
    else:
        save_rank(model, fsdp_version, args, rank, world)
    full = full_state_dict(model, fsdp_version)
    if rank == 0:
        save_rank0_files(config, args, fsdp_version, world)
        save_reference(full, config, args)
    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # as make_fsdp_checkpoint.py: no gloo teardown with FSDP's threads alive


if __name__ == "__main__":
    main()

"""Write a real megatron-core `torch_dist` checkpoint of a tiny GPT trained with Megatron-Bridge's LoRA,
on CPU, under torchrun with gloo.

    torchrun --nproc-per-node N tests/make_megatron_lora.py --out DIR [--tp T] [--from REF] [model options]

The model is make_megatron_checkpoint's (same options, same seeds). Megatron-Bridge's own `LoRA`
transform wraps every linear_qkv, linear_proj, linear_fc1 and linear_fc2 (`LoRALinear` around the
ColumnParallelLinear / RowParallelLinear, with a `ParallelLinearAdapter`: linear_in = A, linear_out = B).
Its adapter weights are then filled with seeded values (B starts at zero: the fold would change
nothing). The save is what verl's Megatron worker writes with LoRA:
- dist_ckpt/: the model's sharded state dict (base and `.adapter.linear_in/out.weight`), saved by
  megatron-core's dist_checkpointing, as verl's MegatronCheckpointManager does;
- adapter_checkpoint/mp_rank_TT[_PPP]_adapter.pt: {"adapter_state_dict": every parameter whose name
  holds `.adapter.`}, each TP rank's local shard, as verl's save_adapter_checkpoint writes;
- huggingface/: config.json and the tokenizer.
With --legacy it writes Megatron-LM's legacy rank files instead, whose model state dicts hold the
adapters (AdapterWrapper.state_dict puts them under `<linear>.adapter.`).
With --layout bridge the layout is Megatron-Bridge's (iter_0000001/ with run_config.yaml, whose `peft:` section
is the LoRA transform's settings, tokenizer/, latest_train_state.pt) and no adapter_checkpoint/. With
--adapter-only the dist checkpoint holds the adapters alone, as Bridge's PEFT save keeps them: the LoRA
is applied for training, Bridge's `set_params_to_save` records the trainable parameters, and the model
section of the state dict is filtered by Bridge's own `adapter_key_filter`, as
`apply_peft_adapter_filter_to_state_dict` does in Bridge's save_checkpoint. save_checkpoint itself does
not run here: megatron.bridge.training.checkpointing imports nvidia-modelopt at module level and its
training config imports the `datasets` package (neither is installed, nor needed to save), and it
reads torch.cuda.get_rng_state(), which a CPU-only torch refuses ("Torch not compiled with CUDA
enabled"); the filtered state dict is saved by megatron-core's dist_checkpointing.save, which
save_checkpoint calls with it.
Without --from (one process) it also records Megatron's forward with the adapters applied by Bridge's
LoRALinear on FIXED_INPUT: DIR/reference/logits.pt, and DIR/reference/lora.json (r, alpha).

Megatron-Bridge imports Transformer Engine (CUDA only) at module level for isinstance checks and its
package __init__ pulls in its whole training stack; import_bridge_lora imports only its PEFT modules,
with a stand-in Transformer Engine module whose classes are never built (the local spec has none),
and tells them Transformer Engine is absent (megatron-core's MagicMock stand-ins fool their check).
"""
import json
import os
import sys
import types

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
from make_megatron_checkpoint import (DIST_DIRS, FIXED_INPUT, build, exit_now, parser, patch_for_cpu,  # noqa: E402
                                      save_layout_files, save_legacy)

TARGETS = ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]


LORA_MODELS = ("llama", "qwen2", "qwen3")  # dense models: the LoRA targets above
LORA_LAYOUTS = ("verl", "bridge")


def parse_args():
    """make_megatron_checkpoint's options (its build() reads them all) and the LoRA ones."""
    p = parser()
    p.set_defaults(layers=2)
    p.add_argument("--rank", type=int, default=4, help="LoRA dim (r)")
    p.add_argument("--alpha", type=int, default=8, help="LoRA alpha")
    p.add_argument("--adapters-apart", action="store_true",
                   help="leave the adapters out of dist_ckpt/: only adapter_checkpoint/ holds them")
    p.add_argument("--adapter-only", action="store_true",
                   help="save the adapters alone, filtered by Bridge's PEFT adapter_key_filter (no base weights)")
    args = p.parse_args()
    if args.model not in LORA_MODELS or args.layout not in LORA_LAYOUTS:
        p.error(f"LoRA fixtures are {', '.join(LORA_MODELS)} models in the {' or '.join(LORA_LAYOUTS)} layout")
    return args


def import_bridge_lora():
    """Megatron-Bridge's LoRA class, without its package __init__ (its training stack) and with a
    stand-in for Transformer Engine (see the module docstring). megatron-core is imported first, so
    that its own Transformer Engine checks see no Transformer Engine."""
    import megatron
    import megatron.core.distributed  # noqa: F401
    import megatron.core.models.gpt  # noqa: F401
    import megatron.core.transformer.moe.router  # noqa: F401

    te, te_torch = types.ModuleType("transformer_engine"), types.ModuleType("transformer_engine.pytorch")
    te_torch.Linear = type("Linear", (torch.nn.Module,), {})
    te_torch.LayerNormLinear = type("LayerNormLinear", (torch.nn.Module,), {})
    te_torch.ops = types.SimpleNamespace(Sequential=object)
    te.pytorch = te_torch
    sys.modules.setdefault("transformer_engine", te)
    sys.modules.setdefault("transformer_engine.pytorch", te_torch)
    root = next(p for p in megatron.__path__ if os.path.isdir(os.path.join(p, "bridge")))
    bridge = types.ModuleType("megatron.bridge")
    bridge.__path__ = [os.path.join(root, "bridge")]
    sys.modules.setdefault("megatron.bridge", bridge)
    from megatron.bridge.peft import utils
    from megatron.bridge.peft.lora import LoRA

    # megatron-core without Transformer Engine defines its TE classes as MagicMocks, which Bridge's
    # import check takes for Transformer Engine (and then fails isinstance); tell it the truth
    utils.HAVE_TE = False
    return LoRA


def with_lora(args, model):
    """The model with Bridge's LoRA on every linear, and that LoRA transform; a reference run fills A and
    B with seeded values. An adapter-only save applies it for training, as a Bridge PEFT run does (the
    adapters trainable, the rest frozen) and records the parameters to save."""
    lora = import_bridge_lora()(target_modules=TARGETS, dim=args.rank, alpha=args.alpha)
    model = lora(model, training=args.adapter_only)
    if args.adapter_only:
        lora.set_params_to_save(model)
    if not args.ref:
        with torch.no_grad():
            gen = torch.Generator().manual_seed(2)
            for name, p in model.named_parameters():
                if ".adapter." in name:
                    p.copy_((torch.randn(p.shape, generator=gen) * 0.05).to(p.dtype))
    return model, lora


def bridge_adapter_filter(lora, sharded: dict) -> dict:
    """The model section as Bridge's PEFT save keeps it (apply_peft_adapter_filter_to_state_dict):
    the keys its adapter_key_filter passes."""
    kept = {key: value for key, value in sharded.items() if lora.adapter_key_filter(key)}
    assert kept and all(".adapter." in key for key in kept), sorted(kept)[:4]
    return kept


def save_bridge_peft_settings(args, lora) -> None:
    """run_config.yaml's `peft:` section, as Bridge's ConfigContainer.to_yaml writes the LoRA transform:
    its target and its dataclass fields of plain values."""
    import dataclasses

    import yaml

    path = os.path.join(args.out, DIST_DIRS[args.layout], "run_config.yaml")
    with open(path) as f:
        run_config = yaml.safe_load(f)
    peft = {"_target_": f"{type(lora).__module__}.{type(lora).__qualname__}"}
    for field in dataclasses.fields(lora):
        value = getattr(lora, field.name)
        if isinstance(value, (bool, int, float, str)) or (isinstance(value, list)
                                                         and all(isinstance(v, str) for v in value)):
            peft[field.name] = value
    run_config["peft"] = peft
    with open(path, "w") as f:
        yaml.safe_dump(run_config, f)


def save_verl_adapter_files(args, model) -> None:
    """verl's save_adapter_checkpoint: each TP (x PP) rank's adapter parameters, local shards."""
    from megatron.core import parallel_state as ps

    if ps.get_data_parallel_rank() != 0:
        return
    name = f"mp_rank_{ps.get_tensor_model_parallel_rank():02d}"
    if args.pp > 1:
        name += f"_{ps.get_pipeline_model_parallel_rank():03d}"
    folder = os.path.join(args.out, "adapter_checkpoint")
    os.makedirs(folder, exist_ok=True)
    state = {n: p.data.clone() for n, p in model.named_parameters() if ".adapter." in n.lower()}
    torch.save({"adapter_state_dict": state}, os.path.join(folder, name + "_adapter.pt"))


def save_reference(args, model) -> None:
    """Megatron's forward with Bridge's LoRALinear applying the adapters: what a fold must reproduce."""
    ids = torch.tensor(FIXED_INPUT)
    seq = ids.shape[1]
    mask = torch.triu(torch.ones(1, 1, seq, seq, dtype=torch.bool), diagonal=1)
    with torch.no_grad():
        logits = model.eval()(input_ids=ids, position_ids=torch.arange(seq).unsqueeze(0), attention_mask=mask)
    os.makedirs(os.path.join(args.out, "reference"), exist_ok=True)
    torch.save(logits[..., : args.vocab].float(), os.path.join(args.out, "reference", "logits.pt"))
    with open(os.path.join(args.out, "reference", "lora.json"), "w") as f:
        json.dump({"r": args.rank, "lora_alpha": args.alpha, "target_modules": TARGETS}, f)


def main():
    args = parse_args()
    dist.init_process_group("gloo")
    patch_for_cpu()
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps

    ps.initialize_model_parallel(tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp)
    model, lora = with_lora(args, build(args))
    if args.ref:
        state = dist_checkpointing.load(model.sharded_state_dict(), args.ref)
        model.load_state_dict(state, strict=False)
    if args.legacy:  # the adapters are in the model's state dict (AdapterWrapper.state_dict)
        save_legacy(args, ["model"], [model])
    else:
        ckpt = os.path.join(args.out, DIST_DIRS[args.layout])
        os.makedirs(ckpt, exist_ok=True)
        sharded = model.sharded_state_dict()
        if args.adapters_apart:
            sharded = {k: v for k, v in sharded.items() if ".adapter." not in k}
        if args.adapter_only:
            sharded = bridge_adapter_filter(lora, sharded)
        dist_checkpointing.save(sharded, ckpt)
        if args.layout != "bridge":  # verl's worker writes these; Bridge does not
            save_verl_adapter_files(args, model)
    if dist.get_rank() == 0:
        save_layout_files(args, model.config)
        if args.layout == "bridge":
            save_bridge_peft_settings(args, lora)
    if not args.ref and dist.get_world_size() == 1:
        save_reference(args, model)
    dist.barrier()
    exit_now()


if __name__ == "__main__":
    main()

"""Write real DeepSpeed ZeRO checkpoints of tiny Llama models, under torchrun with gloo on CPU.

Run:  torchrun --nproc-per-node W tests/make_deepspeed_checkpoint.py --out DIR --variants z1,z2_odd,...

Each variant is one DeepSpeed engine trained for two AdamW steps (torch's AdamW, bf16 or fp16) and
saved with engine.save_checkpoint(DIR/VARIANT/checkpoint-2, tag="global_step2"), the layout TRL and
accelerate leave: `latest`, `zero_to_fp32.py`, the tag directory, and beside them the HF config,
generation config and tokenizer (and adapter_config.json for a PEFT model). Several variants run
one after the other in one process group, so one torchrun pays DeepSpeed's start once.

The ground truth, written by rank 0 after the save (DIR/VARIANT/reference/):
  fp32.safetensors    DeepSpeed's own reconstruction, get_fp32_state_dict_from_zero_checkpoint
                      (a tensor shared under two names is stored under both, cloned)
  module.safetensors  ZeRO-1/2 only: the 16-bit `module` state dict of mp_rank_00_model_states.pt
"""
import argparse
import json
import os
import sys
from dataclasses import dataclass

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

TAG = "global_step2"
LORA_TARGETS = ["q_proj", "v_proj", "down_proj"]


@dataclass(frozen=True)
class Variant:
    stage: int
    dtype: str = "bf16"        # the training precision: bf16 or fp16
    odd: bool = False          # sizes no world size divides: hidden 65, 5 heads of 16, intermediate 131
    tie: bool = False          # tie_word_embeddings
    lora: bool = False         # a PEFT LoRA model (r=4, alpha=8): base frozen, adapters trained


VARIANTS = {
    "z1": Variant(stage=1),
    "z2_odd": Variant(stage=2, odd=True),
    "z2_fp16_tied": Variant(stage=2, dtype="fp16", tie=True),
    "z3_odd_tied": Variant(stage=3, odd=True, tie=True),
    "z3_lora": Variant(stage=3, lora=True),
    "z2_lora": Variant(stage=2, lora=True),
    "z3_odd": Variant(stage=3, odd=True),
    "z3": Variant(stage=3),  # the benchmark's (with --big)
}


def parse_args():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--variants", required=True, help=f"comma-separated, of: {', '.join(VARIANTS)}")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--no-reference", action="store_true", help="skip the reference (benchmarks)")
    p.add_argument("--big", action="store_true", help="a ~350M-parameter Llama (benchmarks)")
    return p.parse_args()


def hf_config(v: Variant, layers: int, big: bool):
    from transformers import LlamaConfig

    if big:
        sizes = dict(hidden_size=1024, num_attention_heads=16, num_key_value_heads=16, intermediate_size=2816,
                     vocab_size=32000, num_hidden_layers=24)
    elif v.odd:
        sizes = dict(hidden_size=65, num_attention_heads=5, num_key_value_heads=5, head_dim=16,
                     intermediate_size=131, vocab_size=1001, num_hidden_layers=layers)
    else:
        sizes = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
                     vocab_size=1001, num_hidden_layers=layers)
    return LlamaConfig(**sizes, max_position_embeddings=128, tie_word_embeddings=v.tie, bos_token_id=1,
                       eos_token_id=2, architectures=["LlamaForCausalLM"])


def lora_config():
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS, lora_dropout=0.0, task_type="CAUSAL_LM")


def ds_config(v: Variant) -> dict:
    precision = {"bf16": {"enabled": True}} if v.dtype == "bf16" else \
        {"fp16": {"enabled": True, "initial_scale_power": 4}}
    return {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "steps_per_print": 10 ** 6,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
            "zero_optimization": {"stage": v.stage}, **precision}


def allow_fp16_on_cpu() -> None:
    """DeepSpeed's CPU accelerator refuses fp16 without AVX-512 fp16 kernels; the checkpoint layout
    does not depend on them, so the fixture says they are there."""
    from deepspeed.accelerator import get_accelerator

    cls = type(get_accelerator())
    cls.is_fp16_supported = lambda self: True


def build_model(v: Variant, config):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # every tensor distinct from its default init (norms start as all ones)
        gen = torch.Generator().manual_seed(1)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.02)
    if v.lora:
        from peft import get_peft_model

        model = get_peft_model(model, lora_config())
    return model


def train_and_save(name: str, v: Variant, args) -> str:
    """Two steps of training under DeepSpeed, then engine.save_checkpoint; returns checkpoint-2/."""
    import deepspeed

    config = hf_config(v, args.layers, args.big)
    model = build_model(v, config)
    engine, *_ = deepspeed.initialize(model=model, config=ds_config(v),
                                      model_parameters=[p for p in model.parameters() if p.requires_grad])
    gen = torch.Generator().manual_seed(100 + dist.get_rank())
    for _ in range(2):
        ids = torch.randint(0, config.vocab_size, (1, 16), generator=gen)
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
    ckpt = os.path.join(args.out, name, "checkpoint-2")
    engine.save_checkpoint(ckpt, tag=TAG)
    if dist.get_rank() == 0:
        write_hf_files(ckpt, config, v)
    dist.barrier()
    engine.destroy()
    return ckpt


def write_hf_files(ckpt: str, config, v: Variant) -> None:
    """What TRL / accelerate write beside `latest`: config, generation config, tokenizer (and the adapter's
    config for a PEFT model)."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from make_fsdp_checkpoint import tiny_tokenizer
    from transformers import GenerationConfig

    config.save_pretrained(ckpt)
    GenerationConfig(bos_token_id=1, eos_token_id=2, do_sample=False).save_pretrained(ckpt)
    tiny_tokenizer().save_pretrained(ckpt)
    if v.lora:
        lora_config().save_pretrained(ckpt)


def write_reference(ckpt: str, v: Variant) -> None:
    """DeepSpeed's own reconstruction (and, for ZeRO-1/2, the 16-bit module state) as safetensors."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import save_file

    ref_dir = os.path.join(os.path.dirname(ckpt), "reference")
    os.makedirs(ref_dir, exist_ok=True)
    state = get_fp32_state_dict_from_zero_checkpoint(ckpt)
    save_file({k: t.detach().clone().contiguous() for k, t in state.items()}, os.path.join(ref_dir, "fp32.safetensors"))
    if v.stage <= 2:
        saved = torch.load(os.path.join(ckpt, TAG, "mp_rank_00_model_states.pt"), weights_only=False)
        save_file({k: t.detach().clone().contiguous() for k, t in saved["module"].items()},
                  os.path.join(ref_dir, "module.safetensors"))
    with open(os.path.join(ref_dir, "variant.json"), "w") as f:
        json.dump(v.__dict__, f)


def main():
    args = parse_args()
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    allow_fp16_on_cpu()
    for name in args.variants.split(","):
        ckpt = train_and_save(name, VARIANTS[name], args)
        if dist.get_rank() == 0 and not args.no_reference:
            write_reference(ckpt, VARIANTS[name])
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

"""Write the DCP checkpoints of accelerate, NeMo-RL and torchtune for tiny models, under torchrun with gloo.

Run:  torchrun --nproc-per-node 2 tests/make_dcp_writers.py --out DIR --variant NAME
(torchtune variants with a Python that has torchtune 0.6.1: see TORCHTUNE_PYTHON in test_dcp_writers.py).

Variants (see VARIANTS), each in DIR/:
- accelerate_fsdp2, accelerate_fsdp2_tied: accelerate 1.15's own FSDP prepare and `Accelerator.save_state`
  (FSDP plugin, SHARDED_STATE_DICT) after one AdamW step with a scheduler, under accelerate's automatic
  checkpoint naming: DIR/checkpoints/checkpoint_0/{pytorch_model_fsdp_0, optimizer_0, scheduler.bin,
  random_states_R.pkl}. accelerate enables FSDP only on accelerators, so the fixture marks the process
  state as multi-GPU before the Accelerator is made; nothing else of accelerate is changed.
- nemo_rl, nemo_rl_v2: NeMo-RL cannot be installed here (it pins vLLM, Ray and CUDA builds of torch), so
  the fixture does with torch DCP what its savers do, in its layout:
  nemo_rl (DTensor policy worker v1, nemo_rl/utils/native_checkpoint.py): DIR/step_3/policy/weights
  = dcp.save({"model": get_model_state_dict(model)}), policy/optimizer = dcp.save({"optim": ...}),
  policy/tokenizer/, config.yaml, training_info.json, train_dataloader.pt.
  nemo_rl_v2 (worker v2 through nemo_automodel's Checkpointer, model_save_format torch_save):
  DIR/step_3/policy/weights/model = dcp.save(state dict without a wrapper key, a tied lm_head dropped),
  policy/optimizer/optim.
- torchtune_llama3: torchtune 0.6.1's llama3 builder, sharded by torchtune's shard_model (FSDP2),
  one AdamW step, saved by torchtune's DistributedCheckpointer as its recipes' async path builds the
  dict ({"model": ..., "optimizer": ..., "seed": ..., "epochs_run": ...}): DIR/dist_epoch_0/.
  The reference is torchtune's own convert_weights.tune_to_hf (its RoPE row permutation) and the
  logits are torchtune's forward.

Written by rank 0 beside the checkpoint:
  hf/                           config.json, generation config and tokenizer (what --hf-config gets)
  reference/model.safetensors   the full state dict under HF names (a tied lm_head left out)
  reference/logits.pt           the model's logits on FIXED_INPUT (fp32)
"""
import argparse
import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_fsdp_checkpoint import FIXED_INPUT, tiny_tokenizer  # noqa: E402

VARIANTS = ["accelerate_fsdp2", "accelerate_fsdp2_tied", "nemo_rl", "nemo_rl_v2", "torchtune_llama3"]
QK_SCALE = 8.0  # q/k scaled up: at init a tiny model's attention is almost uniform and RoPE order barely shows


def hf_config(tied: bool):
    """A tiny Llama (or, tied, a Qwen2 with q/k/v biases and tied embeddings)."""
    from transformers import LlamaConfig, Qwen2Config

    common = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
                  num_hidden_layers=2, vocab_size=1001, max_position_embeddings=128, bos_token_id=1,
                  eos_token_id=2, rms_norm_eps=1e-5, tie_word_embeddings=tied)
    if tied:
        return Qwen2Config(architectures=["Qwen2ForCausalLM"], **common)
    return LlamaConfig(architectures=["LlamaForCausalLM"], rope_theta=500000.0, **common)


def perturbed(model):
    """The model's weights moved off their init by seeded noise, q/k scaled by QK_SCALE (in place)."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.01)
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(QK_SCALE)
    return model


def hf_model(config):
    """The HF model, every tensor moved off its default init (norms are all ones)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return perturbed(model)


def train_step(model, optimizer, scheduler=None) -> None:
    ids = torch.tensor(FIXED_INPUT)
    out = model(ids)
    logits = out.logits if hasattr(out, "logits") else out
    logits.float().pow(2).mean().backward()
    optimizer.step()
    optimizer.zero_grad()
    if scheduler is not None:
        scheduler.step()


def write_hf_dir(config, out: str) -> None:
    from transformers import GenerationConfig

    hf_dir = os.path.join(out, "hf")
    config.save_pretrained(hf_dir)
    GenerationConfig(bos_token_id=1, eos_token_id=2, do_sample=False).save_pretrained(hf_dir)
    tiny_tokenizer().save_pretrained(hf_dir)


def write_reference(full: dict, config, out: str, logits=None) -> None:
    """Rank 0: the HF-named full state dict, and logits (the HF model's on it unless given)."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    ref = os.path.join(out, "reference")
    os.makedirs(ref, exist_ok=True)
    full = {k: v.detach().contiguous().clone() for k, v in full.items()}
    if config.tie_word_embeddings:
        full.pop("lm_head.weight", None)
    save_file(full, os.path.join(ref, "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(ref)
    if logits is None:
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        missing, unexpected = plain.load_state_dict(full, strict=False)
        assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
        with torch.no_grad():
            logits = plain.eval()(torch.tensor(FIXED_INPUT)).logits
    torch.save(logits.float(), os.path.join(ref, "logits.pt"))


def accelerate_save(out: str, fsdp_version: int, tied: bool) -> None:
    """accelerate's FSDP prepare, one step, and Accelerator.save_state under automatic naming."""
    from accelerate import Accelerator, FullyShardedDataParallelPlugin
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, ProjectConfiguration

    state = PartialState(cpu=True)  # gloo over the torchrun ranks
    state.distributed_type = DistributedType.MULTI_GPU  # accelerate allows FSDP only on accelerators
    plugin = FullyShardedDataParallelPlugin(fsdp_version=fsdp_version, state_dict_type="SHARDED_STATE_DICT",
                                            cpu_ram_efficient_loading=False)
    acc = Accelerator(fsdp_plugin=plugin, project_config=ProjectConfiguration(
        project_dir=out, automatic_checkpoint_naming=True))
    assert acc.distributed_type == DistributedType.FSDP and acc.num_processes == dist.get_world_size()
    config = hf_config(tied)
    model = hf_model(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LinearLR(optimizer)
    model, optimizer, scheduler = acc.prepare(model, optimizer, scheduler)
    train_step(model, optimizer, scheduler)
    acc.save_state()
    full = acc.get_state_dict(model)  # accelerate's own gather of the full state dict (on rank 0)
    if acc.is_main_process:
        write_hf_dir(config, out)
        write_reference(full, config, out)


class _Stateful:
    """What NeMo-RL's ModelState / OptimizerState hand to dcp.save: a state_dict() method."""

    def __init__(self, state_dict):
        self.sd = state_dict

    def state_dict(self):
        return self.sd

    def load_state_dict(self, state_dict):
        pass


def sharded_hf_model(config, world: int):
    """The HF model sharded with FSDP2 per decoder layer and at the root (NeMo-RL's DTensor policy)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = hf_model(config)
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("dp_shard",))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def nemo_rl_save(out: str, v2: bool) -> None:
    """NeMo-RL's step_N/ as its SFT loop and DTensor worker (v1, or v2 via nemo_automodel) save it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    from torch.distributed.tensor import DTensor

    config = hf_config(tied=v2)
    model = sharded_hf_model(config, dist.get_world_size())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LinearLR(optimizer)
    train_step(model, optimizer, scheduler)
    step = os.path.join(out, "step_3")
    policy = os.path.join(step, "policy")
    sd = get_model_state_dict(model, options=StateDictOptions(cpu_offload=True))
    optim = {"optim": get_optimizer_state_dict(model, optimizer, options=StateDictOptions(cpu_offload=True)),
             "sched": scheduler.state_dict()}
    if v2:  # nemo_automodel: the bare state dict into weights/model, a tied lm_head popped; optimizer/optim
        weights = {k: v for k, v in sd.items() if not (config.tie_word_embeddings and k == "lm_head.weight")}
        dcp.save(weights, checkpoint_id=os.path.join(policy, "weights", "model"))
        dcp.save({"optim": _Stateful(optim)}, checkpoint_id=os.path.join(policy, "optimizer", "optim"))
    else:
        dcp.save({"model": _Stateful(sd)}, checkpoint_id=os.path.join(policy, "weights"))
        dcp.save({"optim": _Stateful(optim)}, checkpoint_id=os.path.join(policy, "optimizer"))
    full = {k: (v.full_tensor() if isinstance(v, DTensor) else v) for k, v in model.state_dict().items()}
    if dist.get_rank() == 0:
        tiny_tokenizer().save_pretrained(os.path.join(policy, "tokenizer"))
        with open(os.path.join(step, "training_info.json"), "w") as f:
            json.dump({"epoch": 0, "step": 3, "total_steps": 3, "consumed_samples": 24}, f)
        with open(os.path.join(step, "config.yaml"), "w") as f:
            f.write("policy:\n  model_name: tiny-llama\n  dtensor_cfg:\n    enabled: true\n")
        torch.save({"batch": 3}, os.path.join(step, "train_dataloader.pt"))
        write_hf_dir(config, out)
        write_reference(full, config, out)


def torchtune_model():
    """torchtune's llama3 builder at a tiny size (its own init), q/k scaled like hf_model's."""
    from torchtune.models.llama3 import llama3

    torch.manual_seed(0)
    model = llama3(vocab_size=1001, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=64, max_seq_len=128,
                   intermediate_dim=96, norm_eps=1e-5, rope_base=500000)
    return perturbed(model)


def torchtune_save(out: str) -> None:
    """torchtune's FSDP2 sharding and DistributedCheckpointer, with the dict its recipes build."""
    from torch.distributed.tensor import DTensor
    from torchtune import training
    from torchtune.models import convert_weights
    from torchtune.training.checkpointing._checkpointer import DistributedCheckpointer

    model = torchtune_model()
    training.shard_model(model, shard_conditions=[lambda name, module: name.startswith("layers.")
                                                  and name.count(".") == 1], cpu_offload=False,
                         reshard_after_forward=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train_step(model, optimizer)
    checkpoint = {training.MODEL_KEY: model.state_dict(), training.OPT_KEY: optimizer.state_dict(),
                  training.SEED_KEY: 0, training.EPOCHS_KEY: 1, training.TOTAL_EPOCHS_KEY: 2,
                  training.MAX_STEPS_KEY: 3}
    DistributedCheckpointer(checkpoint_dir=out, output_dir=out).save_checkpoint(checkpoint, epoch=0)
    full = {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone()
            for k, v in model.state_dict().items()}
    if dist.get_rank() == 0:
        config = hf_config(tied=False)
        plain = torchtune_model()
        plain.load_state_dict(full)
        with torch.no_grad():
            logits = plain.eval()(torch.tensor(FIXED_INPUT))
        hf = convert_weights.tune_to_hf(full, num_heads=4, num_kv_heads=2, dim=64)
        write_hf_dir(config, out)
        write_reference(hf, config, out, logits)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--variant", choices=VARIANTS, required=True)
    args = p.parse_args()
    if not args.variant.startswith("accelerate"):
        dist.init_process_group("gloo")
    os.makedirs(args.out, exist_ok=True)
    if args.variant.startswith("accelerate"):
        accelerate_save(args.out, 2, tied=args.variant.endswith("_tied"))
    elif args.variant.startswith("nemo_rl"):
        nemo_rl_save(args.out, v2=args.variant.endswith("_v2"))
    else:
        torchtune_save(args.out)
    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # as make_fsdp_checkpoint: no gloo teardown with FSDP's threads alive


if __name__ == "__main__":
    main()

"""Write the torchtitan benchmark checkpoints: tests/make_torchtitan_checkpoint.py's models at their --big
sizes, built, sharded with FSDP2 over gloo and saved by torchtitan's own CheckpointManager, under torchrun.

    torchrun --nproc-per-node 2 bench/torchtitan_checkpoint.py --out DIR --variants qwen3_moe,llama3

Each variant goes to DIR/VARIANT/: `checkpoint/step-1/` (the DCP directory) and `hf/config.json` (the HF
config the merge takes as --hf-config). The save is torchtitan's last-step model-only export in float32
(`last_save_model_only`), so every byte of the data files is a model byte the merge reads, and the
benchmark's floor (`cat` of the data files) reads what distmerge reads. No training step and no reference:
those need several copies of the model in memory (tests/test_torchtitan.py checks exactness at small sizes).

    python bench/torchtitan_checkpoint.py --check DIR/VARIANT --merged OUT    # one process, no torchrun

checks a merged directory bit for bit against torchtitan's own `StateDictAdapter.to_hf` of the full state
dict, read back from the DCP directory (it holds the whole model in memory, twice).
"""
import argparse
import json
import os
import sys

import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
import make_torchtitan_checkpoint as tt  # noqa: E402  (the fixture writer's models, adapters and save)


def make(name: str, out: str, mesh) -> None:
    """One variant on every rank: torchtitan's model, its init, FSDP2, the model-only fp32 save; rank 0
    writes the HF config beside it."""
    variant = tt.VARIANTS[name]
    model = tt.build_sharded(variant, variant.build(), mesh)
    optimizers, schedulers = tt.containers(model)
    tt.save(model, optimizers, schedulers, out, final_dtype="float32")
    if dist.get_rank() == 0:
        os.makedirs(os.path.join(out, "hf"), exist_ok=True)
        with open(os.path.join(out, "hf", "config.json"), "w") as f:
            json.dump(variant.hf_config(), f, indent=2)
    dist.barrier()


def check(ckpt: str, merged: str) -> None:
    """Exit 1 unless every tensor of `merged` equals torchtitan's to_hf of the checkpoint bit for bit, with
    the same names; `ckpt` is DIR/VARIANT as written above."""
    import torch
    from safetensors import safe_open
    from torch.distributed.checkpoint import FileSystemReader, load

    step = os.path.join(ckpt, "checkpoint", "step-1")
    meta = FileSystemReader(step).read_metadata().state_dict_metadata
    full = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in meta.items() if hasattr(m, "size")}
    load(full, checkpoint_id=step, no_dist=True)
    variant = tt.VARIANTS[os.path.basename(os.path.normpath(ckpt))]
    expected = variant.adapter(variant.build()).to_hf(full)
    got = {}
    for name in sorted(f for f in os.listdir(merged) if f.endswith(".safetensors")):
        with safe_open(os.path.join(merged, name), "pt") as f:
            got.update({k: f.get_tensor(k) for k in f.keys()})
    differ = [k for k in expected if k not in got or not torch.equal(expected[k].contiguous(), got[k])]
    extra = sorted(set(got) - set(expected))
    print(f"{len(expected)} tensors from to_hf; differ or missing: {differ[:5]} ({len(differ)}); extra: {extra[:5]}")
    sys.exit(1 if differ or extra else 0)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", help="write the checkpoints here (under torchrun)")
    p.add_argument("--variants", default="qwen3_moe", help=f"comma-separated, of: {', '.join(tt.BIG)}")
    p.add_argument("--check", help="DIR/VARIANT: check --merged against to_hf instead (one process)")
    p.add_argument("--merged", help="the merged directory that --check reads")
    args = p.parse_args()
    for sizes, big in tt.BIG.values():
        sizes.update(big)
    if args.check:
        return check(args.check, args.merged) if args.merged else p.error("--check needs --merged")
    if not args.out:
        p.error("give --out (or --check with --merged)")
    dist.init_process_group("gloo")
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("dp_shard",))
    for name in args.variants.split(","):
        make(name, os.path.join(args.out, name), mesh)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

"""How long `distmerge inspect` takes on the metadata of a 100-shard checkpoint.

python bench/inspect_100.py [--ranks 100] [--layers 32]

It writes (once) a verl FSDP2-style checkpoint of a Llama with 32 layers (hidden 256: the tensor
count of a 7B model, small files) sharded over 100 ranks: torch's in-process "fake" process
group lets one process play each rank in turn and save its DTensor shards (Shard(0), torch.chunk
rows, empty shards on the last ranks where a tensor has fewer than 100 rows). Then it times inspect_source() (metadata only) in this process,
and the whole `python -m distmerge inspect` command (interpreter start and imports included).
"""
import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def make(out, ranks, layers):
    """Each rank's state_dict() as FSDP2 (Shard(0), torch.chunk rows) saves it: DTensors built
    from each rank's chunk on a 100-rank mesh of torch's in-process "fake" process group."""
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard
    from torch.testing._internal.distributed.fake_pg import FakeStore
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=layers, num_attention_heads=8,
                         num_key_value_heads=4, vocab_size=32000, architectures=["LlamaForCausalLM"])
    os.makedirs(os.path.join(out, "huggingface"), exist_ok=True)
    config.save_pretrained(os.path.join(out, "huggingface"))
    full = AutoModelForCausalLM.from_config(config).state_dict()
    for rank in range(ranks):
        dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=ranks)
        mesh = init_device_mesh("cpu", (ranks,), mesh_dim_names=("fsdp",))
        state = {}
        for name, tensor in full.items():
            chunks = torch.chunk(tensor, ranks)
            local = chunks[rank].clone() if rank < len(chunks) else tensor.new_empty((0,) + tensor.shape[1:])
            state[name] = DTensor.from_local(local, mesh, [Shard(0)], run_check=False, shape=tensor.shape,
                                             stride=tensor.stride())
        torch.save(state, os.path.join(out, f"model_world_size_{ranks}_rank_{rank}.pt"))
        dist.destroy_process_group()
    with open(os.path.join(out, "fsdp_config.json"), "w") as f:
        json.dump({"FSDP_version": 2, "world_size": ranks}, f)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--ranks", type=int, default=100)
    p.add_argument("--layers", type=int, default=32)
    args = p.parse_args()
    out = os.path.join(ROOT, "bench", "work", f"inspect{args.ranks}")
    if not os.path.exists(os.path.join(out, "fsdp_config.json")):
        t = time.perf_counter()
        make(out, args.ranks, args.layers)
        print(f"wrote {out} in {time.perf_counter() - t:.1f} s")
    from distmerge.inspect import inspect_source

    times = []
    for _ in range(3):
        start = time.perf_counter()
        text = inspect_source(out, nproc=8)
        times.append(time.perf_counter() - start)
    print(text.splitlines()[1])
    print(f"inspect_source on {args.ranks} shards: median {sorted(times)[1]:.3f} s (runs {', '.join(f'{t:.3f}' for t in times)})")
    start = time.perf_counter()
    inspect_source(out, nproc=8, check_all=True)
    print(f"inspect_source(check_all=True), every rank file's metadata: {time.perf_counter() - start:.3f} s")
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "distmerge", "inspect", out, "--nproc", "8"], check=True,
                   stdout=subprocess.DEVNULL, cwd=ROOT)
    print(f"`python -m distmerge inspect` (interpreter, imports and all): {time.perf_counter() - start:.2f} s")


if __name__ == "__main__":
    main()

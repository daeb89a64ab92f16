"""Metadata at scale: a DeepSeek-V3-layout DCP checkpoint saved by W training ranks (issue 19).

    python bench/scale.py make    --world 64 --dims full  --out /tmp/ds_w64    # sparse files, 1.34 TB apparent
    python bench/scale.py make    --world 64 --dims small --out /tmp/ds_small  # same layout, ~370 MB of data
    python bench/scale.py inspect --source /tmp/ds_w64 --nproc 64              # catalogue + plan: wall, peak RSS
    python bench/scale.py merge   --source /tmp/ds_small --local-ranks 2       # the whole merge: stages, RSS
    python bench/scale.py unpickle --source /tmp/ds_small                      # C and lean unpickler: CPU, RSS

The tensor list is DeepSeek-V3's (61 layers, the first 3 dense, 256 routed experts + 1 shared,
MLA with q LoRA: 45,395 tensors); `--dims small` keeps every name and every row chunk but
shrinks the dimensions. Each tensor is cut into W row chunks as FSDP saves it (torch.chunk rows,
empty chunks left out), rank r's chunks in `__r_0.distcp` one after the other as raw bytes, and
`.metadata` is pickled from torch.distributed.checkpoint's own metadata classes, as dcp.save
writes it. With `--dims full` the data files are sparse (truncated to size, nothing written).
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

FULL = {"hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048, "n_routed_experts": 256,
        "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
        "v_head_dim": 128, "num_attention_heads": 128, "vocab_size": 129280}
SMALL = {"hidden_size": 64, "intermediate_size": 128, "moe_intermediate_size": 64, "n_routed_experts": 256,
         "q_lora_rank": 64, "kv_lora_rank": 64, "qk_nope_head_dim": 16, "qk_rope_head_dim": 16,
         "v_head_dim": 16, "num_attention_heads": 4, "vocab_size": 1024}
LAYERS, DENSE_LAYERS = 61, 3


def config(dims: dict, layers: int = LAYERS) -> dict:
    """A DeepseekV3ForCausalLM config.json with these dimensions."""
    return {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "num_hidden_layers": layers,
            "first_k_dense_replace": DENSE_LAYERS, "n_shared_experts": 1, "num_experts_per_tok": 8,
            "num_key_value_heads": dims["num_attention_heads"], "n_group": 8, "topk_group": 4,
            "rms_norm_eps": 1e-6, "max_position_embeddings": 4096, "tie_word_embeddings": False,
            "torch_dtype": "bfloat16", **dims}


def tensors(dims: dict, layers: int = LAYERS) -> list[tuple[str, tuple[int, ...]]]:
    """(HF name, shape) of every DeepseekV3ForCausalLM tensor, in the model's order."""
    h, heads = dims["hidden_size"], dims["num_attention_heads"]
    qk = dims["qk_nope_head_dim"] + dims["qk_rope_head_dim"]
    kv, q = dims["kv_lora_rank"], dims["q_lora_rank"]
    out = [("model.embed_tokens.weight", (dims["vocab_size"], h))]
    for i in range(layers):
        p = f"model.layers.{i}."
        out += [(p + "self_attn.q_a_proj.weight", (q, h)), (p + "self_attn.q_a_layernorm.weight", (q,)),
                (p + "self_attn.q_b_proj.weight", (heads * qk, q)),
                (p + "self_attn.kv_a_proj_with_mqa.weight", (kv + dims["qk_rope_head_dim"], h)),
                (p + "self_attn.kv_a_layernorm.weight", (kv,)),
                (p + "self_attn.kv_b_proj.weight", (heads * (dims["qk_nope_head_dim"] + dims["v_head_dim"]), kv)),
                (p + "self_attn.o_proj.weight", (h, heads * dims["v_head_dim"]))]
        if i < DENSE_LAYERS:
            out += _mlp(p + "mlp.", h, dims["intermediate_size"])
        else:
            out += [(p + "mlp.gate.weight", (dims["n_routed_experts"], h)),
                    (p + "mlp.gate.e_score_correction_bias", (dims["n_routed_experts"],))]
            for e in range(dims["n_routed_experts"]):
                out += _mlp(p + f"mlp.experts.{e}.", h, dims["moe_intermediate_size"])
            out += _mlp(p + "mlp.shared_experts.", h, dims["moe_intermediate_size"])
        out += [(p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,))]
    return out + [("model.norm.weight", (h,)), ("lm_head.weight", (dims["vocab_size"], h))]


def _mlp(prefix: str, hidden: int, inter: int) -> list:
    return [(prefix + "gate_proj.weight", (inter, hidden)), (prefix + "up_proj.weight", (inter, hidden)),
            (prefix + "down_proj.weight", (hidden, inter))]


def row_chunks(rows: int, world: int) -> list[tuple[int, int]]:
    """(first row, row count) of each rank's chunk, torch.chunk style; empty chunks are left out."""
    size = -(-rows // world)
    return [(r * size, min(size, rows - r * size)) for r in range(world) if r * size < rows]


def make(out: str, world: int, dims: dict, layers: int = LAYERS, sparse: bool = True, seed: int = 0) -> None:
    """Write the checkpoint: `.metadata` from DCP's classes, one raw-bytes file per saving rank."""
    import numpy as np
    import torch
    from torch.distributed.checkpoint.metadata import (ChunkStorageMetadata, Metadata, MetadataIndex,
                                                       TensorProperties, TensorStorageMetadata)
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    os.makedirs(os.path.join(out, "huggingface"), exist_ok=True)
    with open(os.path.join(out, "huggingface", "config.json"), "w") as f:
        json.dump(config(dims, layers), f, indent=1)
    ends, state, storage = [0] * world, {}, {}
    files = [None if sparse else open(os.path.join(out, f"__{r}_0.distcp"), "wb") for r in range(world)]
    rng = np.random.default_rng(seed)
    for name, shape in tensors(dims, layers):
        row = 2 * (shape[1] if len(shape) > 1 else 1)  # bf16 bytes per row
        chunks = []
        for rank, (first, count) in enumerate(row_chunks(shape[0], world)):
            offsets, sizes = torch.Size((first,) + (0,) * (len(shape) - 1)), torch.Size((count,) + shape[1:])
            chunks.append(ChunkStorageMetadata(offsets=offsets, sizes=sizes))
            storage[MetadataIndex(name, offsets, len(chunks) - 1)] = _StorageInfo(
                f"__{rank}_0.distcp", ends[rank], count * row)
            ends[rank] += count * row
            if files[rank] is not None:
                files[rank].write(rng.integers(0, 256, count * row, dtype=np.uint8).tobytes())
        state[name] = TensorStorageMetadata(TensorProperties(dtype=torch.bfloat16), torch.Size(shape), chunks)
    for rank, f in enumerate(files):
        if f is None:
            with open(os.path.join(out, f"__{rank}_0.distcp"), "wb") as f:
                f.truncate(ends[rank])
        else:
            f.close()
    with open(os.path.join(out, ".metadata"), "wb") as f:
        pickle.dump(Metadata(state_dict_metadata=state, storage_data=storage), f)


def check_output(source: str, target: str, world: int, dims: dict, layers: int = LAYERS) -> int:
    """Compare every tensor of the merged checkpoint with the bytes its chunks hold in the source
    (rank files read at the offsets `make` wrote them); returns the number of tensors checked."""
    import torch
    from safetensors import safe_open

    index = os.path.join(target, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            where = json.load(f)["weight_map"]
    else:
        where = {name: "model.safetensors" for name, _ in tensors(dims, layers)}
    ends, files, opened, checked = [0] * world, {}, {}, 0
    try:
        for name, shape in tensors(dims, layers):
            row = 2 * (shape[1] if len(shape) > 1 else 1)
            expected = b""
            for rank, (_, count) in enumerate(row_chunks(shape[0], world)):
                if rank not in files:
                    files[rank] = open(os.path.join(source, f"__{rank}_0.distcp"), "rb")
                expected += os.pread(files[rank].fileno(), count * row, ends[rank])
                ends[rank] += count * row
            if where[name] not in opened:
                opened[where[name]] = safe_open(os.path.join(target, where[name]), framework="pt")
            got = opened[where[name]].get_tensor(name)
            if tuple(got.shape) != shape or got.dtype != torch.bfloat16 or got.view(torch.uint8).numpy().tobytes() \
                    != expected:
                raise AssertionError(f"{name}: merged bytes differ from the source chunks")
            checked += 1
    finally:
        for f in files.values():
            f.close()
    return checked


def timed(cmd: list[str]) -> dict:
    """Run a command; its wall seconds, CPU seconds (all its processes) and the peak RSS of the
    largest process it waited for (on a shared machine the CPU figure is the steadier one)."""
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"cmd": " ".join(cmd), "rc": proc.returncode, "wall_s": round(wall, 1),
            "cpu_s": round(usage.ru_utime + usage.ru_stime, 1), "peak_rss_mb": round(usage.ru_maxrss / 1024),
            "stdout": proc.stdout[-4000:], "stderr": proc.stderr[-4000:]}


UNPICKLE = """
import resource, sys, time
from distmerge.sources.chunks import gc_paused
from distmerge.sources.dcp_pickle import load_metadata
start = time.process_time()
with gc_paused():
    tables = load_metadata(sys.argv[1], lean=sys.argv[2] == "lean")
print(round(time.process_time() - start, 2), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
      sum(len(row) for row in tables.storage.rows.values()))
"""


def unpickle(source: str) -> dict:
    """`.metadata` read by each unpickler in a fresh process: CPU seconds, peak RSS MB (the
    tables made included; the same tables either way, tests/test_dcp_pickle.py)."""
    result = {}
    for how in ("c", "lean"):
        proc = subprocess.run([sys.executable, "-c", UNPICKLE, os.path.join(source, ".metadata"), how],
                              capture_output=True, text=True, cwd=ROOT)
        if proc.returncode:
            raise SystemExit(proc.stderr[-2000:])
        cpu, rss, ints = proc.stdout.split()
        result[how] = {"cpu_s": float(cpu), "peak_rss_mb": int(rss), "storage_ints": int(ints)}
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["make", "inspect", "merge", "unpickle"])
    ap.add_argument("--world", type=int, default=8, help="training ranks that saved the checkpoint")
    ap.add_argument("--dims", choices=["full", "small"], default="full")
    ap.add_argument("--layers", type=int, default=LAYERS)
    ap.add_argument("--out", help="make: the checkpoint directory")
    ap.add_argument("--source", help="inspect/merge/unpickle: the checkpoint directory")
    ap.add_argument("--target", default="/tmp/distmerge_scale_out")
    ap.add_argument("--nproc", type=int, default=64)
    ap.add_argument("--local-ranks", type=int, default=2)
    a = ap.parse_args()
    py = [sys.executable, "-m", "distmerge"]
    if a.what == "make":
        start = time.perf_counter()
        make(a.out, a.world, FULL if a.dims == "full" else SMALL, a.layers, sparse=a.dims == "full")
        print(json.dumps({"made": a.out, "seconds": round(time.perf_counter() - start, 1),
                          "metadata_mb": round(os.path.getsize(os.path.join(a.out, ".metadata")) / 1e6, 1)}))
    elif a.what == "unpickle":
        print(json.dumps(unpickle(a.source), indent=1))
    elif a.what == "inspect":
        result = timed(py + ["inspect", a.source, "--nproc", str(a.nproc), "--json"])
        print(json.dumps({k: v for k, v in result.items() if k != "stdout"}, indent=1))
    else:
        result = timed(py + ["merge", "--local-ranks", str(a.local_ranks), "--source", a.source, "--target",
                             a.target, "--overwrite"])
        print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

"""Fixtures: real verl-style FSDP checkpoints written by real torch FSDP under torchrun (gloo),
made once per test session, and helpers that run distmerge as users do."""
from __future__ import annotations

import builtins
import contextlib
import functools
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MAKER = ROOT / "tests" / "make_fsdp_checkpoint.py"
PROCESS_TIMEOUT = 300

# name -> (nproc, maker arguments). Every layout the core issue lists is covered by one of them.
LAYOUTS = {
    # FSDP2, W=2, odd vocab (embedding sharded on dim 1 by verl's placement), after one AdamW step
    "llama_fsdp2_w2": (2, ["--model", "llama", "--layout", "fsdp2", "--optim-step"]),
    # FSDP2, W=4, qkv bias, tied embeddings, widths smaller than the mesh: uneven and empty shards
    "qwen2_fsdp2_w4_uneven_tied": (4, ["--model", "qwen2", "--layout", "fsdp2", "--hidden", "6", "--heads", "3",
                                       "--kv-heads", "1", "--intermediate", "10", "--tie"]),
    "llama_fsdp1_w2": (2, ["--model", "llama", "--layout", "fsdp1"]),
    "llama_hsdp_w4": (4, ["--model", "llama", "--layout", "hsdp"]),
    "qwen2_fsdp_tp_w4": (4, ["--model", "qwen2", "--layout", "tp"]),
    "qwen2_single": (1, ["--model", "qwen2", "--layout", "single"]),
    # verl's critic: Qwen2ForTokenClassification with num_labels=1 (score.weight [1, H] + score.bias)
    "qwen2_critic_fsdp2_w2": (2, ["--model", "qwen2", "--layout", "fsdp2", "--value-head"]),
    # VLMs: Qwen2-VL under the current names (model.visual.*, model.language_model.*) and Qwen2.5-VL
    # under the names transformers < 4.52 saved (visual.*, model.layers.*), with processor files
    "qwen2vl_fsdp2_w2": (2, ["--model", "qwen2_vl", "--layout", "fsdp2"]),
    "qwen25vl_old_names_fsdp2_w2": (2, ["--model", "qwen2_5_vl", "--layout", "fsdp2", "--old-vlm-names"]),
    # a PEFT LoRA model (r=4, alpha=8) as verl saves it, with lora_train_meta.json; the reference
    # is peft's merge_and_unload() of the live model
    "llama_lora_fsdp2_w2": (2, ["--model", "llama", "--layout", "fsdp2", "--lora", "4:8"]),
    # PyTorch DCP (dcp.save({"model": state_dict})) of FSDP2 and of FSDP2+TP models; source is OUT/dcp
    "qwen2_dcp_fsdp2_w2": (2, ["--model", "qwen2", "--layout", "fsdp2", "--save", "dcp"]),
    "llama_dcp_fsdp_tp_w4": (4, ["--model", "llama", "--layout", "tp", "--save", "dcp"]),
}
# layouts distmerge must refuse with a message: FSDP1 without a device mesh saves ShardedTensors
REFUSED_LAYOUTS = {
    "llama_fsdp1_nomesh_w2": (2, ["--model", "llama", "--layout", "fsdp1_nomesh", "--no-reference"]),
}


MEGATRON_MAKER = ROOT / "tests" / "make_megatron_checkpoint.py"
LLAMA_MG = ["--model", "llama", "--padded-vocab", "136"]          # HF vocab 128: Megatron pads it
QWEN2_MG = ["--model", "qwen2", "--tie", "--dtype", "bfloat16"]    # qkv bias, tied embeddings, bf16
QWEN2MOE_MG = ["--model", "qwen2_moe", "--dense-first"]
# name -> (nproc, maker arguments, reference layout it is re-saved from, or None for a reference)
MEGATRON_LAYOUTS = {
    "mg_llama_ref": (1, LLAMA_MG, None),
    "mg_llama_tp2": (2, LLAMA_MG + ["--tp", "2"], "mg_llama_ref"),
    "mg_llama_pp2": (2, LLAMA_MG + ["--pp", "2"], "mg_llama_ref"),
    "mg_llama_tp2pp2": (4, LLAMA_MG + ["--tp", "2", "--pp", "2"], "mg_llama_ref"),
    "mg_llama_tp2dp2_fully_parallel": (4, LLAMA_MG + ["--tp", "2", "--fully-parallel"], "mg_llama_ref"),
    "mg_llama_pp2vpp2": (2, LLAMA_MG + ["--pp", "2", "--vpp", "2"], "mg_llama_ref"),  # 2 model chunks per rank
    # Megatron-LM's legacy format (mp_rank_TT_PPP/model_optim_rng.pt with an `args` Namespace)
    "mg_llama_legacy_tp2pp2": (4, LLAMA_MG + ["--tp", "2", "--pp", "2", "--legacy"], "mg_llama_ref"),
    "mg_llama_legacy_pp2vpp2": (2, LLAMA_MG + ["--pp", "2", "--vpp", "2", "--legacy"], "mg_llama_ref"),  # model0/model1
    "mg_qwen2_ref": (1, QWEN2_MG, None),
    "mg_qwen2_tp2": (2, QWEN2_MG + ["--tp", "2"], "mg_qwen2_ref"),
    "mg_qwen2_pp2": (2, QWEN2_MG + ["--pp", "2"], "mg_qwen2_ref"),  # tied: the last stage holds a copy
    # a value model (verl's critic): output_layer [1, H] -> Qwen2ForTokenClassification's score
    "mg_critic_ref": (1, ["--model", "qwen2", "--value-head"], None),
    "mg_critic_tp2": (2, ["--model", "qwen2", "--value-head", "--tp", "2"], "mg_critic_ref"),
    "mg_qwen3_ref": (1, ["--model", "qwen3"], None),                          # q_norm / k_norm
    "mg_qwen3_tp2": (2, ["--model", "qwen3", "--tp", "2"], "mg_qwen3_ref"),
    "mg_mixtral_ref": (1, ["--model", "mixtral"], None),                       # MoE: 4 experts, top-2
    "mg_mixtral_ep2": (2, ["--model", "mixtral", "--ep", "2"], "mg_mixtral_ref"),
    "mg_mixtral_tp2ep2": (4, ["--model", "mixtral", "--tp", "2", "--ep", "2"], "mg_mixtral_ref"),
    "mg_mixtral_expert_bias": (1, ["--model", "mixtral", "--expert-bias"], None),  # sigmoid routing + expert_bias
    "mg_mixtral_legacy_tp2ep2": (4, ["--model", "mixtral", "--tp", "2", "--ep", "2", "--legacy"], "mg_mixtral_ref"),
    # Qwen2-MoE: qkv bias, shared expert with its sigmoid gate, no top-k renormalisation, and layer 0
    # dense (mlp_only_layers): heterogeneous layers are saved with a key per layer
    "mg_qwen2moe_ref": (1, QWEN2MOE_MG, None),
    "mg_qwen2moe_tp2ep2": (4, QWEN2MOE_MG + ["--tp", "2", "--ep", "2"], "mg_qwen2moe_ref"),
    # singleton_local_shards: a key per expert, and GLU halves as separate linear_fc1.weight_w / _v
    "mg_qwen2moe_singleton_ep2": (2, QWEN2MOE_MG + ["--ep", "2", "--singleton"], "mg_qwen2moe_ref"),
    "mg_qwen3moe_ref": (1, ["--model", "qwen3_moe"], None),                    # q/k norms, renormalised top-k
    "mg_qwen3moe_ep2": (2, ["--model", "qwen3_moe", "--ep", "2"], "mg_qwen3moe_ref"),
    # DeepSeek-V3: multi-latent attention (q_lora_rank 32), sigmoid routing with expert_bias, a shared
    # expert, layer 0 dense
    "mg_deepseekv3_ref": (1, ["--model", "deepseek_v3"], None),
    "mg_deepseekv3_tp2ep2": (4, ["--model", "deepseek_v3", "--tp", "2", "--ep", "2"], "mg_deepseekv3_ref"),
    "mg_deepseekv3_legacy_tp2": (2, ["--model", "deepseek_v3", "--tp", "2", "--legacy"], "mg_deepseekv3_ref"),
    # the Megatron family's other layouts (issue 16), re-saved from mg_llama_ref: Megatron-LM (args in
    # common.pt, no HF config), Megatron-Bridge (run_config.yaml + tokenizer/), NeMo 2 (module. keys +
    # context/), verl's newer model/{dist_ckpt,huggingface}
    "mg_llama_mlm_tp2": (2, LLAMA_MG + ["--tp", "2", "--layout", "megatron-lm"], "mg_llama_ref"),
    "mg_llama_bridge_pp2": (2, LLAMA_MG + ["--pp", "2", "--layout", "bridge"], "mg_llama_ref"),
    "mg_llama_nemo2_tp2": (2, LLAMA_MG + ["--tp", "2", "--layout", "nemo2"], "mg_llama_ref"),
    "mg_llama_verlmodel_tp2": (2, LLAMA_MG + ["--tp", "2", "--layout", "verl-model"], "mg_llama_ref"),
    # each family saved without an HF config (with its own reference logits): a config is built from it
    "mg_qwen2_bridge_ref": (1, QWEN2_MG + ["--layout", "bridge"], None),
    "mg_qwen3_nemo2_ref": (1, ["--model", "qwen3", "--layout", "nemo2"], None),
    "mg_mixtral_mlm_ref": (1, ["--model", "mixtral", "--layout", "megatron-lm"], None),
    "mg_qwen2moe_bridge_ref": (1, QWEN2MOE_MG + ["--layout", "bridge"], None),
    "mg_qwen3moe_mlm_ref": (1, ["--model", "qwen3_moe", "--layout", "megatron-lm"], None),
    "mg_deepseekv3_bridge_ref": (1, ["--model", "deepseek_v3", "--layout", "bridge"], None),
}


def source_dir(layout: str, ckpt: Path) -> Path:
    """The directory a user passes as --source: DCP checkpoints sit in OUT/dcp beside OUT/huggingface."""
    return ckpt / "dcp" if "_dcp_" in layout else ckpt


class CodeRunningPickle:
    """Pickles to a call of open(marker, "w"): unpickling it creates the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env() -> dict:
    env = dict(os.environ)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def torchrun_cmd(nproc: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
            "--master-addr", "127.0.0.1", "--master-port", str(free_port())]


def run(cmd: list[str], timeout: int = PROCESS_TIMEOUT, env: dict | None = None) -> subprocess.CompletedProcess:
    """cmd in the project root with a clean environment, plus `env`."""
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=clean_env() | (env or {}), cwd=ROOT)


def run_distmerge(args: list[str], nproc: int = 1, timeout: int = PROCESS_TIMEOUT) -> subprocess.CompletedProcess:
    """`python -m distmerge ...` for one process, `torchrun --nproc-per-node N -m distmerge ...` otherwise."""
    if nproc == 1:
        cmd = [sys.executable, "-m", "distmerge"] + args
    else:
        cmd = torchrun_cmd(nproc) + ["-m", "distmerge"] + args
    return run(cmd, timeout)


def write_fixture(cmd: list[str], out: Path, timeout: int = PROCESS_TIMEOUT, env: dict | None = None) -> Path:
    """Run a fixture maker that writes `out`; its own output is the failure message. Callers wrap their
    maker in functools.cache, so each fixture is written once per session, on first use."""
    proc = run(cmd + ["--out", str(out)], timeout, env)
    assert proc.returncode == 0, f"fixture {out.name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return out


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """checkpoint(name) -> directory of that layout, written on first use, once per session."""
    base = tmp_path_factory.mktemp("checkpoints")

    @functools.cache
    def make(name: str) -> Path:
        if name in MEGATRON_LAYOUTS:  # megatron-core needs torchrun even for one process
            nproc, extra, ref = MEGATRON_LAYOUTS[name]
            if ref:
                extra = extra + ["--from", str(make(ref) / "dist_ckpt")]
            cmd = torchrun_cmd(nproc) + [str(MEGATRON_MAKER)]
        else:
            nproc, extra = {**LAYOUTS, **REFUSED_LAYOUTS}[name]
            cmd = [sys.executable, str(MAKER)] if nproc == 1 else torchrun_cmd(nproc) + [str(MAKER)]
        return write_fixture(cmd + extra, base / name)

    return make


def pytest_collection_modifyitems(items):
    """A test that uses a real fixture checkpoint starts torchrun to write it: slow (the fast tier is
    `-m "not slow"`). Test files that start processes otherwise mark themselves."""
    for item in items:
        if {"checkpoint", "slurm"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


def segment_hashes(path, segments: list) -> list:
    """[[start, end, xxh3-128], ...] of a file, hashed afresh, as the manifest lists them."""
    from distmerge.integrity import hash_range

    return [[start, end, hash_range(str(path), start, end)] for start, end, _ in segments]


@contextlib.contextmanager
def opened_under(directory, monkeypatch):
    """The files under `directory` (symlinks resolved) that anything opens while inside the block."""
    opened: list[str] = []

    def spying(real):
        def wrapper(file, *args, **kwargs):
            if isinstance(file, (str, bytes, os.PathLike)) and str(directory) in os.path.realpath(os.fsdecode(file)):
                opened.append(os.fsdecode(file))
            return real(file, *args, **kwargs)
        return wrapper

    monkeypatch.setattr(builtins, "open", spying(builtins.open))
    monkeypatch.setattr(os, "open", spying(os.open))
    try:
        yield opened
    finally:
        monkeypatch.undo()

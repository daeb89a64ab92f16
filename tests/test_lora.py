"""LoRA checkpoints (verl FSDP + PEFT): folded, as an adapter, or both; alpha never guessed."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_distmerge
from test_fsdp_merge import FIXED_INPUT, assert_bit_exact, merged_tensors

LAYOUT = "llama_lora_fsdp2_w2"
ADAPTED = "model.layers.0.self_attn.q_proj.weight"


def merge(ckpt, out, *extra, nproc=2):
    proc = run_distmerge(["merge", "--source", str(ckpt), "--target", str(out), "--max-shard-size", "60KB",
                          "--no-progress", *extra], nproc=nproc)
    return proc


def test_fold_equals_peft_merge_and_unload_and_differs_from_the_base(checkpoint, tmp_path):
    ckpt = checkpoint(LAYOUT)
    assert merge(ckpt, tmp_path / "out").returncode == 0
    merged = merged_tensors(tmp_path / "out")
    assert_bit_exact(load_file(ckpt / "reference" / "model.safetensors"), merged)
    base = load_file(ckpt / "reference" / "base.safetensors")
    assert not torch.equal(merged[ADAPTED], base[ADAPTED]), "the fold changed nothing"
    assert torch.equal(merged["model.layers.0.self_attn.k_proj.weight"], base["model.layers.0.self_attn.k_proj.weight"])
    assert not (tmp_path / "out" / "lora_adapter").exists()


def test_fold_then_cast_to_bf16(checkpoint, tmp_path):
    ckpt = checkpoint(LAYOUT)
    assert merge(ckpt, tmp_path / "out", "--dtype", "bf16", nproc=1).returncode == 0
    reference = {k: v.bfloat16() for k, v in load_file(ckpt / "reference" / "model.safetensors").items()}
    assert_bit_exact(reference, merged_tensors(tmp_path / "out"))


def test_adapter_output_loads_with_peft_and_gives_the_trained_logits(checkpoint, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ckpt = checkpoint(LAYOUT)
    out = tmp_path / "out"
    proc = merge(ckpt, out, "--lora", "adapter", "--verify")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_bit_exact(load_file(ckpt / "reference" / "base.safetensors"), merged_tensors(out))
    adapter = out / "lora_adapter"
    assert_bit_exact(load_file(ckpt / "reference" / "adapter" / "adapter_model.safetensors"),
                     load_file(adapter / "adapter_model.safetensors"))
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["task_type"]) == (4, 8.0, "CAUSAL_LM")
    assert sorted(config["target_modules"]) == ["down_proj", "q_proj", "v_proj"]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out), adapter).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor(FIXED_INPUT)).logits
    torch.testing.assert_close(logits, torch.load(ckpt / "reference" / "logits.pt"), rtol=1e-5, atol=1e-6)


def test_both_writes_the_fold_and_the_adapter(checkpoint, tmp_path):
    ckpt = checkpoint(LAYOUT)
    proc = merge(ckpt, tmp_path / "out", "--lora", "both", "--summary-json", str(tmp_path / "s.json"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_bit_exact(load_file(ckpt / "reference" / "model.safetensors"), merged_tensors(tmp_path / "out"))
    assert (tmp_path / "out" / "lora_adapter" / "adapter_model.safetensors").exists()
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert not any("lora" in name or "lora" in f for name, f in index["weight_map"].items())
    manifest = json.loads((tmp_path / "out" / "distmerge-manifest.json").read_text())
    assert "lora_adapter/adapter_model.safetensors" in manifest["files"]


@pytest.fixture
def no_meta(checkpoint, tmp_path):
    src = tmp_path / "ckpt"
    shutil.copytree(checkpoint(LAYOUT), src)
    (src / "lora_train_meta.json").unlink()
    return src


def test_unknown_alpha_is_refused_and_given_alpha_is_used(no_meta, checkpoint, tmp_path):
    proc = merge(no_meta, tmp_path / "out", nproc=1)
    assert proc.returncode == 2 and "--lora-alpha" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()
    assert merge(no_meta, tmp_path / "out", "--lora-alpha", "8", nproc=1).returncode == 0
    assert_bit_exact(load_file(checkpoint(LAYOUT) / "reference" / "model.safetensors"), merged_tensors(tmp_path / "out"))


def test_alpha_zero_is_refused(no_meta, tmp_path):
    (no_meta / "lora_train_meta.json").write_text(json.dumps({"r": 4, "lora_alpha": 0, "task_type": "CAUSAL_LM"}))
    proc = merge(no_meta, tmp_path / "out", nproc=1)
    assert proc.returncode == 2 and "alpha 0 gives back the base model" in proc.stderr, proc.stderr
    proc = merge(no_meta, tmp_path / "out", "--lora-alpha", "0", nproc=1)
    assert proc.returncode == 2 and "--lora-alpha" in proc.stderr


def test_verify_source_folds_like_merge_and_inspect_shows_the_adapter(checkpoint, capsys):
    from distmerge.cli import main

    ckpt = checkpoint(LAYOUT)
    assert main(["verify", "--source", str(ckpt), "--reference", str(ckpt / "reference")]) == 0
    assert main(["inspect", str(ckpt)]) == 0
    assert "lora          r=4 alpha=8 on 6 modules (down_proj, q_proj, v_proj)" in capsys.readouterr().out

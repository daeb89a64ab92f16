"""configs/ presets: each one merges a real fixture; flags override; bad presets are refused."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors import safe_open

from conftest import run_distmerge, source_dir
from distmerge.cli import main

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
# each preset and the fixture of the source it is for
PRESETS = {
    "verl-fsdp.yaml": "llama_fsdp2_w2",
    "verl-megatron.yaml": "mg_llama_tp2",
    "megatron-lm.yaml": "mg_llama_pp2",
    "dcp.yaml": "qwen2_dcp_fsdp2_w2",
    "bf16-release.yaml": "llama_fsdp2_w2",
    "lora-merge.yaml": "llama_lora_fsdp2_w2",
}


def test_every_preset_has_a_test():
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(PRESETS)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_merges_its_source(preset, checkpoint, tmp_path):
    layout = PRESETS[preset]
    ckpt = checkpoint(layout)
    args = ["merge", "--config", str(CONFIGS / preset), "--source", str(source_dir(layout, ckpt)),
            "--target", str(tmp_path / "out"), "--no-progress"]
    if preset == "megatron-lm.yaml":  # a Megatron-LM run: iter_* directories, config passed by hand
        run_dir = tmp_path / "run"
        run_dir.mkdir()
        # a copy, not a symlink: a checkpoint's files must resolve inside the source (tests/test_hostile.py)
        shutil.copytree(ckpt / "dist_ckpt", run_dir / "iter_0000007")
        (run_dir / "latest_checkpointed_iteration.txt").write_text("7")
        args[args.index("--source") + 1] = str(run_dir)
        args += ["--hf-config", str(ckpt / "huggingface")]
    proc = run_distmerge(args, nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    expected = "bfloat16" if preset in ("bf16-release.yaml", "lora-merge.yaml") else "float32"
    if preset == "lora-merge.yaml":  # folded weights and the adapter beside them
        assert (tmp_path / "out" / "lora_adapter" / "adapter_config.json").exists()
    assert config.get("dtype", config.get("torch_dtype")) == expected
    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as f:
        assert str(f.get_tensor("model.norm.weight").dtype) == f"torch.{expected}"


def test_command_line_flags_override_the_preset(checkpoint, tmp_path, capsys):
    code = main(["merge", "--config", str(CONFIGS / "bf16-release.yaml"), "--dtype", "fp16",
                 "--source", str(checkpoint("llama_fsdp2_w2")), "--target", str(tmp_path / "out"), "--no-progress"])
    assert code == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "out" / "config.json").read_text()).get("dtype") == "float16"


@pytest.mark.parametrize("text, needle", [
    ("dtype: bf16\nshard_size: 2GB\n", "unknown key 'shard_size'"),
    ("dtype: bf32\n", "bf32"),
    ("- dtype\n", "must be a mapping"),
    ("dtype: [unclosed\n", "not valid YAML"),
])
def test_bad_presets_are_refused_by_key(text, needle, checkpoint, tmp_path, capsys):
    preset = tmp_path / "preset.yaml"
    preset.write_text(text)
    code = main(["merge", "--config", str(preset), "--source", str(checkpoint("llama_fsdp2_w2")),
                 "--target", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and needle in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


def test_source_and_target_may_come_from_the_preset(checkpoint, tmp_path, capsys):
    preset = tmp_path / "job.yaml"
    preset.write_text(f"source: {checkpoint('llama_fsdp2_w2')}\ntarget: {tmp_path / 'out'}\n")
    assert main(["merge", "--config", str(preset), "--no-progress"]) == 0, capsys.readouterr().err
    assert (tmp_path / "out" / "model.safetensors").exists()

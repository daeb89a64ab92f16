"""`distmerge verify`: the self-check, the comparison with a reference, logits, and the source
comparison that writes nothing. Damaged outputs must fail with exit 3 and name the damage."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import run_distmerge
from distmerge.cli import main


def verify(capsys, *args):
    code = main(["verify", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


@pytest.fixture(scope="module")
def merged(checkpoint, tmp_path_factory):
    """llama_fsdp2_w2 merged into several files, and its reference HF directory."""
    ckpt = checkpoint("llama_fsdp2_w2")
    out = tmp_path_factory.mktemp("verify") / "merged"
    proc = run_distmerge(["merge", "--source", str(ckpt), "--target", str(out), "--max-shard-size", "60KB",
                          "--no-progress"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return ckpt, out


@pytest.fixture
def damaged(merged, tmp_path):
    """A private copy of the merged directory that a test may damage."""
    copy = tmp_path / "merged"
    shutil.copytree(merged[1], copy)
    return copy


def test_a_sound_merge_passes_every_check_and_matches_reference_and_logits(merged, capsys):
    ckpt, out = merged
    code, text = verify(capsys, out, "--reference", ckpt / "reference", "--logits")
    assert code == 0, text
    for check in ("every header parses", "content hashes match", "tensors match the architecture",
                  "every tensor equals the reference's", "logits equal the reference's"):
        assert f"ok       {check}" in text, text
    assert "bit-identical: 21" in text and "result: OK" in text


def test_json_report(merged, capsys):
    code, text = verify(capsys, merged[1], "--json")
    report = json.loads(text)
    assert code == 0 and report["ok"] is True and all(status == "ok" for _, status in report["checks"])


def test_a_flipped_byte_fails_the_hash_and_the_reference_check(merged, damaged, capsys):
    index = json.loads((damaged / "model.safetensors.index.json").read_text())["weight_map"]
    name = "model.layers.1.mlp.down_proj.weight"
    path = damaged / index[name]
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x40  # inside the data of the file's last tensor
    path.write_bytes(bytes(data))
    code, text = verify(capsys, damaged, "--reference", merged[0] / "reference")
    assert code == 3, text
    assert f"{path}: content hash of bytes" in text and "differs from the manifest's" in text
    assert "differs (max abs diff" in text and "FAILED" in text


def test_a_missing_file_and_a_truncated_file_are_named(damaged, capsys):
    files = sorted(damaged.glob("model-*.safetensors"))
    files[0].unlink()
    with open(files[1], "r+b") as f:
        f.truncate(files[1].stat().st_size - 100)
    code, text = verify(capsys, damaged)
    assert code == 3, text
    assert f"{files[0]} is listed in the index but missing" in text
    assert f"{files[1]}: data is" in text or f"{files[1]}: tensor" in text, text


def test_a_tensor_missing_from_the_architecture_is_found(merged, tmp_path, capsys):
    ckpt, _ = merged
    out = tmp_path / "partial"
    shutil.copytree(ckpt / "reference", out)
    (out / "logits.pt").unlink()
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(ckpt / "huggingface" / f, out / f)
    tensors = load_file(out / "model.safetensors")
    del tensors["model.layers.0.mlp.up_proj.weight"]
    tensors["model.layers.0.mlp.extra.weight"] = torch.zeros(2)
    save_file(tensors, out / "model.safetensors")
    code, text = verify(capsys, out)
    assert code == 3, text
    assert "tensor model.layers.0.mlp.up_proj.weight of LlamaForCausalLM is missing" in text
    assert "tensor model.layers.0.mlp.extra.weight is not part of LlamaForCausalLM" in text
    assert "content hashes (skipped: no distmerge-manifest.json" in text  # not written by distmerge


def test_tolerances_accept_small_differences_only_when_asked(merged, tmp_path, capsys):
    ckpt, out = merged
    ref = tmp_path / "ref"
    shutil.copytree(ckpt / "reference", ref)
    tensors = load_file(ref / "model.safetensors")
    tensors["model.norm.weight"] = tensors["model.norm.weight"] + 1e-6
    save_file(tensors, ref / "model.safetensors")
    code, text = verify(capsys, out, "--reference", ref)
    assert code == 3 and "tensor model.norm.weight differs" in text, text
    assert "model.norm.weight" in text.split("worst:")[1].splitlines()[2]  # the worst tensor leads the table
    code, text = verify(capsys, out, "--reference", ref, "--atol", "1e-5")
    assert code == 0, text


def test_source_against_reference_writes_nothing(merged, tmp_path, capsys):
    ckpt, _ = merged
    before = sorted(p.name for p in ckpt.iterdir())
    code, text = verify(capsys, "--source", ckpt, "--reference", ckpt / "reference")
    assert code == 0 and "bit-identical: 21" in text, text
    assert sorted(p.name for p in ckpt.iterdir()) == before
    ref = tmp_path / "ref"
    shutil.copytree(ckpt / "reference", ref)
    tensors = load_file(ref / "model.safetensors")
    tensors["model.embed_tokens.weight"][3, 4] += 1
    save_file(tensors, ref / "model.safetensors")
    code, text = verify(capsys, "--source", ckpt, "--reference", ref)
    assert code == 3 and "tensor model.embed_tokens.weight differs" in text, text


def test_megatron_source_against_its_merged_output(checkpoint, tmp_path, capsys):
    """The source comparison maps Megatron names (fused QKV, gate/up, stacked layers) on the way."""
    ckpt = checkpoint("mg_llama_tp2pp2")
    out = tmp_path / "out"
    assert main(["merge", "--source", str(ckpt), "--target", str(out), "--no-progress"]) == 0
    code, text = verify(capsys, "--source", ckpt, "--reference", out)
    assert code == 0 and "result: OK" in text, text


def test_an_incomplete_staging_directory_fails(merged, damaged, capsys):
    (damaged / ".distmerge-incomplete").write_text("x")
    code, text = verify(capsys, damaged)
    assert code == 3 and "a merge did not finish writing it" in text


def test_verify_of_something_that_is_not_a_checkpoint_is_bad_input(tmp_path, capsys):
    code, text = verify(capsys, tmp_path)
    assert code == 2 and "is not a safetensors HF checkpoint" in text and "Traceback" not in text


def test_merge_verify_keeps_a_wrong_result_unpublished(merged, tmp_path):
    """A config of another architecture (qkv bias) for a Llama checkpoint: the merge itself has
    nothing to object to, the self-check finds the missing biases, and nothing is published."""
    ckpt, _ = merged
    hf = tmp_path / "hf"
    shutil.copytree(ckpt / "huggingface", hf)
    config = json.loads((hf / "config.json").read_text())
    config.update(architectures=["Qwen2ForCausalLM"], model_type="qwen2")
    (hf / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    proc = run_distmerge(["merge", "--source", str(ckpt), "--target", str(out), "--hf-config", str(hf), "--verify",
                          "--no-progress"])
    assert proc.returncode == 3, proc.stderr
    assert "tensor model.layers.0.self_attn.q_proj.bias of Qwen2ForCausalLM is missing" in proc.stderr
    assert "was not published" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()

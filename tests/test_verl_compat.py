"""What verl's model_merger users bring along: its flags, its `test` operation, and the upload
to the Hub (against a local stand-in of the Hub's HTTP API)."""
from __future__ import annotations

import json
import os

from safetensors.torch import load_file

import sys

from conftest import free_port, run, run_distmerge
from fake_hub import FakeHub
from test_fsdp_merge import assert_bit_exact, merged_tensors


def distmerge_with_hub(args, hub_url):
    return run([sys.executable, "-m", "distmerge", *args],
               env={"HF_ENDPOINT": hub_url, "HF_TOKEN": "hf_test", "HF_HUB_DISABLE_TELEMETRY": "1"})


def test_verl_spelling_merges(checkpoint, tmp_path):
    ckpt = checkpoint("llama_fsdp2_w2")
    proc = run_distmerge(["merge", "--backend", "fsdp", "--local_dir", str(ckpt), "--target_dir", str(tmp_path / "out"),
                          "--tie-word-embedding", "--is-value-model", "--no-progress"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "--tie-word-embedding was given but config.json says tie_word_embeddings=false" in proc.stderr
    assert "--is-value-model was given but config.json's architecture is LlamaForCausalLM" in proc.stderr
    assert_bit_exact(load_file(ckpt / "reference" / "model.safetensors"), merged_tensors(tmp_path / "out"))


def test_verl_backend_must_match_the_source(checkpoint, tmp_path):
    proc = run_distmerge(["merge", "--backend", "megatron", "--local_dir", str(checkpoint("llama_fsdp2_w2")),
                          "--target_dir", str(tmp_path / "out")])
    assert proc.returncode == 2 and "--backend megatron (verl's flag) but" in proc.stderr and "drop --backend" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_verl_test_operation(checkpoint):
    ckpt = checkpoint("llama_fsdp2_w2")
    proc = run_distmerge(["test", "--backend", "fsdp", "--local_dir", str(ckpt), "--test_hf_dir", str(ckpt / "reference")])
    assert proc.returncode == 0 and "result: OK" in proc.stdout, proc.stdout + proc.stderr


def test_upload_after_the_self_check(checkpoint, tmp_path):
    ckpt = checkpoint("llama_fsdp2_w2")
    out = tmp_path / "out"
    with FakeHub() as hub:
        proc = distmerge_with_hub(["merge", "--source", str(ckpt), "--target", str(out), "--max-shard-size", "60KB",
                                   "--hf_upload_path", "my-org/llama-step1", "--private", "--no-progress",
                                   "--summary-json", str(tmp_path / "s.json")], hub.url)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "result: OK" in proc.stderr  # the self-check ran before the upload
    created = hub.repos["my-org/llama-step1"]
    assert created.get("private") is True or created.get("visibility") == "private", created
    uploaded = hub.files["my-org/llama-step1"]
    local = {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert uploaded == local and "model.safetensors.index.json" in uploaded
    assert json.loads((tmp_path / "s.json").read_text())["uploaded"] == f"{hub.url}/my-org/llama-step1"


def test_failed_upload_keeps_the_output_and_says_how_to_retry(checkpoint, tmp_path):
    ckpt = checkpoint("llama_fsdp2_w2")
    with FakeHub(deny=True) as hub:
        proc = distmerge_with_hub(["merge", "--source", str(ckpt), "--target", str(tmp_path / "out"),
                                   "--hf-upload-path", "my-org/x", "--no-progress"], hub.url)
    assert proc.returncode == 4, proc.stderr
    assert "not authorised" in proc.stderr and "hf auth login" in proc.stderr and "Traceback" not in proc.stderr
    assert f"upload it later with: hf upload my-org/x {tmp_path / 'out'}" in proc.stderr
    assert_bit_exact(load_file(ckpt / "reference" / "model.safetensors"), merged_tensors(tmp_path / "out"))
    # nobody listening: a network failure
    proc = distmerge_with_hub(["merge", "--source", str(ckpt), "--target", str(tmp_path / "out2"),
                               "--hf-upload-path", "my-org/x", "--no-progress"], f"http://127.0.0.1:{free_port()}")
    assert proc.returncode == 4 and "cannot reach the Hub" in proc.stderr, proc.stderr
    assert os.path.exists(tmp_path / "out2" / "config.json")

"""verl FSDP checkpoints -> HF: bit-exact tensors, equal logits, consistent index, one writer per file."""
from __future__ import annotations

import hashlib
import json
import re
import shutil
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import distmerge

from conftest import LAYOUTS, run, run_distmerge, segment_hashes, source_dir

FIXED_INPUT = [[1, 5, 9, 2, 7, 3, 11, 4]]


def merged_tensors(out):
    tensors = {}
    for f in sorted(out.glob("*.safetensors")):
        for name, t in load_file(f).items():
            assert name not in tensors, f"{name} written twice"
            tensors[name] = t
    return tensors


def assert_bit_exact(reference: dict, merged: dict):
    assert set(merged) == set(reference), set(merged) ^ set(reference)
    for name, ref in reference.items():
        got = merged[name]
        assert got.dtype == ref.dtype and got.shape == ref.shape, (name, got.dtype, ref.dtype, got.shape, ref.shape)
        assert torch.equal(got.view(torch.uint8), ref.view(torch.uint8)), f"{name} differs"


def assert_index_consistent(out):
    files = sorted(p.name for p in out.glob("*.safetensors"))
    if len(files) == 1:
        assert files == ["model.safetensors"]
        return
    index = json.loads((out / "model.safetensors.index.json").read_text())
    weight_map = index["weight_map"]
    assert sorted(set(weight_map.values())) == files
    total = 0
    for name in files:
        with safe_open(out / name, "pt") as f:
            assert f.metadata() == {"format": "pt"}
            keys = list(f.keys())
            assert all(weight_map[k] == name for k in keys)
            total += sum(f.get_slice(k).get_shape() and f.get_tensor(k).numel() * f.get_tensor(k).element_size()
                         or 0 for k in keys)
    assert sum(1 for _ in weight_map) == len(set(weight_map))
    assert index["metadata"]["total_size"] == total


def assert_loads_with_equal_logits(ckpt, out):
    from transformers import AutoModelForCausalLM, AutoModelForTokenClassification, AutoTokenizer

    from transformers import AutoModelForImageTextToText

    arch = json.loads((out / "config.json").read_text())["architectures"][0]
    auto = (AutoModelForTokenClassification if arch.endswith("ForTokenClassification")
            else AutoModelForImageTextToText if arch.endswith("ForConditionalGeneration") else AutoModelForCausalLM)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no missing/unexpected-key warnings
        model, info = auto.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    AutoTokenizer.from_pretrained(out)
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor(FIXED_INPUT)).logits
    torch.testing.assert_close(logits, torch.load(ckpt / "reference" / "logits.pt"), rtol=1e-5, atol=1e-6)


def digest(out) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.iterdir()) if p.is_file()}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_merge_matches_unsharded_model(layout, checkpoint, tmp_path):
    ckpt = checkpoint(layout)
    out = tmp_path / "hf"
    nproc = 1 if LAYOUTS[layout][0] == 1 else 2
    summary = tmp_path / "summary.json"
    proc = run_distmerge(["merge", "--source", str(source_dir(layout, ckpt)), "--target", str(out), "--max-shard-size", "60KB",
                          "--summary-json", str(summary), "--verify"], nproc=nproc)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "merged" in proc.stderr
    assert_bit_exact(load_file(ckpt / "reference" / "model.safetensors"), merged_tensors(out))
    assert_index_consistent(out)
    result = json.loads(summary.read_text())
    written = [f for files in result["files_by_rank"] for f in files]
    assert sorted(written) == sorted(result["files"]) == sorted(p.name for p in out.glob("*.safetensors"))
    assert len(result["files_by_rank"]) == nproc
    assert result["verified"] is True and "result: OK" in proc.stderr  # the self-check ran before publishing
    assert {f: h["segments"] for f, h in result["hashes"].items()} == {
        f: segment_hashes(out / f, h["segments"]) for f, h in result["hashes"].items()}
    assert_loads_with_equal_logits(ckpt, out)
    config = json.loads((out / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "float32"
    assert (out / "generation_config.json").exists() and (out / "tokenizer.json").exists()
    if "vl" in layout:  # processor files travel with the model
        assert (out / "preprocessor_config.json").exists() and (out / "chat_template.jinja").exists()
    assert not any(p.name.startswith(".") for p in out.iterdir()), "staging marker left in the target"
    assert not any(p.name.endswith(".distmerge-staging") for p in out.parent.iterdir())


@pytest.mark.parametrize("layout, shard_size", [("llama_fsdp2_w2", "30KB"), ("qwen2_fsdp2_w4_uneven_tied", "1KB"),
                                                ("llama_dcp_fsdp_tp_w4", "30KB")])
def test_output_is_the_same_for_any_rank_count_and_transport(layout, shard_size, checkpoint, tmp_path):
    ckpt = checkpoint(layout)
    source = source_dir(layout, ckpt)
    digests = {}
    for nproc in (1, 2, 3, 4):
        for transport in ("direct", "collective"):
            if nproc == 1 and transport == "collective":
                continue  # one process has nobody to exchange with
            out = tmp_path / f"m{nproc}-{transport}"
            proc = run_distmerge(["merge", "--source", str(source), "--target", str(out), "--max-shard-size", shard_size,
                                  "--transport", transport, "--no-progress"], nproc=nproc)
            assert proc.returncode == 0, proc.stderr[-4000:]
            digests[(nproc, transport)] = digest(out)
    # ranks forked by one process instead of torchrun's (launch/merge_local.sh: merge --local-ranks N)
    out = tmp_path / "forked"
    proc = run(["bash", "launch/merge_local.sh", str(source), str(out), "--max-shard-size", shard_size,
                "--transport", "collective", "--no-progress"], env={"PYTHON": sys.executable, "NPROC_PER_NODE": "3"})
    assert proc.returncode == 0 and "with 3 rank(s)" in proc.stderr, proc.stderr[-4000:]
    digests[("--local-ranks 3", "collective")] = digest(out)
    first = digests[(1, "direct")]
    assert len([n for n in first if n.endswith(".safetensors")]) > 3
    for key, d in digests.items():
        assert d == first, f"output of {key} differs from one process"
    assert_bit_exact(load_file(ckpt / "reference" / "model.safetensors"), merged_tensors(tmp_path / "m4-collective"))


def test_dtype_bf16_casts_floating_tensors_and_states_it(checkpoint, tmp_path):
    ckpt = checkpoint("llama_fsdp2_w2")
    out = tmp_path / "bf16"
    proc = run_distmerge(["merge", "--source", str(ckpt), "--target", str(out), "--dtype", "bf16", "--fsync"], nproc=2)
    assert proc.returncode == 0, proc.stderr[-4000:]
    reference = {k: v.to(torch.bfloat16) for k, v in load_file(ckpt / "reference" / "model.safetensors").items()}
    assert_bit_exact(reference, merged_tensors(out))
    config = json.loads((out / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"


def test_one_process_without_torchrun_and_console_script(checkpoint, tmp_path):
    import os
    import sys

    from conftest import run

    ckpt = checkpoint("llama_fsdp2_w2")
    script = os.path.join(os.path.dirname(sys.executable), "distmerge")
    proc = run([script, "merge", "--source", str(ckpt), "--target", str(tmp_path / "out"), "--no-progress"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert_bit_exact(load_file(ckpt / "reference" / "model.safetensors"), merged_tensors(tmp_path / "out"))


def test_missing_rank_file_is_refused_and_nothing_is_written(checkpoint, tmp_path):
    src = tmp_path / "ckpt"
    shutil.copytree(checkpoint("llama_hsdp_w4"), src)
    (src / "model_world_size_4_rank_2.pt").unlink()
    out = tmp_path / "out"
    one = run_distmerge(["merge", "--source", str(src), "--target", str(out)])
    assert one.returncode == 2, one.stderr
    assert "model_world_size_4_rank_2.pt" in one.stderr and "missing rank file" in one.stderr
    assert "Traceback" not in one.stderr
    # under torchrun: the same single message, said once by rank 0 (torchrun itself exits 1 and
    # prints its own failure report, which names no distmerge code)
    two = run_distmerge(["merge", "--source", str(src), "--target", str(out)], nproc=2)
    assert two.returncode != 0
    assert two.stderr.count("distmerge: error: missing rank file") == 1, two.stderr
    # torchrun's report may print its own traceback and paths (the venv's python may sit in a
    # folder named distmerge); no frame of it may be distmerge's code
    package = Path(distmerge.__file__).resolve().parent
    frames = [Path(f).resolve() for f in re.findall(r'File "([^"]+)"', two.stderr)]
    assert not [f for f in frames if f.is_relative_to(package)], two.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_non_empty_target_is_refused_and_left_untouched(checkpoint, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    proc = run_distmerge(["merge", "--source", str(checkpoint("llama_fsdp2_w2")), "--target", str(out)])
    assert proc.returncode == 2
    assert "is not empty" in proc.stderr and "--overwrite" in proc.stderr and "Traceback" not in proc.stderr
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_overwrite_replaces_target_only_after_success(checkpoint, tmp_path):
    ckpt = checkpoint("llama_fsdp2_w2")
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    proc = run_distmerge(["merge", "--source", str(ckpt), "--target", str(out), "--overwrite"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"replaced the earlier contents of {out} (--overwrite)" in proc.stderr
    assert not (out / "old.txt").exists()
    assert_bit_exact(load_file(ckpt / "reference" / "model.safetensors"), merged_tensors(out))


@pytest.mark.parametrize("layout", ["llama_fsdp2_w2", "qwen2_fsdp_tp_w4", "qwen2_fsdp2_w4_uneven_tied",
                                    "llama_dcp_fsdp_tp_w4"])
def test_small_bands_stream_each_tensor_in_many_parts(layout, checkpoint, tmp_path, monkeypatch, capsys):
    """With a 200-byte band every tensor is assembled and written in many row bands (the path
    large tensors take), crossing piece boundaries and column-sharded pieces."""
    from distmerge import bands
    from distmerge.cli import main

    monkeypatch.setattr(bands, "BAND_BYTES", 200)
    ckpt = checkpoint(layout)
    assert main(["merge", "--source", str(source_dir(layout, ckpt)), "--target", str(tmp_path / "out"), "--no-progress"]) == 0
    assert_bit_exact(load_file(ckpt / "reference" / "model.safetensors"), merged_tensors(tmp_path / "out"))


def test_one_large_file_is_shared_by_all_ranks(checkpoint, tmp_path):
    """One output file cut into segments: every rank writes its byte ranges of the same file, and
    the bytes (manifest included) do not depend on the rank count or transport."""
    ckpt = checkpoint("llama_fsdp2_w2")
    digests, summaries = {}, {}
    for nproc, transport in ((1, "direct"), (2, "direct"), (3, "collective"), (4, "direct")):
        out, summary = tmp_path / f"m{nproc}-{transport}", tmp_path / f"s{nproc}.json"
        proc = run_distmerge(["merge", "--source", str(ckpt), "--target", str(out), "--segment-size", "40KB",
                              "--transport", transport, "--no-progress", "--summary-json", str(summary)], nproc=nproc)
        assert proc.returncode == 0, proc.stderr[-4000:]
        digests[nproc] = digest(out)
        summaries[nproc] = json.loads(summary.read_text())
    assert all(d == digests[1] for d in digests.values())
    assert [p.name for p in (tmp_path / "m4-direct").glob("*.safetensors")] == ["model.safetensors"]
    assert all(summaries[4]["files_by_rank"]), "every rank wrote part of the one file"
    assert len(summaries[4]["hashes"]["model.safetensors"]["segments"]) > 4
    assert_bit_exact(load_file(ckpt / "reference" / "model.safetensors"), merged_tensors(tmp_path / "m4-direct"))

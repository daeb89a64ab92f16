"""Bad inputs: one clear message naming the file and the fix, exit code 2 (bad input) or 4 (I/O),
no traceback, nothing written. Run in-process through the CLI entry point (one rank)."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.distributed.tensor  # noqa: F401  lets these tests torch.load the DTensor rank files

from conftest import CodeRunningPickle
from distmerge.cli import main


def merge(capsys, *args):
    code = main(["merge", *map(str, args), "--no-progress"])
    return code, capsys.readouterr().err


@pytest.fixture
def ckpt(checkpoint, tmp_path):
    """A private copy of a W=2 checkpoint that a test may damage."""
    src = tmp_path / "ckpt"
    shutil.copytree(checkpoint("llama_fsdp2_w2"), src)
    return src


def assert_refused(code, err, expected_code, *needles, tmp_path=None):
    assert code == expected_code, err
    assert "Traceback" not in err
    assert err.count("distmerge: error:") == 1, err
    for needle in needles:
        assert needle in err, (needle, err)
    if tmp_path is not None:  # nothing but the source copy exists: no target, no staging directory
        assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_truncated_rank_file(ckpt, tmp_path, capsys):
    f = ckpt / "model_world_size_2_rank_1.pt"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    code, err = merge(capsys, "--source", ckpt, "--target", tmp_path / "out")
    assert_refused(code, err, 4, "model_world_size_2_rank_1.pt", "truncated", tmp_path=tmp_path)


def test_world_size_in_fsdp_config_disagrees(ckpt, tmp_path, capsys):
    (ckpt / "fsdp_config.json").write_text(json.dumps({"FSDP_version": 2, "world_size": 4}))
    code, err = merge(capsys, "--source", ckpt, "--target", tmp_path / "out")
    assert_refused(code, err, 2, "fsdp_config.json", "world_size=4", tmp_path=tmp_path)


def test_missing_fsdp_config_takes_world_size_from_names(ckpt, tmp_path, capsys):
    (ckpt / "fsdp_config.json").unlink()
    code, err = merge(capsys, "--source", ckpt, "--target", tmp_path / "out")
    assert code == 0, err


def test_two_world_sizes_in_one_directory(ckpt, tmp_path, capsys):
    shutil.copy(ckpt / "model_world_size_2_rank_0.pt", ckpt / "model_world_size_4_rank_0.pt")
    code, err = merge(capsys, "--source", ckpt, "--target", tmp_path / "out")
    assert_refused(code, err, 2, "2 world sizes", tmp_path=tmp_path)


def test_shards_of_one_tensor_disagree_in_dtype(ckpt, tmp_path, capsys):
    state = torch.load(ckpt / "model_world_size_2_rank_1.pt", weights_only=True)
    state["model.norm.weight"] = state["model.norm.weight"].to(torch.bfloat16)
    torch.save(state, ckpt / "model_world_size_2_rank_1.pt")
    code, err = merge(capsys, "--source", ckpt, "--target", tmp_path / "out")
    assert_refused(code, err, 2, "model.norm.weight", "disagree", tmp_path=tmp_path)


def test_not_a_checkpoint_and_empty_directory(tmp_path, capsys):
    (tmp_path / "ckpt").mkdir()
    code, err = merge(capsys, "--source", tmp_path / "ckpt", "--target", tmp_path / "out")
    assert_refused(code, err, 2, "is empty", tmp_path=tmp_path)
    (tmp_path / "ckpt" / "notes.txt").write_text("hello")
    code, err = merge(capsys, "--source", tmp_path / "ckpt", "--target", tmp_path / "out")
    assert_refused(code, err, 2, "not a checkpoint", tmp_path=tmp_path)


def test_no_hf_config(ckpt, tmp_path, capsys):
    shutil.rmtree(ckpt / "huggingface")
    code, err = merge(capsys, "--source", ckpt, "--target", tmp_path / "out")
    assert_refused(code, err, 2, "--hf-config", tmp_path=tmp_path)


def test_hf_config_option_supplies_config(ckpt, tmp_path, capsys):
    shutil.move(ckpt / "huggingface", tmp_path / "cfg")
    code, err = merge(capsys, "--source", ckpt, "--target", tmp_path / "out", "--hf-config", tmp_path / "cfg")
    assert code == 0, err
    assert (tmp_path / "out" / "tokenizer.json").exists()


def test_untied_config_without_head(ckpt, tmp_path, capsys):
    for f in ckpt.glob("model_world_size_*.pt"):
        state = torch.load(f, weights_only=True)
        del state["lm_head.weight"]
        torch.save(state, f)
    code, err = merge(capsys, "--source", ckpt, "--target", tmp_path / "out")
    assert_refused(code, err, 2, "tie_word_embeddings=false", "lm_head.weight", tmp_path=tmp_path)


def test_target_is_source_or_inside_it(ckpt, tmp_path, capsys):
    code, err = merge(capsys, "--source", ckpt, "--target", ckpt / "merged")
    assert_refused(code, err, 2, "inside", tmp_path=tmp_path)
    code, err = merge(capsys, "--source", ckpt, "--target", ckpt, "--overwrite")
    assert_refused(code, err, 2, "is the source", tmp_path=tmp_path)


def test_pickle_that_runs_code_is_refused(ckpt, tmp_path, capsys):
    marker = tmp_path / "pwned"
    torch.save({"model.norm.weight": torch.ones(2), "evil": CodeRunningPickle(marker)}, ckpt / "model_world_size_2_rank_1.pt")
    code, err = merge(capsys, "--source", ckpt, "--target", tmp_path / "out")
    assert not marker.exists(), "checkpoint code was executed"
    assert_refused(code, err, 2, "model_world_size_2_rank_1.pt", "never runs code", tmp_path=tmp_path)


def test_max_shard_size_smaller_than_a_tensor_gives_it_its_own_file(checkpoint, tmp_path, capsys):
    code, err = merge(capsys, "--source", checkpoint("llama_fsdp2_w2"), "--target", tmp_path / "out",
                      "--max-shard-size", "1KB")
    assert code == 0, err
    from safetensors import safe_open

    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    for name in set(index["weight_map"].values()):
        with safe_open(tmp_path / "out" / name, "pt") as f:
            sizes = [f.get_tensor(k).nbytes for k in f.keys()]
        assert len(sizes) == 1 or sum(sizes) <= 1000, (name, sizes)  # a tensor over the limit stands alone
    assert len(set(index["weight_map"].values())) > 10


def test_bad_max_shard_size(checkpoint, tmp_path, capsys):
    code, err = merge(capsys, "--source", checkpoint("llama_fsdp2_w2"), "--target", tmp_path / "out",
                      "--max-shard-size", "lots")
    assert_refused(code, err, 2, "cannot read size 'lots'")


# ---- not bad inputs, but cheap one-process checks of what the output directory holds


def test_non_weight_hf_files_are_copied_and_weights_are_not(ckpt, tmp_path, capsys):
    hf = ckpt / "huggingface"
    (hf / "modeling_custom.py").write_text("# custom code of an auto_map model\n")
    (hf / "chat_template.jinja").write_text("{{ messages }}")
    (hf / "model.safetensors").write_bytes(b"stale weights that must not be copied")
    code, err = merge(capsys, "--source", ckpt, "--target", tmp_path / "out")
    assert code == 0, err
    out = tmp_path / "out"
    assert (out / "modeling_custom.py").read_text() == "# custom code of an auto_map model\n"
    assert (out / "chat_template.jinja").exists() and (out / "generation_config.json").exists()
    from safetensors.torch import load_file
    assert "model.embed_tokens.weight" in load_file(out / "model.safetensors")  # ours, not the stale file


def test_cast_touches_floating_tensors_only_and_empty_tensors_are_kept(checkpoint, tmp_path, capsys):
    from safetensors.torch import load_file

    src = tmp_path / "ckpt"
    shutil.copytree(checkpoint("qwen2_single"), src)
    rank_file = src / "model_world_size_1_rank_0.pt"
    state = torch.load(rank_file, weights_only=True)
    state["model.extra_ids"] = torch.arange(7, dtype=torch.int64)
    state["model.extra_mask"] = torch.tensor([True, False, True])
    state["model.extra_empty"] = torch.zeros(0, 4)
    torch.save(state, rank_file)
    code, err = merge(capsys, "--source", src, "--target", tmp_path / "out", "--dtype", "bf16")
    assert code == 0, err
    merged = load_file(tmp_path / "out" / "model.safetensors")
    assert torch.equal(merged["model.extra_ids"], torch.arange(7)) and merged["model.extra_ids"].dtype == torch.int64
    assert merged["model.extra_mask"].tolist() == [True, False, True]
    assert merged["model.extra_empty"].shape == (0, 4)
    assert merged["model.norm.weight"].dtype == torch.bfloat16
    assert torch.equal(merged["model.norm.weight"], state["model.norm.weight"].to(torch.bfloat16))


def test_inspect_reads_metadata_and_prints_the_plan(checkpoint, capsys):
    ckpt = checkpoint("qwen2_fsdp_tp_w4")
    assert main(["inspect", str(ckpt), "--nproc", "3", "--max-shard-size", "50KB", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "verl-fsdp" and info["world_size"] == 4 and info["mesh"] == "fsdp=2 x tp=2"
    assert info["architecture"] == "Qwen2ForCausalLM"
    assert {seg["rank"] for f in info["plan"]["files"] for seg in f["segments"]} == {0, 1, 2}
    assert main(["inspect", str(ckpt)]) == 0
    assert "rank 0: model.safetensors" in capsys.readouterr().out
    # --check-all reads every rank file as a merge does: the same report
    assert main(["inspect", str(ckpt), "--nproc", "3", "--max-shard-size", "50KB", "--json", "--check-all"]) == 0
    full = json.loads(capsys.readouterr().out)
    assert {k: v for k, v in full.items() if k != "metadata_read"} == {k: v for k, v in info.items() if k != "metadata_read"}


def test_inspect_shows_what_is_trimmed_skipped_and_dropped(checkpoint, capsys):
    assert main(["inspect", str(checkpoint("mg_llama_tp2")), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert "embedding.word_embeddings.weight 136 -> 128 rows (vocab padding)" in info["trimmed"]
    assert any("(extra state)" in note for note in info["skipped"]), info["skipped"]
    assert main(["inspect", str(checkpoint("qwen2_fsdp2_w4_uneven_tied")), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["dropped"] == ["lm_head.weight (tied to the embedding)"]


def test_inspect_check_all_finds_a_missing_shard_the_quick_read_cannot(ckpt, capsys):
    """The default reads rank 0's metadata; --check-all reads them all, as the merge will."""
    f = ckpt / "model_world_size_2_rank_1.pt"
    f.write_bytes(f.read_bytes()[:200])
    assert main(["inspect", str(ckpt)]) == 0
    capsys.readouterr()
    assert main(["inspect", str(ckpt), "--check-all"]) != 0
    assert "model_world_size_2_rank_1.pt" in capsys.readouterr().err


def test_fsdp1_sharded_tensors_are_refused_with_the_fix(checkpoint, tmp_path, capsys):
    src = tmp_path / "ckpt"
    shutil.copytree(checkpoint("llama_fsdp1_nomesh_w2"), src)
    code, err = merge(capsys, "--source", src, "--target", tmp_path / "out")
    assert_refused(code, err, 2, "model_world_size_2_rank_0.pt", "ShardedTensors", "device_mesh=mesh", tmp_path=tmp_path)


def test_a_second_merge_into_the_same_target_is_refused(checkpoint, tmp_path, capsys):
    import os
    import socket

    lock = tmp_path / ".out.distmerge-lock"
    lock.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": "now"}))  # alive
    code, err = merge(capsys, "--source", checkpoint("llama_fsdp2_w2"), "--target", tmp_path / "out")
    assert code == 5 and f"pid {os.getpid()}" in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists() and lock.exists()


def test_a_stale_lock_is_taken_over_with_a_warning(checkpoint, tmp_path, capsys):
    """A merge killed with SIGKILL leaves its lock; its pid is dead on this host, so the rerun that
    the surviving ranks advise just works, and says what it did."""
    import socket
    import subprocess

    dead = subprocess.Popen(["true"])
    dead.wait()
    lock = tmp_path / ".out.distmerge-lock"
    lock.write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "started": "then"}))
    code, err = merge(capsys, "--source", checkpoint("llama_fsdp2_w2"), "--target", tmp_path / "out")
    assert code == 0, err
    assert f"took over the stale lock {lock}" in err and f"pid {dead.pid}" in err, err
    assert not lock.exists(), "the lock must be released after a merge"
    assert not list(tmp_path.glob(".out.distmerge-lock*"))


def test_a_lock_whose_pid_was_reused_is_stale(checkpoint, tmp_path, capsys):
    """The pid is alive (this very process) but started at another time than the lock says."""
    import os
    import socket

    lock = tmp_path / ".out.distmerge-lock"
    lock.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "pid_start": 1, "started": "then"}))
    code, err = merge(capsys, "--source", checkpoint("llama_fsdp2_w2"), "--target", tmp_path / "out")
    assert code == 0 and "took over the stale lock" in err, err


def test_a_lock_from_another_host_is_refused_with_its_rm_command(checkpoint, tmp_path, capsys):
    lock = tmp_path / ".out.distmerge-lock"
    lock.write_text(json.dumps({"pid": 1, "host": "another-node-17", "started": "then"}))
    code, err = merge(capsys, "--source", checkpoint("llama_fsdp2_w2"), "--target", tmp_path / "out")
    assert code == 5 and "another-node-17" in err and f"rm {lock}" in err and "Traceback" not in err, err
    assert lock.exists() and not (tmp_path / "out").exists()
    # the command it prints is one that works
    lock.unlink()
    code, err = merge(capsys, "--source", checkpoint("llama_fsdp2_w2"), "--target", tmp_path / "out")
    assert code == 0, err


def test_checkpoint_vocab_smaller_than_the_config_is_refused(ckpt, tmp_path, capsys):
    config = json.loads((ckpt / "huggingface" / "config.json").read_text())
    config["vocab_size"] = 1024  # the checkpoint's embedding has 1001 rows
    (ckpt / "huggingface" / "config.json").write_text(json.dumps(config))
    code, err = merge(capsys, "--source", ckpt, "--target", tmp_path / "out")
    assert_refused(code, err, 2, "model.embed_tokens.weight has 1001 rows", "vocab_size=1024", "--hf-config",
                   tmp_path=tmp_path)


def test_local_ranks_inside_another_launcher_is_refused(ckpt, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RANK", "0")  # what torchrun or srun sets
    code, err = merge(capsys, "--source", ckpt, "--target", tmp_path / "out", "--local-ranks", "2")
    assert_refused(code, err, 2, "--local-ranks starts its own ranks", tmp_path=tmp_path)

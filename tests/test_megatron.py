"""Megatron-core torch_dist checkpoints (written by real megatron-core on CPU) -> HF.

Every layout of one model (TP1, TP2, PP2, TP2xPP2) must merge to the same bytes, and the merged
model's logits must equal Megatron's own forward pass of the reference."""
from __future__ import annotations

import hashlib
import json
import shutil
import warnings

import pytest
import torch

from conftest import run_distmerge
from distmerge.cli import main

pytestmark = pytest.mark.slow  # every test here uses fixtures that megatron-core writes under torchrun

FIXED_INPUT = [[1, 5, 9, 2, 7, 3, 11, 4]]


def digest(out):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("*.safetensors"))}


def logits_of(out, dtype=None):
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True, dtype=dtype)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    with torch.no_grad():
        return model.eval()(input_ids=torch.tensor(FIXED_INPUT)).logits.float()


@pytest.mark.parametrize("family, layouts, tolerance", [
    ("llama", ["mg_llama_ref", "mg_llama_tp2", "mg_llama_pp2", "mg_llama_tp2pp2", "mg_llama_tp2dp2_fully_parallel",
               "mg_llama_pp2vpp2", "mg_llama_legacy_tp2pp2", "mg_llama_legacy_pp2vpp2"], 1e-5),
    # bf16: HF and Megatron run bf16 matmuls with different kernels
    ("qwen2", ["mg_qwen2_ref", "mg_qwen2_tp2", "mg_qwen2_pp2"], 2e-2),
    ("qwen3", ["mg_qwen3_ref", "mg_qwen3_tp2"], 1e-5),
    ("mixtral", ["mg_mixtral_ref", "mg_mixtral_ep2", "mg_mixtral_tp2ep2", "mg_mixtral_legacy_tp2ep2"], 1e-5),
    ("qwen2_moe", ["mg_qwen2moe_ref", "mg_qwen2moe_tp2ep2", "mg_qwen2moe_singleton_ep2"], 1e-5),
    ("qwen3_moe", ["mg_qwen3moe_ref", "mg_qwen3moe_ep2"], 1e-5),
    # legacy TP2: MLA's up projections (and, in the local spec, its down projections) split over TP
    ("deepseek_v3", ["mg_deepseekv3_ref", "mg_deepseekv3_tp2ep2", "mg_deepseekv3_legacy_tp2"], 1e-5),
])
def test_every_layout_merges_to_the_same_bytes_and_megatron_logits(family, layouts, tolerance, checkpoint, tmp_path):
    digests = {}
    for layout in layouts:
        for nproc in (1, 2):
            out = tmp_path / f"{layout}-{nproc}"
            proc = run_distmerge(["merge", "--source", str(checkpoint(layout)), "--target", str(out),
                                  "--max-shard-size", "100KB", "--no-progress", "--verify"], nproc=nproc)
            assert proc.returncode == 0, proc.stderr[-4000:]
            assert "result: OK" in proc.stderr  # the self-check: key set and shapes of the HF class
            digests[(layout, nproc)] = digest(out)
    first = next(iter(digests.values()))
    assert len(first) > 1
    for key, d in digests.items():
        assert d == first, f"{key} differs from {layouts[0]}"
    out = tmp_path / f"{layouts[0]}-1"
    reference = torch.load(checkpoint(layouts[0]) / "reference" / "logits.pt")
    torch.testing.assert_close(logits_of(out), reference, rtol=0, atol=tolerance)
    config = json.loads((out / "config.json").read_text())
    if family == "qwen2":
        assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"
        index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
        assert "lm_head.weight" not in index and "model.layers.0.self_attn.q_proj.bias" in index
    elif family == "qwen2_moe":
        index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
        assert "model.layers.0.mlp.gate_proj.weight" in index  # the dense layer
        assert "model.layers.1.mlp.experts.3.up_proj.weight" in index
        assert "model.layers.1.mlp.shared_expert_gate.weight" in index
        from distmerge.sources import megatron

        names = megatron.read_catalogue(str(checkpoint("mg_qwen2moe_singleton_ep2"))).tensors
        assert "decoder.layers.1.mlp.experts.experts.3.linear_fc1.weight_v" in names  # the layout the fixture claims
    elif family == "deepseek_v3":
        index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
        for name in ("self_attn.q_a_proj.weight", "self_attn.q_a_layernorm.weight",
                     "self_attn.kv_a_proj_with_mqa.weight", "self_attn.kv_b_proj.weight",
                     "mlp.gate.e_score_correction_bias", "mlp.shared_experts.up_proj.weight"):
            assert f"model.layers.1.{name}" in index, name
    elif family == "llama":
        from safetensors import safe_open

        weight_map = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
        path = out / weight_map["model.embed_tokens.weight"]
        with safe_open(path, "pt") as f:
            assert f.get_slice("model.embed_tokens.weight").get_shape() == [128, 64]  # 136 padded rows trimmed


@pytest.fixture
def llama_copy(checkpoint, tmp_path):
    src = tmp_path / "ckpt"
    shutil.copytree(checkpoint("mg_llama_tp2"), src)
    return src


def edit_config(src, **changes):
    path = src / "huggingface" / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize("changes, needle", [
    ({"num_key_value_heads": 4}, "num_key_value_heads=4"),
    ({"architectures": ["GPT2LMHeadModel"]}, "GPT2LMHeadModel, which has no Megatron mapping"),
    ({"vocab_size": 200}, "vocab_size=200"),
    ({"num_hidden_layers": 3}, "num_hidden_layers=3"),
])
def test_config_that_disagrees_with_the_checkpoint_is_refused(changes, needle, llama_copy, tmp_path, capsys):
    edit_config(llama_copy, **changes)
    code = main(["merge", "--source", str(llama_copy), "--target", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and needle in err and "Traceback" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_iteration_directories_and_tracker_file(checkpoint, tmp_path, capsys):
    run_dir = tmp_path / "megatron_run"
    shutil.copytree(checkpoint("mg_llama_pp2") / "dist_ckpt", run_dir / "iter_0000500")
    (run_dir / "latest_checkpointed_iteration.txt").write_text("500\n")
    hf = checkpoint("mg_llama_pp2") / "huggingface"
    code = main(["merge", "--source", str(run_dir), "--hf-config", str(hf), "--target", str(tmp_path / "out"),
                 "--no-progress"])
    assert code == 0, capsys.readouterr().err
    assert (tmp_path / "out" / "model.safetensors").exists()


def test_iteration_option_picks_an_older_checkpoint(checkpoint, tmp_path, capsys):
    run_dir = tmp_path / "megatron_run"
    shutil.copytree(checkpoint("mg_llama_ref") / "dist_ckpt", run_dir / "iter_0000100")
    (run_dir / "latest_checkpointed_iteration.txt").write_text("200\n")  # iter 200 is gone
    hf = str(checkpoint("mg_llama_ref") / "huggingface")
    code = main(["merge", "--source", str(run_dir), "--hf-config", hf, "--target", str(tmp_path / "a"),
                 "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "iter_0000200" in err and "--iteration" in err, err
    code = main(["merge", "--source", str(run_dir), "--hf-config", hf, "--iteration", "100",
                 "--target", str(tmp_path / "b"), "--no-progress"])
    assert code == 0, capsys.readouterr().err


def test_legacy_checkpoint_with_a_missing_rank_is_refused(checkpoint, tmp_path, capsys):
    src = tmp_path / "ckpt"
    shutil.copytree(checkpoint("mg_llama_legacy_tp2pp2"), src)
    shutil.rmtree(src / "iter_0000001" / "mp_rank_01_001")
    code = main(["merge", "--source", str(src), "--target", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "lacks mp_rank_01_001" in err and "Traceback" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_a_tensor_no_rule_maps_is_refused_by_name(checkpoint, tmp_path, capsys):
    src = tmp_path / "ckpt"
    shutil.copytree(checkpoint("mg_llama_legacy_tp2pp2"), src)
    for rank_file in (src / "iter_0000001").glob("mp_rank_*/model_optim_rng.pt"):
        state = torch.load(rank_file, weights_only=False)  # our own fixture: trusted
        for layer in (0, 1):  # both local layers of each pipeline stage
            state["model"][f"decoder.layers.{layer}.mystery_adapter.weight"] = torch.zeros(2, 2)
        torch.save(state, rank_file)
    code = main(["merge", "--source", str(src), "--target", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "no rule maps" in err and "decoder.layers.mystery_adapter.weight" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_expert_bias_without_a_place_in_the_hf_model_is_refused(checkpoint, tmp_path, capsys):
    # Mixtral in transformers has no router bias: dropping Megatron's expert_bias would change routing
    code = main(["merge", "--source", str(checkpoint("mg_mixtral_expert_bias")), "--target", str(tmp_path / "out"),
                 "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "router.expert_bias" in err and "route differently" in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


def test_value_model_becomes_token_classification_with_equal_values(checkpoint, tmp_path):
    from transformers import AutoModelForTokenClassification

    outs = []
    for layout in ("mg_critic_ref", "mg_critic_tp2"):
        out = tmp_path / layout
        proc = run_distmerge(["merge", "--source", str(checkpoint(layout)), "--target", str(out), "--no-progress"],
                             nproc=2)
        assert proc.returncode == 0, proc.stderr[-4000:]
        outs.append(digest(out))
    assert outs[0] == outs[1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model, info = AutoModelForTokenClassification.from_pretrained(tmp_path / "mg_critic_tp2",
                                                                      output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    with torch.no_grad():
        values = model.eval()(input_ids=torch.tensor(FIXED_INPUT)).logits
    reference = torch.load(checkpoint("mg_critic_ref") / "reference" / "logits.pt")
    assert values.shape == reference.shape == (1, len(FIXED_INPUT[0]), 1)
    torch.testing.assert_close(values, reference, rtol=0, atol=1e-5)


def test_legacy_expert_ranks_are_told_from_pipeline_stages_without_args(checkpoint, tmp_path):
    """mp_rank_TT_XXX is a PP stage or, with PP=1, an EP rank. Without the saved args (older or
    stripped files) the content decides: EP ranks hold the same keys, PP stages do not."""
    outs = {}
    for layout in ("mg_mixtral_legacy_tp2ep2", "mg_llama_legacy_pp2vpp2"):
        src = tmp_path / layout
        shutil.copytree(checkpoint(layout), src)
        rank_files = sorted((src / "iter_0000001").glob("mp_rank_*/model_optim_rng.pt"))
        assert all(len(f.parent.name.split("_")) == 4 for f in rank_files)  # mp_rank_TT_XXX: ambiguous by name
        for rank_file in rank_files:
            state = torch.load(rank_file, weights_only=False)  # our own fixture: trusted
            del state["args"]
            torch.save(state, rank_file)
        out = tmp_path / f"{layout}-out"
        proc = run_distmerge(["merge", "--source", str(src), "--target", str(out), "--no-progress"])
        assert proc.returncode == 0, proc.stderr[-4000:]
        outs[layout] = digest(out)
    for layout, ref in (("mg_mixtral_legacy_tp2ep2", "mg_mixtral_ref"), ("mg_llama_legacy_pp2vpp2", "mg_llama_ref")):
        out = tmp_path / f"{ref}-out"
        proc = run_distmerge(["merge", "--source", str(checkpoint(ref)), "--target", str(out), "--no-progress"])
        assert proc.returncode == 0, proc.stderr[-4000:]
        assert outs[layout] == digest(out), layout

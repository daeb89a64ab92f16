"""The Megatron family beyond verl (issue 16): Megatron-LM, Megatron-Bridge, NeMo 2 and verl's newer
layout, written by real megatron-core on CPU with the files each trainer adds, and HF configs built
from what those checkpoints store.

- Each layout merges to the same bytes as the verl layout of the same weights, with 1 and 2 ranks.
- A config built from the checkpoint loads in transformers and gives Megatron's own logits.
- What cannot be known is refused by name; a settings pickle is never run.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import warnings

import pytest
import torch

from conftest import CodeRunningPickle, run_distmerge
from distmerge.arch.megatron_config import (Settings, find_tokenizer, moe_layers, synthesize_config,
                                            tokenizer_size)
from distmerge.errors import MergeError
from distmerge.sources import read_source
from distmerge.sources.megatron_layouts import find_layout

pytestmark = pytest.mark.slow  # the fixtures are written by megatron-core under torchrun

FIXED_INPUT = [[1, 5, 9, 2, 7, 3, 11, 4]]


def digest(out):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("*.safetensors"))}


def logits_of(out):
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    with torch.no_grad():
        return model.eval()(input_ids=torch.tensor(FIXED_INPUT)).logits.float()


def merge(source, out, nproc=1, extra=()):
    proc = run_distmerge(["merge", "--source", str(source), "--target", str(out), "--max-shard-size", "100KB",
                          "--no-progress", *extra], nproc=nproc)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return digest(out)


def built_config_dir(source, tmp_path, vocab_size=None):
    """The config distmerge builds from `source`, written where --hf-config can take it."""
    _, catalogue = read_source(str(source))
    built = synthesize_config(catalogue, vocab_size)
    hf_dir = tmp_path / "built_hf"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text(json.dumps(built.config))
    return hf_dir, built


@pytest.fixture(scope="module")
def verl_merge(checkpoint, tmp_path_factory):
    """The digests of the verl layout's merge of the same weights, merged once for the module."""
    out = tmp_path_factory.mktemp("verl") / "out"
    reference = merge(checkpoint("mg_llama_ref"), out)
    assert len(reference) > 1
    return reference


@pytest.mark.parametrize("layout, name, options", [
    ("mg_llama_mlm_tp2", "megatron-lm", "ref_config"),   # no tokenizer and no config: pass one
    ("mg_llama_bridge_pp2", "megatron-bridge", ()),       # config built from run_config.yaml + tokenizer/
    ("mg_llama_nemo2_tp2", "nemo2", ()),                  # config built from context/model.yaml + tokenizer
    ("mg_llama_verlmodel_tp2", "verl-model", ()),         # model/huggingface/config.json
])
def test_each_layout_merges_to_the_verl_layout_bytes(layout, name, options, checkpoint, verl_merge, tmp_path):
    source = checkpoint(layout)
    if options == "ref_config":
        options = ("--hf-config", str(checkpoint("mg_llama_ref") / "huggingface"))
    _, catalogue = read_source(str(source))
    assert f"layout: {name}" in catalogue.notes
    assert all(n.startswith(("decoder.", "embedding.", "output_layer.")) for n in catalogue.tensors)  # no module.
    for nproc in (1, 2):
        assert merge(source, tmp_path / f"{layout}-{nproc}", nproc, options) == verl_merge, (layout, nproc)
    out = tmp_path / f"{layout}-1"
    assert (out / "tokenizer.json").exists()  # the tokenizer found in the checkpoint travels with it
    expected = torch.load(checkpoint("mg_llama_ref") / "reference" / "logits.pt")
    torch.testing.assert_close(logits_of(out), expected, rtol=0, atol=1e-5)


def test_megatron_lm_args_build_the_config_with_the_vocab_size_given(checkpoint, verl_merge, tmp_path):
    source = checkpoint("mg_llama_mlm_tp2")
    _, catalogue = read_source(str(source))
    with pytest.raises(MergeError, match="vocab_size is unknown.*--vocab-size"):
        synthesize_config(catalogue)  # 136 padded rows and no tokenizer: never guessed
    hf_dir, built = built_config_dir(source, tmp_path, vocab_size=128)
    assert "common.pt" in built.description and "--vocab-size" in built.description
    assert built.config["architectures"] == ["LlamaForCausalLM"] and built.config["vocab_size"] == 128
    assert merge(source, tmp_path / "out", 2, ("--hf-config", str(hf_dir))) == verl_merge


def test_legacy_args_build_the_config(checkpoint, verl_merge, tmp_path):
    """Megatron-LM's legacy rank files carry the same args: TP2 x PP2, tokenizer size given."""
    source = checkpoint("mg_llama_legacy_tp2pp2")
    hf_dir, built = built_config_dir(source, tmp_path, vocab_size=128)
    assert "model_optim_rng.pt" in built.description and built.config["architectures"] == ["LlamaForCausalLM"]
    assert merge(source, tmp_path / "out", 2, ("--hf-config", str(hf_dir))) == verl_merge
    expected = torch.load(checkpoint("mg_llama_ref") / "reference" / "logits.pt")
    torch.testing.assert_close(logits_of(tmp_path / "out"), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("layout, architecture, tolerance", [
    ("mg_qwen2_bridge_ref", "Qwen2ForCausalLM", 2e-2),   # bf16, qkv bias, tied
    ("mg_qwen3_nemo2_ref", "Qwen3ForCausalLM", 1e-5),
    ("mg_mixtral_mlm_ref", "MixtralForCausalLM", 1e-5),
    ("mg_qwen2moe_bridge_ref", "Qwen2MoeForCausalLM", 1e-5),
    ("mg_qwen3moe_mlm_ref", "Qwen3MoeForCausalLM", 1e-5),
    ("mg_deepseekv3_bridge_ref", "DeepseekV3ForCausalLM", 1e-5),
])
def test_a_built_config_gives_megatrons_logits(layout, architecture, tolerance, checkpoint, tmp_path):
    source = checkpoint(layout)
    vocab = 128 if "_mlm_" in layout else None  # Megatron-LM keeps no tokenizer in the checkpoint
    hf_dir, built = built_config_dir(source, tmp_path, vocab)
    assert built.config["architectures"] == [architecture], built.config
    out = tmp_path / "out"
    merge(source, out, 2, ("--hf-config", str(hf_dir), "--verify"))
    expected = torch.load(source / "reference" / "logits.pt")
    torch.testing.assert_close(logits_of(out), expected, rtol=0, atol=tolerance)


def test_a_missing_setting_is_refused_by_name(checkpoint, tmp_path):
    src = tmp_path / "ckpt"
    shutil.copytree(checkpoint("mg_mixtral_mlm_ref"), src)
    common = src / "iter_0000001" / "common.pt"
    state = torch.load(common, weights_only=False)  # our own fixture: trusted
    del state["args"].moe_router_topk
    torch.save(state, common)
    _, catalogue = read_source(str(src))
    with pytest.raises(MergeError, match=r"num_experts_per_tok needs Megatron's moe_router_topk.*--hf-config"):
        synthesize_config(catalogue, 128)


def test_a_settings_pickle_is_never_run(checkpoint, tmp_path):
    src = tmp_path / "ckpt"
    shutil.copytree(checkpoint("mg_mixtral_mlm_ref"), src)
    marker = tmp_path / "ran"
    torch.save({"args": argparse.Namespace(num_layers=CodeRunningPickle(marker))},
               src / "iter_0000001" / "common.pt")
    _, catalogue = read_source(str(src))
    with pytest.raises(MergeError, match="stores no model settings|num_layers"):
        synthesize_config(catalogue, 128)
    assert not marker.exists()


def test_bridge_run_config_that_is_not_safe_yaml_is_refused(checkpoint, tmp_path):
    src = tmp_path / "ckpt"
    shutil.copytree(checkpoint("mg_qwen2moe_bridge_ref"), src)
    (src / "iter_0000001" / "run_config.yaml").write_text("model: !!python/object/apply:os.system ['touch x']\n")
    _, catalogue = read_source(str(src))
    with pytest.raises(MergeError, match="run_config.yaml is not YAML distmerge can read safely"):
        synthesize_config(catalogue)


def test_tokenizer_size_and_layer_pattern(checkpoint):
    src = checkpoint("mg_qwen2moe_bridge_ref")
    tok_dir, size = find_tokenizer(str(src), str(src / "iter_0000001"))
    assert tok_dir.endswith("tokenizer") and size == tokenizer_size(tok_dir) == 128
    assert moe_layers(Settings({"moe_layer_freq": 2}), 4) == [True, False, True, False]
    assert moe_layers(Settings({"moe_layer_freq": [0, 1, 1]}), 3) == [False, True, True]
    with pytest.raises(MergeError, match="moe_layer_freq"):
        moe_layers(Settings({"moe_layer_freq": [0, 1]}), 3)


def test_without_config_tokenizer_or_vocab_size_the_merge_is_refused(checkpoint, tmp_path):
    proc = run_distmerge(["merge", "--source", str(checkpoint("mg_llama_mlm_tp2")), "--target", str(tmp_path / "out"),
                          "--no-progress"])
    assert proc.returncode == 2 and "--vocab-size" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()


def test_bridge_takes_its_highest_iteration_unless_told(checkpoint, tmp_path):
    src = tmp_path / "run"
    shutil.copytree(checkpoint("mg_qwen2moe_bridge_ref"), src)
    shutil.copytree(src / "iter_0000001", src / "iter_0000012")
    assert find_layout(str(src)).ckpt == str(src / "iter_0000012")
    assert find_layout(str(src), 1).ckpt == str(src / "iter_0000001")
    with pytest.raises(MergeError, match="iter_0000005 is not a torch_dist checkpoint.*--iteration"):
        find_layout(str(src), 5)


def test_a_tokenizer_linked_from_outside_the_source_is_not_read(checkpoint, tmp_path):
    src = tmp_path / "run"
    shutil.copytree(checkpoint("mg_qwen2moe_bridge_ref"), src)
    outside = tmp_path / "elsewhere"
    shutil.move(src / "iter_0000001" / "tokenizer", outside)
    (src / "iter_0000001" / "tokenizer").symlink_to(outside, target_is_directory=True)
    assert find_tokenizer(str(src), str(src / "iter_0000001")) == (None, None)
    _, catalogue = read_source(str(src))
    assert synthesize_config(catalogue, 128).tokenizer_dir is None

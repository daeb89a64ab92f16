"""Hostile inputs to the Megatron family's small files: the iteration tracker, the settings that build an
HF config (NeMo 2's context/model.yaml, Megatron-LM's args), the tokenizer a vocab size is counted from,
and verl's adapter_checkpoint/ folder.

Each is refused with one `distmerge: error:` line (exit 2) that names the file and what to do, without
reading, listing or echoing anything outside the source, and without a list sized by a number the
checkpoint merely claims. The fast tests build the few files a reader looks at by hand; the slow ones
mutate real checkpoints written by megatron-core and go through the command line.
"""
from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import sys

import pytest

from conftest import opened_under, run, run_distmerge
from distmerge import cli
from distmerge.arch.megatron_config import find_tokenizer, synthesize_config, tokenizer_size
from distmerge.dtypes import BY_NAME
from distmerge.errors import MergeError
from distmerge.model import Catalogue, SourceTensor
from distmerge.sources.layout import latest_iteration
from distmerge.sources.megatron import _verl_adapters

SECRET = "SECRET_TOKEN=hunter2"
LAYERS, HIDDEN, ROWS = 4, 64, 136
QKV = "decoder.layers.self_attention.linear_qkv.weight"
# NeMo 2's context/model.yaml, cut to the fields a Llama config is built from
MODEL_YAML = """\
_target_: nemo.collections.llm.gpt.model.base.GPTModel
config:
  _target_: nemo.collections.llm.gpt.model.base.GPTConfig
  num_layers: 4
  hidden_size: 64
  num_attention_heads: 4
  num_query_groups: 2
  ffn_hidden_size: 128
  layernorm_epsilon: 1.0e-06
  rotary_base: 10000
  seq_length: 256
"""


def one_error_line(stderr: str) -> str:
    """The refusal: exactly one `distmerge: error:` line and no traceback."""
    lines = [line for line in stderr.splitlines() if line.startswith("distmerge: error:")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


def cli_refusal(args: list[str], capsys) -> str:
    """distmerge ARGS in this process: exit 2 and its one error line."""
    code = cli.main(args)
    err = capsys.readouterr().err
    assert code == 2, err
    return one_error_line(err)


def outside_file(tmp_path, name: str, text: str):
    """A file beside the source, never inside it: what a link out of the source points at."""
    outside = tmp_path / "outside"
    outside.mkdir(exist_ok=True)
    (outside / name).write_text(text)
    return outside / name


# ---------------------------------------------------------------- D5, D15: the iteration tracker

def test_a_tracker_linked_out_of_the_source_is_refused_unread(tmp_path, monkeypatch, capsys):
    src = tmp_path / "run"
    src.mkdir()
    (src / "latest_checkpointed_iteration.txt").symlink_to(outside_file(tmp_path, "environ", SECRET))
    with opened_under(tmp_path / "outside", monkeypatch) as opened:
        with pytest.raises(MergeError, match="outside the source") as refusal:
            latest_iteration(str(src))
    assert opened == [] and "hunter2" not in str(refusal.value)
    line = cli_refusal(["inspect", str(src)], capsys)
    assert "latest_checkpointed_iteration.txt" in line and "hunter2" not in line


@pytest.mark.parametrize("text", ["\u00b2", "\uff11", "\u0663", "1\x00"], ids=["superscript", "fullwidth",
                                                                             "arabic-indic", "nul"])
def test_a_tracker_that_is_not_ascii_digits_is_refused(text, tmp_path, capsys):
    src = tmp_path / "run"
    src.mkdir()
    (src / "latest_checkpointed_iteration.txt").write_text(text, encoding="utf-8")
    with pytest.raises(MergeError, match=r"latest_checkpointed_iteration\.txt.*pass --iteration N"):
        latest_iteration(str(src))
    assert "pass --iteration N" in cli_refusal(["inspect", str(src)], capsys)


def test_an_ascii_tracker_names_its_iteration(tmp_path):
    src = tmp_path / "run"
    src.mkdir()
    assert latest_iteration(str(src)) is None
    (src / "latest_checkpointed_iteration.txt").write_text("12\n")
    assert latest_iteration(str(src)) == 12


# ---------------------------------------------------------------- D6: the tokenizer's files

def tokenizer_json(size: int) -> str:
    return json.dumps({"model": {"vocab": {f"t{i}": i for i in range(size)}}, "added_tokens": []})


def test_a_tokenizer_file_linked_out_of_the_source_is_refused_unread(tmp_path, monkeypatch):
    src = tmp_path / "run"
    (src / "tokenizer").mkdir(parents=True)
    (src / "tokenizer" / "tokenizer.json").symlink_to(outside_file(tmp_path, "tokenizer.json", tokenizer_json(1000)))
    with opened_under(tmp_path / "outside", monkeypatch) as opened:
        with pytest.raises(MergeError, match=r"tokenizer\.json resolves to .*outside the source"):
            find_tokenizer(str(src), str(src))
        with pytest.raises(MergeError, match="outside the source"):
            tokenizer_size(str(src / "tokenizer"))  # the tokenizer's own directory is the default root
    assert opened == []


def test_tokenizer_files_of_unexpected_shapes_count_what_they_can(tmp_path):
    d = tmp_path / "tok"
    d.mkdir()
    (d / "tokenizer.json").write_text(json.dumps({"model": {"vocab": {"a": 0, "b": 5}}, "added_tokens": 7}))
    assert tokenizer_size(str(d)) == 6
    (d / "tokenizer.json").unlink()
    (d / "vocab.json").write_text(json.dumps({"a": 0, "b": 9, "c": "x"}))
    (d / "added_tokens.json").write_text(json.dumps([1, 2]))
    assert tokenizer_size(str(d)) == 10


# ---------------------------------------------------------------- D12, D14, D17: the settings

def megatron_catalogue(root, layers: int = LAYERS) -> Catalogue:
    """The catalogue a Llama-shaped torch_dist checkpoint gives (metadata only: config building reads no data)."""
    bf16 = BY_NAME["bfloat16"]
    tensors = {"embedding.word_embeddings.weight": SourceTensor("embedding.word_embeddings.weight", (ROWS, HIDDEN),
                                                                bf16, []),
               QKV: SourceTensor(QKV, (layers, 2 * HIDDEN, HIDDEN), bf16, [])}
    return Catalogue(format="megatron-torch_dist", source=str(root), files=[], tensors=tensors, hf_dir=None,
                     family="megatron")


def nemo_source(tmp_path, yaml_text: str):
    """A source whose context/model.yaml is `yaml_text`, and its catalogue."""
    src = tmp_path / "nemo"
    (src / "context").mkdir(parents=True)
    (src / "context" / "model.yaml").write_text(yaml_text)
    return src, megatron_catalogue(src)


def with_field(name: str, value: str, yaml_text: str = MODEL_YAML) -> str:
    """MODEL_YAML with `name: value` in its config section (replaced where it is already there)."""
    line = f"  {name}: {value}"
    if re.search(rf"^  {name}:", yaml_text, flags=re.M):
        return re.sub(rf"^  {name}:.*$", line, yaml_text, flags=re.M)
    return yaml_text.replace("config:\n", f"config:\n{line}\n", 1)


def test_the_clean_settings_build_a_config(tmp_path):
    """The control for the refusals below: the same files with sane values build the config."""
    _, catalogue = nemo_source(tmp_path, MODEL_YAML)
    config = synthesize_config(catalogue, 128).config
    assert (config["num_hidden_layers"], config["rms_norm_eps"], config["rope_theta"]) == (4, 1e-6, 10000.0)
    assert config["architectures"] == ["LlamaForCausalLM"] and config["num_key_value_heads"] == 2
    _, catalogue = nemo_source(tmp_path / "text", with_field("layernorm_epsilon", "1e-5"))  # YAML 1.1: a string
    assert synthesize_config(catalogue, 128).config["rms_norm_eps"] == 1e-5


@pytest.mark.parametrize("name, value", [
    ("layernorm_epsilon", "abc"), ("layernorm_epsilon", "[1, 2]"), ("layernorm_epsilon", "true"),
    ("layernorm_epsilon", ".nan"), ("layernorm_epsilon", "'inf'"), ("rotary_base", "1" + "0" * 400),
    ("rotary_base", "'1e400'"), ("hidden_size", "'64'"), ("num_attention_heads", "0"), ("num_query_groups", "2.5"),
    ("num_layers", "true"), ("seq_length", "-1")])
def test_a_setting_that_is_not_a_number_is_refused_by_name_and_file(name, value, tmp_path):
    _, catalogue = nemo_source(tmp_path, with_field(name, value))
    with pytest.raises(MergeError, match=rf"{name}=.* in .*context/model\.yaml is not .*--hf-config") as refusal:
        synthesize_config(catalogue, 128)
    assert "\n" not in str(refusal.value)


def test_a_yarn_setting_that_is_not_a_number_is_refused(tmp_path):
    """DeepSeek-V3's YaRN factors go through the same checked conversion (the MoE path of build_config)."""
    yaml_text = MODEL_YAML
    for name, value in (("multi_latent_attention", "true"), ("num_moe_experts", "4"), ("moe_ffn_hidden_size", "32"),
                        ("moe_router_enable_expert_bias", "true"), ("moe_router_score_function", "sigmoid"),
                        ("moe_router_topk", "2"), ("kv_lora_rank", "16"), ("qk_head_dim", "16"),
                        ("qk_pos_emb_head_dim", "8"), ("v_head_dim", "16"), ("rope_type", "yarn"),
                        ("rotary_scaling_factor", "40"), ("original_max_position_embeddings", "64"),
                        ("beta_fast", "32"), ("beta_slow", "1"), ("mscale", "1.0"), ("mscale_all_dim", "[1]")):
        yaml_text = with_field(name, value, yaml_text)
    _, catalogue = nemo_source(tmp_path, yaml_text)
    with pytest.raises(MergeError, match=r"mscale_all_dim=\[1\] in .*model\.yaml is not a finite number"):
        synthesize_config(catalogue, 128)


def test_megatron_lm_args_with_numbers_too_large_to_print_are_refused_by_name(tmp_path):
    """Pickled args (written by torch.save, read by the restricted unpickler) hold integers of any size,
    which str() refuses past 4300 digits: the message must still be built."""
    import argparse

    import torch

    src = tmp_path / "mlm"
    src.mkdir()
    args = dict(num_layers=4, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128, norm_epsilon=1e-6,
                rotary_base=10000, seq_length=256, vocab_size=128)
    catalogue = megatron_catalogue(src)
    for name, value, needle in (("num_layers", 10 ** 5000, "num_layers=an integer too large to print"),
                                ("vocab_size", 10 ** 5000, "vocab_size an integer too large to print"),
                                ("norm_epsilon", 10 ** 400, "layernorm_epsilon=1000")):
        torch.save({"args": argparse.Namespace(**{**args, name: value})}, src / "common.pt")
        with pytest.raises(MergeError) as refusal:
            synthesize_config(catalogue)
        assert needle in str(refusal.value) and "common.pt" in str(refusal.value), str(refusal.value)


CHILD = """\
import pickle, resource, sys
resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))  # a list sized by the claim fails fast here
from distmerge.arch.megatron_config import synthesize_config
from distmerge.errors import MergeError
try:
    synthesize_config(pickle.load(open(sys.argv[1], "rb")), 128)
except MergeError as e:
    print(e)
    sys.exit(2)
"""


def test_a_layer_count_the_checkpoint_does_not_store_is_refused_before_any_list_is_sized_by_it(tmp_path):
    """num_layers 10^9 with MoE: moe_layers would build 10^9 flags. Run in a child limited to 1 GiB."""
    yaml_text = with_field("num_moe_experts", "4", with_field("num_layers", "1000000000"))
    _, catalogue = nemo_source(tmp_path, yaml_text)
    (tmp_path / "catalogue.pkl").write_bytes(pickle.dumps(catalogue))
    proc = run([sys.executable, "-c", CHILD, str(tmp_path / "catalogue.pkl")], timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert re.search(r"num_layers=1000000000 in .*model\.yaml, but the checkpoint stores 4 layers", proc.stdout)


@pytest.mark.parametrize("yaml_text", [
    "config: !!python/object/apply:os.system ['echo hi']\n",
    "config:\n  num_layers: [1,\n  hidden_size: 64\n",
    "config:\n  ? [1, 2]\n  : 3\n",
    "config:\n  num_layers: " + "9" * 5000 + "\n"], ids=["python-tag", "syntax", "complex-key", "5000-digits"])
def test_yaml_that_cannot_be_read_safely_is_refused_on_one_line(yaml_text, tmp_path):
    _, catalogue = nemo_source(tmp_path, yaml_text)
    try:
        synthesize_config(catalogue, 128)
    except MergeError as e:
        assert "model.yaml" in str(e) and "\n" not in str(e), str(e)
    else:
        raise AssertionError("the YAML was accepted")


# ---------------------------------------------------------------- D19: verl's adapter_checkpoint/

def test_an_adapter_folder_linked_out_of_the_source_is_refused_unlisted(tmp_path, monkeypatch):
    src = tmp_path / "actor"
    src.mkdir()
    outside_file(tmp_path, "mp_rank_00_adapter.pt", "not read")
    (src / "adapter_checkpoint").symlink_to(tmp_path / "outside", target_is_directory=True)
    listed = []
    real_listdir = os.listdir
    monkeypatch.setattr(os, "listdir", lambda path=".": listed.append(os.fspath(path)) or real_listdir(path))
    with pytest.raises(MergeError, match=r"adapter_checkpoint resolves to .*outside the source"):
        _verl_adapters(str(src), str(src), {QKV: megatron_catalogue(src).tensors[QKV]}, [])
    assert not [p for p in listed if "adapter_checkpoint" in p or "outside" in p]


# ---------------------------------------------------------------- the same through the command line

def mutated_copy(checkpoint, layout: str, tmp_path):
    src = tmp_path / layout
    shutil.copytree(checkpoint(layout), src, symlinks=True)
    return src


@pytest.mark.slow
def test_cli_a_megatron_lm_tracker_linked_out_is_refused_without_its_text(checkpoint, tmp_path):
    src = mutated_copy(checkpoint, "mg_llama_mlm_tp2", tmp_path)
    tracker = src / "latest_checkpointed_iteration.txt"
    tracker.unlink()
    tracker.symlink_to(outside_file(tmp_path, "environ", SECRET))
    for args in (["inspect", str(src), "--vocab-size", "128"],
                 ["merge", "--source", str(src), "--target", str(tmp_path / "out"), "--vocab-size", "128",
                  "--no-progress"]):
        proc = run_distmerge(args, timeout=120)
        assert proc.returncode == 2, proc.stderr[-2000:]
        line = one_error_line(proc.stderr)
        assert "latest_checkpointed_iteration.txt" in line and "hunter2" not in proc.stderr + proc.stdout
    assert not (tmp_path / "out").exists()


def nemo_yaml(src) -> str:
    return (src / "context" / "model.yaml").read_text()


@pytest.mark.slow
def test_cli_nemo_settings_that_are_not_numbers_are_refused_by_name(checkpoint, tmp_path):
    src = mutated_copy(checkpoint, "mg_llama_nemo2_tp2", tmp_path)
    original = nemo_yaml(src)
    for name, value in (("layernorm_epsilon", "abc"), ("rotary_base", "1" + "0" * 400)):
        (src / "context" / "model.yaml").write_text(with_field(name, value, original))
        proc = run_distmerge(["merge", "--source", str(src), "--target", str(tmp_path / "out"), "--no-progress"],
                             timeout=120)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert re.search(rf"{name}=.* in .*context/model\.yaml is not a finite number", one_error_line(proc.stderr))
    assert not (tmp_path / "out").exists()


LIMITED_CLI = """\
import resource, runpy, sys
resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))  # 10^9 flags would need 8 GB
sys.argv = ["distmerge"] + sys.argv[1:]
runpy.run_module("distmerge", run_name="__main__")
"""


@pytest.mark.slow
def test_cli_nemo_moe_layer_count_lie_is_refused_before_any_list_is_sized_by_it(checkpoint, tmp_path):
    src = mutated_copy(checkpoint, "mg_llama_nemo2_tp2", tmp_path)
    (src / "context" / "model.yaml").write_text(
        with_field("num_moe_experts", "4", with_field("num_layers", "1000000000", nemo_yaml(src))))
    proc = run([sys.executable, "-c", LIMITED_CLI, "merge", "--source", str(src), "--target", str(tmp_path / "out"),
                "--no-progress"], timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "the checkpoint stores 4 layers" in one_error_line(proc.stderr)

"""LoRA in Megatron checkpoints (issue 16): Megatron-Bridge's adapters, as verl's Megatron workers save
them (in dist_ckpt/, and in adapter_checkpoint/mp_rank_*_adapter.pt), and as Bridge's PEFT save keeps
them (the adapters alone, the base from --base), folded, written as a PEFT adapter, or both. The oracle
is Megatron's own forward with Bridge's LoRALinear applying the adapters (tests/make_megatron_lora.py)."""
from __future__ import annotations

import dataclasses
import functools
import json
import shutil
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import ROOT, CodeRunningPickle, run_distmerge, torchrun_cmd, write_fixture
from distmerge.arch import megatron_gpt
from distmerge.dtypes import FLOAT32
from distmerge.errors import MergeError
from distmerge.model import Catalogue, Piece, SourceTensor
from distmerge.sources.hf_base import with_base

MAKER = ROOT / "tests" / "make_megatron_lora.py"
FIXED_INPUT = [[1, 5, 9, 2, 7, 3, 11, 4]]
# name -> (nproc, maker arguments, reference it is re-saved from)
FIXTURES = {
    "ref": (1, [], None),
    "tp2": (2, ["--tp", "2"], "ref"),
    "tp2_apart": (2, ["--tp", "2", "--adapters-apart"], "ref"),   # adapters only in adapter_checkpoint/
    "pp2_apart": (2, ["--pp", "2", "--adapters-apart"], "ref"),   # ... with layer numbers local to a stage
    "legacy_tp2": (2, ["--tp", "2", "--legacy"], "ref"),           # Megatron-LM's mp_rank_*/model_optim_rng.pt
    "qwen2_ref": (1, ["--model", "qwen2", "--tie"], None),         # QKV bias (not adapted), tied embeddings
    # Megatron-Bridge's PEFT save: iter_N/ with the adapters alone (Bridge's adapter_key_filter)
    "bridge_peft_tp2": (2, ["--tp", "2", "--layout", "bridge", "--adapter-only"], "ref"),
    "qwen2_bridge_peft_tp2": (2, ["--model", "qwen2", "--tie", "--tp", "2", "--layout", "bridge", "--adapter-only"],
                              "qwen2_ref"),
}
ADAPTER_ONLY = ["bridge_peft_tp2", "qwen2_bridge_peft_tp2"]
FULL = [name for name in FIXTURES if name not in ADAPTER_ONLY]   # the base weights saved with the adapters
LLAMA = [name for name in FULL if not name.startswith("qwen2")]


def reference_logits(lora_ckpt, layout):
    """Megatron's forward with the adapters, recorded by the fixture the layout was re-saved from."""
    ref = FIXTURES[layout][2] or layout
    return torch.load(lora_ckpt(ref) / "reference" / "logits.pt")
ADAPTED = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj"]


@pytest.fixture(scope="module")
def lora_ckpt(tmp_path_factory):
    """lora_ckpt(name) -> the directory of that fixture, written by megatron-core + Megatron-Bridge on first use."""
    base = tmp_path_factory.mktemp("megatron_lora")

    @functools.cache
    def make(name):
        nproc, extra, ref = FIXTURES[name]
        if ref:
            extra = extra + ["--from", str(make(ref) / "dist_ckpt")]
        return write_fixture(torchrun_cmd(nproc) + [str(MAKER)] + extra, base / name)

    return make


def merge(source, out, *extra, nproc=1):
    return run_distmerge(["merge", "--source", str(source), "--target", str(out), "--max-shard-size", "60KB",
                          "--no-progress", *extra], nproc=nproc)


def logits_of(out, adapter=None):
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
        if adapter is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, adapter)
    with torch.no_grad():
        return model.eval()(input_ids=torch.tensor(FIXED_INPUT)).logits.float()


def weights(out):
    tensors = {}
    for f in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors


@pytest.mark.slow
@pytest.mark.parametrize("layout", FULL)
@pytest.mark.parametrize("nproc", [1, 2])
def test_fold_gives_megatrons_forward_with_the_adapters(layout, nproc, lora_ckpt, tmp_path):
    proc = merge(lora_ckpt(layout), tmp_path / "out", "--lora-alpha", "8", "--verify", nproc=nproc)
    assert proc.returncode == 0, proc.stderr[-4000:]
    reference = reference_logits(lora_ckpt, layout)
    torch.testing.assert_close(logits_of(tmp_path / "out"), reference, rtol=0, atol=1e-5)
    assert not (tmp_path / "out" / "lora_adapter").exists()


@pytest.mark.slow
def test_every_layout_folds_to_the_same_bytes(lora_ckpt, tmp_path):
    merged = {}
    for layout in LLAMA:
        nproc = 1 if layout == "ref" else 2
        assert merge(lora_ckpt(layout), tmp_path / layout, "--lora-alpha", "8", nproc=nproc).returncode == 0
        merged[layout] = weights(tmp_path / layout)
    for layout, tensors in merged.items():
        assert tensors.keys() == merged["ref"].keys()
        for name, t in tensors.items():
            assert torch.equal(t, merged["ref"][name]), f"{layout}: {name}"


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["tp2", "pp2_apart", "qwen2_ref"])
def test_adapter_loads_with_peft_and_gives_the_trained_logits(layout, lora_ckpt, tmp_path):
    out = tmp_path / "out"
    proc = merge(lora_ckpt(layout), out, "--lora", "adapter", "--lora-alpha", "8", "--verify", nproc=2)
    assert proc.returncode == 0, proc.stderr[-4000:]
    reference = reference_logits(lora_ckpt, layout)
    base = logits_of(out)
    assert (base - reference).abs().max() > 1e-2, "the adapters change nothing: the test would prove nothing"
    config = json.loads((out / "lora_adapter" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (4, 8.0)
    assert sorted(config["target_modules"]) == sorted(m.split(".")[1] for m in ADAPTED)
    adapter = load_file(out / "lora_adapter" / "adapter_model.safetensors")
    assert len(adapter) == 2 * 2 * len(ADAPTED)  # 2 layers, A and B
    q_a, k_a = (adapter[f"base_model.model.model.layers.1.self_attn.{p}.lora_A.weight"] for p in ("q_proj", "k_proj"))
    assert torch.equal(q_a, k_a)  # the fused QKV's one A serves q, k and v
    torch.testing.assert_close(logits_of(out, out / "lora_adapter"), reference, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_both_writes_the_fold_and_the_adapter(lora_ckpt, tmp_path):
    assert merge(lora_ckpt("tp2"), tmp_path / "merge", "--lora-alpha", "8").returncode == 0
    proc = merge(lora_ckpt("tp2"), tmp_path / "both", "--lora", "both", "--lora-alpha", "8", nproc=2)
    assert proc.returncode == 0, proc.stderr[-4000:]
    folded, both = weights(tmp_path / "merge"), weights(tmp_path / "both")
    assert folded.keys() == both.keys() and all(torch.equal(folded[k], both[k]) for k in folded)
    assert (tmp_path / "both" / "lora_adapter" / "adapter_model.safetensors").exists()
    index = json.loads((tmp_path / "both" / "model.safetensors.index.json").read_text())
    assert not any("lora" in name for name in index["weight_map"])


@pytest.mark.slow
def test_alpha_is_never_guessed(lora_ckpt, tmp_path):
    proc = merge(lora_ckpt("tp2"), tmp_path / "out")
    assert proc.returncode == 2 and "--lora-alpha" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()
    proc = merge(lora_ckpt("tp2"), tmp_path / "out", "--lora-alpha", "0")
    assert proc.returncode == 2 and "alpha 0 gives back the base model" in proc.stderr, proc.stderr


@pytest.fixture
def bridge_copy(lora_ckpt, tmp_path):
    """The TP2 fixture with a Megatron-Bridge run_config.yaml beside its dist checkpoint."""
    src = tmp_path / "ckpt"
    shutil.copytree(lora_ckpt("tp2"), src)
    return src


@pytest.mark.slow
def test_alpha_from_bridges_run_config(bridge_copy, lora_ckpt, tmp_path):
    run_config = bridge_copy / "dist_ckpt" / "run_config.yaml"
    run_config.write_text("peft:\n  _target_: megatron.bridge.peft.lora.LoRA\n  dim: 4\n  alpha: 8\n")
    assert merge(bridge_copy, tmp_path / "out").returncode == 0
    reference = torch.load(lora_ckpt("ref") / "reference" / "logits.pt")
    torch.testing.assert_close(logits_of(tmp_path / "out"), reference, rtol=0, atol=1e-5)
    run_config.write_text("peft:\n  _target_: megatron.bridge.peft.lora.LoRA\n  dim: 8\n  alpha: 16\n")
    proc = merge(bridge_copy, tmp_path / "out2")
    assert proc.returncode == 2 and "rank is 8 but the adapters have rank 4" in proc.stderr, proc.stderr
    run_config.write_text("peft:\n  _target_: megatron.bridge.peft.dora.DoRA\n  dim: 4\n  alpha: 8\n")
    proc = merge(bridge_copy, tmp_path / "out3")
    assert proc.returncode == 2 and "DoRA" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


@pytest.mark.slow
def test_hostile_or_wrong_adapter_files_are_refused(lora_ckpt, tmp_path):
    src = tmp_path / "ckpt"
    shutil.copytree(lora_ckpt("tp2_apart"), src)
    rank0 = src / "adapter_checkpoint" / "mp_rank_00_adapter.pt"
    good = rank0.read_bytes()
    marker = tmp_path / "ran"
    torch.save({"adapter_state_dict": {"decoder.layers.0.mlp.linear_fc1.adapter.linear_in.weight":
                                       CodeRunningPickle(marker)}}, rank0)
    proc = merge(src, tmp_path / "out", "--lora-alpha", "8")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert not marker.exists() and not (tmp_path / "out").exists()
    torch.save({"model": {"decoder.layers.0.mlp.linear_fc1.weight": torch.zeros(2, 2)}}, rank0)
    proc = merge(src, tmp_path / "out", "--lora-alpha", "8")
    assert proc.returncode == 2 and "is not a verl adapter file" in proc.stderr, proc.stderr
    rank0.write_bytes(good)
    (src / "adapter_checkpoint" / "mp_rank_01_adapter.pt").unlink()
    proc = merge(src, tmp_path / "out", "--lora-alpha", "8")
    assert proc.returncode == 2 and "a TP rank's file missing" in proc.stderr, proc.stderr


@pytest.mark.slow
def test_verify_source_folds_like_merge(bridge_copy, tmp_path):
    (bridge_copy / "dist_ckpt" / "run_config.yaml").write_text("peft:\n  dim: 4\n  alpha: 8\n")
    assert merge(bridge_copy, tmp_path / "out").returncode == 0
    proc = run_distmerge(["verify", "--source", str(bridge_copy), "--reference", str(tmp_path / "out")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run_distmerge(["verify", "--source", str(bridge_copy), "--reference", str(tmp_path / "out"),
                          "--hf-config", str(bridge_copy / "huggingface")])
    assert proc.returncode == 0, proc.stderr[-3000:]


# ---------------------------------------------------------------- adapter-only checkpoints (Bridge's PEFT save)

@pytest.fixture(scope="module")
def hf_of(lora_ckpt, tmp_path_factory):
    """hf_of(ref) -> (the fold, the `--lora adapter` output, the base as an HF directory) of a fixture
    that holds its base, merged once. The base is the adapter output without lora_adapter/: the
    Megatron base weights (their merge is proved against Megatron's logits by test_megatron)."""
    root = tmp_path_factory.mktemp("megatron_lora_hf")

    @functools.cache
    def make(ref):
        fold, adapter, base = (root / ref / d for d in ("fold", "adapter", "base"))
        for out, extra in ((fold, []), (adapter, ["--lora", "adapter"])):
            proc = merge(lora_ckpt(ref), out, "--lora-alpha", "8", *extra)
            assert proc.returncode == 0, proc.stderr[-3000:]
        shutil.copytree(adapter, base, ignore=shutil.ignore_patterns("lora_adapter", "distmerge-manifest.json"))
        return fold, adapter, base

    return make


@pytest.mark.slow
@pytest.mark.parametrize("layout", ADAPTER_ONLY)
@pytest.mark.parametrize("nproc", [1, 2])
def test_adapter_only_with_base_folds_to_the_full_checkpoints_bytes(layout, nproc, lora_ckpt, hf_of, tmp_path):
    """Bridge's PEFT save (the adapters alone, at TP2) folded into --base gives the bytes that the
    checkpoint holding the same base folds to: the same W, the same rows of B and A, the same fp32
    fold. Hence Megatron's logits. alpha comes from run_config.yaml's peft: section."""
    fold, _, base = hf_of(FIXTURES[layout][2])
    out = tmp_path / "out"
    proc = merge(lora_ckpt(layout), out, "--base", str(base), "--verify", nproc=nproc)
    assert proc.returncode == 0, proc.stderr[-4000:]
    merged, full, unfolded = weights(out), weights(fold), weights(base)
    assert merged.keys() == full.keys()
    for name, t in merged.items():
        assert torch.equal(t, full[name]), name
    assert not torch.equal(merged["model.layers.1.mlp.up_proj.weight"], unfolded["model.layers.1.mlp.up_proj.weight"])
    torch.testing.assert_close(logits_of(out), reference_logits(lora_ckpt, layout), rtol=0, atol=1e-5)
    assert not (out / "lora_adapter").exists()


@pytest.mark.slow
@pytest.mark.parametrize("layout", ADAPTER_ONLY)
@pytest.mark.parametrize("nproc", [1, 2])
def test_adapter_only_writes_the_adapter_without_base(layout, nproc, lora_ckpt, hf_of, tmp_path):
    """--lora adapter needs no base weights: the PEFT adapter equals, byte for byte, the one written
    from the checkpoint that holds its base, and on the base model it gives Megatron's logits."""
    _, adapter, base = hf_of(FIXTURES[layout][2])
    out = tmp_path / "out"
    proc = merge(lora_ckpt(layout), out, "--lora", "adapter", nproc=nproc)
    assert proc.returncode == 0, proc.stderr[-4000:]
    written = load_file(out / "lora_adapter" / "adapter_model.safetensors")
    expected = load_file(adapter / "lora_adapter" / "adapter_model.safetensors")
    assert written.keys() == expected.keys() and len(written) == 2 * 2 * len(ADAPTED)
    assert all(torch.equal(written[k], expected[k]) for k in expected)
    config = json.loads((out / "lora_adapter" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (4, 8.0)
    reference = reference_logits(lora_ckpt, layout)
    assert (logits_of(base) - reference).abs().max() > 1e-2, "the adapters change nothing: the test would prove nothing"
    torch.testing.assert_close(logits_of(base, out / "lora_adapter"), reference, rtol=0, atol=1e-5)
    assert not list(out.glob("*.safetensors"))


@pytest.mark.slow
def test_adapter_only_both_with_base(lora_ckpt, hf_of, tmp_path):
    fold, adapter, base = hf_of("ref")
    out = tmp_path / "out"
    proc = merge(lora_ckpt("bridge_peft_tp2"), out, "--lora", "both", "--base", str(base), nproc=2)
    assert proc.returncode == 0, proc.stderr[-4000:]
    merged, full = weights(out), weights(fold)
    assert merged.keys() == full.keys() and all(torch.equal(merged[k], full[k]) for k in full)
    written = load_file(out / "lora_adapter" / "adapter_model.safetensors")
    expected = load_file(adapter / "lora_adapter" / "adapter_model.safetensors")
    assert written.keys() == expected.keys() and all(torch.equal(written[k], expected[k]) for k in expected)


@pytest.mark.slow
def test_adapter_only_refusals(lora_ckpt, hf_of, tmp_path):
    src, (_, _, base) = lora_ckpt("bridge_peft_tp2"), hf_of("ref")
    proc = merge(src, tmp_path / "a")
    assert proc.returncode == 2 and "pass --base HF_DIR" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "a").exists()
    # a base whose layer 1 q_proj has half the rows the adapter's B @ A has
    wrong = tmp_path / "wrong"
    shutil.copytree(base, wrong)
    name = "model.layers.1.self_attn.q_proj.weight"
    path = wrong / json.loads((wrong / "model.safetensors.index.json").read_text())["weight_map"][name]
    tensors = load_file(path)
    tensors[name] = tensors[name][:32].clone()
    save_file(tensors, path)
    proc = merge(src, tmp_path / "b", "--base", str(wrong))
    assert proc.returncode == 2 and name in proc.stderr and "not the model these adapters were trained on" in \
        proc.stderr, proc.stderr
    # a base whose config.json is another model's (3 layers)
    config = json.loads((base / "config.json").read_text())
    shutil.rmtree(wrong)
    shutil.copytree(base, wrong)
    (wrong / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    proc = merge(src, tmp_path / "c", "--base", str(wrong))
    assert proc.returncode == 2 and "do not fit the config.json used with --base" in proc.stderr, proc.stderr
    # a checkpoint that holds its base takes no --base
    proc = merge(lora_ckpt("tp2"), tmp_path / "d", "--base", str(base), "--lora-alpha", "8")
    assert proc.returncode == 2 and "drop --base" in proc.stderr, proc.stderr
    assert not any((tmp_path / d).exists() for d in "bcd")


@pytest.mark.slow
def test_an_adapter_alone_does_not_look_like_a_model(lora_ckpt, tmp_path):
    """No index or config beside the adapter, --verify says there is no model to check, and an
    upload is refused before anything is written."""
    out = tmp_path / "out"
    proc = merge(lora_ckpt("bridge_peft_tp2"), out, "--lora", "adapter", "--verify")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (out / "model.safetensors.index.json").exists() and not (out / "config.json").exists()
    assert (out / "lora_adapter" / "adapter_model.safetensors").exists()
    assert "not a model to self-check" in proc.stderr
    proc = merge(lora_ckpt("bridge_peft_tp2"), tmp_path / "up", "--lora", "adapter", "--hf-upload-path", "org/x")
    assert proc.returncode == 2 and "--hf-upload-path" in proc.stderr and not (tmp_path / "up").exists()


def test_the_re_described_factors_are_validated_like_the_stored_pieces(lora_ckpt, monkeypatch):
    """The factors find_adapters describes as blocks of stored pieces pass the same checks as the
    stored pieces: a derivation that pointed past a file's end would be refused, not read."""
    from distmerge.prepare import PrepareOptions, prepare

    real = megatron_gpt.sub_tensor

    def past_the_end(catalogue, name, parts):
        t = real(catalogue, name, parts)
        t.pieces = [dataclasses.replace(p, offset=p.offset + 10**9) for p in t.pieces]
        return t

    assert prepare(str(lora_ckpt("tp2")), PrepareOptions(lora="merge", lora_alpha=8)).adapters is not None
    monkeypatch.setattr(megatron_gpt, "sub_tensor", past_the_end)
    with pytest.raises(MergeError, match="lora_[AB].* needs bytes up to"):
        prepare(str(lora_ckpt("tp2")), PrepareOptions(lora="merge", lora_alpha=8))


# ---------------------------------------------------------------- fast: the catalogue-level rules

def tensor(name, shape, offset=0):
    strides = tuple(int(torch.tensor(shape[k + 1:]).prod()) for k in range(len(shape)))
    piece = Piece("f", offset, tuple(shape), strides, (0,) * len(shape), FLOAT32)
    return SourceTensor(name, tuple(shape), FLOAT32, [piece])


CONFIG = {"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 2, "num_attention_heads": 4,
          "num_key_value_heads": 2, "hidden_size": 64, "intermediate_size": 96, "vocab_size": 128,
          "tie_word_embeddings": True}


def catalogue(*tensors):
    return Catalogue(format="megatron-torch_dist", source="/nowhere", files=["f"], family="megatron",
                     tensors={t.name: t for t in tensors}, hf_dir=None)


def test_tp_splits_of_the_adapter_factors():
    split = megatron_gpt.tp_split
    layer = "decoder.layers.self_attention."
    assert split(layer + "linear_qkv.adapter.linear_in.weight") == megatron_gpt.COLUMN   # [r/tp, in]
    assert split(layer + "linear_qkv.adapter.linear_out.weight") == megatron_gpt.COLUMN  # [out/tp, r]
    assert split(layer + "linear_proj.adapter.linear_in.weight") == megatron_gpt.ROW     # [r, in/tp]
    assert split(layer + "linear_proj.adapter.linear_out.weight") == megatron_gpt.COLUMN
    assert split("decoder.layers.mlp.linear_fc1.adapter.linear_out.weight") == megatron_gpt.GATE_UP


def test_qkv_factors_take_the_rows_of_their_projection():
    """B of q_proj is the q rows of each query group of linear_qkv's B, in the base weight's order."""
    qkv = "decoder.layers.self_attention.linear_qkv."
    cat = catalogue(tensor("embedding.word_embeddings.weight", (128, 64)), tensor(qkv + "weight", (2, 128, 64)),
                    tensor(qkv + "adapter.linear_in.weight", (2, 4, 64), 10_000),
                    tensor(qkv + "adapter.linear_out.weight", (2, 128, 4), 20_000))
    adapters = megatron_gpt.find_adapters(cat, CONFIG, 8.0)
    assert (adapters.r, adapters.scale) == (4, 2.0)
    a, b = adapters.factors["model.layers.1.self_attn.q_proj"]
    assert cat.tensors[a].shape == (4, 64) and cat.tensors[b].shape == (64, 4)
    # layer 1, group 1's q rows (rows 64..96 of that layer's B) are q_proj's rows 32..64
    group1 = next(p for p in cat.tensors[b].pieces if p.region[0] == 32)
    assert group1.offset == 20_000 + 4 * (128 * 4 + 64 * 4) and group1.shape == (32, 4)
    assert not any(".adapter." in name for name in cat.tensors)


@pytest.mark.parametrize("names, needle", [
    ({"in": (2, 4, 64)}, "not the other factor"),
    ({"in": (2, 4, 64), "out": (2, 100, 4)}, "do not fit their base weight"),
    ({"in": (2, 4, 32), "out": (2, 128, 4)}, "do not fit their base weight"),
])
def test_bad_factors_are_refused(names, needle):
    qkv = "decoder.layers.self_attention.linear_qkv."
    tensors = [tensor("embedding.word_embeddings.weight", (128, 64)), tensor(qkv + "weight", (2, 128, 64))]
    tensors += [tensor(f"{qkv}adapter.linear_{io}.weight", shape) for io, shape in names.items()]
    with pytest.raises(MergeError, match=needle):
        megatron_gpt.find_adapters(catalogue(*tensors), CONFIG, 8.0)


QKV = "decoder.layers.self_attention.linear_qkv."


def adapter_only(*extra):
    """A Bridge PEFT save's catalogue: linear_qkv's factors alone, stacked over 2 layers (r=4)."""
    return catalogue(tensor(QKV + "adapter.linear_in.weight", (2, 4, 64), 10_000),
                     tensor(QKV + "adapter.linear_out.weight", (2, 128, 4), 20_000), *extra)


def hf_base(k_rows=32):
    """An --base model's catalogue holding q/k/v_proj of both layers ([64|k_rows|32, 64])."""
    shapes = {"q_proj": (64, 64), "k_proj": (k_rows, 64), "v_proj": (32, 64)}
    tensors = [tensor(f"model.layers.{i}.self_attn.{p}.weight", s) for i in range(2) for p, s in shapes.items()]
    return Catalogue(format="hf-safetensors", source="/base", files=["b"], tensors={t.name: t for t in tensors},
                     hf_dir="/base")


def test_adapter_only_factors_are_those_of_a_full_checkpoint():
    """Without the base weight, a stand-in of B @ A's shape gives each HF weight the same rows of B
    (the same pieces) as the stored base does; nothing is mapped, and a fold asks for --base."""
    only = adapter_only()
    full = adapter_only(tensor("embedding.word_embeddings.weight", (128, 64)), tensor(QKV + "weight", (2, 128, 64)))
    adapters, expected = (megatron_gpt.find_adapters(c, CONFIG, 8.0) for c in (only, full))
    assert adapters.factors == expected.factors and len(adapters.factors) == 6
    for a, b in adapters.factors.values():
        assert only.tensors[a] == full.tensors[a] and only.tensors[b] == full.tensors[b]
    assert megatron_gpt.map_outputs(only, CONFIG, lambda dtype: dtype) == []
    with pytest.raises(MergeError, match="pass --base HF_DIR"):
        megatron_gpt.attach_folds([], adapters)


def test_base_completes_an_adapter_only_checkpoint():
    """--base's tensors join the factors; each adapted HF weight gets its fold, named as in the base."""
    joined = with_base(adapter_only(), hf_base())
    adapters = megatron_gpt.find_adapters(joined, CONFIG, 8.0)
    outputs = megatron_gpt.map_outputs(joined, CONFIG, lambda dtype: dtype)
    assert sorted(o.name for o in outputs) == sorted(hf_base().tensors)
    assert all(o.parts[0].source == megatron_gpt.HF_BASE + o.name for o in outputs)
    megatron_gpt.attach_folds(outputs, adapters)
    assert all(o.lora is not None for o in outputs)
    with pytest.raises(MergeError, match=r"model\.layers\.0\.self_attn\.k_proj\.weight.*not the model these"):
        megatron_gpt.find_adapters(with_base(adapter_only(), hf_base(k_rows=16)), CONFIG, 8.0)
    full = adapter_only(tensor("embedding.word_embeddings.weight", (128, 64)), tensor(QKV + "weight", (2, 128, 64)))
    with pytest.raises(MergeError, match="drop --base"):
        with_base(full, hf_base())


@pytest.mark.parametrize("base", [False, True], ids=["adapter-only", "with-base"])
def test_other_adapters_are_refused(base):
    """Canonical LoRA, DoRA and adapters on MoE experts, in full and in adapter-only saves."""
    def held(*tensors):
        if base:
            tensors += (tensor("embedding.word_embeddings.weight", (128, 64)), tensor(QKV + "weight", (2, 128, 64)))
        return catalogue(*tensors)

    canonical = held(tensor(QKV + "adapter.adapter_q.linear_in.weight", (2, 4, 64)))
    with pytest.raises(MergeError, match="canonical LoRA or DoRA"):
        megatron_gpt.find_adapters(canonical, CONFIG, 8.0)
    dora = held(tensor(QKV + "adapter.linear_in.weight", (2, 4, 64)), tensor(QKV + "adapter.linear_out.weight",
                (2, 128, 4)), tensor(QKV + "adapter.weight_magnitude", (2, 128)))
    with pytest.raises(MergeError, match="canonical LoRA or DoRA"):
        megatron_gpt.find_adapters(dora, CONFIG, 8.0)
    fc1 = "decoder.layers.mlp.experts.experts.linear_fc1."
    experts = held(tensor(fc1 + "adapter.linear_in.weight", (2, 4, 64)), tensor(fc1 + "adapter.linear_out.weight",
                   (2, 192, 4)), *([tensor(fc1 + "weight", (2, 4, 192, 64))] if base else []))
    with pytest.raises(MergeError, match="MoE experts and routers are not read yet"):
        megatron_gpt.find_adapters(experts, CONFIG, 8.0)


def test_a_stored_adapter_is_never_dropped_silently():
    """map_outputs refuses adapters that find_adapters has not taken up (they would vanish from the output)."""
    qkv = "decoder.layers.self_attention.linear_qkv."
    cat = catalogue(tensor("embedding.word_embeddings.weight", (128, 64)), tensor(qkv + "weight", (2, 128, 64)),
                    tensor(qkv + "adapter.linear_in.weight", (2, 4, 64)),
                    tensor(qkv + "adapter.linear_out.weight", (2, 128, 4)))
    with pytest.raises(MergeError, match="did not read"):
        megatron_gpt.map_outputs(cat, CONFIG, lambda dtype: dtype)

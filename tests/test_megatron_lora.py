"""LoRA in Megatron checkpoints (issue 16): Megatron-Bridge's adapters, as verl's Megatron workers save
them (in dist_ckpt/, and in adapter_checkpoint/mp_rank_*_adapter.pt), folded, written as a PEFT
adapter, or both. The oracle is Megatron's own forward with Bridge's LoRALinear applying the adapters
(tests/make_megatron_lora.py)."""
from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, CodeRunningPickle, run, run_distmerge, torchrun_cmd
from distmerge.arch import megatron_gpt
from distmerge.errors import MergeError
from distmerge.model import Catalogue, Piece, SourceTensor

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
}
LLAMA = [name for name in FIXTURES if not name.startswith("qwen2")]


def reference_logits(lora_ckpt, layout):
    """Megatron's forward with the adapters, recorded by the fixture the layout was re-saved from."""
    ref = FIXTURES[layout][2] or layout
    return torch.load(lora_ckpt(ref) / "reference" / "logits.pt")
ADAPTED = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj"]


@pytest.fixture(scope="module")
def lora_ckpt(tmp_path_factory):
    """lora_ckpt(name) -> the directory of that fixture, written by megatron-core + Megatron-Bridge on first use."""
    base, made = tmp_path_factory.mktemp("megatron_lora"), {}

    def make(name):
        if name not in made:
            nproc, extra, ref = FIXTURES[name]
            if ref:
                extra = extra + ["--from", str(make(ref) / "dist_ckpt")]
            proc = run(torchrun_cmd(nproc) + [str(MAKER), "--out", str(base / name)] + extra)
            assert proc.returncode == 0, f"fixture {name} failed:\n{proc.stdout}\n{proc.stderr[-4000:]}"
            made[name] = base / name
        return made[name]

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
@pytest.mark.parametrize("layout", list(FIXTURES))
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


# ---------------------------------------------------------------- fast: the catalogue-level rules

def tensor(name, shape, offset=0):
    strides = tuple(int(torch.tensor(shape[k + 1:]).prod()) for k in range(len(shape)))
    piece = Piece("f", offset, tuple(shape), strides, (0,) * len(shape), torch.float32)
    return SourceTensor(name, tuple(shape), torch.float32, [piece])


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


def test_adapter_only_checkpoints_and_other_adapters_are_refused():
    qkv = "decoder.layers.self_attention.linear_qkv."
    only = catalogue(tensor(qkv + "adapter.linear_in.weight", (2, 4, 64)),
                     tensor(qkv + "adapter.linear_out.weight", (2, 128, 4)))
    with pytest.raises(MergeError, match="adapter weights only"):
        megatron_gpt.find_adapters(only, CONFIG, 8.0)
    canonical = catalogue(tensor("embedding.word_embeddings.weight", (128, 64)), tensor(qkv + "weight", (2, 128, 64)),
                          tensor(qkv + "adapter.adapter_q.linear_in.weight", (2, 4, 64)))
    with pytest.raises(MergeError, match="canonical LoRA or DoRA"):
        megatron_gpt.find_adapters(canonical, CONFIG, 8.0)
    fc1 = "decoder.layers.mlp.experts.experts.linear_fc1."
    experts = catalogue(tensor("embedding.word_embeddings.weight", (128, 64)), tensor(fc1 + "weight", (2, 4, 192, 64)),
                        tensor(fc1 + "adapter.linear_in.weight", (2, 4, 64)),
                        tensor(fc1 + "adapter.linear_out.weight", (2, 192, 4)))
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

"""The verl FSDP layouts users reported as refused or fragile (issue 17), each written by real torch
FSDP under torchrun (tests/make_verl_layouts.py), merged by distmerge and judged by safetensors (bit
for bit) and transformers (logits of the original model)."""
from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, run_distmerge, torchrun_cmd, write_fixture
from test_fsdp_merge import assert_loads_with_equal_logits, merged_tensors

slow = pytest.mark.slow  # the tests that start torchrun (fixtures) or distmerge processes

MAKER = ROOT / "tests" / "make_verl_layouts.py"
# name -> (nproc, maker arguments); the source is OUT, or OUT/dcp for a DCP save
VERL_LAYOUTS = {
    "veomni_w2": (2, ["--layout", "veomni"]),                      # mesh ("dp_shard",)
    "veomni_sp_w4": (4, ["--layout", "veomni_sp"]),                # flattened "dp_shard_sp" over (dp_shard, ulysses)
    "veomni_hsdp_w4": (4, ["--layout", "veomni_hsdp"]),            # (dp_replicate, dp_shard)
    "fsdp1_single": (1, ["--layout", "fsdp1_single"]),             # plain tensors with Python attributes
    "fsdp2_single": (1, ["--layout", "fsdp2_single"]),             # DTensors on a one-rank mesh
    "no_config_w2": (2, ["--layout", "no_config", "--tie"]),       # no fsdp_config.json
    "hsdp_2x1": (2, ["--layout", "hsdp_2x1"]),                     # FSDP2: whole local blocks
    "hsdp1_2x1": (2, ["--layout", "hsdp1_2x1"]),                   # FSDP1: whole plain tensors on each rank
    "gemma4_scalars_w2": (2, ["--layout", "fsdp2", "--model", "gemma4"]),             # 0-dim buffers
    "gemma4_scalars_dcp_w2": (2, ["--layout", "fsdp2", "--model", "gemma4", "--save", "dcp"]),
    "gemma4_scalars_deepspeed_w2": (2, ["--layout", "fsdp2", "--model", "gemma4", "--save", "deepspeed"]),
    "megatron_scalars_w2": (2, ["--layout", "fsdp2", "--save", "megatron"]),
    "lora_only_w2": (2, ["--layout", "lora_only", "--lora", "4:8"]),  # save_lora_only + base/ (5 shards)
}
# layouts whose merge is judged against the reference tensors and logits of the original model
LOGIT_LAYOUTS = [n for n in VERL_LAYOUTS if "deepspeed" not in n and "megatron" not in n and "lora" not in n]
# layouts whose rank files are plain tensors pickled with attributes: the fast reader must read them
PLAIN_TENSOR_LAYOUTS = ["fsdp1_single", "hsdp1_2x1"]


@pytest.fixture(scope="session")
def verl_layout(tmp_path_factory):
    """verl_layout(name) -> the directory the maker wrote, once per session."""
    base = tmp_path_factory.mktemp("verl_layouts")

    @functools.cache
    def make(name: str) -> Path:
        nproc, extra = VERL_LAYOUTS[name]
        return write_fixture(torchrun_cmd(nproc) + [str(MAKER)] + extra, base / name)

    return make


def source_of(name: str, ckpt: Path) -> Path:
    """The directory a user passes as --source."""
    return ckpt / "dcp" if "--save" in VERL_LAYOUTS[name][1] else ckpt


def assert_same_bytes(reference: dict, merged: dict) -> None:
    """Every tensor present on both sides with the same dtype, shape and bytes (0-dim tensors too)."""
    assert set(merged) == set(reference), set(merged) ^ set(reference)
    for name, ref in reference.items():
        got = merged[name]
        assert (got.dtype, got.shape) == (ref.dtype, ref.shape), (name, got.dtype, ref.dtype, got.shape, ref.shape)
        assert torch.equal(got.reshape(-1).view(torch.uint8), ref.reshape(-1).view(torch.uint8)), f"{name} differs"


@slow
@pytest.mark.parametrize("name", LOGIT_LAYOUTS)
def test_layout_merges_bit_exact_with_equal_logits(name, verl_layout, tmp_path):
    ckpt = verl_layout(name)
    out = tmp_path / "hf"
    proc = run_distmerge(["merge", "--source", str(source_of(name, ckpt)), "--target", str(out),
                          "--max-shard-size", "60KB", "--no-progress"], nproc=2)
    assert proc.returncode == 0, proc.stderr[-4000:]
    reference = load_file(ckpt / "reference" / "model.safetensors")
    assert_same_bytes(reference, merged_tensors(out))
    if "gemma4" in name:  # the scalars are there, as 0-dim tensors, with the values the model held
        scalars = {k: v for k, v in merged_tensors(out).items() if v.dim() == 0}
        assert len(scalars) == 28 and len({float(v) for v in scalars.values()}) == 28
    assert_loads_with_equal_logits(ckpt, out)


@slow
def test_deepspeed_scalars_merge_bit_exact(verl_layout, tmp_path):
    """Gemma 4's 0-dim buffers under DeepSpeed ZeRO-2: against DeepSpeed's own fp32 reconstruction."""
    ckpt = verl_layout("gemma4_scalars_deepspeed_w2") / "deepspeed"
    out = tmp_path / "hf"
    proc = run_distmerge(["merge", "--source", str(ckpt / "checkpoint-2"), "--target", str(out), "--no-progress"],
                         nproc=2)
    assert proc.returncode == 0, proc.stderr[-4000:]
    reference = load_file(ckpt / "reference" / "fp32.safetensors")
    reference.pop("lm_head.weight")  # Gemma 4 ties it to the embedding: DeepSpeed lists it, HF does not save it
    merged = merged_tensors(out)
    assert_same_bytes(reference, merged)
    assert sum(1 for v in merged.values() if v.dim() == 0) == 28


@slow
def test_megatron_torch_dist_scalar_is_read_as_a_0d_tensor(verl_layout):
    """megatron-core stores a 0-dim ShardedTensor as a 0-d DCP item: the catalogue has it with its bytes."""
    from distmerge.dtypes import of_torch
    from distmerge.sources import read_source
    from distmerge.sources.registry import ReadOptions
    from distmerge.validate import validate_catalogue

    ckpt = verl_layout("megatron_scalars_w2")
    fmt, catalogue = read_source(str(ckpt / "dist_ckpt"), ReadOptions())
    validate_catalogue(catalogue)
    assert fmt.name == "megatron-torch_dist"
    for name, value in load_file(ckpt / "reference" / "scalars.safetensors").items():
        t = catalogue.tensors[name]
        assert (tuple(t.shape), t.dtype) == (tuple(value.shape), of_torch(value.dtype))
        (piece,) = t.pieces
        with open(piece.file, "rb") as f:
            f.seek(piece.offset)
            stored = torch.frombuffer(bytearray(f.read(piece.nbytes)), dtype=value.dtype).reshape(value.shape)
        assert torch.equal(stored, value)


@slow
@pytest.mark.parametrize("name", PLAIN_TENSOR_LAYOUTS + ["veomni_sp_w4", "veomni_hsdp_w4", "gemma4_scalars_w2"])
def test_fast_reader_reads_the_rank_files_without_torch_load(name, verl_layout, monkeypatch):
    """The restricted unpickler reads every record; torch.load (10x slower per file, and an import of
    torch.distributed.tensor) is never called."""
    from distmerge.sources import fsdp
    from distmerge.validate import validate_catalogue

    ckpt = verl_layout(name)

    def no_torch_load(*args, **kwargs):
        raise AssertionError("torch.load was called: the fast reader fell back")

    monkeypatch.setattr(torch, "load", no_torch_load)
    catalogue = fsdp.read_catalogue(str(ckpt))
    validate_catalogue(catalogue)
    reference = load_file(ckpt / "reference" / "model.safetensors")
    assert set(reference) <= set(catalogue.tensors) <= set(reference) | {"lm_head.weight"}  # a tied head is saved
    assert all(tuple(catalogue.tensors[k].shape) == tuple(v.shape) for k, v in reference.items())


@slow
def test_mesh_names_are_reported_as_saved(verl_layout):
    """VeOmni's dimension names are not verl's (fsdp, ddp): they are shown as saved, not required."""
    from distmerge.sources import fsdp

    assert fsdp.read_catalogue(str(verl_layout("veomni_w2"))).mesh == "dp_shard=2"
    assert fsdp.read_catalogue(str(verl_layout("veomni_sp_w4"))).mesh == "dp_shard_sp=4"
    assert fsdp.read_catalogue(str(verl_layout("veomni_hsdp_w4"))).mesh == "dp_replicate=2 x dp_shard=2"


@slow
def test_world_size_from_file_names_is_said(verl_layout, tmp_path):
    from distmerge.sources import fsdp

    ckpt = verl_layout("no_config_w2")
    assert not (ckpt / "fsdp_config.json").exists()
    note = "no fsdp_config.json: the world size 2 is taken from the file names (model_world_size_2_rank_*.pt)"
    assert fsdp.read_catalogue(str(ckpt)).notes == [note]
    proc = run_distmerge(["merge", "--source", str(ckpt), "--target", str(tmp_path / "hf"), "--no-progress"])
    assert proc.returncode == 0 and note in proc.stderr, proc.stderr[-3000:]
    proc = run_distmerge(["inspect", str(ckpt)])
    assert proc.returncode == 0 and note in proc.stdout + proc.stderr, proc.stdout + proc.stderr


@slow
def test_fsdp_config_json_outside_the_source_is_refused(verl_layout, tmp_path):
    """fsdp_config.json is read only once it is known to be a regular file inside the source."""
    src = tmp_path / "ckpt"
    shutil.copytree(verl_layout("no_config_w2"), src)
    outside = tmp_path / "elsewhere.json"
    outside.write_text(json.dumps({"world_size": 2}))
    (src / "fsdp_config.json").symlink_to(outside)
    proc = run_distmerge(["merge", "--source", str(src), "--target", str(tmp_path / "hf"), "--no-progress"])
    assert proc.returncode == 2 and "outside the source" in proc.stderr and "Traceback" not in proc.stderr


# ---------------------------------------------------------------- save_lora_only + --base

ADAPTED = "model.layers.0.self_attn.q_proj.weight"


def merge_takes_base() -> bool:
    """Whether MergeOptions carries --base to prepare() (merge.py wiring); until then the CLI tests skip."""
    import dataclasses

    from distmerge.merge import MergeOptions

    return "base" in {f.name for f in dataclasses.fields(MergeOptions)}


wired = pytest.mark.skipif(not merge_takes_base(), reason="merge.py does not pass MergeOptions.base to prepare yet")


def merge_lora_only(ckpt: Path, out: Path, *extra: str, nproc: int = 2):
    """distmerge merge of a LoRA-only checkpoint with the base the maker wrote beside it."""
    return run_distmerge(["merge", "--source", str(ckpt), "--base", str(ckpt / "base"), "--target", str(out),
                          "--max-shard-size", "60KB", "--no-progress", *extra], nproc=nproc)


@slow
def test_lora_only_without_base_is_refused(verl_layout, tmp_path):
    ckpt = verl_layout("lora_only_w2")
    proc = run_distmerge(["merge", "--source", str(ckpt), "--target", str(tmp_path / "hf"), "--no-progress"])
    assert proc.returncode == 2 and "only LoRA factors" in proc.stderr and "--base HF_DIR" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "hf").exists()


@slow
@wired
def test_lora_only_folds_into_the_sharded_base(verl_layout, tmp_path):
    """The fold equals peft's merge_and_unload() of the trained model, bit for bit, with its logits."""
    ckpt = verl_layout("lora_only_w2")
    assert len(list((ckpt / "base").glob("model-*.safetensors"))) > 1  # the base is sharded, with an index
    out = tmp_path / "hf"
    proc = merge_lora_only(ckpt, out)
    assert proc.returncode == 0, proc.stderr[-4000:]
    merged = merged_tensors(out)
    assert_same_bytes(load_file(ckpt / "reference" / "model.safetensors"), merged)
    assert not torch.equal(merged[ADAPTED], load_file(ckpt / "reference" / "base.safetensors")[ADAPTED])
    assert_loads_with_equal_logits(ckpt, out)


@slow
@wired
def test_lora_only_as_an_adapter_loads_with_peft(verl_layout, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ckpt = verl_layout("lora_only_w2")
    out = tmp_path / "hf"
    proc = merge_lora_only(ckpt, out, "--lora", "adapter", nproc=1)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert_same_bytes(load_file(ckpt / "reference" / "base.safetensors"), merged_tensors(out))
    assert_same_bytes(load_file(ckpt / "reference" / "adapter" / "adapter_model.safetensors"),
                      load_file(out / "lora_adapter" / "adapter_model.safetensors"))
    config = json.loads((out / "lora_adapter" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (4, 8.0)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out), out / "lora_adapter").eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[1, 5, 9, 2, 7, 3, 11, 4]])).logits
    torch.testing.assert_close(logits, torch.load(ckpt / "reference" / "logits.pt"), rtol=1e-5, atol=1e-6)


@slow
@wired
def test_base_for_a_full_checkpoint_is_refused(verl_layout, tmp_path):
    proc = run_distmerge(["merge", "--source", str(verl_layout("veomni_w2")), "--target", str(tmp_path / "hf"),
                          "--base", str(verl_layout("lora_only_w2") / "base"), "--no-progress"])
    assert proc.returncode == 2 and "drop --base" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


@slow
def test_prepare_completes_the_lora_only_catalogue(verl_layout):
    """In process: the base's tensors join under PEFT's names; every adapted module is folded."""
    from distmerge.prepare import PrepareOptions, prepare

    ckpt = verl_layout("lora_only_w2")
    p = prepare(str(ckpt), PrepareOptions(base=str(ckpt / "base")))
    modules = ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")
    assert sorted(o.name for o in p.outputs if o.lora) == sorted(
        f"model.layers.{i}.{m}.weight" for i in range(2) for m in modules)
    assert (p.adapters.r, p.adapters.alpha) == (4, 8.0)
    assert any("(--base)" in note for note in p.catalogue.notes)


# ---------------------------------------------------------------- the base's files are distrusted (no processes)

def tiny_base(directory: Path, sharded: bool = True) -> Path:
    """An HF-style safetensors directory of three tensors (one 0-dim), in two shards with an index or one file."""
    from safetensors.torch import save_file

    directory.mkdir()
    tensors = {"a.weight": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b.weight": torch.ones(4),
               "c.scalar": torch.tensor(2.5)}
    if not sharded:
        save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
        return directory
    save_file({"a.weight": tensors["a.weight"]}, directory / "model-00001-of-00002.safetensors")
    save_file({k: tensors[k] for k in ("b.weight", "c.scalar")}, directory / "model-00002-of-00002.safetensors")
    weight_map = {"a.weight": "model-00001-of-00002.safetensors", "b.weight": "model-00002-of-00002.safetensors",
                  "c.scalar": "model-00002-of-00002.safetensors"}
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return directory


@pytest.mark.parametrize("sharded", [True, False])
def test_base_header_gives_each_tensor_one_exact_piece(tmp_path, sharded):
    from distmerge.sources.hf_base import read_base
    from distmerge.validate import validate_catalogue

    base = read_base(str(tiny_base(tmp_path / "base", sharded)))
    validate_catalogue(base)
    assert {n: t.shape for n, t in base.tensors.items()} == {"a.weight": (2, 3), "b.weight": (4,), "c.scalar": ()}
    a = base.tensors["a.weight"].pieces[0]
    with open(a.file, "rb") as f:
        f.seek(a.offset)
        assert torch.equal(torch.frombuffer(bytearray(f.read(24)), dtype=torch.float32), torch.arange(6.0))


def corrupt(path: Path, header: dict) -> None:
    """Rewrite a safetensors file's header (its data left as it was)."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    text = json.dumps(header).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n:])


@pytest.mark.parametrize("damage, message", [
    ("offsets_past_end", "corrupt or truncated"),
    ("wrong_size", "corrupt or truncated"),
    ("bad_dtype", "has dtype \"F33\""),
    ("huge_header", "does not fit in the file"),
    ("index_outside", "not a .safetensors file beside it"),
    ("index_disagrees", "the index is not this model's"),
    ("symlink_outside", "outside the source"),
    ("no_weights", "neither model.safetensors"),
])
def test_a_damaged_or_hostile_base_is_refused(tmp_path, damage, message):
    from distmerge.errors import MergeError
    from distmerge.sources.hf_base import read_base

    base = tiny_base(tmp_path / "base")
    shard2 = base / "model-00002-of-00002.safetensors"
    index = base / "model.safetensors.index.json"
    entry = {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}
    scalar = {"dtype": "F32", "shape": [], "data_offsets": [16, 20]}
    if damage == "offsets_past_end":
        corrupt(shard2, {"b.weight": {**entry, "shape": [400], "data_offsets": [0, 1600]}, "c.scalar": scalar})
    elif damage == "wrong_size":
        corrupt(shard2, {"b.weight": {**entry, "shape": [5]}, "c.scalar": scalar})
    elif damage == "bad_dtype":
        corrupt(shard2, {"b.weight": {**entry, "dtype": "F33"}, "c.scalar": scalar})
    elif damage == "huge_header":
        shard2.write_bytes((1 << 60).to_bytes(8, "little") + b"{}")
    elif damage == "index_outside":
        index.write_text(json.dumps({"weight_map": {"a.weight": "../elsewhere.safetensors"}}))
    elif damage == "index_disagrees":
        weight_map = json.loads(index.read_text())["weight_map"]
        index.write_text(json.dumps({"weight_map": {**weight_map, "b.weight": "model-00001-of-00002.safetensors"}}))
    elif damage == "symlink_outside":
        outside = tmp_path / "outside.safetensors"
        shard2.rename(outside)
        shard2.symlink_to(outside)
    elif damage == "no_weights":
        for p in base.glob("model*"):
            p.unlink()
    with pytest.raises(MergeError, match=message):
        read_base(str(base))

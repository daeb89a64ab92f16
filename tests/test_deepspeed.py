"""DeepSpeed ZeRO-1/2/3 checkpoints written by real DeepSpeed on CPU (tests/make_deepspeed_checkpoint.py):
every merge equals DeepSpeed's own reconstruction (get_fp32_state_dict_from_zero_checkpoint) bit for
bit and gives the same logits in transformers, with 1 and 2 merge ranks and both transports; bad or
unsupported saves are refused with one message. The fixtures are made once per session: one torchrun
of 2 training ranks for six variants, one of 4 ranks for the seventh."""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
from functools import cache
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, CodeRunningPickle, opened_under, run, run_distmerge, torchrun_cmd, write_fixture
from test_fsdp_merge import assert_bit_exact, merged_tensors
from distmerge.cli import main

pytestmark = pytest.mark.slow

MAKER = ROOT / "tests" / "make_deepspeed_checkpoint.py"
# training world size -> variants trained in one torchrun (see VARIANTS in the maker)
RUNS = {2: ["z1", "z2_odd", "z2_fp16_tied", "z3_odd_tied", "z3_lora", "z2_lora"], 4: ["z3_odd"]}
PLAIN = ["z1", "z2_odd", "z2_fp16_tied", "z3_odd_tied", "z3_odd"]
MAKER_TIMEOUT = 900  # the first DeepSpeed start on a machine compiles its shm op (about 90 s)
MERGE_TIMEOUT = 120  # a merge of these tiny models takes seconds; a hang fails the test early
FIXED_INPUT = [[1, 5, 9, 2, 7, 3, 11, 4]]
LORA_SCALE = 8 / 4   # lora_alpha / r of the maker's LoraConfig


@pytest.fixture(scope="session")
def zero(tmp_path_factory):
    """zero(variant) -> DIR with DIR/checkpoint-2 (the save, HF files beside `latest`) and DIR/reference."""
    base = tmp_path_factory.mktemp("deepspeed")

    @cache
    def run_of(world: int) -> Path:
        """One torchrun of the maker writes every variant saved at this world size."""
        cmd = torchrun_cmd(world) + [str(MAKER), "--variants", ",".join(RUNS[world])]
        return write_fixture(cmd, base / f"w{world}", MAKER_TIMEOUT, {"DS_ACCELERATOR": "cpu"})

    def get(variant: str) -> Path:
        return run_of(next(w for w, names in RUNS.items() if variant in names)) / variant

    return get


def expected_plain(variant_dir) -> dict:
    """zero_to_fp32's state dict as an HF checkpoint holds it: a tied head is written once."""
    ref = load_file(variant_dir / "reference" / "fp32.safetensors")
    config = json.loads((variant_dir / "checkpoint-2" / "config.json").read_text())
    if config.get("tie_word_embeddings"):
        assert torch.equal(ref.pop("lm_head.weight"), ref["model.embed_tokens.weight"])
    return ref


@cache
def reference_logits(variant_dir) -> torch.Tensor:
    """Logits of the model built from config.json with DeepSpeed's reconstruction loaded."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(variant_dir / "checkpoint-2")
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(load_file(variant_dir / "reference" / "fp32.safetensors"), strict=True)
    with torch.no_grad():
        return model.eval()(input_ids=torch.tensor(FIXED_INPUT)).logits


def loaded_logits(out) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        return model.eval()(input_ids=torch.tensor(FIXED_INPUT)).logits


def config_dtype(out) -> str | None:
    config = json.loads((out / "config.json").read_text())
    return config.get("dtype", config.get("torch_dtype"))


def merge(source, out, *extra, ranks=1, torchrun=False, summary=None):
    args = ["merge", "--source", str(source), "--target", str(out), "--max-shard-size", "60KB", "--no-progress", *extra]
    if summary is not None:
        args += ["--summary-json", str(summary)]
    if ranks > 1 and not torchrun:
        args += ["--local-ranks", str(ranks)]
    proc = run_distmerge(args, nproc=ranks if torchrun else 1, timeout=MERGE_TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


# ---------------------------------------------------------------- bit-exact with zero_to_fp32

MERGE_CASES = [(1, "direct"), (2, "direct"), (2, "collective")]


@pytest.mark.parametrize("variant", PLAIN)
@pytest.mark.parametrize("ranks,transport", MERGE_CASES, ids=[f"{r}ranks-{t}" for r, t in MERGE_CASES])
def test_merge_equals_zero_to_fp32(variant, ranks, transport, zero, tmp_path):
    src = zero(variant)
    out, summary = tmp_path / "hf", tmp_path / "summary.json"
    merge(src / "checkpoint-2", out, "--transport", transport, ranks=ranks, summary=summary)
    assert_bit_exact(expected_plain(src), merged_tensors(out))
    assert torch.equal(loaded_logits(out), reference_logits(src))
    assert config_dtype(out) == "float32"
    result = json.loads(summary.read_text())
    assert len(result["peak_rss_mb"]) == ranks and max(result["peak_rss_mb"]) < 600, result["peak_rss_mb"]
    assert len(result["files"]) > 1  # 60KB shards: the ranks share the work
    assert not (out / "global_step2").exists() and not (out / "latest").exists()  # training files stay behind


def test_torchrun_merge_of_zero3_at_4_training_ranks(zero, tmp_path):
    src = zero("z3_odd")
    merge(src / "checkpoint-2", tmp_path / "hf", "--transport", "collective", ranks=2, torchrun=True)
    assert_bit_exact(expected_plain(src), merged_tensors(tmp_path / "hf"))


def imports_torch(source, out, *extra) -> bool:
    """Whether a one-process merge imported torch (python -X importtime lists every import)."""
    proc = run([sys.executable, "-X", "importtime", "-m", "distmerge", "merge", "--source", str(source),
                "--target", str(out), "--no-progress", *extra], timeout=MERGE_TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return re.search(r"\|\s+torch$", proc.stderr, re.M) is not None


def test_a_merge_that_copies_bytes_never_imports_torch(zero, tmp_path):
    """torch costs about a second of start-up: a merge without a cast runs without it, bit-exact;
    a cast brings it in."""
    src = zero("z3_odd")
    assert not imports_torch(src / "checkpoint-2", tmp_path / "copy")
    assert_bit_exact(expected_plain(src), merged_tensors(tmp_path / "copy"))
    assert imports_torch(src / "checkpoint-2", tmp_path / "cast", "--dtype", "bf16")


def test_peak_rss_is_the_merges_own_not_its_launchers(zero, tmp_path):
    """Linux carries a launcher's RSS into ru_maxrss across exec: a merge started by a process of
    800 MB must still report its own peak (VmHWM)."""
    summary = tmp_path / "summary.json"
    args = ["merge", "--source", str(zero("z3_odd") / "checkpoint-2"), "--target", str(tmp_path / "hf"),
            "--no-progress", "--summary-json", str(summary)]
    launcher = ("import subprocess, sys; big = b'x' * (800 << 20); "
                f"sys.exit(subprocess.run([sys.executable, '-m', 'distmerge', *{args!r}]).returncode)")
    proc = run([sys.executable, "-c", launcher], timeout=MERGE_TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert max(json.loads(summary.read_text())["peak_rss_mb"]) < 300


def test_bf16_output_casts_the_fp32_master_weights(zero, tmp_path):
    src = zero("z3_odd_tied")
    merge(src / "checkpoint-2", tmp_path / "hf", "--dtype", "bf16")
    assert_bit_exact({k: v.bfloat16() for k, v in expected_plain(src).items()}, merged_tensors(tmp_path / "hf"))
    assert config_dtype(tmp_path / "hf") == "bfloat16"


# ---------------------------------------------------------------- which directory is the source

def test_tag_directory_as_source(zero, tmp_path):
    src = zero("z2_odd")
    merge(src / "checkpoint-2" / "global_step2", tmp_path / "hf")
    assert_bit_exact(expected_plain(src), merged_tensors(tmp_path / "hf"))


def test_openrlhf_directory_of_tags_needs_the_hf_config(zero, tmp_path, capsys):
    """OpenRLHF keeps `latest` and the tags in _actor/, without the HF config beside them."""
    src = zero("z3_odd_tied")
    actor = tmp_path / "_actor"
    actor.mkdir()
    shutil.copytree(src / "checkpoint-2" / "global_step2", actor / "global_step2")
    shutil.copy(src / "checkpoint-2" / "latest", actor / "latest")
    code = main(["merge", "--source", str(actor), "--target", str(tmp_path / "hf"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "--hf-config" in err and "Traceback" not in err, err
    merge(actor, tmp_path / "hf", "--hf-config", str(src / "checkpoint-2"))
    assert_bit_exact(expected_plain(src), merged_tensors(tmp_path / "hf"))


# ---------------------------------------------------------------- the 16-bit module weights (ZeRO-1/2)

def expected_module(src) -> dict:
    """The 16-bit `module` state dict of mp_rank_00_model_states.pt, a tied head written once."""
    expected = load_file(src / "reference" / "module.safetensors")
    if json.loads((src / "checkpoint-2" / "config.json").read_text())["tie_word_embeddings"]:
        assert torch.equal(expected.pop("lm_head.weight"), expected["model.embed_tokens.weight"])
    return expected


@pytest.mark.parametrize("variant,dtype", [("z1", torch.bfloat16), ("z2_fp16_tied", torch.float16)])
def test_module_weights_are_the_16_bit_state(variant, dtype, zero, tmp_path):
    src = zero(variant)
    merge(src / "checkpoint-2", tmp_path / "hf", "--zero-weights", "module", ranks=2)
    expected = expected_module(src)
    assert {t.dtype for t in expected.values()} == {dtype}
    assert_bit_exact(expected, merged_tensors(tmp_path / "hf"))
    assert config_dtype(tmp_path / "hf") == str(dtype).removeprefix("torch.")


def test_module_weights_through_the_python_api(zero, tmp_path):
    import distmerge

    src = zero("z2_odd")
    distmerge.merge(str(src / "checkpoint-2"), str(tmp_path / "hf"), zero_weights="module", progress=False)
    assert_bit_exact(expected_module(src), merged_tensors(tmp_path / "hf"))


def test_module_weights_without_optimizer_files(zero, tmp_path, capsys):
    """Users who deleted the optimizer files: master weights are refused with the way out, module works."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(zero("z1") / "checkpoint-2", ckpt)
    for f in (ckpt / "global_step2").glob("*_optim_states.pt"):
        f.unlink()
    code = main(["merge", "--source", str(ckpt), "--target", str(tmp_path / "hf"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "--zero-weights module" in err and "Traceback" not in err, err
    merge(ckpt, tmp_path / "hf", "--zero-weights", "module")
    assert_bit_exact(expected_module(zero("z1")), merged_tensors(tmp_path / "hf"))


def test_module_weights_refused_for_zero3(zero, tmp_path, capsys):
    code = main(["merge", "--source", str(zero("z3_odd_tied") / "checkpoint-2"), "--target", str(tmp_path / "hf"),
                 "--zero-weights", "module", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "ZeRO-3" in err and "placeholders" in err and "Traceback" not in err, err
    assert not (tmp_path / "hf").exists()


# ---------------------------------------------------------------- PEFT LoRA under ZeRO-3

def lora_reference(src) -> tuple[dict, dict, dict]:
    """DeepSpeed's reconstruction of the PEFT model split into HF base weights and adapters."""
    ref = load_file(src / "reference" / "fp32.safetensors")
    prefix = "base_model.model."
    base = {k[len(prefix):].replace(".base_layer.", "."): v for k, v in ref.items() if ".lora_" not in k}
    adapters = {k: v for k, v in ref.items() if ".lora_" in k}
    return ref, base, adapters


@pytest.mark.parametrize("variant", ["z3_lora", "z2_lora"])
def test_lora_fold_under_zero(variant, zero, tmp_path):
    src = zero(variant)
    ref, base, adapters = lora_reference(src)
    assert {v.dtype for v in base.values()} == {torch.bfloat16} and {v.dtype for v in adapters.values()} == {
        torch.float32}  # frozen base from the 16-bit fragments, trained adapters from the fp32 master
    merge(src / "checkpoint-2", tmp_path / "hf", ranks=2)
    expected = dict(base)
    for name, a in adapters.items():
        if ".lora_A." in name:
            module = name.split(".lora_A.")[0][len("base_model.model."):]
            b = adapters[name.replace(".lora_A.", ".lora_B.")]
            w = expected[f"{module}.weight"]
            expected[f"{module}.weight"] = (w.float() + (b.float() @ a.float()) * LORA_SCALE).to(w.dtype)
    merged = merged_tensors(tmp_path / "hf")
    assert_bit_exact(expected, merged)
    adapted = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(merged[adapted], base[adapted])
    assert not (tmp_path / "hf" / "adapter_config.json").exists()  # the output is a full model, not an adapter
    torch.testing.assert_close(loaded_logits(tmp_path / "hf"), peft_logits(src), rtol=0.02, atol=0.02)


@cache
def peft_logits(src) -> torch.Tensor:
    """The PEFT model with DeepSpeed's reconstruction loaded (unfolded), in fp32."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(src / "checkpoint-2")
    lc = LoraConfig(**{k: v for k, v in json.loads((src / "checkpoint-2" / "adapter_config.json").read_text()).items()
                       if k in ("r", "lora_alpha", "target_modules", "lora_dropout", "task_type")})
    model = get_peft_model(AutoModelForCausalLM.from_config(config, dtype=torch.float32), lc)
    missing, unexpected = model.load_state_dict(load_file(src / "reference" / "fp32.safetensors"), strict=False)
    assert not unexpected and not [k for k in missing if "inv_freq" not in k], (missing, unexpected)
    with torch.no_grad():
        return model.eval()(input_ids=torch.tensor(FIXED_INPUT)).logits


def test_lora_adapter_under_zero3_loads_with_peft(zero, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    src = zero("z3_lora")
    _, base, adapters = lora_reference(src)
    merge(src / "checkpoint-2", tmp_path / "hf", "--lora", "adapter", "--transport", "collective", ranks=2)
    assert_bit_exact(base, merged_tensors(tmp_path / "hf"))
    saved = load_file(tmp_path / "hf" / "lora_adapter" / "adapter_model.safetensors")
    assert_bit_exact({k.replace(".default.", "."): v for k, v in adapters.items()}, saved)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32),
                                      tmp_path / "hf" / "lora_adapter")
    with torch.no_grad():
        logits = model.eval()(input_ids=torch.tensor(FIXED_INPUT)).logits
    assert torch.equal(logits, peft_logits(src))


# ---------------------------------------------------------------- refused, with one message

@pytest.fixture
def z3_copy(zero, tmp_path):
    """A private copy of a ZeRO-3 save that a test may damage."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(zero("z3_odd_tied") / "checkpoint-2", ckpt)
    return ckpt


def refused(capsys, ckpt, tmp_path, code, *needles):
    got = main(["merge", "--source", str(ckpt), "--target", str(tmp_path / "hf"), "--no-progress"])
    err = capsys.readouterr().err
    assert got == code, err
    assert "Traceback" not in err and err.count("distmerge: error:") == 1, err
    for needle in needles:
        assert needle in err, (needle, err)
    assert not (tmp_path / "hf").exists()


def test_missing_rank_file_against_partition_count(z3_copy, tmp_path, capsys):
    (z3_copy / "global_step2" / "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    refused(capsys, z3_copy, tmp_path, 2, "partition_count is 2", "1 *_optim_states.pt")


def test_truncated_optimizer_file(z3_copy, tmp_path, capsys):
    f = z3_copy / "global_step2" / "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    refused(capsys, z3_copy, tmp_path, 4, "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt", "truncated")


@pytest.mark.parametrize("name,needle", [
    ("zero_pp_rank_0_mp_rank_01_model_states.pt", "tensor-parallel"),
    ("expp_rank_0_mp_rank_00_optim_states.pt", "MoE expert"),
    ("zero", "universal checkpoint"),
])
def test_unsupported_layouts(name, needle, z3_copy, tmp_path, capsys):
    target = z3_copy / "global_step2" / name
    if name == "zero":
        (target / "model.embed_tokens.weight").mkdir(parents=True)
    else:
        shutil.copy(z3_copy / "global_step2" / "zero_pp_rank_0_mp_rank_00_model_states.pt", target)
    refused(capsys, z3_copy, tmp_path, 2, needle)


def test_param_shapes_from_another_save(zero, tmp_path, capsys):
    """The model states of the odd-sized save with the optimizer files of the 4-rank save of the same model."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(zero("z3_odd_tied") / "checkpoint-2", ckpt)
    for f in (ckpt / "global_step2").glob("*optim_states.pt"):
        f.unlink()
    for rank in (0, 1):
        name = f"bf16_zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"
        shutil.copy(zero("z3_odd") / "checkpoint-2" / "global_step2" / name, ckpt / "global_step2" / name)
    refused(capsys, ckpt, tmp_path, 2, "partition_count is 4")


def test_latest_may_not_leave_the_source(z3_copy, tmp_path, capsys):
    (z3_copy / "latest").write_text("../elsewhere")
    refused(capsys, z3_copy, tmp_path, 2, "latest", "not a tag directory name")


def test_a_state_file_linked_out_of_the_source_is_refused_before_it_is_opened(z3_copy, tmp_path, capsys,
                                                                              monkeypatch):
    name = "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.move(z3_copy / "global_step2" / name, outside / name)
    (z3_copy / "global_step2" / name).symlink_to(outside / name)
    with opened_under(outside, monkeypatch) as opened:
        refused(capsys, z3_copy, tmp_path, 2, name, "outside the source")
    assert not opened, f"files outside the source were opened: {opened}"


def test_a_fifo_named_like_a_state_file_is_refused_not_waited_on(z3_copy, tmp_path, capsys):
    name = "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"
    (z3_copy / "global_step2" / name).unlink()
    os.mkfifo(z3_copy / "global_step2" / name)
    refused(capsys, z3_copy, tmp_path, 2, name, "not a regular file")


def test_pickle_code_never_runs(z3_copy, tmp_path, capsys):
    """An optimizer file whose pickle would create a file when unpickled: read inertly, then refused."""
    marker = tmp_path / "pwned"
    torch.save({"optimizer_state_dict": CodeRunningPickle(marker)},
               z3_copy / "global_step2" / "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt")
    refused(capsys, z3_copy, tmp_path, 2, "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt")
    assert not marker.exists()


@pytest.fixture
def z1_copy(zero, tmp_path):
    """A private copy of a ZeRO-1 save (2 ranks, bf16) that a test may damage."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(zero("z1") / "checkpoint-2", ckpt)
    return ckpt


def edit(path, change) -> None:
    """Load a state file with torch, let `change` alter it, and save it back as DeepSpeed did."""
    state = torch.load(path, weights_only=False)
    change(state)
    torch.save(state, path)


def optim_file(ckpt, rank: int):
    return ckpt / "global_step2" / f"bf16_zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"


def model_file(ckpt):
    return ckpt / "global_step2" / "mp_rank_00_model_states.pt"


def test_partitions_that_sum_right_but_split_otherwise_are_refused(z1_copy, tmp_path, capsys):
    """One element moved from rank 0's partition to rank 1's: the total still fits param_shapes, but
    every parameter after the boundary would be shifted by one element."""
    def trim(state):
        groups = state["optimizer_state_dict"]["single_partition_of_fp32_groups"]
        groups[0] = groups[0][:-1].clone()

    def grow(state):
        groups = state["optimizer_state_dict"]["single_partition_of_fp32_groups"]
        groups[0] = torch.cat([groups[0], torch.zeros(1)])

    edit(optim_file(z1_copy, 0), trim)
    edit(optim_file(z1_copy, 1), grow)
    refused(capsys, z1_copy, tmp_path, 2, "param group 0", "partitions are equal")


def test_slice_mappings_that_disagree_with_param_shapes_are_refused(z1_copy, tmp_path, capsys):
    def move(state):
        mapping = state["optimizer_state_dict"]["param_slice_mappings"][0]
        name = next(iter(mapping))
        mapping[name] = type(mapping[name])(numel=mapping[name].numel, start=mapping[name].start + 1)

    edit(optim_file(z1_copy, 0), move)
    refused(capsys, z1_copy, tmp_path, 2, "param_slice_mappings puts 'model.embed_tokens.weight'")


def test_a_final_norm_of_the_wrong_size_is_refused(z1_copy, tmp_path, capsys):
    """A 16-bit module whose norm, and param_shapes with it, are one short of the config's hidden size."""
    def shrink(state):
        state["module"]["model.norm.weight"] = state["module"]["model.norm.weight"][:-1].clone()
        for group in state["param_shapes"]:
            if "model.norm.weight" in group:
                group["model.norm.weight"] = torch.Size([group["model.norm.weight"][0] - 1])

    edit(model_file(z1_copy), shrink)
    got = main(["merge", "--source", str(z1_copy), "--target", str(tmp_path / "hf"), "--no-progress",
                "--zero-weights", "module"])
    err = capsys.readouterr().err
    assert got == 2 and "model.norm.weight" in err and "config.json implies" in err, err
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize("value", [5, "model.norm.weight"])
def test_module_weights_must_hold_every_listed_parameter(value, z1_copy, tmp_path, capsys):
    def replace(state):
        state["module"]["model.norm.weight"] = value

    edit(model_file(z1_copy), replace)
    got = main(["merge", "--source", str(z1_copy), "--target", str(tmp_path / "hf"), "--no-progress",
                "--zero-weights", "module"])
    err = capsys.readouterr().err
    assert got == 2 and "'model.norm.weight' in `module` is not a tensor" in err and "Traceback" not in err, err


def test_a_latest_linked_out_of_the_source_is_neither_read_nor_echoed(z1_copy, tmp_path, capsys, monkeypatch):
    secret = tmp_path / "secret"
    secret.write_text("global_step2 SECRET=hunter2\n")
    (z1_copy / "latest").unlink()
    (z1_copy / "latest").symlink_to(secret)
    with opened_under(secret, monkeypatch) as opened:
        refused(capsys, z1_copy, tmp_path, 2, "latest", "outside the source")
    assert not opened, f"files outside the source were opened: {opened}"
    (z1_copy / "latest").unlink()
    (z1_copy / "latest").write_bytes(b"global_step2\x00" + os.urandom(64))
    refused(capsys, z1_copy, tmp_path, 2, "not one short line of text")


@pytest.mark.timeout(60)
def test_a_pickle_of_shared_containers_is_read_once_per_object(z1_copy, tmp_path, capsys):
    """`x = [x, x]` 40 deep is 40 lists in the pickle; copied once per path it would be 2**40."""
    def bomb(state):
        x = []
        for _ in range(40):
            x = [x, x]
        state["lr_scheduler"] = x

    edit(model_file(z1_copy), bomb)
    assert main(["merge", "--source", str(z1_copy), "--target", str(tmp_path / "hf"), "--no-progress"]) == 0


@pytest.mark.timeout(60)
def test_a_huge_partition_count_is_refused_without_building_it(z1_copy, tmp_path, capsys):
    for rank in (0, 1):
        edit(optim_file(z1_copy, rank), lambda s: s["optimizer_state_dict"].update(partition_count=[10 ** 12]))
    refused(capsys, z1_copy, tmp_path, 2, "partition_count is 1000000000000", "rank 2's optimizer file is missing")


@pytest.mark.timeout(60)
def test_a_config_with_a_huge_layer_count_is_refused_without_building_it(z1_copy, tmp_path, capsys):
    config = json.loads((z1_copy / "config.json").read_text())
    (z1_copy / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 10 ** 12}))
    refused(capsys, z1_copy, tmp_path, 2, "num_hidden_layers=1000000000000")


def test_shared_params_that_name_no_tensor_are_ignored(zero, z1_copy, tmp_path, capsys):
    edit(model_file(z1_copy), lambda s: s.update(shared_params={"lm_head.weight": ["x"], 3: "model.norm.weight"}))
    assert main(["merge", "--source", str(z1_copy), "--target", str(tmp_path / "hf"), "--no-progress"]) == 0
    assert_bit_exact(expected_plain(zero("z1")), merged_tensors(tmp_path / "hf"))


def test_inspect_takes_the_merges_read_options(zero, capsys):
    assert main(["inspect", str(zero("z1") / "checkpoint-2"), "--zero-weights", "module"]) == 0
    assert "16-bit module weights" in capsys.readouterr().out


# ---------------------------------------------------------------- flat runs as rectangles

@pytest.mark.parametrize("shape", [(), (7,), (5, 3), (4, 3, 5), (2, 3, 2, 3), (3, 0, 2)])
def test_flat_runs_cut_into_few_rectangles(shape):
    """Every run [a, b) of every tensor is covered exactly, in at most 2 (ndim - 1) + 1 blocks."""
    import math

    from distmerge.sources.deepspeed import flat_blocks

    numel = math.prod(shape)
    flat = torch.arange(numel).reshape(shape)
    for a in range(numel + 1):
        for b in range(a, numel + 1):
            blocks = list(flat_blocks(shape, a, b))
            assert len(blocks) <= max(1, 2 * (len(shape) - 1) + 1)
            seen = []
            for first, region, block in blocks:
                view = flat[tuple(slice(r, r + n) for r, n in zip(region, block))]
                assert view.numel() and view.reshape(-1)[0].item() == first
                assert torch.equal(view.reshape(-1), torch.arange(first, first + view.numel()))  # one C-order run
                seen += view.reshape(-1).tolist()
            assert sorted(seen) == list(range(a, b))

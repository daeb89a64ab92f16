"""The other DCP writers (issue 17): accelerate, NeMo-RL and torchtune checkpoints, written by
tests/make_dcp_writers.py (accelerate's and torchtune's own savers; NeMo-RL's layout with torch DCP,
since NeMo-RL does not install here), merged from the directory a user naturally passes, with 1
and 2 ranks, judged bit for bit against the model's own state dict (torchtune: its own tune_to_hf)
and by transformers' logits against the model's (torchtune: torchtune's forward).

torchtune 0.6.1 needs its own environment (it pulls ~20 packages: datasets, torchdata, torchao
0.10): TORCHTUNE_PYTHON names a Python that imports it with this torch (default .venv-torchtune/bin/python,
which launch/test.sh makes; see docs/dcp-writers.md); without one the torchtune tests are skipped, saying why.

Run as a script under torchrun, this module merges the given variants inside that job with the
Python API (the job's process group: 2 ranks).
"""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, run, run_distmerge, torchrun_cmd, write_fixture
from test_fsdp_merge import assert_bit_exact, merged_tensors

pytestmark = pytest.mark.slow

MAKER = ROOT / "tests" / "make_dcp_writers.py"
TORCHTUNE_PYTHON = os.environ.get("TORCHTUNE_PYTHON", str(ROOT / ".venv-torchtune" / "bin" / "python"))
FIXED_INPUT = [[1, 5, 9, 2, 7, 3, 11, 4]]
# variant -> the directory a user passes (relative to the variant's folder)
SOURCES = {
    "accelerate_fsdp2": "checkpoints/checkpoint_0",                              # the checkpoint folder
    "accelerate_fsdp2_tied": "checkpoints/checkpoint_0/pytorch_model_fsdp_0",    # the model folder
    "nemo_rl": "step_3",
    "nemo_rl_v2": "step_3/policy",
    "torchtune_llama3": ".",                                                     # the output folder
}
EQUIVALENT_SOURCES = [("accelerate_fsdp2", "checkpoints/checkpoint_0/pytorch_model_fsdp_0"),
                      ("nemo_rl", "step_3/policy"), ("nemo_rl", "step_3/policy/weights"),
                      ("nemo_rl_v2", "step_3"), ("nemo_rl_v2", "step_3/policy/weights/model"),
                      ("torchtune_llama3", "dist_epoch_0")]
# transformers against the writer's own forward: HF's own model is exact (0.0); torchtune's differs by ~4e-7
LOGITS_TOLERANCE = 1e-5


def torchtune_python() -> str | None:
    """A Python that imports torchtune, or None."""
    if not os.path.exists(TORCHTUNE_PYTHON):
        return None
    proc = run([TORCHTUNE_PYTHON, "-c", "import torchtune"], timeout=120)
    return TORCHTUNE_PYTHON if proc.returncode == 0 else None


@pytest.fixture(scope="session")
def writers(tmp_path_factory) -> Path:
    """Every variant, each written by one 2-rank torchrun of the maker (torchtune's with its Python)."""
    out = tmp_path_factory.mktemp("dcp_writers")
    tune = torchtune_python()
    for variant in SOURCES:
        if variant.startswith("torchtune") and tune is None:
            continue
        cmd = torchrun_cmd(2)
        if variant.startswith("torchtune"):
            cmd = [tune] + cmd[1:]
        write_fixture(cmd + [str(MAKER), "--variant", variant], out / variant, timeout=400)
    return out


def needs(writers: Path, variant: str) -> Path:
    if not (writers / variant).exists():
        pytest.skip(f"torchtune is not importable from {TORCHTUNE_PYTHON} (set TORCHTUNE_PYTHON)")
    return writers / variant


def assert_logits_equal(out: Path, variant_dir: Path) -> None:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        logits = model(torch.tensor(FIXED_INPUT)).logits
    diff = (logits - torch.load(variant_dir / "reference" / "logits.pt")).abs().max().item()
    assert diff < LOGITS_TOLERANCE, f"{variant_dir.name}: HF logits differ from the writer's model by {diff}"


@pytest.mark.timeout(600)
@pytest.mark.parametrize("variant", SOURCES)
def test_one_rank_is_bit_exact_with_equal_logits(writers, tmp_path, variant):
    import distmerge

    src = needs(writers, variant)
    result = distmerge.merge(src / SOURCES[variant], tmp_path / "out", hf_config=str(src / "hf"), progress=False)
    assert result.ranks == 1
    assert_bit_exact(load_file(src / "reference" / "model.safetensors"), merged_tensors(tmp_path / "out"))
    assert_logits_equal(tmp_path / "out", src)


@pytest.mark.timeout(600)
def test_two_ranks_in_one_torchrun_job_are_bit_exact(writers, tmp_path):
    """Small files and segments, so both ranks write."""
    variants = [v for v in SOURCES if (writers / v).exists()]
    proc = run(torchrun_cmd(2) + [__file__, str(writers), str(tmp_path)] + variants, timeout=400)
    assert proc.returncode == 0, "\n".join(line for line in proc.stderr.splitlines() if "Error" in line)[-4000:]
    for variant in variants:
        out = tmp_path / variant
        assert len(list(out.glob("*.safetensors"))) > 2, variant
        assert_bit_exact(load_file(writers / variant / "reference" / "model.safetensors"), merged_tensors(out))


@pytest.mark.parametrize("variant, source", EQUIVALENT_SOURCES)
def test_every_natural_directory_reads_the_same_model(writers, variant, source):
    from distmerge.sources import read_source

    src = needs(writers, variant)
    fmt, catalogue = read_source(str(src / source))
    _, expected = read_source(str(src / SOURCES[variant]))
    assert fmt.name == ("torchtune" if variant.startswith("torchtune") else "dcp")
    assert {n: t.shape for n, t in catalogue.tensors.items()} == {n: t.shape for n, t in expected.tensors.items()}
    assert any(note.startswith("recognised ") for note in catalogue.notes), catalogue.notes


@pytest.mark.parametrize("variant, needles", [
    ("accelerate_fsdp2", ["recognised accelerate", "pytorch_model_fsdp_0/", "optimizer_0", "scheduler.bin"]),
    ("nemo_rl", ["recognised NeMo-RL", "policy/weights/", "optimizer, tokenizer"]),
    ("torchtune_llama3", ["recognised torchtune", "dist_epoch_0/", "optimizer"]),
])
def test_inspect_says_what_was_recognised(writers, variant, needles):
    src = needs(writers, variant)
    proc = run_distmerge(["inspect", str(src / SOURCES[variant]), "--hf-config", str(src / "hf")])
    assert proc.returncode == 0, proc.stderr[-2000:]
    for needle in needles:
        assert needle in proc.stdout, (needle, proc.stdout)


def refused(args: list[str], *needles: str) -> None:
    proc = run_distmerge(args)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    for needle in needles:
        assert needle in proc.stderr, (needle, proc.stderr)


def test_two_accelerate_models_are_refused_naming_each(writers, tmp_path):
    ckpt = tmp_path / "checkpoint-7"
    shutil.copytree(writers / "accelerate_fsdp2" / SOURCES["accelerate_fsdp2"], ckpt)
    shutil.copytree(ckpt / "pytorch_model_fsdp_0", ckpt / "pytorch_model_fsdp_1")
    refused(["merge", "--source", str(ckpt), "--target", str(tmp_path / "out")],
            "2 accelerate models", "pytorch_model_fsdp_1", f"--source {ckpt / 'pytorch_model_fsdp_0'}")
    assert not (tmp_path / "out").exists()


def test_accelerates_optimizer_directory_is_refused_as_no_model(writers, tmp_path):
    optimizer = writers / "accelerate_fsdp2" / SOURCES["accelerate_fsdp2"] / "optimizer_0"
    refused(["merge", "--source", str(optimizer), "--target", str(tmp_path / "out")],
            "holds no model weights", "pytorch_model_fsdp_0 beside optimizer_0")


def test_nemo_rl_policy_and_value_are_refused_as_ambiguous(writers, tmp_path):
    step = tmp_path / "step_3"
    shutil.copytree(writers / "nemo_rl" / "step_3", step)
    shutil.copytree(step / "policy", step / "value")
    refused(["merge", "--source", str(step), "--target", str(tmp_path / "out")],
            "policy and value", f"--source {step / 'policy'}")


def test_an_unfinished_nemo_rl_save_is_refused(writers, tmp_path):
    shutil.copytree(writers / "nemo_rl" / "step_3", tmp_path / "tmp_step_3")
    refused(["merge", "--source", str(tmp_path / "tmp_step_3"), "--target", str(tmp_path / "out")],
            "still being written")


def test_a_name_outside_the_writers_wrapper_is_refused(writers, tmp_path):
    """NeMo-RL's weights/ saved bare (not under 'model'): not NeMo-RL's save, so no name is guessed."""
    import torch.distributed.checkpoint as dcp

    weights = tmp_path / "policy" / "weights"
    dcp.save({"model.layers.0.mlp.up_proj.weight": torch.ones(2, 2), "lm_head.weight": torch.ones(2, 2)},
             checkpoint_id=str(weights))
    refused(["merge", "--source", str(tmp_path / "policy"), "--target", str(tmp_path / "out")],
            "lm_head.weight", "not under the 'model' key")


def test_a_torchtune_model_without_a_mapping_is_refused_by_name(tmp_path):
    """Qwen2's biases (torchtune names, under its 'model' key) have no rule: refused, nothing guessed."""
    import torch.distributed.checkpoint as dcp

    state = {"model.tok_embeddings.weight": torch.ones(4, 2), "model.layers.0.attn.q_proj.bias": torch.ones(2)}
    dcp.save(state, checkpoint_id=str(tmp_path / "dist_epoch_0"))
    refused(["merge", "--source", str(tmp_path), "--target", str(tmp_path / "out")],
            "layers.0.attn.q_proj.bias have no mapping", "Llama-family")


def test_torchtunes_logits_notice_a_missing_rope_permutation(writers, tmp_path):
    """The oracle is sharp: torchtune's q/k rows written unpermuted move the logits far past the tolerance."""
    from safetensors.torch import save_file

    src = needs(writers, "torchtune_llama3")
    reference = load_file(src / "reference" / "model.safetensors")
    for name, t in reference.items():
        if name.endswith(("q_proj.weight", "k_proj.weight")):  # torchtune's own _permute, undone
            heads = t.shape[0] // 16
            reference[name] = t.view(heads, 2, 8, -1).transpose(1, 2).reshape(t.shape).contiguous()
    shutil.copy(src / "hf" / "config.json", tmp_path)
    save_file(reference, tmp_path / "model.safetensors")
    with pytest.raises(AssertionError, match="HF logits differ"):
        assert_logits_equal(tmp_path, src)


def merge_in_job(writers: str, out: str, variants: list[str]) -> None:
    """Under torchrun: merge each variant with the job's process group (files of 200 KB, segments of 64 KB)."""
    import torch.distributed as dist

    import distmerge

    dist.init_process_group("gloo")
    for variant in variants:
        src = Path(writers) / variant
        distmerge.merge(src / SOURCES[variant], Path(out) / variant, hf_config=str(src / "hf"),
                        max_shard_size="200KB", segment_size="64KB", progress=False)
    dist.destroy_process_group()


if __name__ == "__main__":
    merge_in_job(sys.argv[1], sys.argv[2], sys.argv[3:])

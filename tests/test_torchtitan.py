"""torchtitan checkpoints (issue 17): written by torchtitan itself (its model configs, FSDP2 over gloo,
its CheckpointManager), merged with 1 and 2 ranks, judged against torchtitan's StateDictAdapter.to_hf
bit for bit and against torchtitan's forward through transformers' logits.

Run as a script under torchrun, this module merges the given variants inside that job with the
Python API (the job's process group: 2 ranks), so one torchrun serves every variant.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, run, run_distmerge, torchrun_cmd, write_fixture
from test_fsdp_merge import assert_bit_exact, merged_tensors

pytestmark = pytest.mark.slow

MAKER = ROOT / "tests" / "make_torchtitan_checkpoint.py"
VARIANTS = ["llama3", "llama3_old", "llama3_final_bf16", "llama3_tied", "qwen3", "qwen3_moe", "qwen3_moe_old",
            "deepseek_v3", "deepseek_v3_q_full"]
# torchtitan's forward against transformers' on the merged weights: within 4e-5 here (the MoE
# experts run in bf16 in torchtitan). Without Llama's RoPE row order the logits move by ~2.4,
# without DeepSeek-V3's expert_bias by ~7e-3.
LOGITS_TOLERANCE = 2e-4


@pytest.fixture(scope="session")
def titan(tmp_path_factory) -> Path:
    """Every variant, written once per session by one 2-rank torchrun of the maker."""
    out = tmp_path_factory.mktemp("torchtitan")
    return write_fixture(torchrun_cmd(2) + [str(MAKER), "--variants", ",".join(VARIANTS)], out, timeout=400)


def expected(variant_dir: Path) -> dict:
    """to_hf's tensors less DeepSeek-V3's multi-token-prediction layers (to_hf numbers them past
    num_hidden_layers; distmerge drops them, HF's DeepseekV3ForCausalLM has no such layers)."""
    layers = json.loads((variant_dir / "hf" / "config.json").read_text())["num_hidden_layers"]
    reference = load_file(variant_dir / "reference" / "model.safetensors")
    return {k: v for k, v in reference.items()
            if not (k.startswith("model.layers.") and int(k.split(".")[2]) >= layers)}


def hf_logits(model_dir: Path, tokens: torch.Tensor) -> torch.Tensor:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        return model(tokens).logits


@pytest.mark.timeout(600)
@pytest.mark.parametrize("variant", VARIANTS)
def test_one_rank_equals_to_hf_and_torchtitans_logits(titan, tmp_path, variant):
    import distmerge

    src, out = titan / variant, tmp_path / "out"
    result = distmerge.merge(src / "checkpoint", out, hf_config=str(src / "hf"), progress=False)
    assert result.ranks == 1
    assert_bit_exact(expected(src), merged_tensors(out))
    logits = load_file(src / "reference" / "logits.safetensors")
    diff = (hf_logits(out, logits["tokens"]) - logits["logits"]).abs().max().item()
    assert diff < LOGITS_TOLERANCE, f"{variant}: HF logits differ from torchtitan's by {diff}"


@pytest.mark.timeout(600)
def test_two_ranks_in_one_torchrun_job_equal_to_hf(titan, tmp_path):
    """Small files and segments, so both ranks write, and gathered (RoPE) and expert bands cross them."""
    proc = run(torchrun_cmd(2) + [__file__, str(titan), str(tmp_path)] + VARIANTS, timeout=400)
    assert proc.returncode == 0, "\n".join(line for line in proc.stderr.splitlines() if "Error" in line)[-4000:]
    for variant in VARIANTS:
        out = tmp_path / variant
        assert len(list(out.glob("*.safetensors"))) > 2, variant
        assert_bit_exact(expected(titan / variant), merged_tensors(out))


def test_rope_row_order_is_torchtitans_permutation():
    """The gather the Llama table writes, applied to a tensor, is the adapter's own _permute."""
    from torchtitan.models.llama3 import Llama3StateDictAdapter

    from distmerge.model import SourceRows
    from distmerge.arch.torchtitan import rope_order

    heads, head_dim, dim = 3, 8, 5
    w = torch.randn(heads * head_dim, dim)
    part = SourceRows("w", (), 0, heads * head_dim, rope_order(head_dim))
    gathered = w[part.source_rows(0, heads * head_dim)]
    assert torch.equal(gathered, Llama3StateDictAdapter._permute(None, w, heads))


def test_logits_notice_a_missing_rope_permutation(titan):
    """The oracle is sharp enough: the reference with q/k rows left in torchtitan's order is far off."""
    from torchtitan.models.llama3 import Llama3StateDictAdapter
    from safetensors.torch import save_file
    import shutil
    import tempfile

    src = titan / "llama3"
    reference = load_file(src / "reference" / "model.safetensors")
    config = json.loads((src / "hf" / "config.json").read_text())
    undo = Llama3StateDictAdapter._reverse_permute
    for name in reference:
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = config["num_attention_heads"] if "q_proj" in name else config["num_key_value_heads"]
            reference[name] = undo(None, reference[name], heads).contiguous()
    with tempfile.TemporaryDirectory() as d:
        shutil.copy(src / "hf" / "config.json", d)
        save_file(reference, Path(d) / "model.safetensors")
        logits = load_file(src / "reference" / "logits.safetensors")
        diff = (hf_logits(Path(d), logits["tokens"]) - logits["logits"]).abs().max().item()
    assert diff > 100 * LOGITS_TOLERANCE


def test_verify_source_compares_the_gathered_rows_with_a_reference(titan, tmp_path):
    """`verify --source` reads the checkpoint through the same recipe (RoPE gather included): the
    adapter's output passes; with one head's q rows left in torchtitan's order it fails (exit 3)."""
    from safetensors.torch import save_file

    src = titan / "llama3"
    reference = tmp_path / "reference"
    reference.mkdir()
    (reference / "config.json").write_text((src / "hf" / "config.json").read_text())
    tensors = load_file(src / "reference" / "model.safetensors")
    save_file(tensors, reference / "model.safetensors")
    args = ["verify", "--source", str(src / "checkpoint"), "--reference", str(reference),
            "--hf-config", str(src / "hf")]
    proc = run_distmerge(args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    name = "model.layers.1.self_attn.q_proj.weight"
    head_dim = tensors[name].shape[0] // json.loads((src / "hf" / "config.json").read_text())["num_attention_heads"]
    q = tensors[name].clone()
    q[:head_dim] = tensors[name][:head_dim].view(2, head_dim // 2, -1).transpose(0, 1).reshape(head_dim, -1)
    save_file({**tensors, name: q}, reference / "model.safetensors")
    proc = run_distmerge(args)
    assert proc.returncode == 3 and name in proc.stdout + proc.stderr, proc.stdout[-2000:]


def test_checkpoint_folder_reads_the_latest_step_or_the_named_one(titan, tmp_path):
    dump, folder = titan / "llama3", titan / "llama3" / "checkpoint"
    proc = run_distmerge(["inspect", str(dump), "--hf-config", str(titan / "llama3" / "hf"), "--json"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert '"torchtitan"' in proc.stdout and "checkpoint/step-1/ (the latest of 1)" in proc.stdout
    proc = run_distmerge(["merge", "--source", str(folder), "--target", str(tmp_path / "out"),
                          "--hf-config", str(titan / "llama3" / "hf"), "--iteration", "7"])
    assert proc.returncode == 2 and "no step-7/" in proc.stderr and "Traceback" not in proc.stderr


def test_a_step_linked_out_of_the_checkpoint_folder_is_refused(titan, tmp_path, monkeypatch):
    """A step-N/ that is a link out of the checkpoint folder given as --source: refused (exit 2)
    before its `.metadata` is opened."""
    import shutil
    from conftest import opened_under
    from distmerge.cli import main
    outside = tmp_path / "elsewhere"
    shutil.copytree(titan / "llama3" / "checkpoint" / "step-1", outside)
    (tmp_path / "source" / "checkpoint").mkdir(parents=True)
    (tmp_path / "source" / "checkpoint" / "step-1").symlink_to(outside)
    with opened_under(outside, monkeypatch) as opened:
        code = main(["merge", "--source", str(tmp_path / "source"), "--target", str(tmp_path / "out"),
                     "--hf-config", str(titan / "llama3" / "hf")])
    assert code == 2 and not opened, opened
    assert not (tmp_path / "out").exists()


def test_deepseek_v3_drops_multi_token_prediction_and_says_so(titan):
    src = titan / "deepseek_v3"
    proc = run_distmerge(["inspect", str(src / "checkpoint" / "step-1"), "--hf-config", str(src / "hf")])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "multi-token-prediction" in proc.stdout


def test_a_config_of_another_family_is_refused_with_the_names(titan, tmp_path):
    proc = run_distmerge(["merge", "--source", str(titan / "llama3" / "checkpoint"), "--target",
                          str(tmp_path / "out"), "--hf-config", str(titan / "deepseek_v3" / "hf")])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "no rule maps these torchtitan tensors" in proc.stderr and "qkv_linear.wk.weight" in proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("variant, change, needle", [
    ("llama3", {"num_key_value_heads": 4}, "not 4 heads of 16 rows"),
    ("llama3", {"num_hidden_layers": 1}, "is layer 1 but config.json says num_hidden_layers=1"),
    ("llama3", {"tie_word_embeddings": False, "vocab_size": 300}, "has 257 rows but config.json says vocab_size=300"),
    ("qwen3_moe", {"num_experts": 8}, "not [8, out, in] stacked experts"),
    ("qwen3", {"architectures": ["GPT2LMHeadModel"]}, "has no torchtitan mapping"),
    ("llama3", {"num_attention_heads": 0}, "num_attention_heads=0, not a positive integer"),
    ("llama3", {"num_hidden_layers": None}, "num_hidden_layers=null, not a positive integer"),
])
def test_a_config_that_disagrees_is_refused_before_anything_is_planned(titan, variant, change, needle):
    from distmerge.arch import torchtitan
    from distmerge.errors import MergeError
    from distmerge.sources import read_source

    _, catalogue = read_source(str(titan / variant / "checkpoint"))
    config = {**json.loads((titan / variant / "hf" / "config.json").read_text()), **change}
    with pytest.raises(MergeError, match=re.escape(needle)):
        torchtitan.map_outputs(catalogue, config, lambda dtype: dtype)


def test_two_generations_of_one_tensor_in_one_save_are_refused(titan):
    """lm_head.weight beside output.weight (a corrupt or mixed save) would map twice to lm_head.weight."""
    import dataclasses

    from distmerge.arch import torchtitan
    from distmerge.errors import MergeError
    from distmerge.sources import read_source

    _, catalogue = read_source(str(titan / "llama3" / "checkpoint"))
    catalogue.tensors["output.weight"] = dataclasses.replace(catalogue.tensors["lm_head.weight"], name="output.weight")
    config = json.loads((titan / "llama3" / "hf" / "config.json").read_text())
    with pytest.raises(MergeError, match="both map to lm_head.weight"):
        torchtitan.map_outputs(catalogue, config, lambda dtype: dtype)


def merge_in_job(titan: str, out: str, variants: list[str]) -> None:
    """Under torchrun: merge each variant with the job's process group (one group for all: files
    of 40 KB, segments of 16 KB)."""
    import torch.distributed as dist

    import distmerge

    dist.init_process_group("gloo")
    for variant in variants:
        src = Path(titan) / variant
        distmerge.merge(src / "checkpoint" / "step-1", Path(out) / variant, hf_config=str(src / "hf"),
                        max_shard_size="40KB", segment_size="16KB", progress=False)
    dist.destroy_process_group()


if __name__ == "__main__":
    merge_in_job(sys.argv[1], sys.argv[2], sys.argv[3:])

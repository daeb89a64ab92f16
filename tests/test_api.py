"""The Python API as a pipeline stage: inside a live torchrun job and stand-alone."""
from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

import distmerge
from conftest import ROOT, run, torchrun_cmd
from distmerge.integrity import segment_hashes
from test_fsdp_merge import assert_bit_exact, merged_tensors


@pytest.mark.timeout(300)
def test_merge_inside_a_torchrun_job_uses_its_process_group(checkpoint, tmp_path):
    ckpt = checkpoint("llama_fsdp2_w2")
    out, result_path = tmp_path / "out", tmp_path / "result.json"
    proc = run(torchrun_cmd(2) + [str(ROOT / "tests" / "api_in_job.py"), str(ckpt), str(out), str(result_path)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(result_path.read_text())
    assert result["ranks"] == 2 and all(result["files_by_rank"]), result["files_by_rank"]
    assert {f: h["segments"] for f, h in result["hashes"].items()} == {
        f: segment_hashes(out / f, h["segments"]) for f, h in result["hashes"].items()}
    assert sorted(result["hashes"]) == sorted(result["files"])
    assert set(result) >= {"files", "bytes", "tensors", "phases", "hashes", "warnings", "seconds"}
    assert_bit_exact(load_file(ckpt / "reference" / "model.safetensors"), merged_tensors(out))


def test_merge_stand_alone_returns_a_result_and_raises_merge_error(checkpoint, tmp_path):
    ckpt = checkpoint("llama_fsdp2_w2")
    result = distmerge.merge(ckpt, tmp_path / "out", dtype="bf16", progress=False, verify=True)
    assert result.ranks == 1 and result.verified is True and result.tensors == 21 and result.warnings == []
    assert result.phases[0]["write"] > 0
    # the time outside the run stage has names (start-up is the CLI's alone: here it is pytest's business)
    assert list(result.stages) == ["process group", "catalogue", "plan", "run", "finish"]
    assert result.stages["run"] > 0 and sum(result.stages.values()) <= result.seconds + 0.01
    with pytest.raises(distmerge.MergeError, match="is not empty"):
        distmerge.merge(ckpt, tmp_path / "out")
    with pytest.raises(TypeError):
        distmerge.merge(ckpt, tmp_path / "other", no_such_option=1)

"""The Python API as a pipeline stage: inside a live torchrun job and stand-alone."""
from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

import distmerge
from conftest import ROOT, run, segment_hashes, torchrun_cmd
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
    assert list(result.stages) == ["process group", "catalogue", "plan", "run", "finish", "self-check"]
    assert result.stages["run"] > 0 and sum(result.stages.values()) <= result.seconds + 0.01
    with pytest.raises(distmerge.MergeError, match="is not empty"):
        distmerge.merge(ckpt, tmp_path / "out")
    with pytest.raises(TypeError):
        distmerge.merge(ckpt, tmp_path / "other", no_such_option=1)


def test_bytes_stored_as_they_go_out_are_copied_by_the_kernel_or_else_through_a_buffer(checkpoint, tmp_path,
                                                                                        monkeypatch):
    """Without a cast, whole-row bands go file to file (copy_file_range); where the kernel refuses
    (another filesystem, an old kernel), the same bytes and hashes come through a buffer. (This
    tiny model's tensors would all be batched as small tensors: the batching is turned off here.)"""
    import errno
    import os

    from distmerge import engine
    from distmerge.writer import SafetensorsWriter

    monkeypatch.setattr(engine, "SMALL_TENSOR_BYTES", 0)
    ckpt = checkpoint("llama_fsdp2_w2")
    reference = load_file(ckpt / "reference" / "model.safetensors")
    kernel = distmerge.merge(ckpt, tmp_path / "kernel", progress=False)
    assert kernel.phases[0]["copy"] > 0, kernel.phases  # (the embedding, cut along dim 1, is assembled)
    assert_bit_exact(reference, merged_tensors(tmp_path / "kernel"))

    refusals = []

    def refuse(*args):
        refusals.append(args)
        raise OSError(errno.EXDEV, "Invalid cross-device link")
    monkeypatch.setattr(os, "copy_file_range", refuse)
    monkeypatch.setattr(SafetensorsWriter, "kernel_copy", True)
    buffered = distmerge.merge(ckpt, tmp_path / "buffered", progress=False)
    assert len(refusals) == 1 and SafetensorsWriter.kernel_copy is False  # refused once, then not asked again
    assert buffered.hashes == kernel.hashes
    assert_bit_exact(reference, merged_tensors(tmp_path / "buffered"))

    # a copy_file_range that copies nothing from a source long enough is not a truncated source
    monkeypatch.setattr(os, "copy_file_range", lambda *args: 0)
    monkeypatch.setattr(SafetensorsWriter, "kernel_copy", True)
    nothing = distmerge.merge(ckpt, tmp_path / "nothing", progress=False)
    assert nothing.hashes == kernel.hashes and SafetensorsWriter.kernel_copy is False

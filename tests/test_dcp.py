"""PyTorch DCP sources: the catalogue comes from .metadata alone; bad files give clear errors."""
from __future__ import annotations

import pickle
import shutil

import pytest

from conftest import CodeRunningPickle
from distmerge.cli import main


@pytest.fixture
def dcp_copy(checkpoint, tmp_path):
    """A private copy (DCP dir + huggingface/ beside it) that a test may damage."""
    src = tmp_path / "ckpt"
    shutil.copytree(checkpoint("qwen2_dcp_fsdp2_w2"), src)
    return src / "dcp"


def merge(capsys, *args):
    code = main(["merge", *map(str, args), "--no-progress"])
    return code, capsys.readouterr().err


def assert_refused(code, err, expected_code, *needles, tmp_path):
    assert code == expected_code, err
    assert "Traceback" not in err and err.count("distmerge: error:") == 1, err
    for needle in needles:
        assert needle in err, (needle, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # nothing written


def test_config_is_found_beside_the_dcp_directory_and_prefix_is_stripped(dcp_copy, tmp_path, capsys):
    code, err = merge(capsys, "--source", dcp_copy, "--target", tmp_path / "out")
    assert code == 0, err
    from safetensors import safe_open

    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as f:
        assert "model.embed_tokens.weight" in f.keys() and "lm_head.weight" in f.keys()
    shutil.rmtree(tmp_path / "out")


def test_missing_distcp_file(dcp_copy, tmp_path, capsys):
    (dcp_copy / "__1_0.distcp").unlink()
    code, err = merge(capsys, "--source", dcp_copy, "--target", tmp_path / "out")
    assert_refused(code, err, 2, "missing", "__1_0.distcp", tmp_path=tmp_path)


def test_truncated_distcp_file(dcp_copy, tmp_path, capsys):
    f = dcp_copy / "__0_0.distcp"
    f.write_bytes(f.read_bytes()[: f.stat().st_size - 100])
    code, err = merge(capsys, "--source", dcp_copy, "--target", tmp_path / "out")
    assert_refused(code, err, 4, "__0_0.distcp", "truncated", tmp_path=tmp_path)


def test_metadata_that_does_not_parse(dcp_copy, tmp_path, capsys):
    (dcp_copy / ".metadata").write_bytes(b"\x80\x04garbage")
    code, err = merge(capsys, "--source", dcp_copy, "--target", tmp_path / "out")
    assert_refused(code, err, 2, ".metadata", "not a readable DCP metadata file", tmp_path=tmp_path)


def test_metadata_pickle_that_runs_code_is_refused(dcp_copy, tmp_path, capsys):
    marker = tmp_path / "pwned"
    (dcp_copy / ".metadata").write_bytes(pickle.dumps(CodeRunningPickle(marker)))
    code, err = merge(capsys, "--source", dcp_copy, "--target", tmp_path / "out")
    assert not marker.exists(), "code in .metadata was executed"
    assert_refused(code, err, 2, ".metadata", "io.open is not part of DCP metadata", tmp_path=tmp_path)

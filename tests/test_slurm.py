"""launch/merge.sbatch on a real one-node SLURM (slurmctld + slurmd on localhost, started here by
launch/slurm_local_cluster.sh). CI installs slurm-wlm; without it this test fails with the reason."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

from conftest import ROOT, clean_env, free_port
from test_fsdp_merge import assert_bit_exact, merged_tensors

CLUSTER = ROOT / "launch" / "slurm_local_cluster.sh"


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    state = tmp_path_factory.mktemp("slurm")
    env = clean_env() | {"SLURMCTLD_PORT": str(free_port()), "SLURMD_PORT": str(free_port())}
    start = subprocess.run([str(CLUSTER), "start", str(state)], capture_output=True, text=True, env=env, timeout=120)
    if start.returncode != 0:
        pytest.fail(f"could not start a local SLURM cluster:\n{start.stdout}{start.stderr}", pytrace=False)
    env["SLURM_CONF"] = str(state / "slurm.conf")
    try:
        yield env
    finally:
        subprocess.run([str(CLUSTER), "stop", str(state)], timeout=60)


def run_job(slurm_env, args, extra_env=(), timeout=240):
    """sbatch the template, poll scontrol until the job ends; returns (state, job output)."""
    # PYTHON: the interpreter with distmerge (CI runs the tests with .venv/bin/python, no venv on PATH)
    env = slurm_env | {"MASTER_PORT": str(free_port()), "PYTHON": sys.executable} | dict(extra_env)
    log_dir = ROOT / ".pytest_cache"
    log_dir.mkdir(exist_ok=True)
    submit = subprocess.run(["sbatch", "--parsable", "--nodes", "1", f"--output={log_dir}/slurm-%j.out",
                             str(ROOT / "launch" / "merge.sbatch"), *map(str, args)],
                            capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)
    assert submit.returncode == 0, submit.stderr
    job = submit.stdout.strip().split(";")[0]
    deadline = time.time() + timeout
    state = "?"
    while time.time() < deadline:
        show = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True, env=env)
        match = re.search(r"JobState=(\w+)", show.stdout)
        state = match.group(1) if match else state
        if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            break
        time.sleep(0.5)
    else:
        subprocess.run(["scancel", job], env=env)
    log = log_dir / f"slurm-{job}.out"
    text = log.read_text() if log.exists() else ""
    if log.exists():
        log.unlink()
    return state, text


@pytest.mark.timeout(600)
def test_sbatch_template_merges_with_two_ranks(slurm, checkpoint, tmp_path):
    ckpt = checkpoint("llama_fsdp2_w2")
    reference = load_file(ckpt / "reference" / "model.safetensors")
    # positional SOURCE TARGET and options; two ranks (the CPU count of this node, or NPROC_PER_NODE)
    out = tmp_path / "positional"
    state, log = run_job(slurm, [ckpt, out, "--max-shard-size", "60KB"], {"NPROC_PER_NODE": "2"})
    assert state == "COMPLETED", log
    assert "x 2 rank(s)" in log and "with 2 rank(s)" in log, log
    assert_bit_exact(reference, merged_tensors(out))
    # SOURCE / TARGET / EXTRA_ARGS from the environment
    out = tmp_path / "from-env"
    state, log = run_job(slurm, [], {"SOURCE": str(ckpt), "TARGET": str(out), "EXTRA_ARGS": "--dtype bf16",
                                     "NPROC_PER_NODE": "2"})
    assert state == "COMPLETED", log
    assert_bit_exact({k: v.bfloat16() for k, v in reference.items()}, merged_tensors(out))
    # a bad input fails the job with distmerge's message in the job's output
    state, log = run_job(slurm, [tmp_path / "missing", tmp_path / "never"], {"NPROC_PER_NODE": "2"})
    assert state == "FAILED", log
    assert "distmerge: error:" in log and "missing" in log, log
    assert not (tmp_path / "never").exists()
    assert os.environ.get("SLURM_CONF") is None  # the test's cluster never leaks into other tests

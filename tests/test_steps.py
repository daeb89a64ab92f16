"""Every step of a run: `merge --steps` and `watch`. Step discovery and "complete" per framework are
checked on directory layouts (fast); the merges run on a real fixture copied into step directories by
a fake training loop, one save of which is killed midway (slow)."""
from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import ROOT, clean_env, run_distmerge
from conftest import run as run_process
from distmerge.errors import MergeError
from distmerge.steps import Ledger, decide, scan, select
from test_fsdp_merge import assert_bit_exact, merged_tensors

LAYOUT = "qwen2_single"  # one rank file: each step merges in about a second


def make_dirs(run: Path, names, files=()):
    for name in names:
        (run / name).mkdir(parents=True)
        for f in files:
            (run / name / f).write_text("x")


def numbers(steps):
    return [s.number for s in steps]


def test_verl_steps_are_complete_up_to_the_tracker(tmp_path):
    make_dirs(tmp_path, ["global_step_100/actor", "global_step_200/actor", "global_step_300/actor", "other"])
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("200\n")
    found = scan(str(tmp_path))
    assert found.framework == "verl"
    assert numbers(found.complete) == [100, 200] and numbers(found.in_progress) == [300]
    assert found.complete[0].source == str(tmp_path / "global_step_100" / "actor")
    (tmp_path / "latest_checkpointed_iteration.txt").unlink()  # the first save is still being written
    assert scan(str(tmp_path)).complete == []


def test_megatron_deepspeed_trainer_and_dcp_mark_completion_their_own_way(tmp_path):
    mg = tmp_path / "mg"
    make_dirs(mg, ["iter_0000010", "iter_0000020"])
    (mg / "latest_checkpointed_iteration.txt").write_text("10")
    found = scan(str(mg))
    assert (found.framework, numbers(found.complete), numbers(found.in_progress)) == ("megatron", [10], [20])
    assert found.complete[0].source == str(mg) and found.complete[0].iteration == 10

    ds = tmp_path / "ds"
    make_dirs(ds, ["global_step5", "global_step10"])
    (ds / "latest").write_text("global_step5")
    found = scan(str(ds))
    assert (found.framework, numbers(found.complete), numbers(found.in_progress)) == ("deepspeed", [5], [10])

    trainer = tmp_path / "trainer"
    make_dirs(trainer, ["checkpoint-50"], ["trainer_state.json"])
    make_dirs(trainer, ["checkpoint-100"], ["latest"])  # the Trainer writes trainer_state.json last
    found = scan(str(trainer))
    assert (found.framework, numbers(found.complete), numbers(found.in_progress)) == ("hf-trainer", [50], [100])

    dcp = tmp_path / "dcp"
    make_dirs(dcp, ["step-1"], [".metadata", "__0_0.distcp"])
    make_dirs(dcp, ["step-2"], ["__0_0.distcp"])  # DCP writes .metadata last
    found = scan(str(dcp))
    assert (found.framework, numbers(found.complete), numbers(found.in_progress)) == ("dcp", [1], [2])


def test_a_tracker_that_is_not_a_step_is_refused(tmp_path):
    make_dirs(tmp_path, ["global_step_1"])
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("release")
    with pytest.raises(MergeError, match="not a step"):
        scan(str(tmp_path))
    assert scan(str(tmp_path / "absent")) is None
    assert scan(str(tmp_path / "global_step_1")) is None  # nothing that looks like a step


def test_select_all_latest_and_numbers(tmp_path):
    make_dirs(tmp_path, ["global_step_1", "global_step_2", "global_step_3"])
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("2")
    found = scan(str(tmp_path))
    assert numbers(select(found, "all")) == [1, 2]
    assert numbers(select(found, "latest")) == [2]
    assert numbers(select(found, (2, 1, 2))) == [1, 2]
    with pytest.raises(MergeError, match="still being written"):
        select(found, (3,))
    with pytest.raises(MergeError, match="not in this run; its complete steps: 1, 2"):
        select(found, (7,))


def test_a_published_step_is_skipped_unless_a_check_or_upload_it_lacks_is_asked(tmp_path):
    from distmerge.merge import MergeOptions

    make_dirs(tmp_path / "run", ["global_step_1"])
    (tmp_path / "run" / "latest_checkpointed_iteration.txt").write_text("1")
    step = scan(str(tmp_path / "run")).complete[0]
    out = tmp_path / "out"
    plain = MergeOptions(source="", target="")
    assert decide(step, str(out), plain, Ledger(str(out))).resume is False  # not merged yet
    make_dirs(out, ["global_step_1"], ["distmerge-manifest.json"])
    assert decide(step, str(out), plain, Ledger(str(out))) is None
    checked = MergeOptions(source="", target="", verify=True)
    assert decide(step, str(out), checked, Ledger(str(out))).check_only
    Ledger(str(out)).record("global_step_1", verified=True)
    assert decide(step, str(out), checked, Ledger(str(out))) is None
    upload = MergeOptions(source="", target="", hf_upload_path="org/model")
    assert decide(step, str(out), upload, Ledger(str(out))).upload_only


# A fake training loop: saves verl-style steps by copying a real checkpoint file by file, slowly,
# and writes latest_checkpointed_iteration.txt after each whole save, as verl does.
TRAINER = r"""
import shutil, sys, time
from pathlib import Path
fixture, run, steps, delay = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3].split(","), float(sys.argv[4])
for step in steps:
    actor = run / f"global_step_{step}" / "actor"
    if actor.exists():
        shutil.rmtree(actor)  # a restarted run saves this step again
    for src in sorted(fixture.rglob("*")):
        dst = actor / src.relative_to(fixture)
        if src.is_dir():
            dst.mkdir(parents=True, exist_ok=True)
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        data = src.read_bytes()
        with open(dst, "wb") as f:
            f.write(data[: len(data) // 2])
            f.flush()
            time.sleep(delay)  # a kill here leaves a half-written file
            f.write(data[len(data) // 2 :])
    (run / "latest_checkpointed_iteration.txt").write_text(step)
    print("saved", step, flush=True)
"""


def train(fixture: Path, run: Path, steps: str, delay: float) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", TRAINER, str(fixture), str(run), steps, str(delay)],
                            stdout=subprocess.PIPE, text=True)


def wait_for(condition, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_watch_merges_every_complete_step_once_and_never_a_cut_save(checkpoint, tmp_path):
    fixture = checkpoint(LAYOUT)
    reference = load_file(fixture / "reference" / "model.safetensors")
    run, out, summary = tmp_path / "run", tmp_path / "out", tmp_path / "summary.json"
    run.mkdir()
    watcher = subprocess.Popen([sys.executable, "-m", "distmerge", "watch", str(run), "--target", str(out),
                                "--until", "400", "--interval", "0.3", "--verify", "--no-progress",
                                "--summary-json", str(summary)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clean_env(), cwd=ROOT)
    try:
        first = train(fixture, run, "100,200,300", delay=0.2)
        # killed in the middle of saving step 300: its directory is there, half written
        wait_for(lambda: (run / "global_step_300" / "actor").exists())
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
        assert (run / "latest_checkpointed_iteration.txt").read_text() == "200"
        time.sleep(1.5)  # the watcher sees the cut save for a few rounds
        assert not (out / "global_step_300").exists()
        # the restarted run saves step 300 again, whole this time, then step 400
        second = train(fixture, run, "300,400", delay=0.0)
        assert second.wait(timeout=120) == 0
        _, err = watcher.communicate(timeout=300)
    finally:
        if watcher.poll() is None:
            watcher.kill()
    assert watcher.returncode == 0, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    result = json.loads(summary.read_text())
    assert result["merged"] == ["global_step_100", "global_step_200", "global_step_300", "global_step_400"], err
    assert result["failed"] == {} and all(result["results"][n]["verified"] for n in result["merged"])
    for name in result["merged"]:
        assert_bit_exact(reference, merged_tensors(out / name))
    # run again: every step is already merged (and was verified), nothing is written
    again = run_distmerge(["merge", "--source", str(run), "--steps", "all", "--target", str(out), "--verify"])
    assert again.returncode == 0, again.stderr[-3000:]
    assert "already merged: global_step_100, global_step_200, global_step_300, global_step_400" in again.stderr
    assert "steps: merged 0" in again.stderr


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_merge_steps_in_one_job_with_two_ranks(checkpoint, tmp_path):
    fixture = checkpoint(LAYOUT)
    reference = load_file(fixture / "reference" / "model.safetensors")
    run, out = tmp_path / "run", tmp_path / "out"
    for step in (10, 20, 30):
        shutil.copytree(fixture, run / f"global_step_{step}" / "actor")
    (run / "latest_checkpointed_iteration.txt").write_text("30")
    proc = run_distmerge(["merge", "--source", str(run), "--steps", "10,30", "--target", str(out), "--no-progress",
                          "--max-shard-size", "20KB"], nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["global_step_10", "global_step_30"]
    for name in ("global_step_10", "global_step_30"):
        assert_bit_exact(reference, merged_tensors(out / name))
    assert proc.stderr.count("steps: merged 2 (global_step_10, global_step_30)") == 1, proc.stderr[-3000:]
    # `latest` on the same output: step 30 is there already
    proc = run_distmerge(["merge", "--source", str(run), "--steps", "latest", "--target", str(out)])
    assert proc.returncode == 0 and "already merged: global_step_30" in proc.stderr, proc.stderr[-3000:]


def upload_takes_a_revision() -> bool:
    """distmerge.upload.upload(..., revision=) and a FakeHub that records branches: the upload.py and
    tests/fake_hub.py change that issue 18 asks for."""
    import inspect

    from distmerge.upload import upload
    from fake_hub import FakeHub

    return "revision" in inspect.signature(upload).parameters and "revisions" in inspect.getsource(FakeHub)


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.skipif(not upload_takes_a_revision(), reason="needs upload(..., revision=) and FakeHub.revisions")
def test_each_step_is_uploaded_to_its_own_revision_and_a_failed_upload_is_retried_alone(checkpoint, tmp_path):
    from fake_hub import FakeHub

    fixture = checkpoint(LAYOUT)
    run_dir, out = tmp_path / "run", tmp_path / "out"
    for step in (100, 200):
        shutil.copytree(fixture, run_dir / f"global_step_{step}" / "actor")
    (run_dir / "latest_checkpointed_iteration.txt").write_text("200")
    args = [sys.executable, "-m", "distmerge", "merge", "--source", str(run_dir), "--steps", "all", "--target",
            str(out), "--hf-upload-path", "org/run", "--no-progress"]
    env = {"HF_TOKEN": "hf_test", "HF_HUB_DISABLE_TELEMETRY": "1"}
    with FakeHub(deny=True) as hub:  # the merges succeed, the uploads fail: exit 4, outputs kept
        proc = run_process(args, env=env | {"HF_ENDPOINT": hub.url})
    assert proc.returncode == 4 and "not authorised" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert (out / "global_step_100" / "model.safetensors").exists()
    with FakeHub() as hub:  # again: nothing is merged again, both steps are uploaded
        proc = run_process(args, env=env | {"HF_ENDPOINT": hub.url})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "result: OK" not in proc.stderr  # the self-check passed in the first run; no merge ran again
    assert hub.branches["org/run"] == {"step-100", "step-200"}
    local = {str(p.relative_to(out / "global_step_100")) for p in (out / "global_step_100").rglob("*") if p.is_file()}
    assert hub.revisions["org/run"]["step-100"] == local == hub.revisions["org/run"]["step-200"]

"""Failure behaviour: a rank killed mid-write, --resume, a full disk, a read-only target. Real
torchrun jobs on real fixtures; the damage is done on purpose."""
from __future__ import annotations

import hashlib
import json
import os
import resource
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest

from conftest import ROOT, clean_env, run_distmerge, torchrun_cmd
from distmerge.finish import INCOMPLETE, lock_path, staging_dir

LAYOUT = "llama_fsdp2_w2"
# a few files, each cut into segments (several ranks write one file), so a killed run leaves some
# segments finished and others half written inside the same file
SHAPE = ["--max-shard-size", "200KB", "--segment-size", "40KB"]


def digests(directory):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def uninterrupted(checkpoint, tmp_path_factory):
    ckpt = checkpoint(LAYOUT)
    out = tmp_path_factory.mktemp("failures") / "uninterrupted"
    proc = run_distmerge(["merge", "--source", str(ckpt), "--target", str(out), *SHAPE, "--no-progress"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return ckpt, digests(out)


def worker_with_rank(launcher: psutil.Process, rank: int) -> psutil.Process | None:
    """Rank `rank` of a job: torchrun's workers carry RANK in their environment; ranks forked by
    --local-ranks do not (a fork keeps the parent's /proc environ) and are the launcher's children
    in rank order."""
    children = launcher.children(recursive=True)
    for child in children:
        try:
            if child.environ().get("RANK") == str(rank) and "slow_merge.py" in " ".join(child.cmdline()):
                return child
        except psutil.Error:
            continue
    forked = sorted(launcher.children(), key=lambda c: c.pid)
    if forked and "--local-ranks" in launcher.cmdline() and len(forked) > rank:
        return forked[rank]
    return None


def start_slow_job(nproc: int, launcher: str, args: list[str]) -> subprocess.Popen:
    if launcher == "fork":
        cmd = [sys.executable, str(ROOT / "tests" / "slow_merge.py")] + args + ["--local-ranks", str(nproc)]
    else:
        cmd = torchrun_cmd(nproc) + [str(ROOT / "tests" / "slow_merge.py")] + args
    return subprocess.Popen(cmd, env=clean_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_finished_segments(staging: str, count: int = 2) -> None:
    deadline = time.time() + 120
    done = os.path.join(staging, ".done")
    while time.time() < deadline and not (os.path.isdir(done) and len(os.listdir(done)) >= count):
        time.sleep(0.05)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("nproc, transport, launcher", [(2, "direct", "torchrun"), (4, "collective", "torchrun"),
                                                         (2, "direct", "fork")])
def test_a_killed_rank_stops_the_job_and_resume_completes_it(nproc, transport, launcher, uninterrupted, tmp_path):
    ckpt, expected = uninterrupted
    out = tmp_path / "out"
    staging = staging_dir(str(out))
    args = ["merge", "--source", str(ckpt), "--target", str(out), *SHAPE, "--transport", transport, "--no-progress"]
    job = start_slow_job(nproc, launcher, args)
    try:
        wait_for_finished_segments(staging)  # kill the last rank once some files are finished
        victim = worker_with_rank(psutil.Process(job.pid), nproc - 1)
        assert victim is not None, "the slowed merge never got going"
        victim.send_signal(signal.SIGKILL)
        killed_at = time.time()
        _, err = job.communicate(timeout=120)
    finally:
        if job.poll() is None:
            job.kill()
    stopped_in = time.time() - killed_at
    assert job.returncode != 0
    # rank 0 either notices the dead peer itself or is stopped by the launcher's SIGTERM first
    assert ("distmerge: error: lost contact with another rank" in err
            or "distmerge: error: stopped by signal SIGTERM" in err), err[-3000:]
    assert "[rank0]: Traceback" not in err, err[-3000:]
    assert stopped_in < 60, f"the other ranks took {stopped_in:.0f} s to stop"
    assert not out.exists(), "a killed merge must not leave a target"
    assert os.path.exists(os.path.join(staging, INCOMPLETE)), "the partial output must be marked incomplete"
    assert not os.path.exists(lock_path(str(out))), "rank 0 must release the lock when the job is stopped"
    finished = sorted(os.listdir(os.path.join(staging, ".done")))

    # the same command with --resume keeps the finished files and writes the rest
    summary = tmp_path / "summary.json"
    proc = run_distmerge(args + ["--resume", "--summary-json", str(summary)], nproc=nproc)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(summary.read_text())
    written = [seg for segs in result["files_by_rank"] for seg in segs]
    assert result["kept"] and written, (result["kept"], written)  # kept some segments, wrote the others
    assert set(result["kept"]) <= {f.removesuffix(".json").replace("--", "/") for f in finished}
    assert not set(result["kept"]) & set(written)
    assert digests(out) == expected, "the resumed output must equal an uninterrupted run byte for byte"
    assert not os.path.exists(staging)


def crashed_run(ckpt, out, extra=()):
    """A merge stopped by SIGKILL of its only process after a few files: a real crash."""
    args = ["merge", "--source", str(ckpt), "--target", str(out), *SHAPE, "--no-progress", *extra]
    job = subprocess.Popen([sys.executable, str(ROOT / "tests" / "slow_merge.py")] + args, env=clean_env(), cwd=ROOT,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    done = os.path.join(staging_dir(str(out)), ".done")
    deadline = time.time() + 120
    while time.time() < deadline and not (os.path.isdir(done) and len(os.listdir(done)) >= 3):
        time.sleep(0.05)
    job.kill()
    job.wait(timeout=60)
    assert os.path.exists(lock_path(str(out))), "a SIGKILLed merge leaves its lock; the rerun takes it over"
    return args


@pytest.mark.timeout(300)
def test_when_rank_0_is_killed_the_command_the_others_print_works(uninterrupted, tmp_path):
    """Rank 0 holds the lock: SIGKILLed (the OOM killer), it cannot release it. The surviving rank
    says to rerun with --resume; that rerun takes the dead merge's lock over and finishes."""
    ckpt, expected = uninterrupted
    out = tmp_path / "out"
    staging = staging_dir(str(out))
    args = ["merge", "--source", str(ckpt), "--target", str(out), *SHAPE, "--no-progress"]
    job = start_slow_job(2, "torchrun", args)
    try:
        wait_for_finished_segments(staging)
        victim = worker_with_rank(psutil.Process(job.pid), 0)
        assert victim is not None, "the slowed merge never got going"
        victim.send_signal(signal.SIGKILL)
        _, err = job.communicate(timeout=120)
    finally:
        if job.poll() is None:
            job.kill()
    # torchrun prints its own traceback (ChildFailedError); the surviving rank prints one line
    said = [line for line in err.splitlines() if line.startswith("distmerge: error:")]
    assert job.returncode != 0 and len(said) == 1 and "--resume" in said[0], err[-3000:]
    assert "[rank1]: Traceback" not in err, err[-3000:]
    assert os.path.exists(lock_path(str(out))), "rank 0 was killed: its lock is left"
    proc = run_distmerge(args + ["--resume"], nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "took over the stale lock" in proc.stderr, proc.stderr[-3000:]
    assert digests(out) == expected
    assert not os.path.exists(lock_path(str(out)))


@pytest.mark.timeout(300)
def test_sigterm_to_the_local_ranks_parent_stops_every_rank(uninterrupted, tmp_path):
    """What SLURM or a user's kill does to `merge --local-ranks`: every rank unwinds, nothing is published."""
    ckpt, _ = uninterrupted
    out = tmp_path / "out"
    staging = staging_dir(str(out))
    job = start_slow_job(2, "fork", ["merge", "--source", str(ckpt), "--target", str(out), *SHAPE, "--no-progress"])
    try:
        wait_for_finished_segments(staging)
        ranks = psutil.Process(job.pid).children()
        assert len(ranks) == 2, ranks
        job.send_signal(signal.SIGTERM)
        _, err = job.communicate(timeout=120)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 4, err[-3000:]
    assert "distmerge: error: stopped by signal SIGTERM" in err and "Traceback" not in err, err[-3000:]
    assert not any(r.is_running() and r.status() != psutil.STATUS_ZOMBIE for r in ranks), "a rank outlived its parent"
    assert not out.exists()
    assert os.path.exists(os.path.join(staging, INCOMPLETE))
    assert not os.path.exists(lock_path(str(out)))


@pytest.mark.timeout(300)
def test_resume_rewrites_a_damaged_finished_file_and_refuses_other_options(uninterrupted, tmp_path):
    ckpt, expected = uninterrupted
    out = tmp_path / "out"
    args = crashed_run(ckpt, out)
    staging = staging_dir(str(out))
    # a different --max-shard-size is another merge: refused, and the partial output is untouched
    before = digests(Path(staging))
    other = run_distmerge(args + ["--max-shard-size", "150KB", "--resume"])
    assert other.returncode == 2 and "cannot --resume" in other.stderr and "Traceback" not in other.stderr
    assert digests(Path(staging)) == before
    # a finished segment damaged after the crash fails its hash and is written again
    finished = sorted(f.removesuffix(".json") for f in os.listdir(os.path.join(staging, ".done")))
    record = json.loads((Path(staging) / ".done" / f"{finished[0]}.json").read_text())
    victim = os.path.join(staging, finished[0].split("[")[0])
    with open(victim, "r+b") as f:
        f.seek(record["end"] - 3)
        f.write(b"\0\0\0")
    summary = tmp_path / "summary.json"
    proc = run_distmerge(args + ["--resume", "--summary-json", str(summary)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(summary.read_text())
    assert finished[0] not in result["kept"] and set(finished[1:]) <= set(result["kept"])
    assert digests(out) == expected


@pytest.mark.timeout(120)
def test_a_rerun_without_resume_starts_over_and_says_so(uninterrupted, tmp_path):
    ckpt, expected = uninterrupted
    out = tmp_path / "out"
    args = crashed_run(ckpt, out)
    proc = run_distmerge(args)
    assert proc.returncode == 0 and "replaced the incomplete merge" in proc.stderr, proc.stderr
    assert "took over the stale lock" in proc.stderr, proc.stderr
    assert digests(out) == expected


def limit_file_size(limit):
    def apply():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


@pytest.mark.timeout(120)
def test_a_full_disk_is_an_io_error_and_the_partial_output_stays_marked(checkpoint, tmp_path):
    """RLIMIT_FSIZE makes every write past 200 KB fail with EFBIG, as a full disk fails them with
    ENOSPC (the same message path)."""
    ckpt = checkpoint(LAYOUT)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "distmerge", "merge", "--source", str(ckpt), "--target", str(out),
                           "--no-progress"], capture_output=True, text=True, env=clean_env(), cwd=ROOT, timeout=100,
                          preexec_fn=limit_file_size(200_000))
    assert proc.returncode == 4, proc.stderr
    assert proc.stderr.count("distmerge: error:") == 1 and "Traceback" not in proc.stderr
    assert "model.safetensors: File too large. Free space on the target's filesystem" in proc.stderr
    assert not out.exists() and os.path.exists(os.path.join(staging_dir(str(out)), INCOMPLETE))
    assert not os.path.exists(lock_path(str(out)))


@contextmanager
def tmpfs(path, options, why_else):
    """A real tmpfs mounted at path for the test, unmounted after it; skipped (with both reasons)
    where this sandbox cannot mount one."""
    path.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip()}); {why_else}")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)])


@pytest.mark.timeout(120)
def test_a_small_filesystem_fills_up_with_enospc(checkpoint, tmp_path):
    with tmpfs(tmp_path / "small", "size=256k", "the RLIMIT_FSIZE test covers the same path") as small:
        out = small / "out"
        proc = run_distmerge(["merge", "--source", str(checkpoint(LAYOUT)), "--target", str(out), "--no-progress"])
        assert proc.returncode == 4, proc.stderr
        assert "No space left on device. Free space on the target's filesystem" in proc.stderr
        assert "Traceback" not in proc.stderr and not out.exists()


@pytest.mark.timeout(120)
def test_a_read_only_target_is_refused_before_anything_is_read(checkpoint, tmp_path):
    with tmpfs(tmp_path / "ro", "ro,size=1m", "as root, mode bits do not stop writes") as ro:
        proc = run_distmerge(["merge", "--source", str(checkpoint(LAYOUT)), "--target", str(ro / "out")])
        assert proc.returncode == 4, proc.stderr
        assert "no write permission" in proc.stderr and "Traceback" not in proc.stderr
        assert os.listdir(ro) == []

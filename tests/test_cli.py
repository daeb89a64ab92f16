"""The command line a newcomer meets: instant --help, typos answered with a suggestion, no prefix
abbreviations, one line for a missing dependency or an internal error, Ctrl-C as SIGTERM, the
summary's headline and progress lines in logs. Parsing tests are fast; those that start processes
are marked slow."""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, clean_env, run, run_distmerge
from distmerge import cli
from distmerge.errors import MergeAbortedError
from distmerge.progress import LogLines
from distmerge.summary import summary_lines


def every_parser(parser=None):
    parser = parser or cli.build_parser()
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from every_parser(sub)


def test_no_parser_takes_abbreviations():
    assert all(p.allow_abbrev is False for p in every_parser())
    with pytest.raises(SystemExit):
        cli.parse(["merge", "--source", "a", "--target", "b", "--max-shard", "2MB"])


def test_a_typo_gets_the_subcommand_usage_and_a_suggestion(capsys):
    with pytest.raises(SystemExit) as e:
        cli.parse(["merge", "--source", "a", "--target", "b", "--dtyp", "bf16"])
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert err.startswith("usage: distmerge merge ")
    assert "unrecognized arguments: --dtyp bf16 (did you mean --dtype?)" in err
    with pytest.raises(SystemExit):
        cli.parse(["inspect", "src", "--max-shard", "2MB"])
    assert "(did you mean --max-shard-size?)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.parse(["merge", "--source", "a", "--target", "b", "--steps", "lates"])
    assert "'lates' is not all, latest or step numbers" in capsys.readouterr().err


def test_steps_and_watch_arguments():
    args = cli.parse(["merge", "--source", "run", "--target", "out", "--steps", "100,200"])
    assert args.steps == (100, 200)
    assert cli.parse(["merge", "--source", "r", "--target", "o", "--steps", "latest"]).steps == "latest"
    with pytest.raises(SystemExit):
        cli.parse(["merge", "--source", "r", "--target", "o", "--steps", "all", "--iteration", "5"])
    args = cli.parse(["watch", "run", "--target", "out", "--until", "500", "--interval", "5", "--verify"])
    assert (args.source, args.target, args.until, args.interval, args.verify) == ("run", "out", 500, 5.0, True)
    # watch takes every option a merge's output needs: the two cannot drift apart
    merge_only = {"config", "source", "target", "steps", "iteration", "help"}
    merge_dests = {a.dest for a in cli.build_parser().commands["merge"]._actions} - merge_only
    watch_dests = {a.dest for a in cli.build_parser().commands["watch"]._actions}
    assert merge_dests <= watch_dests


def test_the_parser_constants_are_the_merges():
    import importlib

    merge = importlib.import_module("distmerge.merge")  # the module: distmerge.merge is the API function
    assert cli.TRANSPORTS == merge.TRANSPORTS and cli.DEFAULT_TRANSPORT == merge.DEFAULT_TRANSPORT
    from distmerge.sources.deepspeed import WEIGHTS

    assert cli.ZERO_WEIGHTS == WEIGHTS
    # every MergeOptions field but the progress switch has its flag
    merge_dests = {a.dest for a in cli.build_parser().commands["merge"]._actions}
    assert {f.name for f in dataclasses.fields(merge.MergeOptions)} - {"progress"} <= merge_dests
    options = cli.merge_options(cli.parse(["merge", "--source", "s", "--target", "t", "--dtype", "bf16"]))
    assert (options.source, options.dtype, options.progress) == ("s", "bf16", True)


def test_an_internal_error_is_one_line_and_the_traceback_comes_with_debug(capsys, monkeypatch):
    cli.setup_logging()
    args = cli.parse(["inspect", "src"])

    def broken():
        raise ValueError("something inside")

    assert cli.guarded(args, broken) == cli.INTERNAL_ERROR_EXIT
    err = capsys.readouterr().err
    assert err.strip() == ("distmerge: error: internal error: ValueError: something inside (rerun with --debug "
                           "for the traceback, and please report it)")
    monkeypatch.setenv(cli.DEBUG_ENV, "1")
    with pytest.raises(ValueError):
        cli.guarded(cli.parse(["inspect", "src"]), broken)


def test_a_missing_module_says_what_to_install():
    line = cli.missing_module(ModuleNotFoundError("No module named 'torch'", name="torch"))
    assert line.startswith(f"torch is not installed for {sys.executable}") and "\n" not in line
    assert "pip install" in line or ".venv/bin/activate" in line


def test_sigint_unwinds_like_sigterm_once_and_an_ignored_sigint_stays_ignored():
    previous = signal.getsignal(signal.SIGINT)
    with pytest.raises(MergeAbortedError, match="stopped by signal SIGINT"):
        with cli.signals_unwind():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
    assert signal.getsignal(signal.SIGINT) is previous
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with cli.signals_unwind():
            assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


class FakeResult:
    """The MergeResult fields the summary reads."""

    target = "/out"
    files = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    hashes = {files[0]: {"bytes": 600_000_000}, files[1]: {"bytes": 400_000_123}}
    bytes = 1_000_000_000
    ranks = 2
    seconds = 0.9
    stages = {"start-up": 1.5, "process group": 0.1, "catalogue": 0.1, "plan": 0.0, "run": 0.5, "finish": 0.1,
              "self-check": 3.0}
    kept: list = []
    replaced = True
    verified = True
    uploaded = None
    phases = [{"read": 0.2, "write": 0.3}, {}]
    peak_rss_mb = [300.0, 120.0]


def test_the_summary_leads_with_the_wall_time_and_lists_what_was_written():
    lines = summary_lines(FakeResult(), wall_seconds=6.2, summary_json="s.json")
    assert lines[0] == "merged into /out in 6.20 s (wall time, start-up included) with 2 rank(s)"
    assert "self-check 3.00s" in lines[1]
    assert "  run stage alone: 1.000 GB of tensors in 0.50 s (2.00 GB/s)" in lines
    written = next(line for line in lines if "wrote" in line)
    assert "wrote 2 weight file(s), 1.000 GB on disk (model-00001-of-00002.safetensors" in written
    assert "  replaced the earlier contents of /out (--overwrite)" in lines
    assert "  summary JSON: s.json" in lines
    assert lines[-1].startswith("  rank 1: idle")


def test_progress_lines_come_every_10_percent_at_most_every_few_seconds():
    lines = LogLines(total=1000)
    lines.start(0.0)
    assert lines.due(500, 1.0) is None                      # too soon after the start
    text = lines.due(500, 6.0)
    assert text == "progress: 0.000 of 0.000 GB (50%), 0.00 GB/s, ETA 6 s"
    assert lines.due(550, 20.0) is None                      # less than 10% more, under a minute
    assert lines.due(650, 21.0) is not None                  # 10% more
    assert lines.due(660, 90.0) is not None                  # a minute without a line
    assert lines.due(1000, 200.0) is None                    # done: the summary follows


@pytest.mark.slow
def test_help_and_a_typo_answer_before_torch_is_imported():
    proc = run([sys.executable, "-X", "importtime", "-m", "distmerge", "merge", "--help"], timeout=60)
    assert proc.returncode == 0 and "--steps" in proc.stdout
    imported = [line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time")]
    assert "distmerge.cli" in imported and not [m for m in imported if m.split(".")[0] == "torch"], imported
    typo = run([sys.executable, "-X", "importtime", "-m", "distmerge", "watch", "run", "--target", "o", "--intervall",
                "3"], timeout=60)
    assert typo.returncode == 2 and "did you mean --interval?" in typo.stderr
    assert " torch" not in typo.stderr


@pytest.mark.slow
def test_without_its_dependencies_the_command_says_what_to_install_in_one_line(tmp_path):
    # -S: no site-packages, so neither torch nor the other dependencies are importable
    proc = run([sys.executable, "-S", "-m", "distmerge", "inspect", str(tmp_path)], timeout=60,
               env={"PYTHONPATH": str(ROOT)})
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    missing = re.match(r"distmerge: error: (\w+) is not installed for ", proc.stderr)
    assert missing and missing.group(1) in ("numpy", "xxhash", "safetensors", "torch"), proc.stderr


@pytest.mark.slow
def test_merge_local_uses_the_checkouts_virtualenv(tmp_path):
    if not (ROOT / ".venv" / "bin" / "python").exists():
        pytest.skip("no .venv in this checkout (launch/test.sh makes one)")
    env = {k: v for k, v in clean_env().items() if k not in ("VIRTUAL_ENV", "PYTHON")}
    env["PATH"] = "/usr/bin:/bin"  # no virtualenv on PATH
    proc = subprocess.run(["bash", str(ROOT / "launch" / "merge_local.sh"), str(tmp_path / "missing"),
                           str(tmp_path / "out")], capture_output=True, text=True, env=env, timeout=120,
                          cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "does not exist" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ctrl_c_stops_a_merge_with_one_message_exit_4_and_a_resumable_staging(checkpoint, tmp_path):
    from distmerge.finish import INCOMPLETE, lock_path, staging_dir

    out = tmp_path / "out"
    job = subprocess.Popen([sys.executable, str(ROOT / "tests" / "slow_merge.py"), "merge", "--source",
                            str(checkpoint("llama_fsdp2_w2")), "--target", str(out), "--max-shard-size", "200KB",
                            "--segment-size", "40KB"], env=clean_env(), cwd=ROOT, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    done = os.path.join(staging_dir(str(out)), ".done")
    deadline = time.time() + 120
    while time.time() < deadline and not (os.path.isdir(done) and os.listdir(done)):
        time.sleep(0.05)
    job.send_signal(signal.SIGINT)
    _, err = job.communicate(timeout=120)
    assert job.returncode == 4, err[-3000:]
    assert err.count("distmerge: error: stopped by signal SIGINT") == 1 and "Traceback" not in err, err[-3000:]
    assert os.path.exists(os.path.join(staging_dir(str(out)), INCOMPLETE))
    assert not os.path.exists(lock_path(str(out))) and not out.exists()
    resumed = run_distmerge(["merge", "--source", str(checkpoint("llama_fsdp2_w2")), "--target", str(out),
                             "--max-shard-size", "200KB", "--segment-size", "40KB", "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # stderr is a pipe here, not a terminal: plain lines, no progress bar's carriage returns
    assert "\r" not in err and "\r" not in resumed.stderr
    assert "(wall time, start-up included)" in resumed.stderr, resumed.stderr[-3000:]


def inspect_names_idle_ranks() -> bool:
    """The inspect.py change issue 18 asks of the lead (idle_ranks)."""
    import importlib

    return hasattr(importlib.import_module("distmerge.inspect"), "idle_ranks")


@pytest.mark.slow
@pytest.mark.skipif(not inspect_names_idle_ranks(), reason="needs distmerge.inspect.idle_ranks (issue 18)")
def test_inspect_says_why_ranks_are_idle(checkpoint, capsys):
    source = str(checkpoint("qwen2_single"))
    assert cli.main(["inspect", source, "--nproc", "4"]) == 0
    out = capsys.readouterr().out
    assert "rank(s) 0, 1, 3: idle: the plan has 1 segment(s)" in out and "--nproc 1" in out, out
    assert cli.main(["inspect", source, "--nproc", "4", "--segment-size", "100KB"]) == 0
    assert "idle" not in capsys.readouterr().out

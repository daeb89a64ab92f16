"""The few lines a merge ends with: what the user waited for, where the time went, what was written.

The headline is the wall time the user lived through (python's start-up and the imports included),
not the merge function's own time: a short merge can spend most of its time starting. Under it come
the stages, the self-check of --verify and the upload as stages of their own, the run stage's rate
(labelled: it is not the job's rate), and what was written. Two byte counts are distinct on purpose:
`MergeResult.bytes` is tensor data (what the run stage moved), the files on disk add their headers.
"""
from __future__ import annotations

import logging

log = logging.getLogger("distmerge")
LISTED_FILES = 3  # more files are summed up as "... and N more"


def seconds_line(named_seconds) -> str:
    """`read 0.35s  write 0.49s`: one line of the summary."""
    return "  ".join(f"{name} {s:.2f}s" for name, s in named_seconds)


def gigabytes(n: int) -> str:
    return f"{n / 1e9:.3f} GB"


def headline(result, wall_seconds: float | None) -> str:
    """`merged into OUT in 6.20 s (wall time, start-up included) with 2 rank(s)`."""
    ranks = f"with {result.ranks} rank(s)"
    if wall_seconds is not None:
        return f"merged into {result.target} in {wall_seconds:.2f} s (wall time, start-up included) {ranks}"
    return f"merged into {result.target} in {result.seconds:.2f} s {ranks}"


def written_line(result) -> str:
    """The weight files by name (a few, then a count) and their size on disk."""
    names = list(result.files)
    on_disk = sum(int(result.hashes.get(name, {}).get("bytes", 0)) for name in names)
    shown = ", ".join(names[:LISTED_FILES]) + (f" and {len(names) - LISTED_FILES} more"
                                               if len(names) > LISTED_FILES else "")
    return (f"wrote {len(names)} weight file(s), {gigabytes(on_disk)} on disk ({shown}), plus the index, config, "
            "tokenizer files and distmerge-manifest.json")


def summary_lines(result, wall_seconds: float | None = None, summary_json: str | None = None) -> list[str]:
    """The summary as lines, for the log and for tests."""
    lines = [headline(result, wall_seconds)]
    if result.stages:
        lines.append("  stages: " + seconds_line(result.stages.items()))
    run = result.stages.get("run")
    if run:
        lines.append(f"  run stage alone: {gigabytes(result.bytes)} of tensors in {run:.2f} s "
                     f"({result.bytes / 1e9 / max(run, 1e-9):.2f} GB/s)")
    lines.append("  " + written_line(result))
    if result.kept:
        lines.append(f"  resumed: kept {len(result.kept)} verified segment(s) of the earlier run, wrote the others")
    if getattr(result, "replaced", False):
        lines.append(f"  replaced the earlier contents of {result.target} (--overwrite)")
    if result.verified:
        lines.append("  self-check (--verify) passed")
    if result.uploaded:
        lines.append(f"  uploaded to {result.uploaded}")
    if summary_json:
        lines.append(f"  summary JSON: {summary_json}")
    for rank, phases in enumerate(result.phases):
        rss = result.peak_rss_mb[rank] if rank < len(result.peak_rss_mb) else 0.0
        lines.append(f"  rank {rank}: {seconds_line(sorted(phases.items())) or 'idle'}  peak RSS {rss:.0f} MB")
    return lines


def log_summary(result, wall_seconds: float | None = None, summary_json: str | None = None) -> None:
    """Log the summary (rank 0 calls it). `wall_seconds`: since the user's command started (the CLI
    knows it); without it the headline is the merge's own time, as for the Python API."""
    for line in summary_lines(result, wall_seconds, summary_json):
        log.info("%s", line)

"""Benchmark: distmerge against the copy floor on a ~1.4 GB fp32 verl FSDP2 checkpoint.

    python bench/run.py                  # generate (once), then measure; ~5 minutes on 2 cores
    python bench/run.py --runs 5 --work /fast/disk/bench

Floors, measured in the same run:
  one process: `python -c "import torch"` + `cat` of the source files + `dd` write of the output bytes
  M ranks:     torchrun of a script that only creates and destroys the process group + the same cat + dd
Each distmerge configuration is run --runs times; the median wall time and the per-rank peak RSS
(ru_maxrss, the figure `/usr/bin/time -v` prints, taken from distmerge's own summary) are recorded in
bench/results.json and bench/results.md.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
MODEL = ["--model", "llama", "--hidden", "2048", "--layers", "8", "--heads", "16", "--kv-heads", "4",
         "--intermediate", "2816", "--vocab", "32000", "--meta-init", "--no-reference"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(n: int) -> list[str]:
    return [PY, "-m", "torch.distributed.run", "--nproc-per-node", str(n), "--master-addr", "127.0.0.1",
            "--master-port", str(free_port())]


def timed(cmd, **kw) -> float:
    """Wall time of a command. Dirty pages of earlier runs are flushed first (untimed): otherwise the
    kernel's writeback throttling charges one run for the previous run's writes."""
    subprocess.run(["sync"], check=True)
    start = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT, **kw)
    return time.perf_counter() - start


def source_files(ckpt: Path) -> list[str]:
    return sorted(str(p) for p in ckpt.glob("model_world_size_*.pt"))


def floor(ckpt: Path, out_bytes: int, work: Path, ranks: int) -> float:
    launch = [PY, "-c", "import torch"] if ranks == 1 else torchrun(ranks) + [str(ROOT / "bench" / "pg_only.py")]
    quiet = dict(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t = timed(launch, **quiet)
    t += timed(["cat"] + source_files(ckpt), **quiet)
    mb = -(-out_bytes // 2**20)
    t += timed(["dd", "if=/dev/zero", f"of={work / 'dd.out'}", "bs=1M", f"count={mb}"], **quiet)
    os.remove(work / "dd.out")
    return t


def distmerge(ckpt: Path, out: Path, ranks: int, transport: str, dtype: str) -> tuple[float, dict]:
    shutil.rmtree(out, ignore_errors=True)
    summary = out.parent / "summary.json"
    args = ["-m", "distmerge", "merge", "--source", str(ckpt), "--target", str(out), "--transport", transport,
            "--dtype", dtype, "--no-progress", "--summary-json", str(summary)]
    cmd = [PY] + args if ranks == 1 else torchrun(ranks) + args
    t = timed(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return t, json.loads(summary.read_text())


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--work", default=str(ROOT / "bench" / "work"))
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args()
    work = Path(args.work)
    ckpt = work / "ckpt"
    if not (ckpt / "fsdp_config.json").exists():
        print("generating the benchmark checkpoint ...", flush=True)
        subprocess.run(torchrun(2) + [str(ROOT / "tests" / "make_fsdp_checkpoint.py"), "--out", str(ckpt)] + MODEL,
                       check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    src_bytes = sum(os.path.getsize(f) for f in source_files(ckpt))
    subprocess.run(["cat"] + source_files(ckpt), stdout=subprocess.DEVNULL, check=True)  # warm the page cache
    rows = []
    configs = [(1, "direct"), (2, "direct"), (2, "collective")]
    for dtype in ("auto", "bf16"):
        for ranks, transport in configs:
            times, floors, summaries = [], [], []
            for _ in range(args.runs):
                t, summary = distmerge(ckpt, work / "out", ranks, transport, dtype)
                times.append(t)
                summaries.append(summary)
                floors.append(floor(ckpt, summary["bytes"], work, ranks))
            best = summaries[times.index(statistics.median(times))] if args.runs % 2 else summaries[-1]
            row = {"ranks": ranks, "transport": transport, "dtype": dtype, "source_gb": src_bytes / 1e9,
                   "output_gb": best["bytes"] / 1e9, "median_s": statistics.median(times),
                   "floor_s": statistics.median(floors), "peak_rss_mb": max(max(s["peak_rss_mb"]) for s in summaries),
                   "phases": best["phases"], "times": times}
            row["ratio"] = row["median_s"] / row["floor_s"]
            rows.append(row)
            print(f"{ranks} rank(s) {transport:10s} {dtype:4s}: {row['median_s']:.2f} s (floor {row['floor_s']:.2f} s, "
                  f"x{row['ratio']:.2f}), peak RSS/rank {row['peak_rss_mb']:.0f} MB", flush=True)
    (ROOT / "bench" / "results.json").write_text(json.dumps(rows, indent=2))
    lines = ["| ranks | transport | dtype | output GB | distmerge s (median) | floor s | ratio | peak RSS / rank MB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['ranks']} | {r['transport']} | {r['dtype']} | {r['output_gb']:.2f} | {r['median_s']:.2f} | "
                     f"{r['floor_s']:.2f} | {r['ratio']:.2f} | {r['peak_rss_mb']:.0f} |")
    (ROOT / "bench" / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

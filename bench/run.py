"""Benchmark: distmerge against the copy floor on a ~1.4 GB fp32 verl FSDP2 checkpoint and a
~1.5 GB fp32 Megatron-core TP2xPP2 checkpoint of the same model, and verl's merger as a baseline.

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
MEGATRON_MODEL = ["--tp", "2", "--pp", "2", "--hidden", "2048", "--layers", "8", "--heads", "16", "--groups", "4",
                  "--ffn", "2816", "--vocab", "32000"]
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
    """The data files a merge reads: verl rank files, or a Megatron checkpoint's .distcp files."""
    return sorted(str(p) for p in ckpt.glob("model_world_size_*.pt")) or sorted(str(p) for p in ckpt.rglob("*.distcp"))


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


VERL_DEPS = ["tensordict>=0.8,<=0.10", "transformers>=5.5.3,<5.11", "ray", "omegaconf", "accelerate", "codetiming",
             "hydra-core", "pandas", "datasets", "peft", "pyarrow", "tqdm", "safetensors", "numpy"]


def verl_python(work: Path) -> str | None:
    """A separate virtualenv with verl 0.9.x (its merger is the baseline); None when it cannot be installed."""
    venv = work / "verl-venv"
    py = venv / "bin" / "python"
    check = [str(py), "-c", "import verl.model_merger"]
    if py.exists() and subprocess.run(check, capture_output=True).returncode == 0:
        return str(py)
    print("installing verl into", venv, "...", flush=True)
    steps = [[sys.executable, "-m", "venv", str(venv)],
             [str(py), "-m", "pip", "install", "-q", "torch==2.13.0"],
             [str(py), "-m", "pip", "install", "-q", "--no-deps", "verl>=0.9,<0.10"],
             [str(py), "-m", "pip", "install", "-q"] + VERL_DEPS, check]
    for step in steps:
        proc = subprocess.run(step, capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"verl baseline skipped: {' '.join(step[:4])} failed: {proc.stderr.strip()[-300:]}")
            return None
    return str(py)


def verl_merge(py: str, ckpt: Path, out: Path) -> tuple[float, float]:
    """verl's model_merger on the same checkpoint (it writes bf16); wall seconds and max RSS in MB."""
    shutil.rmtree(out, ignore_errors=True)
    subprocess.run(["sync"], check=True)
    start = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-f", "%M", py, "-m", "verl.model_merger", "merge", "--backend", "fsdp",
                           "--local_dir", str(ckpt), "--target_dir", str(out)], capture_output=True, text=True, cwd=ROOT)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    return seconds, int(proc.stderr.strip().splitlines()[-1]) / 1024


def measure(label: str, ckpt: Path, work: Path, runs: int, configs, dtypes) -> list[dict]:
    """Time each (ranks, transport) x dtype configuration `runs` times beside its floor."""
    src_bytes = sum(os.path.getsize(f) for f in source_files(ckpt))
    subprocess.run(["cat"] + source_files(ckpt), stdout=subprocess.DEVNULL, check=True)  # warm the page cache
    rows = []
    for dtype in dtypes:
        for ranks, transport in configs:
            times, floors, summaries = [], [], []
            for _ in range(runs):
                t, summary = distmerge(ckpt, work / "out", ranks, transport, dtype)
                times.append(t)
                summaries.append(summary)
                floors.append(floor(ckpt, summary["bytes"], work, ranks))
            best = summaries[times.index(statistics.median(times))] if runs % 2 else summaries[-1]
            row = {"source": label, "ranks": ranks, "transport": transport, "dtype": dtype, "source_gb": src_bytes / 1e9,
                   "output_gb": best["bytes"] / 1e9, "median_s": statistics.median(times),
                   "floor_s": statistics.median(floors), "peak_rss_mb": max(max(s["peak_rss_mb"]) for s in summaries),
                   "phases": best["phases"], "times": times}
            row["ratio"] = row["median_s"] / row["floor_s"]
            rows.append(row)
            print(f"{label}: {ranks} rank(s) {transport:10s} {dtype:4s}: {row['median_s']:.2f} s (floor {row['floor_s']:.2f} s, "
                  f"x{row['ratio']:.2f}), peak RSS/rank {row['peak_rss_mb']:.0f} MB", flush=True)
    return rows


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--work", default=str(ROOT / "bench" / "work"))
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--no-verl", action="store_true", help="skip verl's model_merger baseline")
    args = p.parse_args()
    work = Path(args.work)
    ckpt = work / "ckpt"
    if not (ckpt / "fsdp_config.json").exists():
        print("generating the benchmark checkpoint ...", flush=True)
        subprocess.run(torchrun(2) + [str(ROOT / "tests" / "make_fsdp_checkpoint.py"), "--out", str(ckpt)] + MODEL,
                       check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    rows = measure("verl FSDP2", ckpt, work, args.runs, [(1, "direct"), (2, "direct"), (2, "collective")], ("auto", "bf16"))
    megatron = work / "megatron"
    if not (megatron / "dist_ckpt" / "metadata.json").exists():
        print("generating the Megatron TP2xPP2 benchmark checkpoint ...", flush=True)
        subprocess.run(torchrun(4) + [str(ROOT / "tests" / "make_megatron_checkpoint.py"), "--out", str(megatron)]
                       + MEGATRON_MODEL, check=True, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rows += measure("Megatron TP2xPP2", megatron, work, args.runs, [(1, "direct"), (2, "direct")], ("auto",))
    src_bytes = rows[0]["source_gb"] * 1e9
    py = None if args.no_verl else verl_python(work)
    if py:
        runs = [verl_merge(py, ckpt, work / "verl-out") for _ in range(args.runs)]
        seconds = statistics.median(t for t, _ in runs)
        ours = next(r for r in rows if r["ranks"] == 1 and r["dtype"] == "bf16")
        row = {"source": "verl FSDP2", "ranks": 1, "transport": "verl model_merger", "dtype": "bf16", "source_gb": src_bytes / 1e9,
               "output_gb": ours["output_gb"], "median_s": seconds, "floor_s": ours["floor_s"],
               "ratio": seconds / ours["floor_s"], "peak_rss_mb": max(m for _, m in runs), "times": [t for t, _ in runs]}
        rows.append(row)
        print(f"verl model_merger bf16: {seconds:.2f} s, peak RSS {row['peak_rss_mb']:.0f} MB; "
              f"distmerge is {seconds / ours['median_s']:.1f}x faster in one process", flush=True)
    (ROOT / "bench" / "results.json").write_text(json.dumps(rows, indent=2))
    lines = ["| checkpoint | ranks | transport | dtype | output GB | seconds (median) | floor s | ratio | peak RSS / rank MB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['source']} | {r['ranks']} | {r['transport']} | {r['dtype']} | {r['output_gb']:.2f} | {r['median_s']:.2f} | "
                     f"{r['floor_s']:.2f} | {r['ratio']:.2f} | {r['peak_rss_mb']:.0f} |")
    (ROOT / "bench" / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

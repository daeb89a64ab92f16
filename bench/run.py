"""Benchmark: distmerge against the copy floor on fp32 verl FSDP2 checkpoints of 1.4, ~5 and ~11 GB
(the same Llama widths with 8, 40 and 94 layers), a ~1.5 GB Megatron-core TP2xPP2 checkpoint, and
verl's merger as a baseline; writes bench/results.{json,md} and bench/scaling.png. The ~5 GB
checkpoint is also merged into 2 GB files (`--max-shard-size 2GB`), where ranks write files of
their own; at the default 5GB it is one file, which the ranks share. A DeepSpeed ZeRO-3 save of a
~374M-parameter Llama (2 training ranks, written by real DeepSpeed on CPU) is merged beside
DeepSpeed's own `zero_to_fp32.py --safe_serialization` (same fp32 bytes out). Two torchtitan checkpoints
(torchtitan's own models, FSDP2 over 2 gloo ranks, its CheckpointManager; bench/torchtitan_checkpoint.py)
are merged with --hf-config: a ~2.2 GB Qwen3-MoE (stacked experts split per expert) and a ~1.6 GB Llama 3
(q/k rows reordered within each head). Every row's peak RSS per rank is checked against RSS_BOUND_MB.

    python bench/run.py                          # generate (once), then measure; ~45 minutes on 2 cores
    python bench/run.py --sizes 1.4 --runs 5     # the 1.4 GB checkpoint only
    python bench/run.py --work /fast/disk/bench
    python bench/run.py --sizes "" --no-verl --no-megatron --results-dir /tmp/ds   # the DeepSpeed rows only
    python bench/run.py --sizes "" --no-verl --no-megatron --no-deepspeed --results-name results-torchtitan
                                                 # the torchtitan rows only, into bench/results-torchtitan.{json,md}
    python bench/run.py --sizes "" --no-verl --no-megatron --no-deepspeed --no-torchtitan --scale 8,32,64 \
        --runs 1 --results-name results-scale     # metadata at scale: DeepSeek-V3's tensors saved by W ranks

Floors, measured in the same run, per launch mode:
  one process, and M ranks forked by `merge --local-ranks M`: `python -c "import torch"` + `cat` of the
               source files + `dd` write of the output bytes (the forked ranks get no allowance for starting)
  M ranks under torchrun: torchrun of a script that only creates and destroys the process group + the same cat + dd
Each distmerge configuration is run --runs times, each run followed by its floor; recorded in
bench/results.json and bench/results.md: the median wall time, the median floor, the ratio (the
median of each run's time over the floor measured right after it, which cancels the VM's slow
drifts), and the per-rank peak RSS (VmHWM, each rank's own high-water mark, taken from
distmerge's own summary; for a process started from a small shell it equals the figure
`/usr/bin/time -v` prints).
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
MODEL = ["--model", "llama", "--hidden", "2048", "--heads", "16", "--kv-heads", "4",
         "--intermediate", "2816", "--vocab", "32000", "--meta-init", "--no-reference"]
LAYERS = {"1.4": 8, "5": 40, "11": 94}   # checkpoint GB -> layers (111 MB per layer + 524 MB of embeddings)
# peak RSS per rank at any size (issue 15; issue 19's bound for every rank but the metadata reader): 0.6 GB, in the
# unit of the summary's peak_rss_mb (VmHWM in MiB), so 572
RSS_BOUND_MB = 0.6e9 / 2**20
TORCHTITAN = {"qwen3_moe": "torchtitan Qwen3-MoE W=2 2.2 GB (stacked experts)",
              "llama3": "torchtitan Llama 3 W=2 1.6 GB (permuted q/k)"}   # variant -> row label


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
    """The data files a merge reads: verl rank files, a Megatron checkpoint's .distcp files, or a DeepSpeed
    save's state files (all of them, although the merge reads only the fp32 partitions of the optimizer files)."""
    return (sorted(str(p) for p in ckpt.glob("model_world_size_*.pt")) or sorted(str(p) for p in ckpt.rglob("*.distcp"))
            or sorted(str(p) for p in ckpt.rglob("*_states.pt")))


def floor(ckpt: Path, out_bytes: int, work: Path, ranks: int, launcher: str, computes: bool) -> float:
    """The floor starts from the page-cache state distmerge's run starts from: the previous output
    deleted (its pages freed), the sources warm. On this VM, writing into pages that must first be
    reclaimed from an earlier output was measured up to 10x slower (dd of 1.4 GB: 3.3 s, then 0.3 s).
    Its start is Python with numpy, and torch too where the merge `computes` (a cast, the
    collective transport): a merge that copies bytes needs no torch."""
    shutil.rmtree(work / "out", ignore_errors=True)
    if ranks == 1 or launcher == "fork":
        launch = [PY, "-c", "import torch" if computes else "import numpy"]
    else:
        launch = torchrun(ranks) + [str(ROOT / "bench" / "pg_only.py")]
    quiet = dict(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t = timed(launch, **quiet)
    # warm, as for distmerge's runs: distmerge drops the source pages it has read from the cache
    subprocess.run(["cat"] + source_files(ckpt), check=True, **quiet)
    t += timed(["cat"] + source_files(ckpt), **quiet)
    mb = -(-out_bytes // 2**20)
    t += timed(["dd", "if=/dev/zero", f"of={work / 'dd.out'}", "bs=1M", f"count={mb}"], **quiet)
    os.remove(work / "dd.out")
    return t


def distmerge(ckpt: Path, out: Path, ranks: int, transport: str, dtype: str, launcher: str,
              extra: tuple[str, ...] = ()) -> tuple[float, dict]:
    shutil.rmtree(out, ignore_errors=True)
    summary = out.parent / "summary.json"
    args = ["-m", "distmerge", "merge", "--source", str(ckpt), "--target", str(out), "--transport", transport,
            "--dtype", dtype, "--no-progress", "--summary-json", str(summary), *extra]
    if ranks == 1 or launcher == "fork":
        cmd = [PY] + args + ["--local-ranks", str(ranks)]
    else:
        cmd = torchrun(ranks) + args
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


def verl_merge(py: str, ckpt: Path, out: Path, timeout: float) -> tuple[float, float]:
    """verl's model_merger on the same checkpoint (it writes bf16); wall seconds and max RSS in MB."""
    return time_with_rss([py, "-m", "verl.model_merger", "merge", "--backend", "fsdp", "--local_dir", str(ckpt),
                          "--target_dir", str(out)], out, timeout)


def zero_to_fp32(ckpt: Path, out: Path, timeout: float) -> tuple[float, float]:
    """DeepSpeed's own zero_to_fp32.py, as saved beside the checkpoint (fp32 safetensors); seconds, max RSS in MB."""
    return time_with_rss([PY, str(ckpt / "zero_to_fp32.py"), str(ckpt), str(out), "--safe_serialization"], out, timeout)


def time_with_rss(cmd: list[str], out: Path, timeout: float) -> tuple[float, float]:
    """Wall seconds and max RSS in MB (`/usr/bin/time -f %M`) of a one-process baseline writing into `out`."""
    shutil.rmtree(out, ignore_errors=True)
    subprocess.run(["sync"], check=True)
    start = time.perf_counter()
    try:
        proc = subprocess.run(["/usr/bin/time", "-f", "%M", *cmd], capture_output=True, text=True, cwd=ROOT,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"did not finish in {timeout:.0f} s") from None
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        killed = "Killed" in proc.stderr or proc.returncode in (-9, 137)
        raise RuntimeError(f"killed after {seconds:.0f} s (out of memory)" if killed else proc.stderr[-2000:])
    return seconds, int(proc.stderr.strip().splitlines()[-1]) / 1024


def measure(label: str, ckpt: Path, work: Path, runs: int, configs, dtypes, extra: tuple[str, ...] = ()) -> list[dict]:
    """Time each (ranks, transport, launcher) x dtype configuration `runs` times beside its floor."""
    src_bytes = sum(os.path.getsize(f) for f in source_files(ckpt))
    rows = []
    for dtype in dtypes:
        for ranks, transport, launcher in configs:
            launcher = "python" if ranks == 1 else launcher
            times, floors, ratios, summaries = [], [], [], []
            for _ in range(runs):
                subprocess.run(["cat"] + source_files(ckpt), stdout=subprocess.DEVNULL, check=True)  # warm
                t, summary = distmerge(ckpt, work / "out", ranks, transport, dtype, launcher, extra)
                times.append(t)
                summaries.append(summary)
                computes = dtype != "auto" or (transport == "collective" and ranks > 1)
                floors.append(floor(ckpt, summary["bytes"], work, ranks, launcher, computes))
                ratios.append(t / floors[-1])  # each run against the floor measured right after it
            best = summaries[times.index(statistics.median(times))] if runs % 2 else summaries[-1]
            row = {"source": label, "ranks": ranks, "launcher": launcher, "transport": transport, "dtype": dtype,
                   "source_gb": src_bytes / 1e9,
                   "output_gb": best["bytes"] / 1e9, "median_s": statistics.median(times),
                   "floor_s": statistics.median(floors), "peak_rss_mb": max(max(s["peak_rss_mb"]) for s in summaries),
                   "phases": best["phases"], "stages": best.get("stages", {}), "times": times, "floors": floors,
                   "ratio": statistics.median(ratios), "extra": list(extra), "files": len(best["files"]),
                   "rss_by_rank_mb": [max(s["peak_rss_mb"][i] for s in summaries) for i in range(ranks)]}
            rows.append(row)
            print(f"{label}: {ranks} rank(s) {launcher:8s} {transport:10s} {dtype:4s}: {row['median_s']:.2f} s (floor {row['floor_s']:.2f} s, "
                  f"x{row['ratio']:.2f}), peak RSS/rank {row['peak_rss_mb']:.0f} MB", flush=True)
    return rows


def checkpoint(work: Path, layers: int) -> Path:
    ckpt = work / ("ckpt" if layers == 8 else f"ckpt-{layers}L")
    if not (ckpt / "fsdp_config.json").exists():
        print(f"generating the {layers}-layer benchmark checkpoint ...", flush=True)
        subprocess.run(torchrun(2) + [str(ROOT / "tests" / "make_fsdp_checkpoint.py"), "--out", str(ckpt),
                                      "--layers", str(layers)] + MODEL, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return ckpt


def verl_row(py, ckpt, work, runs, ours, timeout) -> dict:
    """verl's merger beside distmerge's matching row; a run that fails (out of memory) is recorded as such."""
    return baseline_row("verl model_merger", "bf16", lambda out: verl_merge(py, ckpt, out, timeout), work, runs, ours)


def baseline_row(name: str, dtype: str, run_once, work: Path, runs: int, ours: dict) -> dict:
    """A one-process baseline (`run_once(out)` -> seconds, MB) beside distmerge's matching row."""
    times, rss, failure = [], [], None
    for _ in range(runs):
        try:
            t, m = run_once(work / "baseline-out")
        except RuntimeError as e:
            failure = str(e).strip().splitlines()[-1][:200] if str(e).strip() else "failed"
            break
        times.append(t)
        rss.append(m)
    shutil.rmtree(work / "baseline-out", ignore_errors=True)
    row = {"source": ours["source"], "ranks": 1, "launcher": "python", "transport": name, "dtype": dtype,
           "source_gb": ours["source_gb"], "output_gb": ours["output_gb"], "floor_s": ours["floor_s"],
           "median_s": statistics.median(times) if times else None, "peak_rss_mb": max(rss) if rss else None,
           "times": times, "failure": failure}
    row["ratio"] = row["median_s"] / row["floor_s"] if times else None
    print(f"{ours['source']}: {name} {dtype}: " + (f"{row['median_s']:.2f} s, peak RSS {row['peak_rss_mb']:.0f} MB; "
          f"distmerge ({ours['ranks']} rank(s), {ours['launcher']}) is {row['median_s'] / ours['median_s']:.1f}x faster" if times
          else f"failed: {failure}"), flush=True)
    return row


def deepspeed_checkpoint(work: Path) -> Path:
    """A ZeRO-3 save of a ~374M-parameter Llama (hidden 1024, 24 layers, vocab 32000) by 2 training ranks,
    written by real DeepSpeed on CPU; its checkpoint-2/ is what users pass."""
    ckpt = work / "deepspeed" / "z3" / "checkpoint-2"
    if not (ckpt / "latest").exists():
        print("generating the DeepSpeed ZeRO-3 benchmark checkpoint ...", flush=True)
        maker = str(ROOT / "tests" / "make_deepspeed_checkpoint.py")
        args = ["--out", str(work / "deepspeed"), "--variants", "z3", "--big", "--no-reference"]
        subprocess.run(torchrun(2) + [maker] + args, check=True, cwd=ROOT, stdout=subprocess.DEVNULL,
                       env=dict(os.environ, DS_ACCELERATOR="cpu"))
    return ckpt


def deepspeed_rows(work: Path, runs: int) -> list[dict]:
    """distmerge against DeepSpeed's zero_to_fp32.py --safe_serialization on the same save, same (fp32) bytes out."""
    ckpt = deepspeed_checkpoint(work)
    label = "DeepSpeed ZeRO-3 W=2 ~374M"
    rows = measure(label, ckpt, work, runs, [(1, "direct", None), (2, "direct", "fork"), (2, "direct", "torchrun")],
                   ("auto",))
    rows.append(baseline_row("zero_to_fp32.py", "auto", lambda out: zero_to_fp32(ckpt, out, timeout=1200), work, runs,
                             rows[0]))
    return rows


def torchtitan_checkpoint(work: Path, variant: str) -> Path:
    """WORK/torchtitan/VARIANT/ (its checkpoint/step-1/ and hf/), written once by bench/torchtitan_checkpoint.py
    under torchrun with 2 ranks: every variant of TORCHTITAN in one job (about a minute, 4 GB of memory per rank)."""
    ckpt = work / "torchtitan" / variant
    if not (ckpt / "hf" / "config.json").exists():   # written by rank 0 after the save
        print("generating the torchtitan benchmark checkpoints ...", flush=True)
        maker = str(ROOT / "bench" / "torchtitan_checkpoint.py")
        subprocess.run(torchrun(2) + [maker, "--out", str(work / "torchtitan"), "--variants", ",".join(TORCHTITAN)],
                       check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return ckpt


def torchtitan_rows(work: Path, runs: int) -> list[dict]:
    """Each torchtitan checkpoint with 1 rank, 2 forked ranks and 2 torchrun ranks, kept (fp32) and cast to bf16
    (a cast band is read into memory, where a kept one is copied by the kernel)."""
    rows = []
    configs = [(1, "direct", None), (2, "direct", "fork"), (2, "direct", "torchrun")]
    for variant, label in TORCHTITAN.items():
        ckpt = torchtitan_checkpoint(work, variant)
        rows += measure(label, ckpt / "checkpoint" / "step-1", work, runs, configs, ("auto", "bf16"),
                        extra=("--hf-config", str(ckpt / "hf")))
    return rows


def scale_checkpoint(work: Path, world: int) -> Path:
    """WORK/scale/wW: bench/scale.py's DeepSeek-V3 layout (its 45,395 tensor names, small dimensions, 372 MB)
    saved by W ranks as row chunks, 45,395 x W of them; written once (W=64: about 10 minutes)."""
    ckpt = work / "scale" / f"w{world}"
    if not (ckpt / ".metadata").exists():   # written last
        print(f"generating the W={world} DeepSeek-V3-layout checkpoint ...", flush=True)
        subprocess.run([PY, str(ROOT / "bench" / "scale.py"), "make", "--world", str(world), "--dims", "small",
                        "--out", str(ckpt)], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return ckpt


def scale_rows(work: Path, worlds: list[int], runs: int) -> list[dict]:
    """Metadata at scale (issue 19): each W merged by 2 forked ranks, rank 0 the metadata reader. The reader's
    peak RSS is its own figure (the catalogue of every chunk passes through it); the bound is for the others."""
    rows = []
    for world in worlds:
        label = f"DeepSeek-V3 layout W={world} ({45395 * world:,} chunks)"
        rows += measure(label, scale_checkpoint(work, world), work, runs, [(2, "direct", "fork")], ("auto",))
    return rows


def over_bound(rows: list[dict]) -> list[str]:
    """The rows whose peak RSS per rank passed RSS_BOUND_MB, as 'label, N rank(s) launcher dtype: MB'; in the
    scale rows, the ranks but the metadata reader (rank 0)."""
    def peak(r):
        return max(r["rss_by_rank_mb"][1:]) if r["source"].startswith("DeepSeek-V3 layout") else r["peak_rss_mb"]
    return [f"{r['source']}, {r['ranks']} rank(s) {r['launcher']} {r['dtype']}: {peak(r):.0f} MB"
            for r in rows if r["transport"] in ("direct", "collective") and peak(r) > RSS_BOUND_MB]


def plot(rows, path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4))
    series = {}
    for r in rows:
        if not r["source"].startswith("verl FSDP2") or r["median_s"] is None or r.get("extra"):
            continue
        key = ("verl model_merger (bf16)" if r["transport"] == "verl model_merger"
               else f"distmerge {r['ranks']} rank(s) {r['launcher']} {r['transport']} {r['dtype']}")
        series.setdefault(key, []).append((r["source_gb"], r["median_s"], r["peak_rss_mb"]))
    for key, points in sorted(series.items()):
        points.sort()
        style = "--" if key.startswith("verl") else "-"
        ax_t.plot([p[0] for p in points], [p[1] for p in points], style, marker="o", label=key)
        ax_m.plot([p[0] for p in points], [p[2] / 1024 for p in points], style, marker="o", label=key)
    floors = sorted({(r["source_gb"], r["floor_s"]) for r in rows if r["source"].startswith("verl FSDP2")
                     and r["ranks"] == 1 and r["dtype"] == "auto" and r["transport"] == "direct" and not r.get("extra")})
    ax_t.plot([f[0] for f in floors], [f[1] for f in floors], ":", color="gray", label="floor, 1 process (fp32 out)")
    ax_t.set(xlabel="checkpoint GB (fp32)", ylabel="seconds (median of runs)", title="time")
    ax_m.set(xlabel="checkpoint GB (fp32)", ylabel="peak RSS per rank, GB", title="memory")
    ax_t.legend(fontsize=7)
    ax_m.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print("wrote", path)


def out_gb(row: dict) -> str:
    return f"{row['output_gb']:.2f}" + (f" ({row['files']})" if row.get("files") else "")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--work", default=str(ROOT / "bench" / "work"))
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--sizes", default="1.4,5,11", help="checkpoint sizes in GB, of " + ", ".join(LAYERS))
    p.add_argument("--no-verl", action="store_true", help="skip verl's model_merger baseline")
    p.add_argument("--no-megatron", action="store_true")
    p.add_argument("--no-deepspeed", action="store_true", help="skip the DeepSpeed ZeRO-3 rows (zero_to_fp32 baseline)")
    p.add_argument("--no-torchtitan", action="store_true", help="skip the torchtitan rows (Qwen3-MoE, Llama 3)")
    p.add_argument("--scale", default="", metavar="W,W,...",
                   help="metadata at scale: DeepSeek-V3-layout checkpoints saved by these rank counts (e.g. 8,32,64)")
    p.add_argument("--results-dir", default=str(ROOT / "bench"), help="where results.{json,md} and scaling.png go")
    p.add_argument("--results-name", default="results", help="the results files' name: NAME.json and NAME.md")
    args = p.parse_args()
    work = Path(args.work)
    py = None if args.no_verl else verl_python(work)
    rows = []
    for size in filter(None, args.sizes.split(",")):
        ckpt = checkpoint(work, LAYERS[size])
        label = f"verl FSDP2 {size} GB"
        configs = [(1, "direct", None), (2, "direct", "fork"), (2, "direct", "torchrun"), (2, "collective", "torchrun")]
        new = measure(label, ckpt, work, args.runs, configs, ("auto", "bf16"))
        rows += new
        if py:  # verl against distmerge writing the same bytes: 1 process at 1.4 GB, 2 (forked) ranks above
            ours = next(r for r in new if r["dtype"] == "bf16" and r["ranks"] == (1 if size == "1.4" else 2)
                        and r["transport"] == "direct" and r["launcher"] in ("python", "fork"))
            rows.append(verl_row(py, ckpt, work, 1 if size == "11" else args.runs, ours, timeout=1200))
        if size == "5":  # ranks writing files of their own: a file takes one buffered write at a time
            rows += measure(f"{label} into 2 GB files", ckpt, work, args.runs, configs[:2], ("auto", "bf16"),
                            extra=("--max-shard-size", "2GB"))
    if not args.no_megatron:
        megatron = work / "megatron"
        if not (megatron / "dist_ckpt" / "metadata.json").exists():
            print("generating the Megatron TP2xPP2 benchmark checkpoint ...", flush=True)
            subprocess.run(torchrun(4) + [str(ROOT / "tests" / "make_megatron_checkpoint.py"), "--out", str(megatron)]
                           + MEGATRON_MODEL, check=True, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        rows += measure("Megatron TP2xPP2 1.4 GB", megatron, work, args.runs,
                        [(1, "direct", None), (2, "direct", "fork"), (2, "direct", "torchrun")], ("auto",))
    if not args.no_deepspeed:
        rows += deepspeed_rows(work, args.runs)
    if not args.no_torchtitan:
        rows += torchtitan_rows(work, args.runs)
    if args.scale:
        rows += scale_rows(work, [int(w) for w in args.scale.split(",")], args.runs)
    write_results(rows, Path(args.results_dir), args.results_name)


def write_results(rows: list[dict], results: Path, name: str) -> None:
    """NAME.json (every row, every run), NAME.md (the table, the bound, the phases) and, with verl FSDP rows,
    the plot scaling.png."""
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{name}.json").write_text(json.dumps(rows, indent=2))
    lines = ["| checkpoint | ranks | launcher | transport | dtype | output GB (files) | seconds (median) | floor s "
             "| ratio | peak RSS / rank MB |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        head = f"| {r['source']} | {r['ranks']} | {r['launcher']} | {r['transport']} | {r['dtype']} | {out_gb(r)} | "
        if r["median_s"] is None:
            lines.append(head + f"failed: {r['failure']} | {r['floor_s']:.2f} | - | - |")
            continue
        lines.append(head + f"{r['median_s']:.2f} | {r['floor_s']:.2f} | {r['ratio']:.2f} | {r['peak_rss_mb']:.0f} |")
    over = over_bound(rows)
    lines += ["", f"Peak RSS per rank (the highest of every run of a row) against the bound of 0.6 GB "
              f"({RSS_BOUND_MB:.0f} in the table's MB, which are MiB): "
              + ("over it in " + "; ".join(over) if over else "within it in every distmerge row") + ".", ""]
    lines += ["Seconds per stage (rank 0) and per phase (each rank) of the median run, from the job's own summary:", ""]
    for r in rows:
        if r.get("phases"):
            stages = "stages: " + ", ".join(f"{k} {v:.2f}" for k, v in r.get("stages", {}).items())
            phases = "; ".join([stages] + [f"rank {i}: " + ", ".join(f"{k} {v:.2f}" for k, v in sorted(ph.items()))
                                           for i, ph in enumerate(r["phases"])])
            lines.append(f"- {r['source']}, {r['ranks']} rank(s) {r['launcher']} {r['transport']} {r['dtype']}: "
                         + phases + "; peak RSS by rank MB: " + ", ".join(f"{m:.0f}" for m in r["rss_by_rank_mb"]))
    (results / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if any(r["source"].startswith("verl FSDP2") for r in rows):
        plot(rows, results / "scaling.png")


if __name__ == "__main__":
    main()

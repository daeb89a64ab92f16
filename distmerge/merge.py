"""The merge job: detect -> map -> plan -> run -> finish, the same code for 1 or N ranks."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field

from . import runtime as runtime_mod
from .arch import find_adapters, hf, load_config, lora, map_outputs
from .errors import MergeError, MergeVerifyError
from .finish import (acquire_lock, check_sizes, check_target, copy_hf_files, prepare_staging, publish, release_lock,
                     remove_run_records, staging_dir, verified_done_files, write_adapter_config, write_index)
from .gather import RankRunner
from .integrity import fingerprint, manifest_files, write_manifest
from .model import DTYPE_NAMES
from .plan import make_plan, parse_size
from .progress import Progress
from .sources import read_source

log = logging.getLogger("distmerge")

TRANSPORTS = ("collective", "direct")
DEFAULT_TRANSPORT = "direct"  # chosen by measurement: see README "Transports"


@dataclass
class MergeOptions:
    source: str
    target: str
    dtype: str = "auto"
    max_shard_size: str = "5GB"
    segment_size: str = "256MiB"
    transport: str = DEFAULT_TRANSPORT
    overwrite: bool = False
    lora: str = "merge"
    lora_alpha: float | None = None
    resume: bool = False
    verify: bool = False
    fsync: bool = False                   # fsync every weight file (the index, config and dirs always are)
    hf_upload_path: str | None = None     # ORG/NAME: upload after the self-check passed
    private: bool = False
    trust_remote_code: bool = False
    tie_word_embedding: bool = False      # verl's flags: accepted, checked against config.json
    is_value_model: bool = False
    hf_config: str | None = None
    iteration: int | None = None
    backend: str = "auto"
    timeout: float = 1800.0
    progress: bool = True


@dataclass
class MergeResult:
    target: str
    files: list[str]
    bytes: int
    tensors: int
    ranks: int
    seconds: float
    hashes: dict[str, dict] = field(default_factory=dict)  # file -> {"bytes", "segments": [[start, end, xxh3-128]]}
    kept: list[str] = field(default_factory=list)          # segments (file or file[k]) a --resume kept
    warnings: list[str] = field(default_factory=list)
    verified: bool | None = None                                   # the --verify self-check passed
    uploaded: str | None = None                                    # the Hub repo URL (--hf-upload-path)
    phases: list[dict] = field(default_factory=list)   # per rank: {"read": s, "write": s, ...}
    stages: dict = field(default_factory=dict)          # rank 0: {"start-up": s, "catalogue": s, "plan": s, ...}
    files_by_rank: list[list[str]] = field(default_factory=list)  # what each rank actually wrote
    peak_rss_mb: list[float] = field(default_factory=list)        # per rank, at the end of its writes

    def to_dict(self) -> dict:
        return asdict(self)


def cast_rule(dtype: str):
    """auto keeps every tensor's dtype; a named dtype casts floating tensors only."""
    if dtype == "auto":
        return lambda d: d
    if dtype not in DTYPE_NAMES:
        raise MergeError(f"--dtype {dtype} is not one of auto, {', '.join(DTYPE_NAMES)}")
    target = DTYPE_NAMES[dtype]
    return lambda d: target if d.is_floating_point else d


@contextlib.contextmanager
def intra_op_threads(ranks_on_this_machine: int):
    """torch threads for the casts and copies: half this rank's share of the cores (the other half
    reads and writes). torch's default, every core, is 2-3x slower for casts on a small machine,
    where those threads fight the rank's own reader and writer. An explicit OMP_NUM_THREADS wins."""
    import torch

    before = torch.get_num_threads()
    if "OMP_NUM_THREADS" not in os.environ:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        torch.set_num_threads(max(1, cores // (2 * max(1, ranks_on_this_machine))))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def seconds_line(named_seconds) -> str:
    """`read 0.35s  write 0.49s`: one line of the summary."""
    return "  ".join(f"{name} {s:.2f}s" for name, s in named_seconds)


class Stages:
    """Wall seconds of the job's stages on this rank, beside the run stage's own phases: the time
    a merge takes outside reading and writing has a name in the summary."""

    def __init__(self, start_up: float | None):
        self.seconds: dict[str, float] = {} if start_up is None else {"start-up": start_up}
        self.last = time.perf_counter()

    def done(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = self.seconds.get(name, 0.0) + now - self.last
        self.last = now


def run_merge(opts: MergeOptions, start_up: float | None = None) -> MergeResult:
    """The whole job on this rank; `start_up` is the CLI's start-up time, for the summary."""
    start = time.perf_counter()
    stages = Stages(start_up)
    if opts.lora not in lora.MODES:
        raise MergeError(f"--lora {opts.lora} is not one of {', '.join(lora.MODES)}")
    if opts.transport not in TRANSPORTS:
        raise MergeError(f"--transport {opts.transport} is not one of {', '.join(TRANSPORTS)}")
    max_shard_size = parse_size(opts.max_shard_size)
    cast = cast_rule(opts.dtype)
    source_kind = opts.backend if opts.backend in ("fsdp", "megatron") else None  # verl's --backend
    rt = runtime_mod.start("auto" if source_kind else opts.backend, opts.timeout)
    stages.done("process group")
    lock, warnings = None, []
    try:
        # detect -> map -> plan: metadata only, the same on every rank, so every rank stops at the
        # same bad input before anything is written
        catalogue = read_source(opts.source, opts.iteration)
        hf_dir = opts.hf_config or catalogue.hf_dir
        config = load_config(hf_dir, opts.source)
        warnings += check_verl_flags(opts, source_kind, catalogue.format, config)
        adapters = find_adapters(catalogue, opts.lora_alpha)
        outputs = map_outputs(catalogue, config, cast, adapters, opts.lora)
        stages.done("catalogue")
        extra = None
        if adapters and opts.lora in ("adapter", "both"):
            extra = {lora.ADAPTER_FILE: lora.adapter_outputs(catalogue, adapters, cast)}
        plan = make_plan(catalogue, outputs, rt.world_size, max_shard_size, opts.transport,
                         config_dtype=None if opts.dtype == "auto" else DTYPE_NAMES[opts.dtype], extra_files=extra,
                         segment_bytes=parse_size(opts.segment_size))
        check_target(opts.target, opts.source, opts.overwrite)
        job = fingerprint(catalogue, plan, {"lora": opts.lora, "lora_scale": adapters.scale} if adapters else {})

        def take_target():  # rank 0 alone; its refusal reaches every rank
            nonlocal lock
            log.info("%s: %s, %d tensors, mesh %s; writing %d file(s) with %d rank(s), transport %s",
                     opts.source, catalogue.format, len(catalogue.tensors), catalogue.mesh,
                     len(plan.files), rt.world_size, plan.transport if rt.world_size > 1 else "direct")
            lock = acquire_lock(opts.target)
            warnings.extend(prepare_staging(opts.target, job, opts.resume))
        rt.on_rank0(take_target)
        staging = staging_dir(opts.target)
        stages.done("plan")

        # run: a --resume keeps the files a crashed run finished (each rank checks its own)
        kept = rt.gather_dicts(verified_done_files(plan, staging, rt.rank) if opts.resume else {})
        progress = Progress(staging, rt.rank, rt.world_size, plan.total_bytes, opts.progress)
        progress(sum(seg.end - seg.start for f, seg in plan.segments_of(rt.rank) if plan.segment_name(f, seg) in kept))
        try:
            with intra_op_threads(int(os.environ.get("LOCAL_WORLD_SIZE", rt.world_size))):
                stats = RankRunner(plan, catalogue, staging, rt, progress, skip=set(kept), fsync=opts.fsync).run()
        except MergeError as e:
            e.all_ranks = False  # this rank's own failure: it must speak for itself
            raise
        finally:
            progress.close(plan.total_bytes)
        all_stats = rt.gather_objects(stats)
        hashes = dict(kept)
        for s in all_stats:
            hashes.update(s["hashes"])
        manifest = manifest_files(plan, hashes)
        stages.done("run")

        # finish: rank 0 alone, after every rank's files are closed
        verified = uploaded = None

        def finish():
            nonlocal verified, uploaded
            check_sizes(plan, staging)
            write_index(plan, staging)
            copy_hf_files(hf_dir, staging, config, plan)
            if extra:
                write_adapter_config(staging, lora.ADAPTER_DIR, lora.adapter_config(adapters))
            write_manifest(staging, manifest)
            if opts.verify or opts.hf_upload_path:  # an upload only ever follows a passed self-check
                verified = self_check(staging, opts.target, opts.trust_remote_code)
            remove_run_records(staging)
            publish(staging, opts.target, opts.overwrite)
            if opts.hf_upload_path:
                from .upload import upload
                uploaded = upload(opts.target, opts.hf_upload_path, opts.private)
        rt.on_rank0(finish)
        stages.done("finish")
    finally:
        if lock:
            release_lock(lock)
        rt.close()
    seconds = time.perf_counter() - start
    result = MergeResult(target=opts.target, files=[f.name for f in plan.files], bytes=plan.total_bytes,
                         tensors=sum(len(f.entries) for f in plan.files), ranks=rt.world_size,
                         seconds=seconds, hashes=manifest, kept=sorted(kept), warnings=warnings, verified=verified,
                         uploaded=uploaded,
                         phases=[s["seconds"] for s in all_stats], stages=stages.seconds,
                         files_by_rank=[s["files"] for s in all_stats],
                         peak_rss_mb=[s["peak_rss_mb"] for s in all_stats])
    if rt.rank == 0:
        if kept:
            log.info("resumed: kept %d verified segment(s) of the earlier run, wrote %d", len(kept),
                     sum(len(f.segments) for f in plan.files) - len(kept))
        log.info("merged %.3f GB into %d file(s) in %s with %d rank(s) in %.2f s (%.2f GB/s)",
                 result.bytes / 1e9, len(result.files), opts.target, rt.world_size, seconds,
                 result.bytes / 1e9 / max(seconds, 1e-9))
        log.info("  stages: %s", seconds_line(result.stages.items()))
        for r, phases in enumerate(result.phases):
            log.info("  rank %d: %s  peak RSS %.0f MB", r, seconds_line(sorted(phases.items())) or "idle",
                     result.peak_rss_mb[r])
    return result


def check_verl_flags(opts: MergeOptions, source_kind: str | None, source_format: str, config: dict) -> list[str]:
    """verl's --backend fsdp|megatron must match the source; --tie-word-embedding and
    --is-value-model are checked against config.json, which decides (a warning if they disagree)."""
    if source_kind and not source_format.startswith("megatron" if source_kind == "megatron" else "verl-fsdp"):
        raise MergeError(f"--backend {source_kind} (verl's flag) but {opts.source} is a {source_format} checkpoint; "
                         "drop --backend: distmerge detects the format")
    warnings = []
    tied = hf.tie_word_embeddings(config)
    if opts.tie_word_embedding and not tied:
        warnings.append("--tie-word-embedding was given but config.json says tie_word_embeddings=false; "
                        "following config.json (lm_head.weight is written)")
    arch = (config.get("architectures") or ["?"])[0]
    if opts.is_value_model and not hf.is_value_model(config):
        warnings.append(f"--is-value-model was given but config.json's architecture is {arch}; following "
                        "config.json (for a critic, use a config with *ForTokenClassification and num_labels=1)")
    for w in warnings:
        log.warning("%s", w)
    return warnings


def self_check(staging: str, target: str, trust_remote_code: bool = False) -> bool:
    """`distmerge verify` on the staging directory before it is published. It runs in a child
    process: transformers (config, tokenizer, the meta-device model) never enters a merge rank,
    so it adds nothing to the rank's memory and leaves no threads behind in it."""
    from .verify import Report

    proc = subprocess.run([sys.executable, "-m", "distmerge", "verify", staging, "--allow-incomplete", "--json"]
                          + (["--trust-remote-code"] if trust_remote_code else []), capture_output=True, text=True)
    try:
        fields = json.loads(proc.stdout)
        fields.pop("ok")
        report = Report(**fields)
    except (ValueError, KeyError, TypeError):  # the check itself failed to run
        raise MergeVerifyError(f"--verify could not check {staging}, so {target} was not published: "
                               f"{proc.stderr.strip()[-500:]}") from None
    log.info("%s", report.render())
    if report.ok:
        return True
    raise MergeVerifyError(f"--verify found problems in the merged files, so {target} was not published; "
                           f"they are in {staging}: " + "; ".join(report.problems[:5]))


def merge(source: str, target: str, **options) -> MergeResult:
    """Python API: merge a sharded checkpoint into an HF directory (inside or outside torchrun)."""
    return run_merge(MergeOptions(source=str(source), target=str(target), **options))

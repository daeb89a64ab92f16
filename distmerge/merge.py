"""The merge job: detect -> map -> plan -> run -> finish, the same code for 1 or N ranks."""
from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, field

from . import runtime as runtime_mod
from .arch import lora
from .errors import MergeError
from .engine import RankRunner
from .finish import (acquire_lock, check_sizes, check_target, copy_hf_files, hf_files, prepare_staging, publish,
                     release_lock, remove_run_records, staging_dir, verified_done_files, write_adapter_config,
                     write_index)
from .integrity import fingerprint, manifest_files, write_manifest
from .dtypes import CAST_NAMES
from .model import Plan
from .plan import make_plan, parse_size
from .prepare import Prepared, PrepareOptions, check_choices, prepare
from .progress import Progress
from .runtime import intra_op_threads
from .scatter import scatter_shares
from .selfcheck import self_check
from .summary import log_summary
from .verl_compat import check_verl_flags, source_kind

log = logging.getLogger("distmerge")

TRANSPORTS = ("collective", "direct")
DEFAULT_TRANSPORT = "direct"  # chosen by measurement: see docs/performance.md "Transports"


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
    zero_weights: str = "master"          # DeepSpeed ZeRO-1/2: fp32 master weights or the 16-bit module
    untie_word_embeddings: bool = False   # keep a head trained apart from the embedding; config says untied
    vocab_size: int | None = None         # a Megatron checkpoint without config.json: the true vocabulary
    base: str | None = None               # a LoRA-only checkpoint: the HF model its adapters belong to
    backend: str = "auto"
    timeout: float = 1800.0
    progress: bool = True


@dataclass
class MergeResult:
    target: str
    files: list[str]
    bytes: int                   # tensor data the run stage wrote; each file's size on disk is hashes[f]["bytes"]
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
    replaced: bool = False                                         # --overwrite replaced an earlier target

    def to_dict(self) -> dict:
        return asdict(self)


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


def check_options(opts: MergeOptions) -> None:
    """What can be refused before a process group exists."""
    check_choices(opts.lora, opts.dtype)
    if opts.transport not in TRANSPORTS:
        raise MergeError(f"--transport {opts.transport} is not one of {', '.join(TRANSPORTS)}")
    parse_size(opts.max_shard_size)
    parse_size(opts.segment_size)


class MergeJob:
    """One merge on this rank, stage by stage: prepare -> plan -> run -> finish. Each stage reads
    what the earlier ones left on the object; none reaches back into the source's files."""

    def __init__(self, opts: MergeOptions, rt, stages: Stages):
        self.opts, self.rt, self.stages = opts, rt, stages
        self.lock: str | None = None
        self.warnings: list[str] = []
        self.kept: dict[str, str] = {}
        self.verified: bool | None = None
        self.uploaded: str | None = None
        self.replaced = False

    def prepare(self) -> None:
        """detect -> validate -> map, on the reader rank (rank 0) alone: metadata only. A refusal
        there reaches every rank, so every rank stops at the same bad input before anything is
        written. The other ranks get their share of the result in plan()."""
        self.p: Prepared | None = None
        self.rt.on_rank0(self._prepare_here)
        self.stages.done("catalogue")

    def _prepare_here(self) -> None:
        o = self.opts
        self.p = prepare(o.source, PrepareOptions(
            hf_config=o.hf_config, iteration=o.iteration, dtype=o.dtype, lora=o.lora, lora_alpha=o.lora_alpha,
            zero_weights=o.zero_weights, untie_word_embeddings=o.untie_word_embeddings, vocab_size=o.vocab_size,
            base=o.base))
        self.warnings += check_verl_flags(o.source, source_kind(o.backend), self.p.format, self.p.config,
                                          o.tie_word_embedding, o.is_value_model)

    def plan(self) -> None:
        """The reader plans, takes the target and sends each rank its share (scatter.py): the plan,
        and the pieces of the tensors it writes. From here on every rank, the reader included,
        holds only its share of the catalogue."""
        self.rt.on_rank0(self._plan_here)
        share = scatter_shares(self.rt, self.p, getattr(self, "plan_", None))
        self.p, self.plan_ = share.prepared, share.plan
        self.staging = staging_dir(self.opts.target)
        self.stages.done("plan")

    def _plan_here(self) -> None:
        o, p = self.opts, self.p
        self.plan_: Plan = make_plan(p.catalogue, p.outputs, self.rt.world_size, parse_size(o.max_shard_size),
                                     o.transport, config_dtype=None if o.dtype == "auto" else CAST_NAMES[o.dtype],
                                     extra_files=p.extra or None, segment_bytes=parse_size(o.segment_size))
        if o.hf_upload_path and not self.plan_.model_files:
            raise MergeError(f"{o.source} holds LoRA adapters only: without --base the target gets the PEFT "
                             "adapter alone, which --hf-upload-path does not publish as a model; pass --base HF_DIR")
        check_target(o.target, o.source, o.overwrite)
        hf_files(p.hf_dir, **self._hf_file_rules())  # refused now, before any data is written, not at finish
        lora_opts = {"lora": o.lora, "lora_scale": p.adapters.scale} if p.adapters else {}
        self.job = fingerprint(p.catalogue, self.plan_, lora_opts)
        self._take_target()

    def _take_target(self) -> None:
        """Rank 0 alone (in _plan_here); its refusal reaches every rank."""
        o, c, plan = self.opts, self.p.catalogue, self.plan_
        log.info("%s: %s, %d tensors, mesh %s; writing %d file(s) with %d rank(s), transport %s",
                 o.source, c.format, len(c.tensors), c.mesh, len(plan.files), self.rt.world_size,
                 plan.transport if self.rt.world_size > 1 else "direct")
        self.lock = acquire_lock(o.target)
        self.warnings.extend(prepare_staging(o.target, self.job, o.resume))

    def run(self) -> None:
        """Each rank writes its segments; a --resume keeps the ones a crashed run finished."""
        plan, rt = self.plan_, self.rt
        self.kept = rt.gather_dicts(verified_done_files(plan, self.staging, rt.rank) if self.opts.resume else {})
        progress = Progress(self.staging, rt.rank, rt.world_size, plan.total_bytes, self.opts.progress)
        progress(sum(seg.end - seg.start for f, seg in plan.segments_of(rt.rank)
                     if plan.segment_name(f, seg) in self.kept))
        try:
            with intra_op_threads(int(os.environ.get("LOCAL_WORLD_SIZE", rt.world_size))):
                stats = RankRunner(plan, self.p.catalogue, self.staging, rt, progress, skip=set(self.kept),
                                   fsync=self.opts.fsync).run()
        except MergeError as e:
            e.all_ranks = False  # this rank's own failure: it must speak for itself
            raise
        finally:
            progress.close(plan.total_bytes)
        self.all_stats = rt.gather_objects(stats)
        hashes = dict(self.kept)
        for s in self.all_stats:
            hashes.update(s["hashes"])
        self.manifest = manifest_files(plan, hashes)
        self.stages.done("run")

    def finish(self) -> None:
        self.rt.on_rank0(self._finish_on_rank0)
        self.stages.done("finish")

    def _finish_on_rank0(self) -> None:
        """After every rank's files are closed: index, config, tokenizer, manifest, self-check, rename."""
        o, p, plan, staging = self.opts, self.p, self.plan_, self.staging
        check_sizes(plan, staging)
        if plan.model_files:  # none: an adapter-only checkpoint without --base writes lora_adapter/ alone
            write_index(plan, staging)
            copy_hf_files(p.hf_dir, staging, p.config, plan, **self._hf_file_rules())
        elif o.verify:
            self.warnings.append(f"--verify: {o.target} holds the PEFT adapter alone, not a model to self-check "
                                 "(pass --base HF_DIR to write the model as well)")
            log.warning("%s", self.warnings[-1])
        if p.extra:
            write_adapter_config(staging, lora.ADAPTER_DIR, lora.adapter_config(p.adapters))
        write_manifest(staging, self.manifest)
        if (o.verify or o.hf_upload_path) and plan.model_files:  # an upload only ever follows a passed self-check
            self.stages.done("finish")
            self.verified = self_check(staging, o.target, o.trust_remote_code)
            self.stages.done("self-check")
        remove_run_records(staging)
        self.replaced = publish(staging, o.target, o.overwrite)
        if o.hf_upload_path:
            from .upload import upload
            self.stages.done("finish")
            self.uploaded = upload(o.target, o.hf_upload_path, o.private)
            self.stages.done("upload")

    def _hf_file_rules(self) -> dict:
        """A directory the user named may hold symlinks; a format's training files are skipped only
        in the directory the format found."""
        p = self.p
        return {"explicit": bool(self.opts.hf_config),
                "skip": p.catalogue.hf_skip if p.hf_dir == p.catalogue.hf_dir else ()}

    def close(self) -> None:
        if self.lock:
            release_lock(self.lock)
        self.rt.close()

    def result(self, seconds: float) -> MergeResult:
        plan, stats = self.plan_, self.all_stats
        return MergeResult(target=self.opts.target, files=[f.name for f in plan.files], bytes=plan.total_bytes,
                           tensors=sum(len(f.entries) for f in plan.files), ranks=self.rt.world_size,
                           seconds=seconds, hashes=self.manifest, kept=sorted(self.kept), warnings=self.warnings,
                           verified=self.verified, uploaded=self.uploaded, replaced=self.replaced,
                           phases=[s["seconds"] for s in stats], stages=self.stages.seconds,
                           files_by_rank=[s["files"] for s in stats], peak_rss_mb=[s["peak_rss_mb"] for s in stats])


def run_merge(opts: MergeOptions, start_up: float | None = None) -> MergeResult:
    """The whole job on this rank; `start_up` is the CLI's start-up time, for the summary."""
    start = time.perf_counter()
    stages = Stages(start_up)
    check_options(opts)
    rt = runtime_mod.start("auto" if source_kind(opts.backend) else opts.backend, opts.timeout)
    stages.done("process group")
    job = MergeJob(opts, rt, stages)
    try:
        job.prepare()
        job.plan()
        job.run()
        job.finish()
    finally:
        job.close()
    result = job.result(time.perf_counter() - start)
    return result


def merge(source: str, target: str, **options) -> MergeResult:
    """Python API: merge a sharded checkpoint into an HF directory (inside or outside torchrun)."""
    known = set(MergeOptions.__dataclass_fields__) - {"source", "target"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(f"distmerge.merge() got unknown option(s) {', '.join(unknown)}; "
                        f"it takes {', '.join(sorted(known))}")
    result = run_merge(MergeOptions(source=str(source), target=str(target), **options))
    if int(os.environ.get("RANK", "0")) == 0:
        log_summary(result)  # the CLI logs its own, with the wall time since the command started
    return result

"""`distmerge inspect SOURCE`: what the checkpoint holds and the merge plan, from metadata only."""
from __future__ import annotations

import json
from collections import Counter

from .arch.config import architecture
from .merge import DEFAULT_TRANSPORT
from .model import dtype_str
from .plan import describe, make_plan, parse_size
from .prepare import PrepareOptions, prepare


def skipped_files(source: str) -> list[str]:
    """Files beside the weights that a merge never reads (verl: optimizer and extra state)."""
    import os

    names = os.listdir(source)
    found = []
    kinds = (("optim_world_size_", "optimizer state"), ("extra_state_world_size_", "extra state (RNG, scheduler)"))
    for prefix, what in kinds:
        n = sum(name.startswith(prefix) for name in names)
        if n:
            found.append(f"{n} {prefix}*.pt files ({what})")
    return found


def idle_ranks(plan, segment_size: str) -> tuple[list[int], str]:
    """The ranks the plan gives nothing to write, and why: a rank's work is whole segments (a file
    cut at tensor boundaries into pieces of at most --segment-size), so a model with fewer segments
    than ranks leaves the others idle."""
    busy = {seg.rank for f in plan.files for seg in f.segments}
    idle = [r for r in range(plan.world_size) if r not in busy]
    if not idle:
        return [], ""
    segments = sum(len(f.segments) for f in plan.files)
    return idle, (f"the plan has {segments} segment(s) ({len(plan.files)} file(s) cut at tensor boundaries into "
                  f"pieces of at most --segment-size {segment_size}) for {plan.world_size} ranks; a smaller "
                  f"--segment-size shares the work out, or run fewer ranks (--nproc {len(busy)})")


def dropped_and_trimmed(catalogue, outputs) -> tuple[list[str], list[str]]:
    """Source tensors no output takes (optimizer leftovers, a tied head), and outputs that take
    fewer rows than their source holds (vocab padding)."""
    kept = set().union(*(t.sources for t in outputs))
    folded = {s for t in outputs if t.lora for s in (t.lora.a, t.lora.b)}
    dropped = [n + (" (tied to the embedding)" if n == "lm_head.weight" else "")
               for n in catalogue.tensors if n not in kept and n not in folded]
    trimmed = []
    for t in outputs:
        if len(t.parts) == 1 and not t.parts[0].index and t.shape:
            part, rows = t.parts[0], catalogue.tensors[t.parts[0].source].shape[0]
            if part.stop - part.start < rows:
                head = "embed" in t.name or t.name in ("lm_head.weight", "score.weight")
                why = "vocab padding" if head else "unused rows"
                trimmed.append(f"{part.source} {rows} -> {part.stop - part.start} rows ({why})")
    return dropped, trimmed


def plan_info(plan, nproc: int, segment_size: str) -> dict:
    idle, why_idle = idle_ranks(plan, segment_size)
    files = [{"name": f.name, "bytes": f.size, "tensors": len(f.entries),
              "segments": [{"rank": seg.rank, "tensors": seg.stop - seg.first, "bytes": seg.end - seg.start}
                           for seg in f.segments]} for f in plan.files]
    return {"ranks": nproc, "files": files, "idle_ranks": idle, "idle_reason": why_idle or None}


def inspect_info(source: str, p, plan, nproc: int, segment_size: str) -> dict:
    catalogue, adapters = p.catalogue, p.adapters
    dropped, trimmed = dropped_and_trimmed(catalogue, p.outputs)
    dtypes = Counter()
    for t in catalogue.tensors.values():
        dtypes[dtype_str(t.dtype)] += t.nbytes
    return {
        "source": source, "format": catalogue.format, "world_size": catalogue.world_size, "mesh": catalogue.mesh,
        "architecture": architecture(p.config),
        "source_tensors": len(catalogue.tensors), "source_bytes": sum(t.nbytes for t in catalogue.tensors.values()),
        "dtypes": dict(dtypes), "dropped": dropped, "trimmed": trimmed,
        "skipped": list(catalogue.notes) + skipped_files(source),
        "metadata_read": "rank 0 (--check-all: all)" if catalogue.partial else "every file",
        "lora": None if adapters is None else {"r": adapters.r, "alpha": adapters.alpha,
                                               "target_modules": adapters.target_modules,
                                               "adapted": len(adapters.factors)},
        "plan": plan_info(plan, nproc, segment_size),
    }


def render(info: dict, plan) -> str:
    lora, idle = info["lora"], info["plan"]["idle_ranks"]
    return "\n".join([
        f"source        {info['source']}",
        f"format        {info['format']}, world size {info['world_size']}, mesh {info['mesh']}",
        f"architecture  {info['architecture']}",
        f"tensors       {info['source_tensors']}, {info['source_bytes'] / 1e9:.3f} GB "
        f"({', '.join(f'{k} {v / 1e9:.3f} GB' for k, v in info['dtypes'].items())})",
        f"dropped       {', '.join(info['dropped']) or 'nothing'}",
        f"trimmed       {', '.join(info['trimmed']) or 'nothing'}",
        f"skipped       {', '.join(info['skipped']) or 'nothing'}",
        *([f"lora          r={lora['r']} alpha={lora['alpha']:g} on {lora['adapted']} modules "
           f"({', '.join(lora['target_modules'])}); --lora merge folds them"] if lora else []),
        describe(plan),
        *([f"  rank(s) {', '.join(map(str, idle))}: idle: {info['plan']['idle_reason']}"] if idle else [])])


def inspect_source(source: str, nproc: int = 1, max_shard_size: str = "5GB", dtype: str = "auto",
                   hf_config: str | None = None, iteration: int | None = None, as_json: bool = False,
                   lora_alpha: float | None = None, check_all: bool = False, segment_size: str = "256MiB",
                   vocab_size: int | None = None, base: str | None = None, zero_weights: str = "master") -> str:
    p = prepare(source, PrepareOptions(hf_config=hf_config, iteration=iteration, quick=not check_all, dtype=dtype,
                                       lora_alpha=lora_alpha, vocab_size=vocab_size, base=base,
                                       zero_weights=zero_weights))
    plan = make_plan(p.catalogue, p.outputs, nproc, parse_size(max_shard_size), DEFAULT_TRANSPORT,
                     segment_bytes=parse_size(segment_size))
    info = inspect_info(source, p, plan, nproc, segment_size)
    return json.dumps(info, indent=2) if as_json else render(info, plan)

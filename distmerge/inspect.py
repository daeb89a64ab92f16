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
    for prefix, what in (("optim_world_size_", "optimizer state"), ("extra_state_world_size_", "extra state (RNG, "
                                                                                               "scheduler)")):
        n = sum(name.startswith(prefix) for name in names)
        if n:
            found.append(f"{n} {prefix}*.pt files ({what})")
    return found


def inspect_source(source: str, nproc: int = 1, max_shard_size: str = "5GB", dtype: str = "auto",
                   hf_config: str | None = None, iteration: int | None = None, as_json: bool = False,
                   lora_alpha: float | None = None, check_all: bool = False, segment_size: str = "256MiB") -> str:
    p = prepare(source, PrepareOptions(hf_config=hf_config, iteration=iteration, quick=not check_all, dtype=dtype,
                                       lora_alpha=lora_alpha))
    catalogue, config, adapters, outputs = p.catalogue, p.config, p.adapters, p.outputs
    plan = make_plan(catalogue, outputs, nproc, parse_size(max_shard_size), DEFAULT_TRANSPORT,
                     segment_bytes=parse_size(segment_size))
    kept = set().union(*(t.sources for t in outputs))
    folded = {s for t in outputs if t.lora for s in (t.lora.a, t.lora.b)}
    dropped = [n + (" (tied to the embedding)" if n == "lm_head.weight" else "")
               for n in catalogue.tensors if n not in kept and n not in folded]
    trimmed = []
    for t in outputs:
        if len(t.parts) == 1 and not t.parts[0].index and t.shape:
            part, rows = t.parts[0], catalogue.tensors[t.parts[0].source].shape[0]
            if part.stop - part.start < rows:
                why = "vocab padding" if ("embed" in t.name or t.name in ("lm_head.weight", "score.weight")) else "unused rows"
                trimmed.append(f"{part.source} {rows} -> {part.stop - part.start} rows ({why})")
    skipped = list(catalogue.notes) + skipped_files(source)
    dtypes = Counter()
    for t in catalogue.tensors.values():
        dtypes[dtype_str(t.dtype)] += t.nbytes
    info = {
        "source": source, "format": catalogue.format, "world_size": catalogue.world_size, "mesh": catalogue.mesh,
        "architecture": architecture(config),
        "source_tensors": len(catalogue.tensors), "source_bytes": sum(t.nbytes for t in catalogue.tensors.values()),
        "dtypes": dict(dtypes), "dropped": dropped, "trimmed": trimmed, "skipped": skipped,
        "metadata_read": "rank 0 (--check-all: all)" if catalogue.partial else "every file",
        "lora": None if adapters is None else {"r": adapters.r, "alpha": adapters.alpha,
                                               "target_modules": adapters.target_modules,
                                               "adapted": len(adapters.factors)},
        "plan": {"ranks": nproc, "files": [{"name": f.name, "bytes": f.size, "tensors": len(f.entries),
                                            "segments": [{"rank": seg.rank, "tensors": seg.stop - seg.first,
                                                          "bytes": seg.end - seg.start} for seg in f.segments]}
                                           for f in plan.files]},
    }
    if as_json:
        return json.dumps(info, indent=2)
    lines = [f"source        {source}",
             f"format        {catalogue.format}, world size {catalogue.world_size}, mesh {catalogue.mesh}",
             f"architecture  {info['architecture']}",
             f"tensors       {info['source_tensors']}, {info['source_bytes'] / 1e9:.3f} GB "
             f"({', '.join(f'{k} {v / 1e9:.3f} GB' for k, v in dtypes.items())})",
             f"dropped       {', '.join(dropped) or 'nothing'}",
             f"trimmed       {', '.join(trimmed) or 'nothing'}",
             f"skipped       {', '.join(skipped) or 'nothing'}",
             *([f"lora          r={adapters.r} alpha={adapters.alpha:g} on {len(adapters.factors)} modules "
                f"({', '.join(adapters.target_modules)}); --lora merge folds them"] if adapters else []),
             describe(plan)]
    return "\n".join(lines)

"""detect -> validate -> map, once: what `merge`, `inspect` and `verify --source` all start from.

Metadata only. A merge calls it on the reader rank (rank 0) alone, whose refusal reaches every
rank before anything is written; the other ranks receive their share of the result (scatter.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from .arch import find_adapters, load_config, lora, map_outputs
from .arch.lora import Adapters
from .arch.megatron_config import synthesize_config
from .dtypes import CAST_NAMES
from .errors import MergeError
from .model import Catalogue, OutputTensor
from .sources import read_source
from .sources.hf_base import is_lora_only, read_base, with_base
from .sources.registry import ReadOptions, SourceFormat
from .tied import check_tied_head, untie
from .validate import check_outputs, validate_catalogue


@dataclass(frozen=True)
class PrepareOptions:
    """The subset of the merge options that decides what is read and what is written."""

    hf_config: str | None = None
    iteration: int | None = None
    quick: bool = False                 # inspect without --check-all
    dtype: str = "auto"
    lora: str = "merge"
    lora_alpha: float | None = None
    zero_weights: str = "master"
    untie_word_embeddings: bool = False  # keep a trained head and write tie_word_embeddings: false
    fallback_hf_dir: str | None = None  # verify --source: the reference's config when the source has none
    vocab_size: int | None = None       # --vocab-size: a Megatron checkpoint's true vocabulary (config synthesis)
    base: str | None = None             # --base: the HF model a LoRA-only checkpoint's adapters belong to


@dataclass
class Prepared:
    format: SourceFormat
    catalogue: Catalogue
    hf_dir: str | None
    config: dict
    adapters: Adapters | None
    outputs: list[OutputTensor]
    extra: dict[str, list[OutputTensor]] = field(default_factory=dict)  # file -> tensors (lora_adapter/)


def cast_rule(dtype: str):
    """auto keeps every tensor's dtype; a named dtype casts floating tensors only."""
    if dtype == "auto":
        return lambda d: d
    if dtype not in CAST_NAMES:
        raise MergeError(f"--dtype {dtype} is not one of auto, {', '.join(CAST_NAMES)}")
    target = CAST_NAMES[dtype]
    return lambda d: target if d.is_floating_point else d


def check_choices(lora_mode: str, dtype: str):
    """--lora and --dtype must be among their choices (the API does not go through argparse); the cast rule."""
    if lora_mode not in lora.MODES:
        raise MergeError(f"--lora {lora_mode} is not one of {', '.join(lora.MODES)}")
    return cast_rule(dtype)


def complete_lora_only(catalogue: Catalogue, base_dir: str | None) -> Catalogue:
    """A LoRA-only checkpoint (verl's save_lora_only) plus the base model the user names; the base's
    catalogue is validated against its own directory. Without --base such a checkpoint is refused."""
    if base_dir is None:
        if is_lora_only(catalogue):
            raise MergeError(f"{catalogue.source} holds only LoRA factors (verl's checkpoint.save_lora_only), no base "
                             "weights; pass --base HF_DIR, the HF model the LoRA was trained on")
        return catalogue
    base = read_base(base_dir)
    validate_catalogue(base)
    return with_base(catalogue, base)


def prepare(source: str, opts: PrepareOptions = PrepareOptions()) -> Prepared:
    cast = check_choices(opts.lora, opts.dtype)
    fmt, catalogue = read_source(source, ReadOptions(iteration=opts.iteration, quick=opts.quick,
                                                     zero_weights=opts.zero_weights))
    validate_catalogue(catalogue)
    catalogue = complete_lora_only(catalogue, opts.base)
    hf_dir = opts.hf_config or catalogue.hf_dir or opts.fallback_hf_dir
    if hf_dir is None and catalogue.family == "megatron":
        built = synthesize_config(catalogue, opts.vocab_size)  # no config.json anywhere: build one
        config, hf_dir = built.config, built.tokenizer_dir     # the tokenizer found is copied to the output
        catalogue.notes.append(f"config.json {built.description}")
    else:
        config = load_config(hf_dir, source)
    if opts.untie_word_embeddings:
        config = untie(config)
    adapters = find_adapters(catalogue, opts.lora_alpha, config)
    if adapters is not None:  # Megatron's factors are re-described as blocks of the stored pieces: checked too
        validate_catalogue(replace(catalogue, files=[], tensors={
            name: catalogue.tensors[name] for pair in adapters.factors.values() for name in pair}))
    outputs = map_outputs(catalogue, config, cast, adapters, opts.lora)
    check_outputs(catalogue, outputs, config)
    check_tied_head(catalogue, outputs)
    extra = {}
    if adapters and opts.lora in ("adapter", "both"):
        extra[lora.ADAPTER_FILE] = lora.adapter_outputs(catalogue, adapters, cast)
    return Prepared(fmt, catalogue, hf_dir, config, adapters, outputs, extra)

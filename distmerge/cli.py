"""Command line: `distmerge merge|inspect`, parsed into one options object."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from .errors import MergeError
from .merge import DEFAULT_TRANSPORT, TRANSPORTS, MergeOptions, run_merge


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distmerge", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    m = sub.add_parser("merge", help="merge a sharded checkpoint into a Hugging Face directory")
    m.add_argument("--config", metavar="FILE", help="a YAML preset (see configs/); flags on the command line override it")
    m.add_argument("--source", help="checkpoint directory (e.g. global_step_100/actor); required")
    m.add_argument("--target", help="output directory; must be empty or absent unless --overwrite; required")
    m.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="auto keeps the source bytes exactly; others cast floating tensors only")
    m.add_argument("--max-shard-size", default="5GB", help="largest output file, e.g. 5GB, 500MB, 2GiB")
    m.add_argument("--transport", default=DEFAULT_TRANSPORT, choices=TRANSPORTS,
                   help="direct: each writer reads its pieces from the filesystem; "
                        "collective: each source file is read once and pieces are sent to their writer")
    m.add_argument("--hf-config", help="directory with config.json and tokenizer (default: SOURCE/huggingface)")
    m.add_argument("--iteration", type=int, help="Megatron-LM: merge iter_N instead of the latest checkpointed one")
    m.add_argument("--overwrite", action="store_true", help="replace a non-empty target (only once the merge succeeded)")
    m.add_argument("--backend", default="auto", choices=["auto", "gloo", "nccl"],
                   help="process-group backend under torchrun (auto: nccl when GPUs are visible)")
    m.add_argument("--timeout", type=float, default=1800.0, help="seconds any collective may wait")
    m.add_argument("--no-progress", action="store_true", help="no progress bar")
    m.add_argument("--summary-json", metavar="PATH", help="write the result (files, bytes, seconds per phase and rank) as JSON")
    m.add_argument("--debug", action="store_true", help="show tracebacks")

    parser.merge_parser = m
    i = sub.add_parser("inspect", help="print what a checkpoint holds and the merge plan; reads metadata only")
    i.add_argument("source")
    i.add_argument("--nproc", type=int, default=1, help="ranks to plan for")
    i.add_argument("--max-shard-size", default="5GB")
    i.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    i.add_argument("--hf-config")
    i.add_argument("--iteration", type=int)
    i.add_argument("--json", action="store_true", help="machine-readable output")
    i.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def setup_logging() -> None:
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"[distmerge rank {rank}] %(message)s" if int(os.environ.get("WORLD_SIZE", "1")) > 1
                        else "[distmerge] %(message)s", stream=sys.stderr)


def load_preset(path: str, merge_parser: argparse.ArgumentParser) -> dict:
    """A YAML preset's options, checked like flags: unknown keys and values outside the choices are errors."""
    import yaml

    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except OSError as e:
        raise MergeError(f"cannot read --config {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise MergeError(f"--config {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise MergeError(f"--config {path} must be a mapping of option: value")
    actions = {a.dest: a for a in merge_parser._actions if a.dest not in ("help", "config")}
    preset = {}
    for key, value in data.items():
        dest = str(key).replace("-", "_")
        if dest not in actions:
            raise MergeError(f"--config {path}: unknown key {key!r}; known keys: {', '.join(sorted(actions))}")
        action = actions[dest]
        if action.type is not None and value is not None:
            value = action.type(value)
        if action.choices and value not in action.choices:
            raise MergeError(f"--config {path}: {key}: {value!r} is not one of {', '.join(map(str, action.choices))}")
        preset[dest] = value
    return preset


def parse(argv) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "merge":
        if args.config:
            parser.merge_parser.set_defaults(**load_preset(args.config, parser.merge_parser))
            args = parser.parse_args(argv)  # flags given on the command line win over the preset
        if not args.source or not args.target:
            parser.merge_parser.error("--source and --target are required (on the command line or in --config)")
    return args


def main(argv=None) -> int:
    try:
        args = parse(argv)
    except MergeError as e:
        print(f"distmerge: error: {e}", file=sys.stderr)
        return e.exit_code
    setup_logging()
    try:
        if args.command == "merge":
            result = run_merge(MergeOptions(source=args.source, target=args.target, dtype=args.dtype,
                                   max_shard_size=args.max_shard_size, transport=args.transport,
                                   overwrite=args.overwrite, hf_config=args.hf_config, iteration=args.iteration, backend=args.backend,
                                   timeout=args.timeout, progress=not args.no_progress))
            if args.summary_json and int(os.environ.get("RANK", "0")) == 0:
                with open(args.summary_json, "w") as f:
                    json.dump(result.to_dict(), f, indent=2)
        elif args.command == "inspect":
            from .inspect import inspect_source

            print(inspect_source(args.source, nproc=args.nproc, max_shard_size=args.max_shard_size,
                                 dtype=args.dtype, hf_config=args.hf_config, iteration=args.iteration,
                                 as_json=args.json))
        return 0
    except MergeError as e:
        if args.debug:
            raise
        if int(os.environ.get("RANK", "0")) == 0 or not e.all_ranks:
            print(f"distmerge: error: {e}", file=sys.stderr)
        return e.exit_code

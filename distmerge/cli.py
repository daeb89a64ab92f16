"""Command line: `distmerge merge|inspect|verify`, parsed into one options object."""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import signal
import sys

import torch.distributed as dist

from .errors import MergeAbortedError, MergeError, MergeVerifyError
from .merge import DEFAULT_TRANSPORT, TRANSPORTS, MergeOptions, run_merge

log = logging.getLogger("distmerge")


DTYPES = ["auto", "bf16", "fp16", "fp32"]


def build_parser() -> argparse.ArgumentParser:
    """The one source of every option's name, default and meaning (README's tables are generated
    from it: `python -m distmerge.docs`)."""
    parser = argparse.ArgumentParser(prog="distmerge", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    m = sub.add_parser("merge", help="merge a sharded checkpoint into a Hugging Face directory")
    m.add_argument("--config", metavar="FILE", help="a YAML preset of these options (keys as the flags, `-` or `_`); "
                   "flags on the command line override it; unknown keys and values outside the choices are errors")
    m.add_argument("--source", "--local_dir", dest="source", metavar="DIR", help="the checkpoint directory (required, on the command line or in "
                   "--config)")
    m.add_argument("--target", "--target_dir", dest="target", metavar="DIR", help="the output directory (required); created with its parents; must "
                   "be absent or empty unless --overwrite")
    m.add_argument("--dtype", default="auto", choices=DTYPES,
                   help="auto keeps every tensor's dtype and bytes; a named dtype casts floating tensors only (int and "
                        "bool stay); config.json states the dtype written")
    m.add_argument("--max-shard-size", metavar="SIZE", default="5GB",
                   help="largest output file (500MB, 2GiB, bytes); a larger tensor gets a file of its own, as in "
                        "transformers; a single file is named model.safetensors")
    m.add_argument("--segment-size", metavar="SIZE", default="256MiB",
                   help="a file larger than this is cut, at tensor boundaries, into runs written by different ranks "
                        "in parallel (the bytes do not depend on it or on the rank count)")
    m.add_argument("--transport", default=DEFAULT_TRANSPORT, choices=TRANSPORTS,
                   help="how pieces reach their writer: direct = the writer reads them from the filesystem; "
                        "collective = each source file is read by one rank and pieces are sent (README: Transports)")
    m.add_argument("--hf-config", metavar="DIR", help="directory with config.json, tokenizer and generation config "
                   "(default: SOURCE/huggingface, for DCP and verl Megatron also a huggingface/ beside the source)")
    m.add_argument("--iteration", metavar="N", type=int,
                   help="Megatron-LM runs: merge iter_N instead of the one latest_checkpointed_iteration.txt names")
    m.add_argument("--overwrite", action="store_true",
                   help="replace a non-empty target; the old one is removed only after the merge succeeded")
    m.add_argument("--lora", default="merge", choices=["merge", "adapter", "both"],
                   help="LoRA checkpoints: merge = fold W + (alpha/r) B @ A into the base weights (in fp32, then the "
                        "output dtype); adapter = the base weights plus a PEFT adapter in TARGET/lora_adapter/; both")
    m.add_argument("--lora-alpha", metavar="ALPHA", type=float,
                   help="the lora_alpha the training used (default: from lora_train_meta.json; without it a LoRA "
                        "merge is refused, never done with 0)")
    m.add_argument("--resume", action="store_true",
                   help="continue a crashed run of the same merge: its finished files whose size, header and content "
                        "hash check out are kept, the rest is written; another source or other options are refused")
    m.add_argument("--verify", action="store_true",
                   help="run the `distmerge verify` self-check on the result before publishing it; if it fails the "
                        "target is not published and the exit code is 3")
    m.add_argument("--fsync", action="store_true",
                   help="fsync every weight file before it counts as written (durable against power loss, slower: "
                        "README Benchmark); without it only the index, config, manifest and directories are fsynced "
                        "at the final rename")
    m.add_argument("--backend", default="auto", choices=["auto", "gloo", "nccl", "fsdp", "megatron"],
                   help="process-group backend under torchrun: auto = NCCL (with CUDA tensors) when every rank of "
                        "the node has a GPU of its own, gloo otherwise; nccl with fewer GPUs than ranks is refused. "
                        "verl's fsdp/megatron are accepted: the source must then be of that kind (backend auto)")
    m.add_argument("--hf-upload-path", "--hf_upload_path", dest="hf_upload_path", metavar="ORG/NAME",
                   help="after the merge and its self-check pass, upload TARGET to this Hub repo (huggingface_hub; "
                        "HF_TOKEN / HF_ENDPOINT as usual); a failed upload keeps TARGET and exits 4")
    m.add_argument("--private", action="store_true", help="with --hf-upload-path: create the repo private")
    m.add_argument("--trust-remote-code", "--trust_remote_code", dest="trust_remote_code", action="store_true",
                   help="let the self-check load config/tokenizer code shipped with the model (auto_map)")
    m.add_argument("--tie-word-embedding", action="store_true",
                   help="verl's flag, accepted and checked: config.json decides; a warning when they disagree")
    m.add_argument("--is-value-model", action="store_true",
                   help="verl's flag, accepted and checked: value models are detected from config.json "
                        "(*ForTokenClassification); a warning when they disagree")
    m.add_argument("--local-ranks", metavar="N", type=int, default=1,
                   help="run N ranks on this machine without torchrun: this process forks them after importing "
                        "torch once (about 2 s faster to start than torchrun); not inside torchrun or srun")
    m.add_argument("--timeout", metavar="SECONDS", type=float, default=1800.0,
                   help="how long any collective may wait")
    m.add_argument("--no-progress", action="store_true", help="no progress bar")
    m.add_argument("--summary-json", metavar="PATH",
                   help="write the result as JSON: files, bytes, tensors, hashes, files kept by --resume, warnings, "
                        "seconds, rank 0's stages (start-up, catalogue, plan, run, finish), per-rank phases, files each "
                        "rank wrote, per-rank peak RSS")
    m.add_argument("--debug", action="store_true", help="show Python tracebacks on errors")
    parser.merge_parser = m

    i = sub.add_parser("inspect", help="print what a checkpoint holds and the merge plan; reads metadata only")
    i.add_argument("source", metavar="SOURCE", help="the checkpoint directory")
    i.add_argument("--nproc", metavar="N", type=int, default=1, help="ranks to plan for")
    i.add_argument("--max-shard-size", metavar="SIZE", default="5GB", help="as for merge")
    i.add_argument("--segment-size", metavar="SIZE", default="256MiB", help="as for merge")
    i.add_argument("--dtype", default="auto", choices=DTYPES, help="as for merge")
    i.add_argument("--hf-config", metavar="DIR", help="as for merge")
    i.add_argument("--iteration", metavar="N", type=int, help="as for merge")
    i.add_argument("--check-all", action="store_true",
                   help="read every rank file's metadata and check that the shards cover every tensor, as a merge "
                        "does (verl FSDP; by default rank 0's metadata describes the model)")
    i.add_argument("--json", action="store_true", help="machine-readable output")
    i.add_argument("--debug", action="store_true", help="show Python tracebacks on errors")

    v = sub.add_parser("verify", help="check a merged directory (exit 0 if it is sound, 3 if not)")
    v.add_argument("target", metavar="TARGET", nargs="?", help="the merged HF directory to check")
    v.add_argument("--reference", metavar="HF_DIR",
                   help="also compare every tensor with this HF directory's (bitwise unless --atol/--rtol)")
    v.add_argument("--source", metavar="CKPT",
                   help="instead of a TARGET: compare a sharded checkpoint with --reference, writing nothing")
    v.add_argument("--atol", type=float, help="absolute tolerance (default: bit-identical)")
    v.add_argument("--rtol", type=float, help="relative tolerance (default: bit-identical)")
    v.add_argument("--logits", action="store_true",
                   help="also load TARGET and --reference with transformers (CPU, stored dtype) and compare logits "
                        "on a fixed prompt")
    v.add_argument("--hf-config", metavar="DIR", help="with --source: as for merge")
    v.add_argument("--iteration", metavar="N", type=int, help="with --source: as for merge")
    v.add_argument("--json", action="store_true", help="machine-readable output")
    v.add_argument("--debug", action="store_true", help="show Python tracebacks on errors")
    v.add_argument("--trust-remote-code", "--trust_remote_code", dest="trust_remote_code", action="store_true",
                   help="let transformers run code shipped with the model (auto_map) while loading it")
    v.add_argument("--allow-incomplete", action="store_true", help=argparse.SUPPRESS)  # merge --verify: staging

    t = sub.add_parser("test", help="verl's `test` operation: verify --source CKPT --reference HF_DIR")
    t.add_argument("--local_dir", "--source", dest="source", metavar="CKPT", required=True,
                   help="the sharded checkpoint")
    t.add_argument("--test_hf_dir", "--reference", dest="reference", metavar="HF_DIR", required=True,
                   help="the HF directory to compare with")
    t.add_argument("--backend", choices=["fsdp", "megatron"], help="accepted for verl compatibility (detected)")
    t.add_argument("--hf-config", metavar="DIR", help="as for merge")
    t.add_argument("--atol", type=float, help="absolute tolerance (default: bit-identical)")
    t.add_argument("--rtol", type=float, help="relative tolerance (default: bit-identical)")
    t.add_argument("--trust-remote-code", "--trust_remote_code", dest="trust_remote_code", action="store_true",
                   help="accepted for verl compatibility")
    t.add_argument("--json", action="store_true", help="machine-readable output")
    t.add_argument("--debug", action="store_true", help="show Python tracebacks on errors")
    return parser


class RankFormatter(logging.Formatter):
    """`[distmerge rank R] message` under torchrun, `[distmerge] message` alone; errors read
    `distmerge: error: message` as argparse's do."""

    def __init__(self, rank: int, world: int):
        super().__init__()
        self.tag = f"distmerge rank {rank}" if world > 1 else "distmerge"
        self.rank_note = f" [rank {rank}]" if world > 1 else ""

    def format(self, record: logging.LogRecord) -> str:
        if record.levelno >= logging.ERROR:
            return f"distmerge: error: {record.getMessage()}{self.rank_note}"
        if record.levelno >= logging.WARNING:
            return f"[{self.tag}] warning: {record.getMessage()}"
        return f"[{self.tag}] {record.getMessage()}"


class StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is now (pytest swaps it per test)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def setup_logging() -> None:
    """Rank 0 logs progress; the other ranks only warnings and errors."""
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    handler = StderrHandler()
    handler.setFormatter(RankFormatter(rank, world))
    log.handlers[:] = [handler]
    log.propagate = False
    log.setLevel(logging.INFO if rank == 0 else logging.WARNING)


@contextlib.contextmanager
def sigterm_unwinds():
    """torchrun stops the other workers with SIGTERM when one fails: unwind, so the lock is
    released and the staging directory stays marked incomplete for --resume.

    Only the first SIGTERM raises. A second one (torchrun and the --local-ranks parent may both
    send one, or it lands while an earlier error is being reported) must not interrupt the
    cleanup the first one started. Outside the merge the previous handler is back, so a SIGTERM
    during interpreter exit ends the process quietly instead of raising inside a finaliser."""
    armed = True

    def on_sigterm(signum, frame):
        nonlocal armed
        if armed:
            armed = False
            raise MergeAbortedError(f"stopped by signal {signal.Signals(signum).name}; the partial output stays "
                                    "marked incomplete: rerun the same command with --resume to finish it")

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    finally:
        armed = False
        signal.signal(signal.SIGTERM, previous)


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


def process_age() -> float | None:
    """Seconds since this process started; None where /proc is missing. Called when the CLI
    starts, it is python's start-up and `import torch`."""
    try:
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        with open("/proc/self/stat") as f:
            started_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        return max(0.0, uptime - started_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


def entry() -> None:
    """The command line's entry point: main(), then a quick exit. An interpreter that imported
    torch spends about 0.4 s tearing itself down (here `python -c "import torch"` exits in 0.43 s
    after its last line, 0.02 s with os._exit). A finished command has closed, fsynced and
    published all it wrote, so that time buys nothing."""
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)


def main(argv=None) -> int:
    start_up = process_age()  # python and the imports (torch's) so far: the summary's first stage
    setup_logging()
    try:
        args = parse(argv)
        if args.command == "merge" and args.local_ranks != 1:
            from .local_ranks import run_local_ranks

            def run_rank() -> int:
                setup_logging()  # this rank's prefix
                return run_command(args, start_up)

            return run_local_ranks(args.local_ranks, run_rank)
    except MergeError as e:
        log.error("%s", e)
        return e.exit_code
    return run_command(args, start_up)


def run_command(args: argparse.Namespace, start_up: float | None = None) -> int:
    if args.command != "merge":
        return run_one_command(args)
    try:
        with sigterm_unwinds():
            return run_one_command(args, start_up)
    except MergeAbortedError as e:  # the SIGTERM came while an earlier error was being reported
        if args.debug:
            raise
        log.error("%s", e)
        return e.exit_code


def run_one_command(args: argparse.Namespace, start_up: float | None = None) -> int:
    try:
        if args.command == "merge":
            result = run_merge(merge_options(args), start_up)
            if args.summary_json and int(os.environ.get("RANK", "0")) == 0:
                with open(args.summary_json, "w") as f:
                    json.dump(result.to_dict(), f, indent=2)
        elif args.command == "inspect":
            from .inspect import inspect_source

            print(inspect_source(args.source, nproc=args.nproc, max_shard_size=args.max_shard_size,
                                 segment_size=args.segment_size,
                                 dtype=args.dtype, hf_config=args.hf_config, iteration=args.iteration,
                                 as_json=args.json, check_all=args.check_all))
        elif args.command in ("verify", "test"):
            return run_verify(args)
        return 0
    except MergeError as e:
        if args.debug:
            raise
        if int(os.environ.get("RANK", "0")) == 0 or not e.all_ranks:
            log.error("%s", e)
        return e.exit_code
    except (dist.DistError, RuntimeError) as e:  # gloo reports a dead peer as a plain RuntimeError
        if args.debug or int(os.environ.get("WORLD_SIZE", "1")) == 1:
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        log.error("lost contact with another rank (%s); that rank's own message says why. The partial output "
                  "stays marked incomplete: rerun with --resume", first[:200])
        return MergeAbortedError.exit_code


def merge_options(args: argparse.Namespace) -> MergeOptions:
    """Every MergeOptions field from the flag of the same name (so the two cannot drift)."""
    names = {f.name for f in dataclasses.fields(MergeOptions)} - {"progress"}
    return MergeOptions(**{name: getattr(args, name) for name in names}, progress=not args.no_progress)


def run_verify(args) -> int:
    from .verify import check_merged, compare_logits, compare_source_with_reference, compare_with_reference

    if args.command == "test":  # verl's spelling of verify --source --reference
        args.target, args.iteration, args.logits, args.allow_incomplete = None, None, False, False
    if args.source:
        if not args.reference or args.target:
            raise MergeError("verify --source CKPT needs --reference HF_DIR and no TARGET")
        report = compare_source_with_reference(args.source, args.reference, args.atol, args.rtol,
                                               args.hf_config, args.iteration)
    else:
        if not args.target:
            raise MergeError("verify needs a TARGET directory (or --source CKPT --reference HF_DIR)")
        if args.logits and not args.reference:
            raise MergeError("--logits compares with a model: give --reference HF_DIR")
        report = check_merged(args.target, allow_incomplete=args.allow_incomplete,
                              trust_remote_code=args.trust_remote_code)
        if args.reference:
            compare_with_reference(args.target, args.reference, args.atol, args.rtol, report)
        if args.logits:
            compare_logits(args.target, args.reference, args.atol, args.rtol, report)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.render())
    return 0 if report.ok else MergeVerifyError.exit_code

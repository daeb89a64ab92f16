"""Command line: `distmerge merge|watch|inspect|verify|test`, parsed into one options object.

Parsing needs the standard library alone: `--help`, a bad argument or a typo is answered before
torch is imported, and the merge machinery is imported only once the arguments are good."""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import importlib
import json
import logging
import os
import signal
import sys
import time

from .errors import MergeAbortedError, MergeError, MergeIOError, MergeVerifyError

log = logging.getLogger("distmerge")

DTYPES = ["auto", "bf16", "fp16", "fp32"]
TRANSPORTS = ("collective", "direct")  # as merge.py's (tests/test_cli.py checks); --help imports no merge code
DEFAULT_TRANSPORT = "direct"
ZERO_WEIGHTS = ("master", "module")      # as sources/deepspeed.py's WEIGHTS (checked by tests/test_cli.py)
DEBUG_ENV = "DISTMERGE_DEBUG"           # =1: tracebacks as with --debug (for jobs whose flags are hard to change)
INTERNAL_ERROR_EXIT = 1                  # a bug, not a bad input: one line, the traceback with --debug


class Parser(argparse.ArgumentParser):
    """argparse without prefix abbreviations (`--max-shard 2MB` must not become --max-shard-size,
    and a script must not break when a new flag makes its abbreviation ambiguous)."""

    def __init__(self, *args, **kwargs):
        kwargs["allow_abbrev"] = False
        super().__init__(*args, **kwargs)

    def refuse_unknown(self, extras: list[str]) -> None:
        """argparse's 'unrecognized arguments' from this (sub)command, with its usage and the
        nearest option name for a mistyped one."""
        names = [name for name in self._option_string_actions if name.startswith("--")]
        hint = ""
        for word in extras:
            if word.startswith("--"):
                near = difflib.get_close_matches(word.split("=", 1)[0], names, n=1, cutoff=0.6)
                if near:
                    hint = f" (did you mean {near[0]}?)"
                    break
        self.error(f"unrecognized arguments: {' '.join(extras)}{hint}")


def build_parser() -> argparse.ArgumentParser:
    """The one source of every option's name, default and meaning (docs/options.md's tables are generated
    from it: `python -m distmerge.docs`). Importing this module imports no torch."""
    parser = Parser(prog="distmerge", description="Turn sharded training checkpoints (verl FSDP, PyTorch DCP, "
                    "Megatron, DeepSpeed) into Hugging Face checkpoints: streaming, multi-rank, bit-exact.")
    sub = parser.add_subparsers(dest="command", required=True)
    parser.commands = sub.choices
    add_merge_parser(sub)
    add_watch_parser(sub)
    add_inspect_parser(sub)
    add_verify_parsers(sub)
    parser.merge_parser = sub.choices["merge"]
    return parser


def add_merge_parser(sub) -> None:
    m = sub.add_parser("merge", help="merge a sharded checkpoint into a Hugging Face directory")
    m.add_argument("--config", metavar="FILE", help="a YAML preset of these options (keys as the flags, `-` or `_`); "
                   "flags on the command line override it; unknown keys and values outside the choices are errors")
    m.add_argument("--source", "--local_dir", dest="source", metavar="DIR",
                   help="the checkpoint directory (required, on the command line or in --config); with --steps, "
                        "the training run's directory")
    m.add_argument("--target", "--target_dir", dest="target", metavar="DIR",
                   help="the output directory (required); created with its parents; must be absent or empty unless "
                        "--overwrite; with --steps, TARGET/<step>/ per step")
    m.add_argument("--steps", metavar="all|latest|N,M", type=steps_spec,
                   help="SOURCE is a training run: merge these saved steps (numbers as in global_step_N, iter_N, "
                        "step-N), each into TARGET/<step name>/, in one job; steps already merged are skipped and "
                        "saves still being written are left alone (docs/running.md: Every step of a run)")
    m.add_argument("--iteration", metavar="N", type=int,
                   help="Megatron-LM runs: merge iter_N instead of the one latest_checkpointed_iteration.txt names")
    add_output_options(m)


def add_watch_parser(sub) -> None:
    w = sub.add_parser("watch", help="merge each step of a training run as training saves it (merge --steps, "
                                     "repeated)")
    w.add_argument("source", metavar="RUN_DIR", help="the training run's checkpoint directory")
    w.add_argument("--target", required=True, metavar="DIR", help="TARGET/<step name>/ per step")
    w.add_argument("--until", metavar="STEP", type=int,
                   help="stop once every complete step up to STEP is merged (default: run until stopped, e.g. by "
                        "SIGTERM or Ctrl-C while waiting, which exits 0)")
    w.add_argument("--interval", metavar="SECONDS", type=float, default=60.0,
                   help="how often to look for new complete steps")
    w.add_argument("--config", metavar="FILE", help="a YAML preset of these options, as for merge")
    add_output_options(w)


def add_output_options(m) -> None:
    """The options merge and watch share: what is written and how."""
    m.add_argument("--dtype", default="auto", choices=DTYPES,
                   help="auto keeps every tensor's dtype and bytes; a named dtype casts floating tensors only (int and "
                        "bool stay); config.json states the dtype written")
    m.add_argument("--max-shard-size", metavar="SIZE", default="5GB",
                   help="largest output file (500MB, 2GiB, bytes); a larger tensor gets a file of its own, as in "
                        "transformers; a single file is named model.safetensors")
    m.add_argument("--segment-size", metavar="SIZE", default="256MiB",
                   help="the most bytes of one run of tensors a rank writes: files are cut, at tensor boundaries, "
                        "into runs of at most this size and of about 1/64 of the model (at least 4 MiB), shared out "
                        "among the ranks (the bytes do not depend on it or on the rank count)")
    m.add_argument("--transport", default=DEFAULT_TRANSPORT, choices=TRANSPORTS,
                   help="how pieces reach their writer: direct = the writer reads them from the filesystem; "
                        "collective = each source file is read by one rank and pieces are sent "
                        "(docs/performance.md: Transports)")
    m.add_argument("--hf-config", metavar="DIR", help="directory with config.json, tokenizer and generation config "
                   "(default: SOURCE/huggingface, for DCP and verl Megatron also a huggingface/ beside the source)")
    m.add_argument("--vocab-size", metavar="N", type=int,
                   help="a Megatron checkpoint without config.json: the tokenizer's vocabulary size (Megatron's "
                        "embedding is padded; the padding rows are dropped). Read from a tokenizer inside the "
                        "checkpoint when there is one")
    m.add_argument("--overwrite", action="store_true",
                   help="replace a non-empty target; the old one is removed only after the merge succeeded")
    m.add_argument("--lora", default="merge", choices=["merge", "adapter", "both"],
                   help="LoRA checkpoints: merge = fold W + (alpha/r) B @ A into the base weights (in fp32, then the "
                        "output dtype); adapter = the base weights plus a PEFT adapter in TARGET/lora_adapter/; both")
    m.add_argument("--base", metavar="HF_DIR",
                   help="a LoRA-only checkpoint (verl's checkpoint.save_lora_only, or a Megatron-Bridge PEFT save "
                        "holding only the adapters): the HF model (safetensors, one file or sharded with an index) "
                        "whose weights the adapters are folded into, or written beside (--lora adapter); read in "
                        "bands like the checkpoint, never whole")
    m.add_argument("--lora-alpha", metavar="ALPHA", type=float,
                   help="the lora_alpha the training used (default: from lora_train_meta.json or peft's "
                        "adapter_config.json; without it a LoRA merge is refused, never done with 0)")
    m.add_argument("--untie-word-embeddings", action="store_true",
                   help="config.json ties lm_head to the embedding but the checkpoint's head was trained apart: keep "
                        "the head and write tie_word_embeddings: false (without it such a checkpoint is refused)")
    m.add_argument("--zero-weights", default="master", choices=ZERO_WEIGHTS,
                   help="DeepSpeed ZeRO: master = the fp32 master weights of the optimizer files, what "
                        "zero_to_fp32.py gives; module = the 16-bit weights of mp_rank_00_model_states.pt, without "
                        "the optimizer files (ZeRO-1/2 only)")
    m.add_argument("--resume", action="store_true",
                   help="continue a crashed run of the same merge: its finished files whose size, header and content "
                        "hash check out are kept, the rest is written; another source or other options are refused")
    m.add_argument("--verify", action="store_true",
                   help="run the `distmerge verify` self-check on the result before publishing it; if it fails the "
                        "target is not published and the exit code is 3")
    m.add_argument("--fsync", action="store_true",
                   help="fsync every weight file before it counts as written (durable against power loss, slower: "
                        "docs/performance.md: Benchmark); without it only the index, config, manifest and "
                        "directories are fsynced at the final rename")
    add_run_options(m)


def add_run_options(m) -> None:
    """The options merge and watch share: how the job runs."""
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
                   help="run N ranks on this machine without torchrun: this process forks them (1-2 s faster to "
                        "start than torchrun; with the direct transport they need no torch process group); not "
                        "inside torchrun or srun")
    m.add_argument("--timeout", metavar="SECONDS", type=float, default=1800.0,
                   help="how long any collective may wait")
    m.add_argument("--no-progress", action="store_true", help="no progress bar")
    m.add_argument("--summary-json", metavar="PATH",
                   help="write the result as JSON: files, bytes, tensors, hashes, files kept by --resume, warnings, "
                        "seconds, rank 0's stages (start-up, catalogue, plan, run, finish), per-rank phases, files "
                        "each rank wrote, per-rank peak RSS; with --steps and watch, every step's result")
    m.add_argument("--debug", action="store_true", help="show Python tracebacks on errors")


def add_inspect_parser(sub) -> None:
    i = sub.add_parser("inspect", help="print what a checkpoint holds and the merge plan; reads metadata only")
    i.add_argument("source", metavar="SOURCE", help="the checkpoint directory")
    i.add_argument("--nproc", metavar="N", type=int, default=1, help="ranks to plan for")
    i.add_argument("--max-shard-size", metavar="SIZE", default="5GB", help="as for merge")
    i.add_argument("--segment-size", metavar="SIZE", default="256MiB", help="as for merge")
    i.add_argument("--dtype", default="auto", choices=DTYPES, help="as for merge")
    i.add_argument("--hf-config", metavar="DIR", help="as for merge")
    i.add_argument("--iteration", metavar="N", type=int, help="as for merge")
    i.add_argument("--vocab-size", metavar="N", type=int, help="as for merge")
    i.add_argument("--lora-alpha", metavar="ALPHA", type=float, help="as for merge")
    i.add_argument("--base", metavar="HF_DIR", help="as for merge")
    i.add_argument("--zero-weights", default="master", choices=ZERO_WEIGHTS, help="as for merge")
    i.add_argument("--check-all", action="store_true",
                   help="read every rank file's metadata and check that the shards cover every tensor, as a merge "
                        "does (verl FSDP; by default rank 0's metadata describes the model)")
    i.add_argument("--json", action="store_true", help="machine-readable output")
    i.add_argument("--debug", action="store_true", help="show Python tracebacks on errors")



def add_verify_parsers(sub) -> None:
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
    v.add_argument("--vocab-size", metavar="N", type=int, help="with --source: as for merge")
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
    t.add_argument("--vocab-size", metavar="N", type=int, help="as for merge")
    t.add_argument("--atol", type=float, help="absolute tolerance (default: bit-identical)")
    t.add_argument("--rtol", type=float, help="relative tolerance (default: bit-identical)")
    t.add_argument("--trust-remote-code", "--trust_remote_code", dest="trust_remote_code", action="store_true",
                   help="accepted for verl compatibility")
    t.add_argument("--json", action="store_true", help="machine-readable output")
    t.add_argument("--debug", action="store_true", help="show Python tracebacks on errors")


def steps_spec(text: str) -> str | tuple[int, ...]:
    """`all`, `latest` or step numbers `100,200`: checked while parsing (a typo costs no torch import)."""
    if text in ("all", "latest"):
        return text
    try:
        numbers = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not all, latest or step numbers like 100,200") from None
    if any(n < 0 for n in numbers):
        raise argparse.ArgumentTypeError(f"{text!r}: step numbers are not negative")
    return numbers


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
def signals_unwind():
    """SIGTERM (torchrun stopping the other workers when one fails, SLURM, kill) and SIGINT
    (Ctrl-C) unwind the merge with MergeAbortedError: the lock is released and the staging
    directory stays marked incomplete for --resume; one message, exit 4, no traceback.

    Only the first signal raises. A second one (Ctrl-C reaches torchrun and every worker, and
    torchrun then sends SIGTERM; the --local-ranks parent sends one too) must not interrupt the
    cleanup the first one started. An ignored SIGINT (a --local-ranks rank: its parent handles
    Ctrl-C) stays ignored. Outside the merge the previous handlers are back, so a signal during
    interpreter exit ends the process quietly instead of raising inside a finaliser."""
    armed = True

    def on_signal(signum, frame):
        nonlocal armed
        if armed:
            armed = False
            raise MergeAbortedError(f"stopped by signal {signal.Signals(signum).name}; the partial output stays "
                                    "marked incomplete: rerun the same command with --resume to finish it")

    caught = [signal.SIGTERM] + ([signal.SIGINT] if signal.getsignal(signal.SIGINT) != signal.SIG_IGN else [])
    previous = {s: signal.signal(s, on_signal) for s in caught}
    try:
        yield
    finally:
        armed = False
        for s, handler in previous.items():
            signal.signal(s, handler)


sigterm_unwinds = signals_unwind  # the earlier name


def load_preset(path: str, command_parser: argparse.ArgumentParser) -> dict:
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
    actions = {a.dest: a for a in command_parser._actions if a.dest not in ("help", "config")}
    preset = {}
    for key, value in data.items():
        dest = str(key).replace("-", "_")
        if dest not in actions:
            raise MergeError(f"--config {path}: unknown key {key!r}; known keys: {', '.join(sorted(actions))}")
        action = actions[dest]
        if action.type is not None and value is not None:
            try:
                value = action.type(value if isinstance(value, (int, float)) or action.type is not steps_spec
                                    else str(value))
            except (TypeError, ValueError, argparse.ArgumentTypeError) as e:
                raise MergeError(f"--config {path}: {key}: {e}") from None
        if action.choices and value not in action.choices:
            raise MergeError(f"--config {path}: {key}: {value!r} is not one of {', '.join(map(str, action.choices))}")
        preset[dest] = value
    return preset


def parse_known(parser: Parser, argv) -> argparse.Namespace:
    """parse_args, with an unknown option refused by its subcommand (usage and a suggestion)."""
    args, extras = parser.parse_known_args(argv)
    if extras:
        parser.commands[args.command].refuse_unknown(extras)
    return args


def parse(argv) -> argparse.Namespace:
    parser = build_parser()
    args = parse_known(parser, argv)
    command = parser.commands[args.command]
    if args.command in ("merge", "watch") and args.config:
        command.set_defaults(**load_preset(args.config, command))
        args = parse_known(parser, argv)  # flags given on the command line win over the preset
    if args.command == "merge" and (not args.source or not args.target):
        command.error("--source and --target are required (on the command line or in --config)")
    if args.command == "merge" and args.steps is not None and args.iteration is not None:
        command.error("--steps picks the steps (Megatron-LM iterations too): leave out --iteration")
    args.debug = getattr(args, "debug", False) or os.environ.get(DEBUG_ENV) == "1"
    return args


def process_age(pid: int | str = "self") -> float | None:
    """Seconds since process `pid` started; None where /proc is missing."""
    try:
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        with open(f"/proc/{pid}/stat") as f:
            started_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        return max(0.0, uptime - started_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


@dataclasses.dataclass
class Clock:
    """When the user's command started (this process's start, before python and the imports), for
    the summary's headline: the wall time the user waited. `start_up` is that time up to the merge."""

    started: float                 # time.time() at the process's start
    start_up: float | None = None  # seconds from then to the merge's own start

    @classmethod
    def now(cls) -> Clock:
        """Under torchrun the user started torchrun, this worker's parent: the clock starts there."""
        age = process_age(os.getppid()) if "TORCHELASTIC_RUN_ID" in os.environ else None
        return cls(time.time() - (age or process_age() or 0.0))

    def mark_start_up(self) -> None:
        self.start_up = time.time() - self.started

    def wall(self) -> float:
        return time.time() - self.started


def entry() -> None:
    """The command line's entry point: main(), then a quick exit. An interpreter that imported
    torch spends a noticeable time tearing itself down; a finished command has closed, fsynced
    and published all it wrote, so that time buys nothing."""
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)


def main(argv=None) -> int:
    clock = Clock.now()
    setup_logging()
    try:
        args = parse(argv)
    except MergeError as e:
        log.error("%s", e)
        return e.exit_code
    except ModuleNotFoundError as e:  # yaml, for --config
        log.error("%s", missing_module(e))
        return MergeError.exit_code
    if args.command not in ("merge", "watch"):
        return guarded(args, lambda: run_command(args, clock))
    code = guarded(args, load_merge_machinery)  # imported once, before any rank is forked
    if code:
        return code
    clock.mark_start_up()
    if args.local_ranks != 1:
        return guarded(args, lambda: fork_ranks(args, clock))
    return guarded(args, lambda: run_command(args, clock), unwind=True)


def load_merge_machinery() -> int:
    importlib.import_module("distmerge.merge")  # not torch: a one-process merge that copies bytes needs none
    return 0


def fork_ranks(args: argparse.Namespace, clock: Clock) -> int:
    """--local-ranks: the ranks are forked here; each runs the command as under torchrun."""
    from .local_ranks import run_local_ranks, wants_links

    def run_rank() -> int:
        setup_logging()  # this rank's prefix
        return guarded(args, lambda: run_command(args, clock), unwind=True)

    return run_local_ranks(args.local_ranks, run_rank, wants_links(args.transport, args.backend))


def guarded(args: argparse.Namespace, fn, unwind: bool = False) -> int:
    """fn()'s exit code; every failure becomes one message and a documented exit code (the
    traceback only with --debug or DISTMERGE_DEBUG=1). With `unwind` (a merge), SIGTERM and
    SIGINT end it as a MergeAbortedError (exit 4, resumable); elsewhere Ctrl-C is exit 4 too."""
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    try:
        with signals_unwind() if unwind else contextlib.nullcontext():
            return fn()
    except MergeError as e:
        if args.debug:
            raise
        if rank == 0 or not e.all_ranks:
            log.error("%s", e)
        return e.exit_code
    except KeyboardInterrupt:
        log.error("interrupted")
        return MergeAbortedError.exit_code
    except ModuleNotFoundError as e:
        if args.debug:
            raise
        log.error("%s", missing_module(e))
        return MergeError.exit_code
    except Exception as e:  # noqa: BLE001 - a bug or a lost peer: one line, not a traceback
        if args.debug:
            raise
        return report_unexpected(e, world)


def missing_module(e: ModuleNotFoundError) -> str:
    """One line saying what to install, or which interpreter has it (the checkout's .venv)."""
    name = (e.name or str(e)).split(".")[0]
    venv = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".venv")
    if os.path.isfile(os.path.join(venv, "bin", "python")) and os.path.realpath(sys.prefix) != os.path.realpath(venv):
        return (f"{name} is not installed for {sys.executable}; use the project's virtualenv: "
                f"`source {venv}/bin/activate`, or run {venv}/bin/python -m distmerge")
    return (f"{name} is not installed for {sys.executable}: install distmerge with its dependencies "
            "(`pip install -e .` in the checkout, or `bash launch/test.sh`, which sets up .venv)")


def report_unexpected(e: Exception, world: int) -> int:
    """gloo reports a dead peer as a plain RuntimeError (torch's DistError is one too): under
    several ranks that is a lost peer, exit 4; anything else is a bug in distmerge."""
    first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
    if world > 1 and isinstance(e, RuntimeError):
        log.error("lost contact with another rank (%s); that rank's own message says why. The partial output "
                  "stays marked incomplete: rerun with --resume", first)
        return MergeAbortedError.exit_code
    log.error("internal error: %s: %s (rerun with --debug for the traceback, and please report it)",
              type(e).__name__, first)
    return INTERNAL_ERROR_EXIT


def run_command(args: argparse.Namespace, clock: Clock | None = None) -> int:
    """One subcommand on this rank (errors are guarded()'s)."""
    clock = clock or Clock.now()
    if args.command == "watch" or (args.command == "merge" and args.steps is not None):
        from .steps import run_steps

        return run_steps(args, merge_options(args), clock.started)
    if args.command == "merge":
        return run_one_merge(args, clock)
    if args.command == "inspect":
        from .inspect import inspect_source

        print(inspect_source(args.source, nproc=args.nproc, max_shard_size=args.max_shard_size,
                             segment_size=args.segment_size, dtype=args.dtype, hf_config=args.hf_config,
                             iteration=args.iteration, as_json=args.json, check_all=args.check_all,
                             vocab_size=args.vocab_size, lora_alpha=args.lora_alpha, base=args.base,
                             zero_weights=args.zero_weights))
        return 0
    return run_verify(args)


def run_one_merge(args: argparse.Namespace, clock: Clock) -> int:
    from .merge import run_merge
    from .summary import log_summary

    result = run_merge(merge_options(args), clock.start_up)
    if int(os.environ.get("RANK", "0")) == 0:
        if args.summary_json:
            write_summary_json(args.summary_json, result.to_dict() | {"wall_seconds": clock.wall()})
        log_summary(result, wall_seconds=clock.wall(), summary_json=args.summary_json)
    return 0


def write_summary_json(path: str, data: dict) -> None:
    try:
        with open(path, "w") as f:
            json.dump(data, f, indent=2)
    except OSError as e:
        raise MergeIOError(f"cannot write --summary-json {path}: {e.strerror}; the merge itself finished") from None


def merge_options(args: argparse.Namespace):
    """Every MergeOptions field from the flag of the same name (so the two cannot drift); a field
    without a flag keeps its default."""
    from .merge import MergeOptions

    names = {f.name for f in dataclasses.fields(MergeOptions)} - {"progress"}
    given = {name: getattr(args, name) for name in names if hasattr(args, name)}
    return MergeOptions(**given, progress=not args.no_progress)


def run_verify(args) -> int:
    from .verify import check_merged, compare_logits, compare_source_with_reference, compare_with_reference

    if args.command == "test":  # verl's spelling of verify --source --reference
        args.target, args.iteration, args.logits, args.allow_incomplete = None, None, False, False
    if args.source:
        if not args.reference or args.target:
            raise MergeError("verify --source CKPT needs --reference HF_DIR and no TARGET")
        report = compare_source_with_reference(args.source, args.reference, args.atol, args.rtol,
                                               args.hf_config, args.iteration, args.vocab_size)
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

"""Every step of a training run: `merge --steps` and `watch`.

A training run leaves one save per step. This module finds them the way each framework marks them,
tells a complete save from one still being written, and merges each complete step into
TARGET/<step name>/, all in one job: the process group is started once and `run_merge` runs per
step on it (a live group is used as is and left alive).

"Complete", per framework (a save is never read before its framework has said it is whole):
- verl: `global_step_N/` (source: its `actor/`) once latest_checkpointed_iteration.txt, which verl
  writes after the whole save, names N or a later step;
- Megatron-LM: `iter_NNNNNNN/` once latest_checkpointed_iteration.txt names N or later;
- DeepSpeed: tag `global_stepN/` once the `latest` file names a tag of step N or later;
- Hugging Face Trainer (TRL, accelerate with DeepSpeed): `checkpoint-N/` once its
  trainer_state.json exists, the last file the Trainer writes;
- PyTorch DCP (torchtitan): `step-N/` once its `.metadata` exists, which DCP writes last.

A step is skipped when TARGET/<step>/ already holds a published merge (its manifest) and, where
--verify or --hf-upload-path asks for it, distmerge-steps.json in TARGET records the self-check and
the upload. Rank 0 decides what to do and every rank follows that one decision.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import time
from dataclasses import dataclass, field

from .errors import MergeAbortedError, MergeError, MergeIOError
from .integrity import MANIFEST

log = logging.getLogger("distmerge")

TRACKER = "latest_checkpointed_iteration.txt"   # verl and Megatron-LM
LATEST = "latest"                               # DeepSpeed
LEDGER = "distmerge-steps.json"                 # in TARGET: what each step's merge did
MAX_TRACKER_BYTES = 256


@dataclass(frozen=True)
class Step:
    """One saved step of a run."""

    number: int
    name: str                    # the directory name in the run, and under TARGET
    source: str                  # what `merge --source` gets for this step
    iteration: int | None = None  # Megatron-LM: `merge --iteration`


@dataclass
class Scan:
    """The steps of a run: complete saves and saves still being written (or cut short)."""

    framework: str
    complete: list[Step] = field(default_factory=list)
    in_progress: list[Step] = field(default_factory=list)


@dataclass(frozen=True)
class Layout:
    """How one framework names its steps and marks a save complete."""

    framework: str
    pattern: re.Pattern
    completion: str              # "tracker", "latest", or a file that the finished save holds


LAYOUTS = [
    Layout("verl", re.compile(r"global_step_(\d+)"), "tracker"),
    Layout("megatron", re.compile(r"iter_(\d{7})"), "tracker"),
    Layout("deepspeed", re.compile(r"global_step(\d+)"), "latest"),
    Layout("hf-trainer", re.compile(r"checkpoint-(\d+)"), "trainer_state.json"),
    Layout("dcp", re.compile(r"step-(\d+)"), ".metadata"),
]


def read_marker(path: str, what: str) -> str | None:
    """A small marker file's text (a tracker, DeepSpeed's `latest`); None where it is absent."""
    if not os.path.isfile(path):
        return None
    try:
        with open(path, "rb") as f:
            return f.read(MAX_TRACKER_BYTES).decode().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise MergeError(f"{path} ({what}) cannot be read: {e}") from None


def completed_up_to(run_dir: str, layout: Layout) -> int | None:
    """The last step the run's marker file declares complete (tracker and `latest` layouts)."""
    if layout.completion == "tracker":
        text = read_marker(os.path.join(run_dir, TRACKER), "the latest complete step")
        match = re.fullmatch(r"\d+", text or "")
    else:
        text = read_marker(os.path.join(run_dir, LATEST), "DeepSpeed's latest tag")
        match = layout.pattern.fullmatch(text or "")
    if text is None:
        return None
    if not match:
        raise MergeError(f"{os.path.join(run_dir, TRACKER if layout.completion == 'tracker' else LATEST)} says "
                         f"{text[:40]!r}, not a step; --steps cannot tell which saves are complete")
    return int(match.group(1) if match.groups() else match.group(0))


def step_of(run_dir: str, layout: Layout, name: str, number: int) -> Step:
    path = os.path.join(run_dir, name)
    if layout.framework == "verl" and os.path.isdir(os.path.join(path, "actor")):
        return Step(number, name, os.path.join(path, "actor"))
    if layout.framework == "megatron":
        return Step(number, name, run_dir, iteration=number)
    return Step(number, name, path)


def scan(run_dir: str) -> Scan | None:
    """The run's steps under the first layout that has any; None when no layout has a step yet."""
    try:
        names = sorted(n for n in os.listdir(run_dir) if os.path.isdir(os.path.join(run_dir, n)))
    except FileNotFoundError:
        return None
    except OSError as e:
        raise MergeIOError(f"cannot list {run_dir}: {e.strerror}") from None
    for layout in LAYOUTS:
        found = {int(m.group(1)): n for n in names if (m := layout.pattern.fullmatch(n))}
        if not found:
            continue
        result = Scan(layout.framework)
        last = completed_up_to(run_dir, layout) if layout.completion in ("tracker", "latest") else None
        for number in sorted(found):
            step = step_of(run_dir, layout, found[number], number)
            if layout.completion in ("tracker", "latest"):
                complete = last is not None and number <= last
            else:
                complete = os.path.isfile(os.path.join(run_dir, found[number], layout.completion))
            (result.complete if complete else result.in_progress).append(step)
        return result
    return None


def select(found: Scan, spec) -> list[Step]:
    """The complete steps `--steps` names: all, latest, or numbers (one not complete is refused)."""
    if spec == "all":
        return list(found.complete)
    if spec == "latest":
        return found.complete[-1:]
    complete = {s.number: s for s in found.complete}
    writing = {s.number for s in found.in_progress}
    for n in spec:
        if n in writing:
            raise MergeError(f"step {n} is still being written (or its save was cut short); it is merged once "
                             "complete: rerun later, or use `distmerge watch`")
        if n not in complete:
            have = ", ".join(str(s) for s in sorted(complete)) or "none"
            raise MergeError(f"step {n} is not in this run; its complete steps: {have}")
    return [complete[n] for n in sorted(set(spec))]


@dataclass(frozen=True)
class Todo:
    """What this job does for one step, decided on rank 0."""

    step: Step
    target: str
    resume: bool = False         # a staging directory of an interrupted merge of this step is there
    upload_only: bool = False    # merged and checked before; the upload is what is missing
    check_only: bool = False     # merged before without the self-check that is asked for now


class Ledger:
    """TARGET/distmerge-steps.json: per step, its source, whether --verify's self-check passed and
    where it was uploaded. Written by rank 0 after each step (a new file, then a rename)."""

    def __init__(self, out_dir: str):
        self.path = os.path.join(out_dir, LEDGER)
        try:
            with open(self.path) as f:
                data = json.load(f)
            self.steps: dict[str, dict] = data["steps"] if isinstance(data.get("steps"), dict) else {}
        except (OSError, ValueError, AttributeError):
            self.steps = {}

    def record(self, name: str, **fields) -> None:
        self.steps[name] = self.steps.get(name, {}) | fields
        tmp = self.path + ".tmp"
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            with open(tmp, "w") as f:
                json.dump({"steps": self.steps}, f, indent=2)
            os.replace(tmp, self.path)
        except OSError as e:
            raise MergeIOError(f"cannot write {self.path}: {e.strerror}; step {name} itself is complete") from None


def decide(step: Step, out_dir: str, opts, ledger: Ledger) -> Todo | None:
    """None when the step is already merged (and checked and uploaded where asked)."""
    from .finish import staging_dir

    target = os.path.join(out_dir, step.name)
    entry = ledger.steps.get(step.name, {})
    if os.path.isfile(os.path.join(target, MANIFEST)):
        checked = entry.get("verified") or not (opts.verify or opts.hf_upload_path)
        if checked and (not opts.hf_upload_path or entry.get("uploaded_to") == opts.hf_upload_path):
            return None
        return Todo(step, target, upload_only=checked, check_only=not checked)
    return Todo(step, target, resume=opts.resume or os.path.isdir(staging_dir(target)))


def shared(rt, decide_on_rank0):
    """Rank 0's answer on every rank; a MergeError there is raised on every rank."""
    answer = None
    if rt.rank == 0:
        try:
            answer = decide_on_rank0()
        except MergeError as e:
            answer = e
    if rt.world_size > 1:
        answer = rt.group.broadcast(answer)
    if isinstance(answer, MergeError):
        raise answer
    return answer


@dataclass
class Outcome:
    """What happened to each step in this job, for the log, the exit code and --summary-json."""

    merged: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, int] = field(default_factory=dict)     # step name -> exit code
    results: dict[str, dict] = field(default_factory=dict)   # step name -> MergeResult or error, as JSON

    @property
    def exit_code(self) -> int:
        return next(iter(self.failed.values()), 0)


def run_todo(todo: Todo, template, rt, ledger: Ledger, outcome: Outcome) -> None:
    """Merge one step (or upload it); a bad step is reported and the job goes on to the next."""
    from .merge import run_merge
    from .summary import log_summary

    name, repo = todo.step.name, template.hf_upload_path
    try:
        if todo.check_only:
            shared(rt, lambda: check_step(todo, template, ledger))
        elif not todo.upload_only:
            opts = dataclasses.replace(template, source=todo.step.source, target=todo.target,
                                       iteration=todo.step.iteration, resume=todo.resume, hf_upload_path=None,
                                       verify=template.verify or bool(repo))
            result = run_merge(opts)
            outcome.results[name] = result.to_dict()
            if rt.rank == 0:
                ledger.record(name, source=todo.step.source, verified=result.verified)
                log_summary(result)
        if repo:
            shared(rt, lambda: upload_step(todo, template, ledger))
        outcome.merged.append(name)
    except MergeAbortedError:
        raise
    except MergeError as e:
        if not e.all_ranks:  # one rank's own failure: the others may be waiting on it
            raise
        if rt.rank == 0:
            log.error("step %s: %s", name, e)
        outcome.failed[name] = e.exit_code
        outcome.results[name] = {"error": str(e), "exit_code": e.exit_code}


def check_step(todo: Todo, template, ledger: Ledger) -> None:
    """Rank 0: --verify's self-check on a step merged earlier without it."""
    from .selfcheck import self_check

    ledger.record(todo.step.name, verified=self_check(todo.target, todo.target, template.trust_remote_code))


def upload_step(todo: Todo, template, ledger: Ledger) -> None:
    """Rank 0: the step's directory to the Hub repo, on the revision (branch) `step-N`."""
    from .upload import upload

    revision = f"step-{todo.step.number}"
    url = upload(todo.target, template.hf_upload_path, template.private, revision=revision)
    ledger.record(todo.step.name, uploaded_to=template.hf_upload_path, revision=revision, url=url)


@dataclass
class Round:
    """Rank 0's look at the run, shared with every rank: what to do now and what it saw."""

    todos: list[Todo]
    skipped: list[str]           # complete, chosen, already merged
    found: Scan | None


def plan_round(run_dir: str, out_dir: str, spec, opts, failed: dict) -> Round:
    """Rank 0: the steps to merge now, in step order (a step that failed in this job is not retried)."""
    found = scan(run_dir)
    if found is None:
        return Round([], [], None)
    ledger = Ledger(out_dir)
    todos, skipped = [], []
    for step in select(found, spec):
        if step.name in failed:
            continue
        todo = decide(step, out_dir, opts, ledger)
        if todo is None:
            skipped.append(step.name)
        else:
            todos.append(todo)
    return Round(todos, skipped, found)


def listing(items: list, most: int = 8) -> str:
    """`100, 200, 300`, or for a long run `12 steps: 100, 200, 300 ... 1200`."""
    items = [str(i) for i in items]
    if len(items) <= most:
        return ", ".join(items) or "none"
    return f"{len(items)} steps: {', '.join(items[:3])} ... {items[-1]}"


def describe(run_dir: str, r: Round) -> str:
    """`RUN: verl run; complete steps 100, 200; being written: 300; to do: 200; already merged: 100`."""
    found = r.found
    parts = [f"{run_dir}: {found.framework} run", "complete steps " + listing([s.number for s in found.complete])]
    if found.in_progress:
        parts.append("being written or cut short: " + listing([s.number for s in found.in_progress]))
    parts.append("to do: " + listing([t.step.name + (" (self-check)" if t.check_only else " (upload)" if t.upload_only
                                                      else "") for t in r.todos]))
    if r.skipped:
        parts.append("already merged: " + listing(r.skipped))
    return "; ".join(parts)


NO_STEPS = ("holds no saved steps (verl global_step_N/, Megatron-LM iter_NNNNNNN/, DeepSpeed global_stepN/ with "
            "latest, Trainer checkpoint-N/, DCP step-N/)")


def merge_listed(rt, args, template, outcome: Outcome) -> None:
    """`merge --steps`: the chosen complete steps, once."""
    r = shared(rt, lambda: plan_round(args.source, args.target, args.steps, template, {}))
    if r.found is None:
        raise MergeError(f"{args.source} {NO_STEPS}")
    if not r.found.complete:
        raise MergeError(f"{args.source} has no complete step yet ({describe(args.source, r)}); "
                         "`distmerge watch` waits for them")
    if rt.rank == 0:
        log.info("%s", describe(args.source, r))
    outcome.skipped += r.skipped
    for todo in r.todos:
        run_todo(todo, template, rt, Ledger(args.target), outcome)


def watch(rt, args, template, outcome: Outcome) -> None:
    """`watch`: merge each complete step as it appears, until --until's step is merged or a signal
    comes while waiting (a normal end). A signal during a step's merge ends the job with exit 4,
    that step resumable."""
    said = None
    while True:
        try:
            r = shared(rt, lambda: plan_round(args.source, args.target, "all", template, outcome.failed))
        except MergeAbortedError as e:
            return stopped_while_waiting(rt, e)
        if rt.rank == 0 and r.found is not None and describe(args.source, r) != said:
            said = describe(args.source, r)
            log.info("%s", said)
        elif rt.rank == 0 and r.found is None and said is None:
            said = f"{args.source} {NO_STEPS} yet; waiting"
            log.info("%s", said)
        outcome.skipped += [n for n in r.skipped if n not in outcome.skipped and n not in outcome.merged]
        for todo in r.todos:
            run_todo(todo, template, rt, Ledger(args.target), outcome)
        if args.until is not None and r.found and any(s.number >= args.until for s in r.found.complete):
            return
        try:
            time.sleep(args.interval)
        except MergeAbortedError as e:
            return stopped_while_waiting(rt, e)


def stopped_while_waiting(rt, e: MergeAbortedError) -> None:
    if rt.rank == 0:
        log.info("watch: %s while waiting for new steps; nothing was being merged", str(e).split(";")[0])


def run_steps(args, template, started: float | None = None) -> int:
    """`merge --steps` or `watch` on this rank: one process group for every step. `started`: when
    the user's command started (time.time()), for the last line's wall time."""
    from . import runtime

    started = started or time.time()
    rt = runtime.start("auto" if template.backend in ("fsdp", "megatron") else template.backend, template.timeout)
    outcome = Outcome()
    try:
        (watch if args.command == "watch" else merge_listed)(rt, args, template, outcome)
    finally:
        rt.close()
    if rt.rank == 0:
        finish_log(args, outcome, time.time() - started)
    return outcome.exit_code


def finish_log(args, outcome: Outcome, seconds: float) -> None:
    """Rank 0: the job's last line, and --summary-json with every step's result."""
    log.info("steps: merged %d (%s), already merged %d, failed %d%s; %.2f s wall time", len(outcome.merged),
             ", ".join(outcome.merged) or "none", len(outcome.skipped), len(outcome.failed),
             f" ({', '.join(outcome.failed)})" if outcome.failed else "", seconds)
    if args.summary_json:
        data = dataclasses.asdict(outcome) | {"seconds": seconds}
        try:
            with open(args.summary_json, "w") as f:
                json.dump(data, f, indent=2)
        except OSError as e:
            log.error("cannot write --summary-json %s: %s", args.summary_json, e.strerror)

"""Seeded mutations of valid inputs of every format (issue 13): each must end in a refusal (a
MergeError with exit 2, 3 or 4, and no target that looks complete) or in an output identical to
the clean merge's. Nothing wrong may be published; any other exception is a failure.

Inputs: a verl FSDP rank file, fsdp_config.json and config.json; a DCP `.metadata` and `.distcp`;
a Megatron torch_dist `common.pt`, `metadata.json` and `.metadata`; a legacy Megatron-LM `mp_rank`
file and its tracker; and a merged output for `verify`. Mutations: ints, strings and bytes of the
pickles (the archive rebuilt with valid checksums, so the pickle itself is what is tested), bytes
of the zip structure and of the DCP files outside the tensor payloads (a payload byte changes the
weights legitimately), JSON fields set to values of other types, and truncations.

Merges run in this process (distmerge.merge.run_merge), one after another. Where an output differs
from the clean merge (a mutation that changed what the file means), an independent reading is the
judge: torch.load of the verl rank files, assembled by their placements, must give the same weights.
The seed is fixed (FUZZ_SEED overrides it; FUZZ_SCALE multiplies the counts)."""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from conftest import ROOT, clean_env, source_dir
from distmerge.errors import MergeError
from distmerge.finish import INCOMPLETE, staging_dir
from distmerge.merge import MergeOptions, run_merge
from test_hostile import INT_OPS, encode_int, members, ops, pickle_name, replace_op, write_zip

SEED = int(os.environ.get("FUZZ_SEED", "1313"))
SCALE = float(os.environ.get("FUZZ_SCALE", "1"))
HOSTILE_INTS = (-1, 0, 1, 2, 7, -(2 ** 31), 2 ** 31, 2 ** 40, 2 ** 63, -(2 ** 63))
HOSTILE_JSON = (None, -1, 0, 1, 2 ** 40, 1.5, True, "", "x" * 300, [], [1, "a"], {}, {"a": {"b": 1}})
DEEP = "[" * 100_000 + "]" * 100_000


@dataclass
class Subject:
    """A file of a source to mutate: its path inside the source, its kind and how many mutations."""

    rel: str
    kind: str          # zip | pickle | distcp | json | text
    count: int


@dataclass
class Case:
    layout: str
    subjects: list[Subject]
    oracle: str = "none"  # "verl": torch.load of the rank files judges an output that differs


CASES = {
    "verl": Case("llama_fsdp2_w2", [Subject("model_world_size_2_rank_1.pt", "zip", 150),
                                    Subject("fsdp_config.json", "json", 15),
                                    Subject("huggingface/config.json", "json", 35)], oracle="verl"),
    "dcp": Case("qwen2_dcp_fsdp2_w2", [Subject(".metadata", "pickle", 90), Subject("__1_0.distcp", "distcp", 40)]),
    "megatron": Case("mg_llama_tp2", [Subject("dist_ckpt/common.pt", "zip", 30),
                                      Subject("dist_ckpt/metadata.json", "json", 10),
                                      Subject("dist_ckpt/.metadata", "pickle", 40),
                                      Subject("huggingface/config.json", "json", 25)]),
    "legacy": Case("mg_llama_legacy_tp2pp2", [Subject("iter_0000001/mp_rank_01_001/model_optim_rng.pt", "zip", 80),
                                              Subject("latest_checkpointed_iteration.txt", "text", 5)]),
}


# ---------------------------------------------------------------- mutations: bytes -> bytes

def pickle_int(rng: random.Random, pkl: bytes) -> tuple[bytes, str]:
    spots = [(start, end, arg) for name, arg, start, end in ops(pkl) if name in INT_OPS]
    if not spots:
        return flip_bytes(rng, pkl)
    start, end, old = rng.choice(spots)
    new = rng.choice(HOSTILE_INTS + (old + 1, old - 1, -old, old * 2, rng.randrange(-10 ** 6, 10 ** 6)))
    return replace_op(pkl, start, end, encode_int(new)), f"int at {start}: {old} -> {new}"


def pickle_string(rng: random.Random, pkl: bytes) -> tuple[bytes, str]:
    spots = [(start, end, arg) for name, arg, start, end in ops(pkl)
             if name in ("BINUNICODE", "SHORT_BINUNICODE", "UNICODE") and isinstance(arg, str)]
    if not spots:
        return pickle_int(rng, pkl)
    start, end, old = rng.choice(spots)
    others = [s for *_, s in spots if s != old]
    new = rng.choice(["", old[:-1], old + "x", old.upper(), "../" + old, "/etc/passwd", "0", "-1",
                      rng.choice(others) if others else "y"])
    encoded = new.encode("utf-8", "surrogatepass")
    op = b"X" + len(encoded).to_bytes(4, "little") + encoded
    return replace_op(pkl, start, end, op), f"string at {start}: {old[:30]!r} -> {new[:30]!r}"


def flip_bytes(rng: random.Random, data: bytes, allowed=None) -> tuple[bytes, str]:
    """One to three bytes set to random values, inside the ranges `allowed` lists (anywhere by default)."""
    allowed = [(a, b) for a, b in (allowed or [(0, len(data))]) if b > a]
    data = bytearray(data)
    where = []
    for _ in range(rng.randint(1, 3)):
        a, b = rng.choices(allowed, [b - a for a, b in allowed])[0]
        i = rng.randrange(a, b)
        data[i] = rng.randrange(256)
        where.append(i)
    return bytes(data), f"bytes at {where}"


def truncate(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    n = rng.choice([0, 1, 7, rng.randrange(len(data)), len(data) - 1, len(data) // 2])
    return data[:n], f"truncated to {n} of {len(data)} bytes"


def outside(ranges, size: int) -> list[tuple[int, int]]:
    """The byte ranges of a file of `size` bytes that none of `ranges` covers."""
    gaps, at = [], 0
    for a, b in sorted(ranges):
        gaps.append((at, a))
        at = max(at, b)
    return gaps + [(at, size)]


def payload_ranges(path: Path) -> list[tuple[int, int]]:
    """The bytes of a torch.save archive's storage members: changing them changes weights legitimately."""
    from distmerge.sources.torch_archive import _read_archive

    with open(path, "rb") as f:
        _, prefix, offsets = _read_archive(f, str(path))
    return [(off, off + size) for name, (off, size) in offsets.items() if name.startswith(prefix + "data/")]


def mutate_zip(rng: random.Random, original: bytes, path: Path, payload) -> tuple[bytes, str]:
    how = rng.choices(["int", "string", "pickle_bytes", "structure", "truncate", "rezip"], [40, 12, 15, 20, 8, 5])[0]
    if how in ("structure", "truncate"):
        if how == "structure":
            data, what = flip_bytes(rng, original, outside(payload, len(original)))
        else:
            data, what = truncate(rng, original)
        return data, f"{how}: {what}"
    path.write_bytes(original)
    name = pickle_name(path)
    entries, what = [], "rebuilt archive"
    for info, data in members(path):
        if info.filename == name and how != "rezip":
            data, what = {"int": pickle_int, "string": pickle_string, "pickle_bytes": flip_bytes}[how](rng, data)
        entries.append((info.filename, data))
    write_zip(path, entries)
    return path.read_bytes(), f"{how}: {what}"


def mutate_pickle(rng: random.Random, original: bytes) -> tuple[bytes, str]:
    how = rng.choices(["int", "string", "bytes", "truncate"], [45, 20, 25, 10])[0]
    data, what = {"int": pickle_int, "string": pickle_string, "bytes": flip_bytes, "truncate": truncate}[how](
        rng, original)
    return data, f"{how}: {what}"


def json_paths(value, prefix=()):
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from json_paths(v, prefix + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value[:8]):
            yield from json_paths(v, prefix + (i,))


def mutate_json(rng: random.Random, original: bytes) -> tuple[bytes, str]:
    how = rng.choices(["field", "delete", "bytes", "truncate", "deep"], [60, 15, 10, 10, 5])[0]
    if how in ("bytes", "truncate"):
        data, what = (flip_bytes if how == "bytes" else truncate)(rng, original)
        return data, f"{how}: {what}"
    if how == "deep":
        return DEEP.encode(), "deep nesting"
    doc = json.loads(original)
    paths = [p for p in json_paths(doc) if p]
    if not paths:
        return DEEP.encode(), "deep nesting"
    path = rng.choice(paths)
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    if how == "delete":
        del parent[path[-1]]
        return json.dumps(doc).encode(), f"deleted {path}"
    new = rng.choice(HOSTILE_JSON + ((parent[path[-1]] or 0) * 2 if isinstance(parent[path[-1]], int) else "z",))
    parent[path[-1]] = new
    return json.dumps(doc).encode(), f"{path} = {json.dumps(new)[:40]}"


def mutate_text(rng: random.Random, original: bytes) -> tuple[bytes, str]:
    new = rng.choice([b"", b"abc", b"-1", b"99999999999999999999", b"2\n", b"1" * 100, b"\xff\xfe"])
    return new, f"text {new[:20]!r}"


# ---------------------------------------------------------------- judging one run

def digests(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.glob("*.safetensors"))}


def looks_complete(target: Path) -> bool:
    return target.exists() and not (target / INCOMPLETE).exists()


def verl_reading(source: Path) -> dict[str, torch.Tensor]:
    """The weights torch itself reads from verl rank files: each DTensor's local tensor, in rank
    order, joined on its Shard dim (the fixture's mesh is one-dimensional)."""
    import torch.distributed.tensor  # noqa: F401  registers DTensor for torch.load

    files = sorted(source.glob("model_world_size_*_rank_*.pt"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))
    states = [torch.load(f, weights_only=True) for f in files]
    out = {}
    for name, first in states[0].items():
        (placement,) = first.placements
        locals_ = [s[name]._local_tensor for s in states]
        out[name] = torch.cat(locals_, placement.dim) if placement.is_shard() else locals_[0]
    return out


def same_as_torch(source: Path, target: Path) -> bool:
    from safetensors.torch import load_file

    try:
        expected = verl_reading(source)
    except Exception:  # noqa: BLE001 - torch cannot read it: distmerge must not have published it
        return False
    got = {}
    for f in target.glob("*.safetensors"):
        got.update(load_file(f))
    return got.keys() == expected.keys() and all(
        got[k].dtype == expected[k].dtype and torch.equal(got[k], expected[k]) for k in got)


@dataclass
class Tally:
    runs: int = 0
    refused: dict = field(default_factory=dict)   # exit code -> count
    identical: int = 0
    judged_equal: int = 0                         # differed from clean, equal to torch's own reading
    failures: list = field(default_factory=list)

    def line(self, name: str, seconds: float) -> str:
        return (f"fuzz {name}: {self.runs} mutations in {seconds:.1f} s: refused {dict(sorted(self.refused.items()))}, "
                f"identical {self.identical}, changed and equal to torch's reading {self.judged_equal}, "
                f"failures {len(self.failures)}")


def judge(tally: Tally, case: Case, source: Path, target: Path, clean: dict, what: str) -> None:
    """One merge of a mutated source: a refusal, or an output equal to the clean one (or to torch's reading)."""
    tally.runs += 1
    try:
        run_merge(MergeOptions(source=str(source), target=str(target), progress=False))
    except MergeError as e:
        tally.refused[e.exit_code] = tally.refused.get(e.exit_code, 0) + 1
        if e.exit_code not in (2, 3, 4):
            tally.failures.append(f"{what}: exit {e.exit_code}: {e}")
        elif looks_complete(target):
            tally.failures.append(f"{what}: refused ({e}) but the target looks complete")
        return
    except Exception as e:  # noqa: BLE001 - the point of the test: anything else is a failure
        tally.failures.append(f"{what}: {type(e).__name__}: {e}\n{traceback.format_exc(limit=-3)}")
        return
    if digests(target) == clean:
        tally.identical += 1
    elif case.oracle == "verl" and same_as_torch(source, target):
        tally.judged_equal += 1
    else:
        tally.failures.append(f"{what}: exit 0 with weights that differ from the clean merge")


def reset(target: Path) -> None:
    shutil.rmtree(target, ignore_errors=True)
    shutil.rmtree(staging_dir(str(target)), ignore_errors=True)


def payload_of(path: Path, kind: str, catalogue) -> list[tuple[int, int]]:
    if kind == "zip":
        return payload_ranges(path)
    if kind == "distcp":  # the pieces distmerge copies out of this file
        return [(p.offset, p.offset + p.span_elements * p.dtype.itemsize) for t in catalogue.tensors.values()
                for p in t.pieces if os.path.samefile(p.file, path)]
    return []


def mutate(rng: random.Random, subject: Subject, original: bytes, path: Path, payload) -> tuple[bytes, str]:
    if subject.kind == "zip":
        return mutate_zip(rng, original, path, payload)
    if subject.kind == "pickle":
        return mutate_pickle(rng, original)
    if subject.kind == "distcp":
        if rng.random() < 0.2:
            return truncate(rng, original)
        return flip_bytes(rng, original, outside(payload, len(original)))
    if subject.kind == "json":
        return mutate_json(rng, original)
    return mutate_text(rng, original)


def fuzz_case(name: str, case: Case, checkpoint, work: Path) -> Tally:
    from distmerge.prepare import prepare

    root = work / "src"
    shutil.copytree(checkpoint(case.layout), root, ignore=shutil.ignore_patterns("reference", "dist_ckpt_ref"))
    source = source_dir(case.layout, root)
    target = work / "out"
    run_merge(MergeOptions(source=str(source), target=str(target), progress=False))
    clean = digests(target)
    catalogue = prepare(str(source)).catalogue
    tally = Tally()
    rng = random.Random(f"{SEED}-{name}")
    for subject in case.subjects:
        path = source / subject.rel
        original = path.read_bytes()
        payload = payload_of(path, subject.kind, catalogue)
        for i in range(max(1, int(subject.count * SCALE))):
            reset(target)
            data, what = mutate(rng, subject, original, path, payload)
            path.write_bytes(data)
            judge(tally, case, source, target, clean, f"{name} {subject.rel} #{i} {what}")
        path.write_bytes(original)
    reset(target)
    return tally


@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", sorted(CASES))
def test_fuzz_merge(name, checkpoint, tmp_path, capsys):
    start = time.perf_counter()
    tally = fuzz_case(name, CASES[name], checkpoint, tmp_path)
    with capsys.disabled():
        print("\n" + tally.line(name, time.perf_counter() - start))
    assert not tally.failures, "\n".join(tally.failures[:20])
    assert sum(tally.refused.values()) > tally.runs // 4, "most mutations should be refused: is the fuzz biting?"


# ---------------------------------------------------------------- verify: a merged output, damaged

VERIFY_SUBJECTS = [("model-00001-of-00004.safetensors", "safetensors", 80),
                   ("model.safetensors.index.json", "json", 40),
                   ("distmerge-manifest.json", "json", 25), ("config.json", "json", 15)]


def mutate_safetensors(rng: random.Random, original: bytes) -> tuple[bytes, str]:
    how = rng.choices(["header", "bytes", "truncate"], [60, 25, 15])[0]
    if how != "header":
        data, what = (flip_bytes if how == "bytes" else truncate)(rng, original)
        return data, f"{how}: {what}"
    n = int.from_bytes(original[:8], "little")
    header, what = mutate_json(rng, original[8:8 + n])
    return len(header).to_bytes(8, "little") + header + original[8 + n:], f"header: {what}"


def judge_verify(tally: Tally, out: Path, reference: Path, changed: bool, weights: bool, what: str) -> None:
    """verify on a damaged output: exit 3 (a report that fails, or a MergeVerifyError), never an
    exception; a changed weight file never passes."""
    from distmerge.verify import check_merged, compare_with_reference

    tally.runs += 1
    try:
        report = check_merged(str(out))
        compare_with_reference(str(out), str(reference), None, None, report)
    except MergeError as e:
        tally.refused[e.exit_code] = tally.refused.get(e.exit_code, 0) + 1
        if e.exit_code != 3:
            tally.failures.append(f"{what}: exit {e.exit_code}: {e}")
        return
    except Exception as e:  # noqa: BLE001
        tally.failures.append(f"{what}: {type(e).__name__}: {e}\n{traceback.format_exc(limit=-3)}")
        return
    if not report.ok:
        tally.refused[3] = tally.refused.get(3, 0) + 1
    elif changed and weights:
        tally.failures.append(f"{what}: a changed weight file passed verify")
    else:
        tally.identical += 1


@pytest.mark.timeout(600)
def test_fuzz_verify(checkpoint, tmp_path, capsys):
    start = time.perf_counter()
    clean = tmp_path / "clean"
    run_merge(MergeOptions(source=str(checkpoint("llama_fsdp2_w2")), target=str(clean), progress=False,
                           max_shard_size="200KB"))
    out = tmp_path / "out"
    shutil.copytree(clean, out)
    assert [n for n, *_ in VERIFY_SUBJECTS if not (out / n).exists()] == []
    tally, rng = Tally(), random.Random(f"{SEED}-verify")
    for name, kind, count in VERIFY_SUBJECTS:
        original = (clean / name).read_bytes()
        for i in range(max(1, int(count * SCALE))):
            data, what = (mutate_safetensors if kind == "safetensors" else mutate_json)(rng, original)
            (out / name).write_bytes(data)
            judge_verify(tally, out, clean, data != original, kind == "safetensors", f"verify {name} #{i} {what}")
        (out / name).write_bytes(original)
    with capsys.disabled():
        print("\n" + tally.line("verify", time.perf_counter() - start))
    assert not tally.failures, "\n".join(tally.failures[:20])
    assert tally.refused.get(3, 0) > tally.runs // 4


# ---------------------------------------------------------------- end to end: one message, no traceback

def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "distmerge", *map(str, args)], capture_output=True, text=True,
                          env=clean_env(), cwd=ROOT, timeout=120)


def refused_mutation(rng: random.Random, how: str, src: Path, rank: Path, original: bytes, payload) -> None:
    """Write a mutation of the rank file that an in-process merge refuses (some mutations are
    harmless and merge to the clean output: those are drawn again)."""
    probe = src.parent / "probe"
    while True:
        reset(probe)
        if how == "int":
            data, _ = mutate_zip(rng, original, rank, payload)
        elif how == "structure":  # the zip's central directory, at the end of the file
            data, _ = flip_bytes(rng, original, [(len(original) - 2000, len(original))])
        else:
            data, _ = truncate(rng, original)
        rank.write_bytes(data)
        try:
            run_merge(MergeOptions(source=str(src), target=str(probe), progress=False))
        except MergeError:
            reset(probe)
            return


@pytest.mark.timeout(300)
def test_mutated_inputs_end_to_end_say_one_thing(checkpoint, tmp_path):
    """A few mutations through the real command line: exit 2, 3 or 4, exactly one error line, no
    traceback, and no target."""
    src = tmp_path / "ckpt"
    shutil.copytree(checkpoint("llama_fsdp2_w2"), src, ignore=shutil.ignore_patterns("reference"))
    rank = src / "model_world_size_2_rank_1.pt"
    original, payload = rank.read_bytes(), payload_ranges(rank)
    rng = random.Random(f"{SEED}-cli")
    seen = set()
    for how in ("int", "structure", "truncate", "deep config"):
        if how == "deep config":
            rank.write_bytes(original)
            (src / "huggingface" / "config.json").write_text(DEEP)
        else:
            refused_mutation(rng, how, src, rank, original, payload)
        proc = cli("merge", "--source", src, "--target", tmp_path / "out", "--no-progress")
        assert proc.returncode in (2, 3, 4), (how, proc.returncode, proc.stderr[-2000:])
        assert proc.stderr.count("distmerge: error:") == 1 and "Traceback" not in proc.stderr, (how, proc.stderr)
        assert not (tmp_path / "out").exists()
        seen.add(proc.returncode)
    assert seen >= {2, 4}, seen
    proc = cli("verify", tmp_path / "nothing")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr

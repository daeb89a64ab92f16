"""The lean `.metadata` unpickler (sources/dcp_pickle.py): the C unpickler's tables, far less memory,
and every file it cannot read, or that refers back to something it let go, refused (exit 2, the file named).

The fixtures are written by the real writers: torch.distributed.checkpoint.save here, FSDP2 under
torchrun and megatron-core through conftest's `checkpoint`.
"""
from __future__ import annotations

import collections
import os
import pickle
import random
import sys
import tracemalloc
import warnings

import pytest
import torch

from conftest import ROOT, CodeRunningPickle, run
from distmerge.cli import main
from distmerge.dtypes import DType
from distmerge.errors import MergeError
from distmerge.sources import dcp, dcp_pickle

sys.path.insert(0, str(ROOT / "bench"))
import scale  # noqa: E402

pytestmark = pytest.mark.slow  # real DCP checkpoints written by torch


def tables(path: str, lean: bool) -> tuple[dict, dict]:
    """A `.metadata` through one unpickler, as plain values to compare: entries and storage per tensor."""
    t = dcp_pickle.load_metadata(path, lean=lean)
    entries = {name: dcp_pickle.tensor_entry(e) if dcp_pickle.entry_kind(e) == "TensorStorageMetadata"
               else dcp_pickle.entry_kind(e) for name, e in t.entries.items()}
    return entries, {name: t.storage.take(name) for name in list(t.storage.rows)}


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> str:
    """A DCP directory written by dcp.save: 2-d, 1-d and 3-d tensors of three dtypes, and a non-tensor entry."""
    import torch.distributed.checkpoint as dcp_save

    out = str(tmp_path_factory.mktemp("dcp") / "ckpt")
    state = {f"model.layers.{i}.mlp.weight": torch.full((8, 4), float(i), dtype=torch.bfloat16) for i in range(12)}
    state.update({"model.norm.weight": torch.ones(4), "model.experts": torch.zeros(2, 3, 4, dtype=torch.float16),
                  "step": 3})
    with warnings.catch_warnings():  # one process, no process group: torch warns that it assumes so
        warnings.simplefilter("ignore")
        dcp_save.save(state, checkpoint_id=out)
    return out


def refused(capsys, source: str, tmp_path, *needles: str) -> None:
    """The CLI refuses the source with exit 2, one message that names its `.metadata`, no traceback."""
    code = main(["merge", "--source", source, "--target", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and err.count("distmerge: error:") == 1, err
    for needle in (os.path.join(source, ".metadata"), *needles):
        assert needle in err, (needle, err)
    assert not (tmp_path / "out").exists()


@pytest.fixture
def lean_only(monkeypatch):
    """Every `.metadata` read by the lean unpickler, however small."""
    monkeypatch.setattr(dcp_pickle, "LEAN_FROM", 0)


def test_lean_gives_the_c_tables_for_dcp_save(saved):
    lean, c = tables(os.path.join(saved, ".metadata"), True), tables(os.path.join(saved, ".metadata"), False)
    assert lean == c
    assert lean[0]["step"] == "BytesStorageMetadata" and lean[0]["model.experts"].size == (2, 3, 4)


@pytest.mark.parametrize("name", ["qwen2_dcp_fsdp2_w2", "mg_qwen3moe_mlm_ref"])
def test_lean_gives_the_c_tables_for_real_writers(checkpoint, name):
    """FSDP2's dcp.save under torchrun, and megatron-core's torch_dist, whose saved plans refer back
    to the chunk records (the lean unpickler keeps those in its memo)."""
    ckpt = checkpoint(name)
    path = str(ckpt / "dcp" / ".metadata") if "_dcp_" in name else str(next(ckpt.glob("iter_*")) / ".metadata")
    if name.startswith("mg_"):
        assert b"all_local_plans" in open(path, "rb").read()  # the refer-backs this case is here for
    lean, c = tables(path, True), tables(path, False)
    assert lean == c and lean[0]


def test_size_picks_the_unpickler(saved, monkeypatch):
    """At LEAN_FROM bytes and up the lean unpickler alone reads `.metadata`; below, it checks the
    file first and the C one reads it."""
    used = []
    for cls in (dcp_pickle.LeanUnpickler, dcp_pickle.MetadataUnpickler):
        monkeypatch.setattr(cls, "load", lambda self, real=cls.load: used.append(type(self).__name__) or real(self))
    size = os.path.getsize(os.path.join(saved, ".metadata"))
    monkeypatch.setattr(dcp_pickle, "LEAN_FROM", size + 1)
    dcp_pickle.load_metadata(os.path.join(saved, ".metadata"))
    assert used == ["LeanUnpickler", "MetadataUnpickler"]
    used.clear()
    monkeypatch.setattr(dcp_pickle, "LEAN_FROM", size)
    dcp_pickle.load_metadata(os.path.join(saved, ".metadata"))
    assert used == ["LeanUnpickler"]


def test_lean_memory_per_chunk(tmp_path):
    """The point of the lean unpickler: what a chunk costs while `.metadata` is read (peak) and
    after (the tables kept). Measured with tracemalloc on bench/scale.py's layout, 5 layers saved
    by 16 ranks (25,648 chunks); the 1 MiB read buffer is about 80 of the lean peak's bytes here."""
    scale.make(str(tmp_path), 16, scale.SMALL, 5, sparse=True)
    path = str(tmp_path / ".metadata")
    chunks = sum(len(scale.row_chunks(shape[0], 16)) for _, shape in scale.tensors(scale.SMALL, 5))
    peak, kept = {}, {}
    for lean in (True, False):
        tracemalloc.start()
        result = dcp_pickle.load_metadata(path, lean=lean)
        kept[lean], peak[lean] = (n / chunks for n in tracemalloc.get_traced_memory())
        tracemalloc.stop()
        del result
    assert peak[True] < 450 and kept[True] < 120, (peak, kept)  # bytes per chunk; measured 344 and 82
    assert peak[False] > 1000 and kept[False] > 400, (peak, kept)  # the C unpickler: 1389 and 449


def with_metadata(saved: str, tmp_path, change) -> str:
    """A copy of the saved directory whose `.metadata` is the real Metadata object changed by `change`
    (which returns it, or bytes to write instead), re-pickled as dcp.save pickles it."""
    from torch.distributed.checkpoint import FileSystemReader

    out = tmp_path / "ckpt"
    out.mkdir()
    for name in os.listdir(saved):
        if name != ".metadata":
            os.symlink(os.path.join(saved, name), out / name)
    meta = change(FileSystemReader(saved).read_metadata())
    (out / ".metadata").write_bytes(meta if isinstance(meta, bytes) else pickle.dumps(meta))
    return str(out)


def state_dict_again(meta):
    """planner_data refers back to a chunk's state dict, which the lean unpickler let go after its BUILD."""
    chunk = meta.state_dict_metadata["model.layers.0.mlp.weight"].chunks[0]
    meta.planner_data = {"again": chunk.__dict__}
    return meta


def storage_record_early(meta):
    """A storage key pickled in planner_data first: storage_data refers back to the record, let go."""
    meta.planner_data = {"early": next(iter(meta.storage_data))}
    return meta


@pytest.mark.parametrize("change", [state_dict_again, storage_record_early])
def test_reference_to_what_was_let_go_is_refused(saved, tmp_path, capsys, lean_only, change):
    """No DCP writer refers back to a record's state or a storage record; a file that does is
    refused (the C unpickler would read it), never read into a wrong catalogue."""
    source = with_metadata(saved, tmp_path, change)
    with open(os.path.join(source, ".metadata"), "rb") as f:
        dcp_pickle.MetadataUnpickler(f).load()  # valid for the C unpickler alone
    refused(capsys, source, tmp_path, "refers back")


@pytest.mark.parametrize("protocol", [2, 3, 5])
def test_other_pickle_protocols_read_as_the_c_path(saved, tmp_path, protocol):
    """dcp.save pickles with protocol 4 (MEMOIZE, frames); older Pythons wrote 2 or 3 (BINPUT)."""
    path = os.path.join(with_metadata(saved, tmp_path, lambda meta: pickle.dumps(meta, protocol=protocol)),
                        ".metadata")
    assert tables(path, True) == tables(path, False) == tables(os.path.join(saved, ".metadata"), False)


def test_chunk_referred_back_reads_as_the_c_path(saved, tmp_path):
    """What the lean unpickler keeps: a chunk record (Megatron's plans) or a Size referred back to later."""
    def chunk_again(meta):
        entry = meta.state_dict_metadata["model.layers.1.mlp.weight"]
        meta.planner_data = {"chunk": entry.chunks[0], "size": entry.size}
        return meta
    path = os.path.join(with_metadata(saved, tmp_path, chunk_again), ".metadata")
    assert tables(path, True) == tables(path, False)


class Evaluated:
    def __reduce__(self):
        return (eval, ("1",))


@pytest.mark.parametrize("damage, needle", [
    (lambda data: data[:len(data) // 2], "truncated"),
    (lambda data: data[:-1], "truncated"),
    (lambda data: pickle.dumps(CodeRunningPickle("/tmp/distmerge-never-written")), "io.open is not part of DCP"),
    (lambda data: b"\x80\x04\x95\x05\x00\x00\x00\x00\x00\x00\x00K\x01r\x07\x00\x00\x00.", "out of order"),
    (lambda data: pickle.dumps(Evaluated()), "builtins.eval is not part of DCP"),
])
def test_unreadable_metadata_is_refused(saved, tmp_path, capsys, lean_only, damage, needle):
    source = with_metadata(saved, tmp_path, lambda meta: damage(pickle.dumps(meta)))
    refused(capsys, source, tmp_path, "not a readable DCP metadata file", needle)
    assert not os.path.exists("/tmp/distmerge-never-written")


def plain(t: dcp_pickle.MetadataTables) -> tuple[dict, dict]:
    """tables() of a read result whose entries may be damaged: an entry the reader refuses (it does
    not read, or its dtype is no dtype: a record, which compares by identity) is a value too."""
    entries = {}
    for name, e in t.entries.items():
        try:
            entries[name] = dcp_pickle.tensor_entry(e)
        except dcp.FAST_PATH_MISSES as err:
            entries[name] = (dcp_pickle.entry_kind(e), type(err))
        else:
            if not isinstance(entries[name].dtype, DType):
                entries[name] = "refused: no dtype"
    return entries, {name: t.storage.take(name) for name in list(t.storage.rows)}


READ_ERRORS = (MergeError, pickle.UnpicklingError, MemoryError, *dcp.FAST_PATH_MISSES)  # what the reader reports


def test_mutated_metadata_reads_as_c_or_is_refused(saved, tmp_path):
    """One byte of a real `.metadata` changed, 1,000 times: the lean unpickler gives the C unpickler's
    tables, or an error the reader reports as an unreadable file (exit 2); never another exception."""
    data = open(os.path.join(saved, ".metadata"), "rb").read()
    rng, path, agreed = random.Random(19), str(tmp_path / ".metadata"), 0
    for _ in range(1000):
        damaged = bytearray(data)
        damaged[rng.randrange(len(damaged))] = rng.randrange(256)
        with open(path, "wb") as f:
            f.write(damaged)
        try:
            lean = plain(dcp_pickle.load_metadata(path, lean=True))
        except READ_ERRORS:
            continue
        try:
            c = plain(dcp_pickle.load_metadata(path, lean=False))
        except READ_ERRORS:  # the C unpickler refuses what the lean one read (a frame it checks)
            continue
        assert lean == c
        agreed += 1
    assert agreed > 100  # 183 of 1,000 here: the rest break the pickle for both


def random_value(rng: random.Random, pool: list, depth: int = 0):
    """Nested tuples, lists, dicts, OrderedDicts, strings, ints of any size, floats, bytes and
    constants, some of them the same object twice (a memo reference back)."""
    if depth > 4 or rng.random() < 0.3:
        return rng.choice([rng.randint(-3, 300), rng.randint(-2 ** 40, 2 ** 70), "s" * rng.randint(0, 300),
                           f"k{rng.randint(0, 5)}", None, True, False, 1.5, b"xy" * rng.randint(0, 200), (),
                           rng.choice(pool) if pool else 0])
    kind, n = rng.choice("tlds2"), rng.randint(0, 6)
    if kind == "t":
        value = tuple(random_value(rng, pool, depth + 1) for _ in range(n))
    elif kind == "2":
        value = (rng.randint(0, 9), rng.randint(0, 9))
    elif kind == "l":
        value = [random_value(rng, pool, depth + 1) for _ in range(rng.randint(0, 1200 if depth == 0 else 6))]
    elif kind == "s":
        value = collections.OrderedDict((str(i), random_value(rng, pool, depth + 1)) for i in range(n))
    else:
        value = {rng.choice(["a", 1, (1, 2), f"k{i}"]): random_value(rng, pool, depth + 1)
                 for i in range(rng.randint(0, 1500 if depth == 0 else 6))}
    pool.append(value)
    return value


def test_lean_reads_plain_pickles_as_c(tmp_path):
    """Random pickles of plain values (protocols 2 to 5, with shared and recursive references): the
    lean unpickler's result is the C unpickler's, or both refuse (bytes under protocol 2 need a
    global that is not part of DCP metadata)."""
    rng, path, read = random.Random(5), str(tmp_path / "plain.pkl"), 0
    for _ in range(200):
        pool: list = []
        value = [random_value(rng, pool), pool[:rng.randint(0, len(pool))]]
        if rng.random() < 0.3:
            value.append(value)  # recursive
        with open(path, "wb") as f:
            pickle.dump(value, f, protocol=rng.randint(2, 5))
        results = []
        for unpickler in (lambda f: dcp_pickle.MetadataUnpickler(f), lambda f: dcp_pickle.LeanUnpickler(f, path)):
            with open(path, "rb") as f:
                try:
                    results.append(repr(unpickler(f).load()))
                except pickle.UnpicklingError as e:
                    results.append(f"refused: {e}")
        assert results[0] == results[1]
        read += not results[0].startswith("refused")
    assert read > 100


# Hostile `.metadata` files (the probe's D7, D8, D13, D17, D18): refused with exit 2, in bounded time and memory.

def copied(saved: str, tmp_path, name: str = "ckpt") -> str:
    """A copy of the saved directory (real files: a link out of the source is refused before what is tested)."""
    out = tmp_path / name
    out.mkdir()
    for entry in os.listdir(saved):
        (out / entry).write_bytes(open(os.path.join(saved, entry), "rb").read())
    return str(out)


def only_metadata(tmp_path, data: bytes) -> str:
    """A directory holding just a `.metadata` of these bytes (a DCP directory to detect)."""
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / ".metadata").write_bytes(data)
    return str(out)


OPENED: list[str] | None = None  # the paths `open` is audited with while a test records them


def _audit(event: str, args: tuple) -> None:
    if OPENED is not None and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        OPENED.append(os.fsdecode(args[0]))


sys.addaudithook(_audit)  # audit hooks stay for the process; this one records only while OPENED is a list


def test_metadata_linked_outside_is_never_opened(saved, tmp_path, capsys):
    """D7: a `.metadata` that links out of the source is refused before anything opens it: format
    detection (torchtitan's, torchtune's names) read it first, unpickling a file outside the source."""
    global OPENED
    source = copied(saved, tmp_path)
    outside = tmp_path / "outside.metadata"
    os.replace(os.path.join(source, ".metadata"), outside)
    os.symlink(outside, os.path.join(source, ".metadata"))
    OPENED = []
    try:
        refused(capsys, source, tmp_path, "outside the source")
        opened = [p for p in OPENED if os.path.realpath(p) == str(outside)]
    finally:
        OPENED = None
    assert not opened
    with pytest.raises(MergeError, match="outside the source"):
        dcp.read_metadata(os.path.join(source, ".metadata"))


BOMB = b"K\x00K\x00\x86" + b"2\x86" * 60  # (0, 0), then 60 times t = (t, t): one object per level, 2^60 paths


LEAN_CLI = "import sys, distmerge.sources.dcp_pickle as p; p.LEAN_FROM = 0; from distmerge.cli import main; " \
           "sys.exit(main(sys.argv[1:]))"  # the CLI, every `.metadata` through the lean unpickler


@pytest.mark.parametrize("data", [
    b"\x80\x04" + BOMB + b".",                                                  # the probe's D8
    b"\x80\x04K\x00K\x00\x86\x94" + b"2\x86\x94" * 60 + b".",                   # the same, memoized
    b"\x80\x04K\x00K\x00K\x00\x87" + b"22\x87" * 40 + b".",                    # TUPLE3: 3^40
    b"\x80\x04}(" + BOMB + b"Nu.",                                              # a dict key
    b"\x80\x04}" + BOMB + b"Ns.",                                               # SETITEM
    b"\x80\x04(" + BOMB + b"Nd.",                                               # DICT
    b"\x80\x04(" + BOMB + b"\x91.",                                             # FROZENSET
    b"\x80\x04\x8c\x13torch.serialization\x8c\x0b_get_layout\x93" + BOMB + b"\x85R.",  # str() of it
], ids=["tuple2", "memoized", "tuple3", "dict_key", "setitem", "dict", "frozenset", "str"])
def test_nested_shared_tuples_cost_no_time(tmp_path, data):
    """D8: a tuple's hash (and str) is not cached and visits each value once per path, so 60 levels
    of shared tuples would take 2^60 steps. Interning, dict keys, set members and the globals
    called never hash or print such a tuple: the file is refused at once. In a process of its
    own: a hash runs in C, where no timeout inside the process would stop it."""
    source = only_metadata(tmp_path, data)
    for cli in (["-c", LEAN_CLI], ["-m", "distmerge"]):  # the lean path alone, and the default (C) path
        proc = run([sys.executable, *cli, "inspect", source], timeout=60)
        assert proc.returncode == 2, proc.stderr
        assert "not a readable DCP metadata file" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


@pytest.mark.timeout(120)
@pytest.mark.parametrize("opcode", [b"]", b"}", b"(", b")"], ids=["empty_list", "empty_dict", "mark", "empty_tuple"])
def test_a_stack_of_empty_containers_is_refused_in_bounded_memory(tmp_path, capsys, lean_only, opcode):
    """D13: 3 million one-byte EMPTY_LISTs (or dicts, marks, tuples) would hold some 60 bytes each;
    no writer holds more than a batch of 1000 items on its stack. Refused when the stacks pass
    STACK_LIMIT, so the memory used does not grow with the file."""
    source = only_metadata(tmp_path, b"\x80\x04" + opcode * 3_000_000 + b".")
    tracemalloc.start()
    try:
        with pytest.raises(pickle.UnpicklingError, match="on its stack"):
            dcp_pickle.load_metadata(os.path.join(source, ".metadata"), lean=True)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 100 << 20, peak  # (STACK_LIMIT + one 1 MiB block) values at most; 190 MB read to the end
    refused(capsys, source, tmp_path, "on its stack")


def test_pickle_errors_are_one_short_line(tmp_path, capsys):
    """D17: pickle's own messages (the C unpickler's on PERSID) and ours quoting the file (a global's
    name with newlines, 5000 characters long) end up on one line of the refusal, cut at 200 characters."""
    name = b"sys\ntem" + b"x" * 5000
    data = b"\x80\x04\x8c\x02os\x8d" + len(name).to_bytes(8, "little") + name + b"\x93."
    for i, bytes_ in enumerate([b"Pid\n.", data]):
        (tmp_path / str(i)).mkdir()
        source = only_metadata(tmp_path / str(i), bytes_)
        refused(capsys, source, tmp_path / str(i), "not a readable DCP metadata file")
        code = main(["inspect", source])
        err = capsys.readouterr().err
        line = next(x for x in err.splitlines() if "distmerge: error:" in x)
        assert code == 2 and line.endswith("Copy it again from the training job") and len(line) < 600, err
        assert "x" * 201 not in err


@pytest.mark.parametrize("field_name", ["offset", "length"])
def test_negative_storage_offset_or_length_is_corrupt_metadata(saved, tmp_path, capsys, field_name):
    """D18: a `_StorageInfo` with a negative offset or length is corrupt metadata (exit 2, named),
    not a truncated data file (exit 4, 'copy it again')."""
    source = copied(saved, tmp_path, "src")

    def negative(meta):
        for info in meta.storage_data.values():
            setattr(info, field_name, -100)
        return meta
    bad = with_metadata(source, tmp_path, negative)
    for entry in os.listdir(bad):  # real files, inside the source
        if entry != ".metadata":
            os.remove(os.path.join(bad, entry))
            os.link(os.path.join(source, entry), os.path.join(bad, entry))
    refused(capsys, bad, tmp_path, f"has {field_name} -100, which is negative; the metadata is corrupt")

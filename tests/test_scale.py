"""Metadata at scale (issue 19): one rank catalogues, every rank gets only its share.

The checkpoint is bench/scale.py's DeepSeek-V3 layout (every tensor name of 4 layers, 256 experts,
row chunks from 8 saving ranks), with `.metadata` pickled from torch's own DCP classes.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from array import array

import pytest
import torch

from conftest import PROCESS_TIMEOUT, ROOT

sys.path.insert(0, str(ROOT / "bench"))
import scale  # noqa: E402

from distmerge.dtypes import BFLOAT16  # noqa: E402
from distmerge.errors import MergeError  # noqa: E402
from distmerge.model import Piece  # noqa: E402
from distmerge.prepare import PrepareOptions, prepare  # noqa: E402
from distmerge.sources import read_source  # noqa: E402
from distmerge.sources.chunks import PieceTable  # noqa: E402
from distmerge.validate import validate_catalogue  # noqa: E402

WORLD, LAYERS = 8, 4

# Runs the CLI with --local-ranks after wrapping three functions; the forked ranks inherit the
# wrappers. Each rank records how often it read metadata and what its catalogue held at the run stage.
DRIVER = """
import importlib, json, os, sys
merge, dcp = importlib.import_module("distmerge.merge"), importlib.import_module("distmerge.sources.dcp")
from distmerge.scatter import catalogue_size
from distmerge.cli import main
counts = {"read_metadata": 0, "prepare": 0}
def counted(name, fn):
    def wrapper(*args, **kwargs):
        counts[name] += 1
        return fn(*args, **kwargs)
    return wrapper
dcp._load_metadata = counted("read_metadata", dcp._load_metadata)
merge.prepare = counted("prepare", merge.prepare)
run = merge.MergeJob.run
def recorded_run(self):
    tensors, pieces = catalogue_size(self.p.catalogue)
    mine = len(self.plan_.segments_of(self.rt.rank))
    with open(os.path.join(os.environ["SCALE_OUT"], f"rank{self.rt.rank}.json"), "w") as f:
        json.dump({**counts, "tensors": tensors, "pieces": pieces, "segments": mine}, f)
    return run(self)
merge.MergeJob.run = recorded_run
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def deepseek(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("scale") / "ds")
    scale.make(out, WORLD, scale.SMALL, LAYERS, sparse=False)
    return out


def merge_counted(source: str, target: str, ranks: int, records: str) -> list[dict]:
    os.makedirs(records, exist_ok=True)
    cmd = [sys.executable, "-c", DRIVER, "merge", "--local-ranks", str(ranks), "--source", source, "--target",
           target, "--max-shard-size", "1MB", "--segment-size", "256KiB"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PROCESS_TIMEOUT, cwd=ROOT,
                          env={**os.environ, "SCALE_OUT": records, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.load(open(os.path.join(records, f"rank{r}.json"))) for r in range(ranks)]


def test_one_reader_and_shares(deepseek, tmp_path):
    """Rank 0 alone reads `.metadata`; rank 1 holds only the pieces of the tensors it writes; the
    output is the source's bytes, and the same as one rank writes."""
    total = scale.tensors(scale.SMALL, LAYERS)
    chunks = sum(len(scale.row_chunks(shape[0], WORLD)) for _, shape in total)
    two = merge_counted(deepseek, str(tmp_path / "two"), 2, str(tmp_path / "rec2"))
    assert two[0]["read_metadata"] == 1 and two[0]["prepare"] == 1
    assert two[1]["read_metadata"] == 0 and two[1]["prepare"] == 0   # never built, never read
    assert two[0]["segments"] and two[1]["segments"]                  # both ranks write
    assert two[0]["tensors"] + two[1]["tensors"] == len(total)        # each tensor on exactly one rank
    assert two[0]["pieces"] + two[1]["pieces"] == chunks
    assert 0 < two[1]["pieces"] < chunks
    assert scale.check_output(deepseek, str(tmp_path / "two"), WORLD, scale.SMALL, LAYERS) == len(total)
    one = merge_counted(deepseek, str(tmp_path / "one"), 1, str(tmp_path / "rec1"))
    assert one[0]["pieces"] == chunks
    manifests = [json.load(open(tmp_path / d / "distmerge-manifest.json"))["files"] for d in ("one", "two")]
    assert manifests[0] == manifests[1]


def test_dcp_reader_builds_tables(deepseek):
    """The DCP reader keeps each tensor's chunks in one PieceTable (no Piece objects kept), and a
    table reads back as the Pieces the chunks describe."""
    _, c = read_source(deepseek)
    name = "model.layers.3.mlp.experts.7.up_proj.weight"
    table = c.tensors[name].pieces
    assert isinstance(table, PieceTable) and len(table) == WORLD
    rows = 64 // WORLD
    assert list(table)[1] == table[1] == Piece(os.path.join(deepseek, "__1_0.distcp"), table[1].offset,
                                               (rows, 64), (64, 1), (rows, 0), BFLOAT16)
    assert table.bytes_by_file()[os.path.join(deepseek, "__1_0.distcp")] == rows * 64 * 2
    validate_catalogue(c)


def test_lean_unpickler_gives_the_c_catalogue(deepseek, monkeypatch):
    """A large `.metadata` is read by the lean unpickler (sources/dcp_pickle.py), a small one by the
    C unpickler (after the lean one's bounded check): both give the same catalogue, piece for piece."""
    from distmerge.sources import dcp, dcp_pickle

    used = []
    real = dcp_pickle.MetadataUnpickler.load
    monkeypatch.setattr(dcp_pickle.MetadataUnpickler, "load", lambda self: used.append(1) or real(self))
    monkeypatch.setattr(dcp_pickle, "LEAN_FROM", 1 << 62)
    c_tensors, *c_rest = dcp.tensors_from_metadata(deepseek)
    assert used == [1]
    monkeypatch.setattr(dcp_pickle, "LEAN_FROM", 0)
    lean_tensors, *lean_rest = dcp.tensors_from_metadata(deepseek)
    assert used == [1]
    assert lean_rest == c_rest and list(lean_tensors) == list(c_tensors)
    assert len(c_tensors) == len(scale.tensors(scale.SMALL, LAYERS))
    for name, t in c_tensors.items():
        lean = lean_tensors[name]
        assert (lean.shape, lean.dtype) == (t.shape, t.dtype)
        assert (lean.pieces.ndim, lean.pieces.data, lean.pieces.files) == (t.pieces.ndim, t.pieces.data, t.pieces.files)


def broken(c, name: str, change) -> None:
    """Rewrite one row of a tensor's table in place."""
    table = c.tensors[name].pieces
    rows = table.rows().copy()
    change(rows)
    table.data = array("q", rows.tobytes())


@pytest.mark.parametrize("change, message", [
    (lambda r: r.__setitem__((1, 2), r[0, 2]), "cover"),                      # two chunks on the same rows
    (lambda r: r.__setitem__((1, 1), 1 << 40), "needs bytes up to"),          # past the end of its file
    (lambda r: r.__setitem__((1, 6), 0), "make elements overlap"),            # a zero row stride
    (lambda r: r.__setitem__((1, 2), 60), "lies outside the tensor's shape"),  # rows past the tensor
])
def test_bulk_screen_refuses_like_the_piece_checks(deepseek, change, message):
    """A table the bulk screen does not clear goes through the piece-by-piece checks: same refusal."""
    _, c = read_source(deepseek)
    broken(c, "model.layers.3.mlp.experts.7.up_proj.weight", change)
    with pytest.raises(MergeError, match=message):
        validate_catalogue(c)


def test_hostile_chunk_values_are_refused(deepseek, tmp_path):
    """A chunk offset no int64 holds is a corrupt record (exit 2), not a traceback."""
    table = PieceTable([os.path.join(deepseek, "__0_0.distcp")], BFLOAT16, 2)
    with pytest.raises(MergeError, match="corrupt"):
        table.add(0, 1 << 70, (0, 0), (1, 1), (1, 1))


def test_prepare_maps_every_tensor(deepseek):
    """prepare (what inspect shows) still maps the whole catalogue: every tensor, in the model order."""
    p = prepare(deepseek, PrepareOptions(quick=True))
    assert [(o.name, tuple(o.shape)) for o in p.outputs] == scale.tensors(scale.SMALL, LAYERS)


def test_blob_chunks_parsed_once_per_framing_match_a_full_parse(tmp_path, monkeypatch):
    """dcp.save's default chunks are torch.save blobs. Blobs framed alike are located from the
    first one's parse; every piece equals what parsing each blob gives, and a blob whose frame
    differs (another shape here) is parsed itself."""
    import torch.distributed.checkpoint as dcp_save
    from distmerge.sources import dcp

    state = {f"w{i}": torch.arange(i * 64, (i + 1) * 64, dtype=torch.bfloat16).reshape(8, 8) for i in range(20)}
    state["odd"] = torch.ones(3, 5, dtype=torch.float32)
    with warnings.catch_warnings():  # one process, no process group: torch warns that it assumes so
        warnings.simplefilter("ignore")
        dcp_save.save(state, checkpoint_id=str(tmp_path / "blobs"))
    framed, *_ = dcp.tensors_from_metadata(str(tmp_path / "blobs"))
    monkeypatch.setattr(dcp, "BLOB_FRAME_MAX", -1)  # nothing remembered: every blob parsed
    parsed, *_ = dcp.tensors_from_metadata(str(tmp_path / "blobs"))
    assert set(framed) == set(state)
    for name in state:
        assert list(framed[name].pieces) == list(parsed[name].pieces)
        piece = framed[name].pieces[0]
        with open(piece.file, "rb") as f:
            f.seek(piece.offset)
            data = f.read(piece.nbytes)
        assert data == state[name].view(torch.uint8).numpy().tobytes()


def test_tiny_chunks_are_read_in_bulk(deepseek, tmp_path, monkeypatch):
    """The run stage's cost per chunk falls: the small tensors' chunks are read by a few preadv
    calls (a rank file's chunks of consecutive tensors are adjacent), not one call per chunk, and
    the bytes are the source's."""
    import distmerge
    total = scale.tensors(scale.SMALL, LAYERS)
    chunks = sum(len(scale.row_chunks(shape[0], WORLD)) for _, shape in total)
    calls = {"preadv": 0, "copy_file_range": 0, "pread": 0}
    for name in calls:
        real = getattr(os, name)

        def counted(*args, _real=real, _name=name):
            calls[_name] += 1
            return _real(*args)
        monkeypatch.setattr(os, name, counted)
    distmerge.merge(deepseek, tmp_path / "out", progress=False)
    assert sum(calls.values()) * 100 < chunks, (calls, chunks)
    monkeypatch.undo()
    assert scale.check_output(deepseek, str(tmp_path / "out"), WORLD, scale.SMALL, LAYERS) == len(total)

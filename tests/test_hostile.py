"""Hostile and malformed checkpoints (issue 13): nothing outside the source is read or published,
nothing wrong is published, and every refusal is one message with a documented exit code.

Each case is made from a real checkpoint (the session fixtures) damaged the way a hostile user
would: pickled tensor records rewritten field by field, zip archives rebuilt member by member,
DCP metadata re-pickled with other paths, links and special files put in place. The helpers at
the top are shared with test_fuzz.py."""
from __future__ import annotations

import json
import os
import pickle
import pickletools
import shutil
import struct
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import opened_under
from distmerge.cli import main
from distmerge.errors import MergeError

pytestmark = pytest.mark.timeout(120)  # a hang (a FIFO opened, /dev/zero copied) fails, it does not block the suite

FSDP = "llama_fsdp2_w2"
DCP = "qwen2_dcp_fsdp2_w2"
RANK1 = "model_world_size_2_rank_1.pt"


# ---------------------------------------------------------------- helpers: archives and pickles

def members(path) -> list[tuple[zipfile.ZipInfo, bytes]]:
    with zipfile.ZipFile(path) as z:
        return [(info, z.read(info)) for info in z.infolist()]


def write_zip(path, entries, compress=()) -> None:
    """A zip of (name, data) in the given order, stored uncompressed unless the name is in `compress`."""
    with zipfile.ZipFile(path, "w") as z:
        for name, data in entries:
            method = zipfile.ZIP_DEFLATED if name in compress else zipfile.ZIP_STORED
            z.writestr(zipfile.ZipInfo(name, (2020, 1, 1, 0, 0, 0)), data, compress_type=method)


def pickle_name(path) -> str:
    with zipfile.ZipFile(path) as z:
        return next(n for n in z.namelist() if n.endswith("data.pkl"))


def rewrite_pickle(path, edit) -> None:
    """Replace the archive's data.pkl by edit(data.pkl), every other member kept as it is."""
    name = pickle_name(path)
    entries = [(i.filename, edit(d) if i.filename == name else d) for i, d in members(path)]
    write_zip(path, entries)


def ops(pkl: bytes) -> list[tuple[str, object, int, int]]:
    """Every opcode of a pickle: (name, argument, start, end)."""
    found = list(pickletools.genops(pkl))
    ends = [pos for _, _, pos in found[1:]] + [len(pkl)]
    return [(op.name, arg, pos, end) for (op, arg, pos), end in zip(found, ends)]


INT_OPS = ("BININT", "BININT1", "BININT2", "LONG1", "LONG4", "INT", "LONG")


def encode_int(value: int) -> bytes:
    """The opcode that pushes `value` (as pickle protocol 2 writes it)."""
    return pickle.dumps(value, protocol=2)[2:-1]


def replace_op(pkl: bytes, start: int, end: int, new: bytes) -> bytes:
    return pkl[:start] + new + pkl[end:]


def tensor_record(pkl: bytes, index: int = 0) -> dict:
    """The opcode spans of the `index`-th _rebuild_tensor_v2 record: its storage numel (the last int
    of the persistent id), storage offset, and each size and stride."""
    listed = ops(pkl)
    persids = [i for i, (name, *_) in enumerate(listed) if name == "BINPERSID"]
    at = persids[index]
    ints_before = [i for i in range(at) if listed[i][0] in INT_OPS]
    after = [i for i in range(at + 1, len(listed)) if listed[i][0] in INT_OPS]
    tuples = [i for i in range(at + 1, len(listed)) if listed[i][0].startswith("TUPLE")]
    ndim = {"TUPLE1": 1, "TUPLE2": 2, "TUPLE3": 3}.get(listed[tuples[0]][0], 0)
    span = lambda i: listed[i][2:4]  # noqa: E731
    return {"numel": span(ints_before[-1]), "offset": span(after[0]),
            "sizes": [span(i) for i in after[1:1 + ndim]], "strides": [span(i) for i in after[1 + ndim:1 + 2 * ndim]]}


def set_ints(pkl: bytes, changes: list[tuple[tuple[int, int], int]]) -> bytes:
    """Replace the ints at the given opcode spans (from the end, so earlier spans stay valid)."""
    for (start, end), value in sorted(changes, reverse=True):
        pkl = replace_op(pkl, start, end, encode_int(value))
    return pkl


def plain_checkpoint(checkpoint, tmp_path) -> Path:
    """A one-rank verl checkpoint of plain tensors (model_world_size_1_rank_0.pt), written by
    torch.save from the fixture's reference weights, with the fixture's huggingface/ directory."""
    src = checkpoint(FSDP)
    out = tmp_path / "ckpt"
    out.mkdir()
    torch.save(load_file(src / "reference" / "model.safetensors"), out / "model_world_size_1_rank_0.pt")
    shutil.copytree(src / "huggingface", out / "huggingface")
    return out


def merge(capsys, *args) -> tuple[int, str]:
    code = main(["merge", *map(str, args), "--no-progress"])
    return code, capsys.readouterr().err


def refused(code, err, expected, *needles) -> None:
    assert code == expected, err
    assert "Traceback" not in err and "internal error" not in err, err
    assert err.count("distmerge: error:") == 1, err
    for needle in needles:
        assert needle in err, (needle, err)


def nothing_published(tmp_path, target="out") -> None:
    """No target, and no staging directory without its incomplete marker."""
    assert not (tmp_path / target).exists()
    staging = tmp_path / f".{target}.distmerge-staging"
    assert not staging.exists() or (staging / ".distmerge-incomplete").exists()


def weights(directory) -> dict:
    out = {}
    for f in sorted(Path(directory).glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.fixture
def fsdp(checkpoint, tmp_path) -> Path:
    src = tmp_path / "ckpt"
    shutil.copytree(checkpoint(FSDP), src, ignore=shutil.ignore_patterns("reference"))
    return src


@pytest.fixture
def clean(checkpoint, tmp_path_factory) -> dict:
    """The weights of the clean merge of the FSDP fixture."""
    out = tmp_path_factory.mktemp("clean") / "out"
    assert main(["merge", "--source", str(checkpoint(FSDP)), "--target", str(out), "--no-progress"]) == 0
    return weights(out)


# ---------------------------------------------------------------- 1. reads outside the source

def dcp_copy(checkpoint, tmp_path) -> Path:
    src = tmp_path / "ckpt"
    shutil.copytree(checkpoint(DCP), src, ignore=shutil.ignore_patterns("reference"))
    return src / "dcp"


def repath_dcp(dcp_dir: Path, relative_path: str, victim: str = "__1_0.distcp") -> None:
    """Point every chunk stored in `victim` at `relative_path` instead (the real DCP classes)."""
    meta = pickle.loads((dcp_dir / ".metadata").read_bytes())  # our own fixture: safe to unpickle
    for info in meta.storage_data.values():
        if str(info.relative_path) == victim:
            info.relative_path = relative_path
    (dcp_dir / ".metadata").write_bytes(pickle.dumps(meta))


@pytest.mark.parametrize("how", ["absolute", "dotdot"])
def test_dcp_chunk_outside_the_source_is_refused(checkpoint, tmp_path, capsys, how):
    """Before: the outside file's bytes were published inside a weight, exit 0."""
    dcp = dcp_copy(checkpoint, tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.move(dcp / "__1_0.distcp", outside / "__1_0.distcp")
    repath_dcp(dcp, str(outside / "__1_0.distcp") if how == "absolute" else "../../outside/__1_0.distcp")
    code, err = merge(capsys, "--source", dcp, "--target", tmp_path / "out")
    refused(code, err, 2, "__1_0.distcp", "outside")
    nothing_published(tmp_path)


def test_no_file_outside_the_source_is_opened(checkpoint, tmp_path, capsys, monkeypatch):
    """Not only refused: never read. A DCP chunk names an absolute path outside the source; no
    file outside the source and the target's directory may be opened while the merge is refused."""
    dcp = dcp_copy(checkpoint, tmp_path)
    secret = tmp_path / "secret"
    secret.mkdir()
    shutil.move(dcp / "__1_0.distcp", secret / "__1_0.distcp")
    repath_dcp(dcp, str(secret / "__1_0.distcp"))
    with opened_under(secret, monkeypatch) as opened:
        code, err = merge(capsys, "--source", dcp, "--target", tmp_path / "out")
    refused(code, err, 2, "outside")
    assert not opened, f"files outside the source were opened: {opened}"


@pytest.mark.parametrize("layout", ["accelerate", "megatron"])
def test_a_model_directory_linked_out_of_the_source_is_refused(checkpoint, tmp_path, capsys, monkeypatch, layout):
    """A trainer's folder whose model directory is a link out of it (accelerate's
    pytorch_model_fsdp_0/, Megatron's iter_N/): refused before its `.metadata` is opened."""
    outside = tmp_path / "elsewhere"
    source = tmp_path / "source"
    source.mkdir()
    if layout == "accelerate":
        shutil.copytree(dcp_copy(checkpoint, tmp_path), outside)
        (source / "pytorch_model_fsdp_0").symlink_to(outside)
    else:
        shutil.copytree(checkpoint("mg_llama_tp2") / "dist_ckpt", outside)
        (source / "latest_checkpointed_iteration.txt").write_text("1")
        (source / "iter_0000001").symlink_to(outside)
    with opened_under(outside, monkeypatch) as opened:
        code, err = merge(capsys, "--source", source, "--target", tmp_path / "out")
    refused(code, err, 2, "outside")
    assert not opened, f"files outside the source were opened: {opened}"
    nothing_published(tmp_path)


def test_a_rank_file_linked_out_of_the_source_is_refused(fsdp, tmp_path, capsys, monkeypatch):
    """Before: the linked file was read and merged, exit 0. Now it is refused before it is opened."""
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.move(fsdp / RANK1, outside / RANK1)
    (fsdp / RANK1).symlink_to(outside / RANK1)
    with opened_under(outside, monkeypatch) as opened:
        code, err = merge(capsys, "--source", fsdp, "--target", tmp_path / "out")
    refused(code, err, 2, RANK1, "outside the source")
    assert not opened, f"files outside the source were opened: {opened}"
    nothing_published(tmp_path)


def test_a_link_inside_the_source_is_followed(fsdp, tmp_path, capsys, clean):
    """A checkpoint may link its own files (e.g. a deduplicated copy): that is not hostile."""
    (fsdp / "store").mkdir()
    shutil.move(fsdp / RANK1, fsdp / "store" / RANK1)
    (fsdp / RANK1).symlink_to(Path("store") / RANK1)
    code, err = merge(capsys, "--source", fsdp, "--target", tmp_path / "out")
    assert code == 0, err
    assert all(torch.equal(a, clean[k]) for k, a in weights(tmp_path / "out").items())


def hf_link(fsdp: Path, name: str, to) -> None:
    (fsdp / "huggingface" / name).symlink_to(to)


@pytest.mark.parametrize("case", ["secret", "dev_zero", "fifo", "loop", "dangling", "dir_out"])
def test_hostile_entries_in_the_hf_directory_are_refused(fsdp, tmp_path, capsys, case):
    """Before: a link out of the checkpoint was copied into the output (a secret would be uploaded
    with --hf-upload-path); /dev/zero copied without end; a FIFO, a loop: tracebacks."""
    secret = tmp_path / "id_rsa"
    secret.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\n")
    if case == "secret":
        hf_link(fsdp, "chat_template.jinja", secret)
    elif case == "dev_zero":
        hf_link(fsdp, "merges.txt", "/dev/zero")
    elif case == "fifo":
        os.mkfifo(fsdp / "huggingface" / "vocab.txt")
    elif case == "loop":
        hf_link(fsdp, "a.json", fsdp / "huggingface" / "b.json")
        hf_link(fsdp, "b.json", fsdp / "huggingface" / "a.json")
    elif case == "dangling":
        hf_link(fsdp, "special_tokens_map.json", tmp_path / "nowhere")
    else:
        (tmp_path / "keys").mkdir()
        shutil.copy(secret, tmp_path / "keys" / "id_rsa")
        hf_link(fsdp, "extra", tmp_path / "keys")
    code, err = merge(capsys, "--source", fsdp, "--target", tmp_path / "out")
    refused(code, err, 2, str(fsdp / "huggingface"))
    nothing_published(tmp_path)
    assert not any("OPENSSH" in p.read_text(errors="replace") for p in tmp_path.rglob("*")
                   if p.is_file() and not p.is_symlink() and p != secret and p.stat().st_size < 1 << 20
                   and "keys" not in p.parts)


def test_a_config_json_linked_out_of_the_source_is_not_published(fsdp, tmp_path, capsys):
    """A JSON file outside the checkpoint (a cloud credential file) with a model's fields added
    would be read as config.json and written into the output. Refused, and nothing is published."""
    config = json.loads((fsdp / "huggingface" / "config.json").read_text())
    leaked = tmp_path / "credentials.json"
    leaked.write_text(json.dumps({**config, "private_key": "SECRET-KEY-MATERIAL"}))
    (fsdp / "huggingface" / "config.json").unlink()
    hf_link(fsdp, "config.json", leaked)
    code, err = merge(capsys, "--source", fsdp, "--target", tmp_path / "out")
    refused(code, err, 2, "config.json", "outside")
    nothing_published(tmp_path)


def hf_cache_snapshot(fsdp: Path, tmp_path: Path) -> Path:
    """The layout of ~/.cache/huggingface/hub: snapshots/<rev>/<name> -> ../../blobs/<hash>."""
    repo = tmp_path / "hub" / "models--org--model"
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    for i, f in enumerate(sorted((fsdp / "huggingface").iterdir())):
        shutil.copy(f, repo / "blobs" / f"blob{i}")
        (snapshot / f.name).symlink_to(Path("..") / ".." / "blobs" / f"blob{i}")
    shutil.rmtree(fsdp / "huggingface")
    return snapshot


def test_an_hf_cache_snapshot_named_with_hf_config_still_works(fsdp, tmp_path, capsys):
    snapshot = hf_cache_snapshot(fsdp, tmp_path)
    code, err = merge(capsys, "--source", fsdp, "--target", tmp_path / "out", "--hf-config", snapshot)
    assert code == 0, err
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (snapshot / "tokenizer.json").read_bytes()
    assert not (tmp_path / "out" / "tokenizer.json").is_symlink()


def test_copy_hf_files_follows_links_only_where_the_directory_was_named(fsdp, tmp_path):
    """finish.hf_files: links out of the directory are refused, unless the user named the directory."""
    from distmerge.finish import hf_files

    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "tokenizer.model").write_bytes(b"sp")
    hf_link(fsdp, "tokenizer.model", tmp_path / "shared" / "tokenizer.model")
    with pytest.raises(MergeError, match="outside"):
        hf_files(str(fsdp / "huggingface"))
    names = [f.name for f in hf_files(str(fsdp / "huggingface"), explicit=True)]
    assert "tokenizer.model" in names and "config.json" not in names


def test_an_oversized_hf_file_is_refused_with_its_size(fsdp, tmp_path, capsys, monkeypatch):
    from distmerge import finish

    monkeypatch.setattr(finish, "MAX_HF_FILE_BYTES", 1000)
    code, err = merge(capsys, "--source", fsdp, "--target", tmp_path / "out")
    refused(code, err, 2, "tokenizer.json", "bytes, more than")
    nothing_published(tmp_path)


def test_a_fifo_named_like_a_rank_file_is_refused_not_waited_on(fsdp, tmp_path, capsys):
    (fsdp / RANK1).unlink()
    os.mkfifo(fsdp / RANK1)
    code, err = merge(capsys, "--source", fsdp, "--target", tmp_path / "out")
    refused(code, err, 2, RANK1, "not a regular file")


# ---------------------------------------------------------------- 2. tensor records and archives

PLAIN = "model_world_size_1_rank_0.pt"


@pytest.fixture
def plain(checkpoint, tmp_path) -> Path:
    return plain_checkpoint(checkpoint, tmp_path)


@pytest.fixture
def reference(checkpoint) -> dict:
    return load_file(checkpoint(FSDP) / "reference" / "model.safetensors")


def edit_record(path: Path, index: int, **fields) -> None:
    """Set fields (offset, numel, sizes, strides: ints or lists of ints) of the index-th tensor record."""
    def edit(pkl):
        rec, changes = tensor_record(pkl, index), []
        for key, value in fields.items():
            spans = rec[key] if isinstance(rec[key], list) else [rec[key]]
            values = value if isinstance(value, list) else [value]
            changes += list(zip(spans, values))
        return set_ints(pkl, changes)
    rewrite_pickle(path, edit)


def record_of(path: Path, name: str) -> int:
    """The index of the tensor record of state-dict key `name` (records are pickled in key order)."""
    return list(torch.load(path, weights_only=True, mmap=True)).index(name)


@pytest.mark.parametrize("fields, needle", [
    ({"offset": -8}, "storage offset -8"),                         # bytes before the storage: the zip headers
    ({"strides": [-64, 1]}, "strides"),                            # a negative stride
    ({"offset": 1 << 40}, "claims elements"),                       # far past the storage
    ({"numel": 1 << 40}, "claims"),                                 # a storage larger than its member
])
def test_hostile_tensor_records_are_refused(plain, tmp_path, capsys, fields, needle):
    """Before: a negative storage offset published the archive's own bytes (exit 0); a negative
    stride ended in a traceback."""
    f = plain / PLAIN
    edit_record(f, record_of(f, "model.layers.0.self_attn.q_proj.weight"), **fields)
    code, err = merge(capsys, "--source", plain, "--target", tmp_path / "out")
    refused(code, err, 2, PLAIN, needle)
    nothing_published(tmp_path)


def test_stride_zero_with_a_huge_shape_is_refused_at_once(plain, tmp_path, capsys):
    """10^13 elements that all alias one: no multi-TiB plan, no hang, no memory growth.
    (Not run on the code before: it planned a 40 TB file.)"""
    f = plain / PLAIN
    edit_record(f, record_of(f, "model.norm.weight"), sizes=[10 ** 13], strides=[0])
    code, err = merge(capsys, "--source", plain, "--target", tmp_path / "out")
    refused(code, err, 2, "model.norm.weight", "overlap")
    nothing_published(tmp_path)


def tensors_with_attributes(plain: Path) -> None:
    """Every tensor carries a Python attribute holding a set: the fast reader (which reads plain tensors
    with attributes of plain values, as FSDP1 saves them) leaves such a file to torch's loader."""
    state = torch.load(plain / PLAIN, weights_only=True)
    for t in state.values():
        t.note = {1}
    torch.save(state, plain / PLAIN)


def test_the_torch_fallback_places_tensors_by_their_local_headers(plain, tmp_path, capsys, reference):
    """A valid archive laid out by another zip writer (Python's zipfile: no 64-byte alignment, no
    data descriptors). torch's meta loader computes offsets from its own writer's layout: before,
    the fallback published bytes from the wrong places with exit 0."""
    tensors_with_attributes(plain)
    write_zip(plain / PLAIN, [(i.filename, d) for i, d in members(plain / PLAIN)])
    code, err = merge(capsys, "--source", plain, "--target", tmp_path / "out")
    assert code == 0, err
    got = weights(tmp_path / "out")
    assert got.keys() == reference.keys()
    assert all(torch.equal(got[k], reference[k]) for k in got), "the output differs from the weights saved"


def test_duplicate_archive_members_are_refused(plain, tmp_path, capsys):
    """Before: accepted silently; the last of two members of one name was read."""
    entries = [(i.filename, d) for i, d in members(plain / PLAIN)]
    name, data = next((n, d) for n, d in entries if n.endswith("/data/0"))
    with pytest.warns(UserWarning, match="Duplicate name"):
        write_zip(plain / PLAIN, entries + [(name, bytes(len(data)))])
    code, err = merge(capsys, "--source", plain, "--target", tmp_path / "out")
    refused(code, err, 2, PLAIN, "two members named", "data/0")
    nothing_published(tmp_path)


def test_compressed_members_are_refused_with_how_to_resave(plain, tmp_path, capsys):
    entries = [(i.filename, d) for i, d in members(plain / PLAIN)]
    write_zip(plain / PLAIN, entries, compress={n for n, _ in entries if "/data/" in n})
    code, err = merge(capsys, "--source", plain, "--target", tmp_path / "out")
    refused(code, err, 2, PLAIN, "compressed", "torch.save(torch.load(f, weights_only=True), f)")
    nothing_published(tmp_path)


def test_a_persistent_id_holding_a_bare_dtype(plain, tmp_path, capsys, reference):
    """The storage class spelled as a dtype (torch.float32 for torch.FloatStorage) is still a plain
    tensor and merges; a persistent id that is a bare dtype instead of a storage record is refused."""
    f = plain / PLAIN
    rewrite_pickle(f, lambda pkl: pkl.replace(b"ctorch\nFloatStorage\n", b"ctorch\nfloat32\n"))
    code, err = merge(capsys, "--source", plain, "--target", tmp_path / "out")
    assert code == 0, err
    assert all(torch.equal(t, reference[k]) for k, t in weights(tmp_path / "out").items())

    def bare(pkl):  # (MARK 'storage' dtype key location numel TUPLE) -> POP_MARK dtype
        tuple_at = next(start for name, _, start, _ in ops(pkl) if name == "TUPLE")
        return pkl[:tuple_at] + b"1ctorch\nfloat32\n" + pkl[tuple_at + 1:]
    rewrite_pickle(f, bare)
    code, err = merge(capsys, "--source", plain, "--target", tmp_path / "out2")
    refused(code, err, 2, PLAIN)
    nothing_published(tmp_path, "out2")


def test_a_storage_record_naming_a_missing_member_is_refused(plain, tmp_path, capsys):
    rewrite_pickle(plain / PLAIN, lambda pkl: pkl.replace(b"X\x01\x00\x00\x000", b"X\x01\x00\x00\x009", 1))
    code, err = merge(capsys, "--source", plain, "--target", tmp_path / "out")
    refused(code, err, 2, PLAIN, "data/9")


@pytest.mark.parametrize("kind, needle", [("legacy", "legacy (pre-1.6, non-zip) format"), ("text", "a text file"),
                                          ("pickle", "bare pickle"), ("binary", "not a zip archive")])
def test_a_file_that_is_not_a_zip_says_what_it_is(plain, tmp_path, capsys, kind, needle):
    """Before: every one of these was called truncated (exit 4, 'copy it again')."""
    f = plain / PLAIN
    if kind == "legacy":
        torch.save(torch.load(f, weights_only=True), f, _use_new_zipfile_serialization=False)
    elif kind == "text":
        f.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0123\nsize 4096\n")
    elif kind == "pickle":
        f.write_bytes(pickle.dumps({"a": 1}, protocol=2))
    else:
        f.write_bytes(bytes(range(256)) * 4)
    code, err = merge(capsys, "--source", plain, "--target", tmp_path / "out")
    refused(code, err, 2, PLAIN, needle)
    nothing_published(tmp_path)


def test_a_truncated_archive_is_still_an_io_error(plain, tmp_path, capsys):
    f = plain / PLAIN
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    code, err = merge(capsys, "--source", plain, "--target", tmp_path / "out")
    refused(code, err, 4, PLAIN, "truncated")


def test_a_bare_dtype_storage_that_only_torch_could_read(plain, tmp_path, capsys):
    """The fast reader leaves the file to torch's loader (tensors with attributes), which cannot
    read a storage spelled as a dtype. Before: an AttributeError traceback."""
    tensors_with_attributes(plain)
    rewrite_pickle(plain / PLAIN, lambda pkl: pkl.replace(b"ctorch\nFloatStorage\n", b"ctorch\nfloat32\n"))
    code, err = merge(capsys, "--source", plain, "--target", tmp_path / "out")
    refused(code, err, 2, PLAIN)
    nothing_published(tmp_path)


# ---------------------------------------------------------------- 3. verify: fields of the wrong type

@pytest.fixture(scope="module")
def merged_sharded(checkpoint, tmp_path_factory) -> Path:
    """A merge in several files, so it has an index."""
    out = tmp_path_factory.mktemp("merged") / "out"
    code = main(["merge", "--source", str(checkpoint(FSDP)), "--target", str(out), "--no-progress",
                 "--max-shard-size", "200KB"])
    assert code == 0 and (out / "model.safetensors.index.json").exists()
    return out


def rewrite_header(path: Path, edit) -> None:
    """Replace a safetensors file's JSON header by edit(header) (a dict, or raw bytes), data kept."""
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    new = edit(json.loads(raw[8:8 + n]))
    new = new if isinstance(new, bytes) else json.dumps(new).encode()
    path.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n:])


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def first_tensor(header: dict) -> str:
    return next(k for k in header if k != "__metadata__")


HEADER_DAMAGE = {
    "offsets_strings": lambda h: {**h, first_tensor(h): {**h[first_tensor(h)], "data_offsets": ["0", "64"]}},
    "offsets_one": lambda h: {**h, first_tensor(h): {**h[first_tensor(h)], "data_offsets": [0]}},
    "shape_string": lambda h: {**h, first_tensor(h): {**h[first_tensor(h)], "shape": "12"}},
    "shape_negative": lambda h: {**h, first_tensor(h): {**h[first_tensor(h)], "shape": [-1, -64]}},
    "shape_bool": lambda h: {**h, first_tensor(h): {**h[first_tensor(h)], "shape": [True]}},
    "dtype_list": lambda h: {**h, first_tensor(h): {**h[first_tensor(h)], "dtype": ["F32"]}},
    "entry_list": lambda h: {**h, first_tensor(h): [1, 2]},
    "metadata_list": lambda h: {**h, "__metadata__": ["format", "pt"]},
    "header_list": lambda h: [h],
    "deep": lambda h: nested(100_000),
    "not_utf8": lambda h: b"\xff\xfe" + b" " * 30,
}


@pytest.mark.parametrize("damage", sorted(HEADER_DAMAGE))
def test_verify_names_a_header_with_wrong_types(merged_sharded, tmp_path, capsys, damage):
    """Before: strings for offsets, a string for shape, deep nesting ended in tracebacks."""
    out = tmp_path / "out"
    shutil.copytree(merged_sharded, out)
    victim = sorted(out.glob("*.safetensors"))[0]
    rewrite_header(victim, HEADER_DAMAGE[damage])
    for extra in ([], ["--reference", str(merged_sharded)]):
        code = main(["verify", str(out), *extra])
        text = capsys.readouterr()
        assert code == 3, text
        assert victim.name in text.out + text.err, text
        assert "Traceback" not in text.err and "internal error" not in text.err, text.err


INDEX_DAMAGE = {
    "weight_map_list": lambda i: {**i, "weight_map": list(i["weight_map"].items())},
    "weight_map_string": lambda i: {**i, "weight_map": "model.safetensors"},
    "file_outside": lambda i: {**i, "weight_map": {**i["weight_map"], "model.norm.weight": "../../../etc/passwd"}},
    "file_not_a_string": lambda i: {**i, "weight_map": {**i["weight_map"], "model.norm.weight": 7}},
    "metadata_list": lambda i: {**i, "metadata": [1]},
    "total_size_string": lambda i: {**i, "metadata": {"total_size": "12"}},
    "index_list": lambda i: [i],
    "deep": lambda i: nested(100_000),
    "not_json": lambda i: b"weight_map: model.safetensors",
}


@pytest.mark.parametrize("damage", sorted(INDEX_DAMAGE))
def test_verify_names_an_index_with_wrong_types(merged_sharded, tmp_path, capsys, damage):
    """Before: a list for weight_map, deep nesting ended in tracebacks; a path in weight_map was read."""
    out = tmp_path / "out"
    shutil.copytree(merged_sharded, out)
    index = out / "model.safetensors.index.json"
    new = INDEX_DAMAGE[damage](json.loads(index.read_text()))
    index.write_bytes(new if isinstance(new, bytes) else json.dumps(new).encode())
    for extra in ([], ["--reference", str(merged_sharded)]):
        code = main(["verify", str(out), *extra])
        text = capsys.readouterr()
        assert code == 3, text
        assert "model.safetensors.index.json" in text.out + text.err, text
        assert "Traceback" not in text.err and "internal error" not in text.err, text.err


MANIFEST_DAMAGE = {
    "files_list": lambda m: {**m, "files": [1]},
    "segments_strings": lambda m: {**m, "files": {k: {**v, "segments": [["0", "1", "x"]]}
                                                  for k, v in m["files"].items()}},
    "record_list": lambda m: {**m, "files": {k: [v] for k, v in m["files"].items()}},
    "name_outside": lambda m: {**m, "files": {"../../etc/passwd": {"bytes": 1, "segments": [[0, 1, "x"]]}}},
    "deep": lambda m: nested(100_000),
}


@pytest.mark.parametrize("damage", sorted(MANIFEST_DAMAGE))
def test_verify_names_a_manifest_with_wrong_types(merged_sharded, tmp_path, capsys, damage):
    out = tmp_path / "out"
    shutil.copytree(merged_sharded, out)
    manifest = out / "distmerge-manifest.json"
    new = MANIFEST_DAMAGE[damage](json.loads(manifest.read_text()))
    manifest.write_bytes(new if isinstance(new, bytes) else json.dumps(new).encode())
    code = main(["verify", str(out)])
    text = capsys.readouterr()
    assert code == 3 and "distmerge-manifest.json" in text.out, text
    assert "Traceback" not in text.err and "internal error" not in text.err, text.err


# ---------------------------------------------------------------- 4. targets

def test_a_symlinked_target_is_resolved_and_published_whole(fsdp, tmp_path, capsys, clean):
    """Before: a traceback, and a staging directory holding a full output without its marker."""
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    code, err = merge(capsys, "--source", fsdp, "--target", tmp_path / "link")
    assert code == 0, err
    assert (tmp_path / "link").is_symlink() and os.readlink(tmp_path / "link") == str(real)
    got = weights(real)
    assert got.keys() == clean.keys() and all(torch.equal(got[k], clean[k]) for k in got)
    assert not (real / ".distmerge-incomplete").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "link", "real"], "staging or lock left behind"


@pytest.mark.parametrize("to", ["nowhere", "loop"])
def test_a_dangling_or_looping_target_link_is_refused(fsdp, tmp_path, capsys, to):
    link = tmp_path / "out"
    link.symlink_to(tmp_path / "nowhere" if to == "nowhere" else link)
    code, err = merge(capsys, "--source", fsdp, "--target", link)
    refused(code, err, 2, "does not exist or loops")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "out"]


def test_a_target_link_into_the_source_is_refused(fsdp, tmp_path, capsys):
    (tmp_path / "out").symlink_to(fsdp / "huggingface")
    code, err = merge(capsys, "--source", fsdp, "--target", tmp_path / "out", "--overwrite")
    refused(code, err, 2, "inside")
    assert (fsdp / "huggingface" / "config.json").exists()


def test_the_marker_stays_until_the_final_rename_succeeded(fsdp, tmp_path, capsys, monkeypatch):
    """The last rename fails (here by a fault put in its way): the staging directory still says it
    is incomplete, no target appears, and the message says the output is resumable (exit 4)."""
    from distmerge import finish

    real_rename = os.rename

    def failing(src, dst, *args, **kwargs):
        if str(src).endswith(".distmerge-staging"):
            raise OSError(5, "Input/output error")
        return real_rename(src, dst, *args, **kwargs)

    monkeypatch.setattr(finish.os, "rename", failing)
    code, err = merge(capsys, "--source", fsdp, "--target", tmp_path / "out")
    refused(code, err, 4, "Input/output error", "--resume")
    staging = tmp_path / ".out.distmerge-staging"
    assert (staging / ".distmerge-incomplete").exists() and (staging / "model.safetensors").exists()
    assert not (tmp_path / "out").exists()


def test_an_old_target_survives_a_failed_publish(fsdp, tmp_path, capsys, monkeypatch):
    """--overwrite moves the old target aside only for the rename; a failed rename puts it back."""
    from distmerge import finish

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("old model")
    real_rename = os.rename

    def failing(src, dst, *args, **kwargs):
        if str(src).endswith(".distmerge-staging"):
            raise OSError(28, "No space left on device")
        return real_rename(src, dst, *args, **kwargs)

    monkeypatch.setattr(finish.os, "rename", failing)
    code, err = merge(capsys, "--source", fsdp, "--target", tmp_path / "out", "--overwrite")
    refused(code, err, 4)
    assert (tmp_path / "out" / "keep.txt").read_text() == "old model"


# ---------------------------------------------------------------- 6. the config against the tensors

@pytest.mark.parametrize("field, value, needle", [
    ("hidden_size", 128, "config.json implies"),
    ("num_hidden_layers", 3, "num_hidden_layers=3"),
    ("num_hidden_layers", 1, "num_hidden_layers=1"),
    ("intermediate_size", 64, "config.json implies"),
    ("num_key_value_heads", 1, "config.json implies"),
])
def test_a_config_that_disagrees_with_the_tensors_is_refused(fsdp, tmp_path, capsys, field, value, needle):
    """Before (verl FSDP): published with the wrong config."""
    path = fsdp / "huggingface" / "config.json"
    config = json.loads(path.read_text())
    assert config[field] != value
    path.write_text(json.dumps({**config, field: value}))
    code, err = merge(capsys, "--source", fsdp, "--target", tmp_path / "out")
    refused(code, err, 2, needle, "--hf-config")
    nothing_published(tmp_path)


def test_the_fallback_refuses_storages_that_do_not_sit_on_members():
    """torch_archive._storage_locator: every storage must land exactly on an archive member with
    room for it, under one shift; none, or more than one, and the file is refused."""
    from distmerge.sources.torch_archive import _storage_locator

    a, b = torch.zeros(16), torch.zeros(4)  # two storages, 64 and 16 bytes apart in memory
    state = {"a": a, "b": b}
    gap = b.untyped_storage().data_ptr() - a.untyped_storage().data_ptr()
    fits = {"p/data/0": (100, 64), "p/data/1": (100 + gap, 16)}
    locate = _storage_locator(state, fits, "p/", "f.pt")
    assert locate(a.untyped_storage()) == 100 and locate(b.untyped_storage()) == 100 + gap
    too_small = {"p/data/0": (100, 63), "p/data/1": (100 + gap, 16)}
    with pytest.raises(MergeError, match="places the tensors where the archive's members are not"):
        _storage_locator(state, too_small, "p/", "f.pt")
    with pytest.raises(MergeError, match="2 consistent placements"):  # one storage, two members it fits
        _storage_locator({"a": a}, {"p/data/0": (100, 64), "p/data/1": (900, 64)}, "p/", "f.pt")


def test_an_hf_directory_that_is_a_link_out_of_the_checkpoint_is_refused(fsdp, tmp_path, capsys):
    """huggingface/ -> ~/.ssh would copy every key into the output (and with --hf-upload-path, to the Hub)."""
    keys = tmp_path / "dot_ssh"
    shutil.copytree(fsdp / "huggingface", keys)
    (keys / "id_ed25519").write_text("-----BEGIN OPENSSH PRIVATE KEY-----\n")
    shutil.rmtree(fsdp / "huggingface")
    (fsdp / "huggingface").symlink_to(keys)
    code, err = merge(capsys, "--source", fsdp, "--target", tmp_path / "out")
    refused(code, err, 2, "is a link to", f"--hf-config {keys}")
    nothing_published(tmp_path)

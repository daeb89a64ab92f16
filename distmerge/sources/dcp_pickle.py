"""DCP's `.metadata` pickle, read by a restricted unpickler into compact tables.

`.metadata` is a pickle of torch.distributed.checkpoint's `Metadata`: per tensor its dtype, size
and chunks, and per chunk (`MetadataIndex` -> `_StorageInfo`) the file and bytes that hold it.
Only DCP's (and Megatron's) metadata classes load, as inert records; no code of theirs runs, and
any other global is refused.

Two unpicklers give one result, `MetadataTables`:
- a large file (`LEAN_FROM` bytes and up) goes through `LeanUnpickler` alone;
- a small one goes through `LeanUnpickler` first, as a bounded check whose result is let go, then
  through the C unpickler, whose records are compacted afterwards. The C unpickler keeps every
  object it made in its memo until `load()` returns: about 1.4 KB per chunk (three state dicts,
  the tuples behind each `torch.Size`, the records), some 70 bytes per byte of a file of empty
  lists. Nothing inside it can be bounded: it hashes every dict key it builds, and a tuple's hash
  is not cached, so a key of nested tuples that share their members (a file of a few hundred
  bytes) costs 2^depth steps. The lean pass refuses such a file first. The C pass stays because
  the lean unpickler does not yet check FRAME lengths as the C one does (a string of another
  length inside a frame reads); once it does, small files can take the lean path alone.

The lean unpickler compacts each record as its `BUILD` completes, routes the storage records into
arrays as they are set, and keeps in its memo only what a writer refers back to: the state dicts
and storage records it consumed are replaced by `DROPPED`. A later reference to one (no DCP or
Megatron writer makes one) stops the read; it never yields a wrong catalogue. Its bounds, which no
writer comes near: at most STACK_LIMIT values on its stacks (picklers batch 1000 items); a dict
key or set member hashes at most KEY_BUDGET values; only Sizes of at most MAX_DIMS ints (and
tuples of them) are interned, and membership is by identity; the globals other than DCP's records
are called with plain values only; no integer is wider than 255 bytes (LONG4). Compaction takes
sizes and offsets of at most MAX_DIMS ints, names and paths that are strings, offsets and lengths
that are ints.
"""
from __future__ import annotations

import os
import pickle
from array import array
from typing import NamedTuple

from ..errors import MergeError
from .torch_archive import plain_global

LEAN_FROM = 4 << 20  # bytes of `.metadata` from which the lean unpickler reads it (about 25k chunks); below,
#                     the C unpickler's memory (some 70 bytes per byte at worst) stays under 300 MB
MAX_DIMS = 64  # values in a Size or offsets (a tensor's dimensions)
STACK_LIMIT = 100_000  # values (and levels) on the lean unpickler's stacks; a writer batches 1000 items
KEY_BUDGET = 1_000  # values a dict key or set member may hash (DCP's keys are strings and records)
READ_BLOCK = 1 << 20  # bytes the lean unpickler reads from the file at a time
LOOKAHEAD = 300       # bytes every inlined opcode fits in (opcode, arguments, a short string)


class _Inert:
    """A DCP metadata record as pickled: `fields` is its pickled state dict itself (kept, not
    copied), `args` its constructor arguments (older pickles); none of the real class's code runs."""

    __slots__ = ("args", "fields")

    def __init__(self, *args):  # REDUCE: cls(*args)
        self.args = args

    def __setstate__(self, state):
        if type(state) is dict:
            self.fields = state
        elif isinstance(state, tuple) and len(state) == 2 and all(isinstance(x, (dict, type(None))) for x in state):
            self.fields = {**(state[0] or {}), **(state[1] or {})}  # (dict, slots)
        elif isinstance(state, tuple):
            self.args = state  # TensorProperties: (dtype, layout, requires_grad, ...)
        else:
            self.fields = {"value": state}


_NO_FIELDS: dict = {}
_MISSING = object()


def fields_of(record) -> dict:
    """A record's pickled fields ({} for a record built from arguments alone)."""
    fields = getattr(record, "fields", _NO_FIELDS)
    if type(fields) is not dict:
        raise TypeError(f"{type(record).__name__} is not a DCP metadata record")
    return fields


def field(record, name, position=None):
    """A record's pickled field, or its constructor argument at `position` (older pickles)."""
    value = fields_of(record).get(name, _MISSING)
    if value is not _MISSING:
        return value
    args = getattr(record, "args", ())
    if position is not None and len(args) > position:
        return args[position]
    raise KeyError(f"{type(record).__name__}.{name}")


def find_metadata_class(classes: dict, module: str, name: str):
    """DCP's (and Megatron's) metadata classes as inert record classes (one per name, kept in
    `classes`), torch dtypes and sizes as values; anything else is refused."""
    if module.startswith(("torch.distributed.checkpoint", "megatron.core.dist_checkpointing")):
        if name not in classes:
            classes[name] = type(name, (_Inert,), {"__slots__": ()})
        return classes[name]
    plain = plain_global(module, name)
    if plain is not None:
        return plain
    if module == "pathlib" and name in ("PosixPath", "PurePosixPath", "Path", "WindowsPath", "PureWindowsPath"):
        return lambda *parts: "/".join(map(str, parts))
    raise pickle.UnpicklingError(f"{module}.{name} is not part of DCP metadata")


class MetadataUnpickler(pickle.Unpickler):
    """The C unpickler, restricted: DCP's metadata classes become inert records; torch dtypes and
    sizes become values; nothing else loads."""

    def __init__(self, file):
        super().__init__(file)
        self.classes: dict[str, type] = {}

    def find_class(self, module, name):
        return find_metadata_class(self.classes, module, name)


# The compact values, the same from both unpicklers.

class Chunk(NamedTuple):
    """A `ChunkStorageMetadata`: where the chunk lies in its tensor."""
    offsets: tuple
    sizes: tuple


class TensorEntry(NamedTuple):
    """A `TensorStorageMetadata`: the dtype as pickled (checked where a tensor is built), size, chunks."""
    dtype: object
    size: tuple
    chunks: tuple


class IndexKey(NamedTuple):
    """A `MetadataIndex`: the tensor and the chunk offsets a storage record is for."""
    fqn: str
    offsets: tuple


class Where(NamedTuple):
    """A `_StorageInfo`: the file (relative to the checkpoint) and bytes that hold a chunk."""
    relative_path: str
    offset: int
    length: int
    transforms: object  # the record's transform_descriptors when it has any (refused), else None


def dims_of(value) -> tuple:
    """A Size or offsets as pickled (a tuple or list) as a tuple of at most MAX_DIMS ints; TypeError
    for anything else. Checked before it is copied or hashed: a nested or shared value would cost
    far more than its bytes each time."""
    if type(value) not in (tuple, list) or len(value) > MAX_DIMS or not all(type(x) is int for x in value):
        raise TypeError(f"a size or offsets that is not a list of at most {MAX_DIMS} integers "
                        f"({type(value).__name__})")
    return tuple(value)


def _text(value) -> str:
    if type(value) is not str:
        raise TypeError(f"a name or path that is a {type(value).__name__}, not a string")
    return value


def _int(value) -> int:
    if type(value) is not int:
        raise TypeError(f"a byte offset or length that is a {type(value).__name__}, not an integer")
    return value


def chunk_of(record) -> Chunk:
    if type(record) is Chunk:
        return record
    f = fields_of(record)
    if "offsets" in f and "sizes" in f:  # the pickled dataclass
        return Chunk(dims_of(f["offsets"]), dims_of(f["sizes"]))
    return Chunk(dims_of(field(record, "offsets", 0)), dims_of(field(record, "sizes", 1)))


def tensor_entry(record) -> TensorEntry:
    """A TensorStorageMetadata record (or its compact value) as a TensorEntry."""
    if type(record) is TensorEntry:
        return record
    dtype = field(field(record, "properties", 0), "dtype", 0)
    chunks = field(record, "chunks", 2)
    if type(chunks) not in (tuple, list):
        raise TypeError(f"chunks that are a {type(chunks).__name__}, not a list")
    return TensorEntry(dtype, dims_of(field(record, "size", 1)), tuple(map(chunk_of, chunks)))


def index_key(record) -> IndexKey:
    if type(record) is IndexKey:
        return record
    offsets = fields_of(record).get("offset", _MISSING)
    if offsets is _MISSING:
        args = getattr(record, "args", ())
        offsets = args[1] if len(args) > 1 else None
    return IndexKey(_text(field(record, "fqn", 0)), dims_of(offsets) if offsets is not None else ())  # None: bytes


def where_of(record) -> Where:
    if type(record) is Where:
        return record
    s = fields_of(record)
    if "relative_path" in s and "offset" in s and "length" in s:  # the pickled dataclass
        rel, offset, length = s["relative_path"], s["offset"], s["length"]
    else:
        rel, offset, length = field(record, "relative_path", 0), field(record, "offset", 1), field(record, "length", 2)
    return Where(_text(rel), _int(offset), _int(length), s.get("transform_descriptors") or None)


def entry_kind(entry) -> str:
    """The DCP class name of a `state_dict_metadata` value, compacted or not."""
    return "TensorStorageMetadata" if type(entry) is TensorEntry else type(entry).__name__


class StorageTable:
    """`storage_data` in arrays: per tensor, one row per chunk [ndim, offsets..., file number,
    byte offset, length]; the files' relative paths once each. About 48 bytes per 2-d chunk,
    where a dict of records took over 500."""

    def __init__(self, path: str):
        self.path = path  # the `.metadata`, for messages
        self.rows: dict[str, array] = {}
        self.files: list[str] = []
        self.numbers: dict[str, int] = {}

    def add(self, key: IndexKey, where: Where) -> None:
        if type(key) is not IndexKey or type(where) is not Where:
            raise pickle.UnpicklingError("storage_data mixes storage records with other values")
        if where.transforms:
            raise MergeError(f"{self.path}: {key.fqn} is stored with transforms (e.g. compression), which "
                             "distmerge does not read yet")
        number = self.numbers.get(where.relative_path)
        if number is None:
            number = self.numbers[where.relative_path] = len(self.files)
            self.files.append(where.relative_path)
        row = self.rows.get(key.fqn)
        if row is None:
            row = self.rows[key.fqn] = array("q")
        row.append(len(key.offsets))
        row.extend(key.offsets)
        row.extend((number, where.offset, where.length))

    def add_items(self, items: list) -> None:
        """SETITEMS' flat [key, value, key, value, ...]."""
        if len(items) % 2:
            raise pickle.UnpicklingError("odd number of items for SETITEMS")
        add, rows, numbers = self.add, self.rows, self.numbers
        for i in range(0, len(items), 2):
            key, where = items[i], items[i + 1]
            if type(key) is IndexKey and type(where) is Where and not where[3]:
                row, number = rows.get(key[0]), numbers.get(where[0])
                if row is not None and number is not None:  # add() inline: its tensor and file are known
                    row.append(len(key[1]))
                    row.extend(key[1])
                    row.extend((number, where[1], where[2]))
                    continue
            add(key, where)

    @classmethod
    def of_records(cls, storage_data, path: str) -> StorageTable:
        """The table of a `storage_data` dict of records (the C unpickler's), in the file's order."""
        if type(storage_data) is cls:
            return storage_data
        if not isinstance(storage_data, dict):  # its keys hashed once, as the unpickler set them
            raise TypeError("storage_data is not a dict")
        table = cls(path)
        for index, info in storage_data.items():
            table.add(index_key(index), where_of(info))
        return table

    def take(self, fqn: str) -> dict[tuple, tuple[str, int, int]]:
        """A tensor's chunk offsets -> (relative file, byte offset, length), the first record of
        each offsets kept; the rows are dropped as they are taken."""
        row, files, found = self.rows.pop(fqn, None), self.files, {}
        i = 0
        while row is not None and i < len(row):
            n = row[i]
            offsets = tuple(row[i + 1:i + 1 + n])
            if offsets not in found:
                found[offsets] = (files[row[i + 1 + n]], row[i + 2 + n], row[i + 3 + n])
            i += n + 4
        return found


class MetadataTables(NamedTuple):
    """A `.metadata`: fqn -> TensorEntry (or another record: bytes entries), and the storage table."""
    entries: dict
    storage: StorageTable


def tables_of(meta, path: str) -> MetadataTables:
    """The result of either unpickler (the `Metadata` record) as tables."""
    entries = field(meta, "state_dict_metadata", 0)
    if not isinstance(entries, dict) or not all(type(name) is str for name in entries):
        raise TypeError("state_dict_metadata is not a dict of tensor names")
    return MetadataTables(dict(entries), StorageTable.of_records(field(meta, "storage_data", 2), path))


def load_metadata(path: str, lean: bool | None = None) -> MetadataTables:
    """Unpickle a `.metadata` (streamed from the file) into tables; `lean` None: by its size.
    A small file goes through the lean unpickler first, its result let go: that pass is bounded
    in time and memory and refuses what would make the C unpickler hash without end (nested shared
    tuples as a dict key) or grow without bound. The C unpickler then reads it, with the frame
    checks the lean one does not make yet."""
    with open(path, "rb") as f:
        if lean is None:
            lean = os.fstat(f.fileno()).st_size >= LEAN_FROM
        meta = LeanUnpickler(f, path).load()
        if not lean:
            f.seek(0)
            meta = MetadataUnpickler(f).load()
    return tables_of(meta, path)


class DroppedReference(pickle.UnpicklingError):
    """A memo reference to an object the lean unpickler let go: no DCP writer makes one."""


class _Unused:
    """The compact value of a record nothing reads (Megatron's saved plans)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "UNUSED"


class _Dropped:
    __slots__ = ()

    def __repr__(self) -> str:
        return "DROPPED"


UNUSED, DROPPED = _Unused(), _Dropped()


class _Policy(NamedTuple):
    """What the lean unpickler makes of a record class once its BUILD completes."""
    compact: object      # record -> compact value
    from_state: object   # its plain state dict -> the same value, or None where `compact` must decide
    from_items: object   # (SETITEMS' items as DCP writes them, ids of interned Sizes) -> the same value, or None
    keep: bool           # whether the memo keeps the value (a writer may refer back to it) or drops it
    containers: bool     # whether its state holds lists or dicts (they leave the memo with it)


def _unused(record) -> _Unused:
    return UNUSED


_new = tuple.__new__  # a NamedTuple made without its Python-level __new__: these run once per chunk


def _size(value) -> bool:
    """Whether a value is a Size as compaction keeps it (dims_of's check, without the copy)."""
    return type(value) is tuple and len(value) <= MAX_DIMS and all(type(x) is int for x in value)


def _chunk_state(s: dict):
    offsets, sizes = s.get("offsets"), s.get("sizes")
    return _new(Chunk, (offsets, sizes)) if _size(offsets) and _size(sizes) else None


def _index_state(s: dict):
    fqn, offsets = s.get("fqn"), s.get("offset")
    return _new(IndexKey, (fqn, offsets)) if type(fqn) is str and offsets and _size(offsets) else None


def _where_state(s: dict):
    rel, offset, length = s.get("relative_path"), s.get("offset"), s.get("length")
    if type(rel) is str and type(offset) is int and type(length) is int and not s.get("transform_descriptors"):
        return _new(Where, (rel, offset, length, None))
    return None


def _no_state(s: dict):
    return None


def _no_items(items: list, sizes: set):
    return None


def _chunk_items(items: list, sizes: set, id=id):
    """['offsets', Size, 'sizes', Size], both interned Sizes (`sizes`: their ids)."""
    if len(items) == 4 and items[0] == "offsets" and items[2] == "sizes":
        offsets, size = items[1], items[3]
        if id(offsets) in sizes and id(size) in sizes:
            return _new(Chunk, (offsets, size))
    return None


def _index_items(items: list, sizes: set, id=id):
    """['fqn', str, 'index', any, 'offset', interned Size]."""
    if len(items) == 6 and items[0] == "fqn" and items[2] == "index" and items[4] == "offset":
        fqn, offsets = items[1], items[5]
        if type(fqn) is str and offsets and id(offsets) in sizes:
            return _new(IndexKey, (fqn, offsets))
    return None


def _where_items(items: list, sizes: set):
    """['relative_path', str, 'offset', int, 'length', int] (no transform_descriptors)."""
    if len(items) == 6 and items[0] == "relative_path" and items[2] == "offset" and items[4] == "length":
        rel, offset, length = items[1], items[3], items[5]
        if type(rel) is str and type(offset) is int and type(length) is int:
            return _new(Where, (rel, offset, length, None))
    return None


POLICIES = {  # Megatron's saved plans (all_local_plans: a WriteItem per chunk) refer back to chunks
    "ChunkStorageMetadata": _Policy(chunk_of, _chunk_state, _chunk_items, True, False),
    "TensorStorageMetadata": _Policy(tensor_entry, _no_state, _no_items, True, True),
    "MetadataIndex": _Policy(index_key, _index_state, _index_items, False, False),
    "_StorageInfo": _Policy(where_of, _where_state, _where_items, False, False),
    "SavePlan": _Policy(_unused, _no_state, _no_items, False, True),
    "WriteItem": _Policy(_unused, _no_state, _no_items, False, True),
    "TensorWriteData": _Policy(_unused, _no_state, _no_items, False, True),
    "BytesWriteData": _Policy(_unused, _no_state, _no_items, False, True),
}


class LeanUnpickler(pickle._Unpickler):
    """The same restricted unpickler in Python, lean in memory (see the module's docstring).

    Its memo is a list (one slot per memoized object, as every Python pickler numbers them; a PUT
    out of that order is refused). The hot opcodes of a DCP pickle run inline in `_run`; the rest
    go through pickle._Unpickler's own handlers, which read through `read`/`readline` from the
    same buffer. Tuples of ints (every `torch.Size`), chunks and strings are interned: equal
    values are one object, so the memo slots that keep them cost 8 bytes each and nothing more.
    What it hashes is bounded (see the module's docstring): a tuple's hash is not cached and visits
    every value under it, once per path, so nested tuples that share members cost 2^depth."""

    def __init__(self, file, path: str):
        super().__init__(file)
        self.path, self.file = path, file
        self.size = os.fstat(file.fileno()).st_size
        self.classes: dict[str, type] = {}
        self.records: set[type] = set()      # every record class made, with a policy or not
        self.policies: dict[type, _Policy] = {}
        self.memo_list: list = []
        self.slots: dict[int, int] = {}     # id -> memo slot of the records, dicts and lists not yet consumed
        self.opened: list[int] = []         # memo slots of the records (and state dicts) _empty_tuple started
        self.tuples: dict[tuple, tuple] = {}  # interned: Sizes (ints) and tuples of Sizes, at most MAX_DIMS long
        self.sizes: set[int] = set()           # ids of the interned Sizes (live: `tuples` keeps them)
        self.calls: dict[object, object] = {}  # the plain globals that are called, checked (_plain_call)
        self.chunks: dict[Chunk, Chunk] = {}
        self.strings: dict[str, str] = {}
        self.buf, self.pos, self.exhausted = b"", 0, False
        self.read, self.readline, self.readinto = self._read, self._readline, self._readinto

    def find_class(self, module, name):
        cls = find_metadata_class(self.classes, module, name)
        if isinstance(cls, type) and issubclass(cls, _Inert):
            self.records.add(cls)
            if name in POLICIES:
                self.policies[cls] = POLICIES[name]
        elif callable(cls) and cls is not tuple:  # tuple (torch.Size) copies its argument; hashes nothing
            if cls not in self.calls:
                self.calls[cls] = _plain_call(cls)
            return self.calls[cls]
        return cls

    # reading: one buffer, shared by the inline loop and pickle's own handlers

    def _refill(self, buf: bytes, pos: int) -> bytes:
        more = self.file.read(READ_BLOCK)
        self.exhausted = not more
        if pos > len(buf) or (pos == len(buf) and not more):
            raise EOFError("the pickle is truncated")
        return buf[pos:] + more

    def _read(self, n: int) -> bytes:
        buf, pos = self.buf, self.pos
        if pos + n <= len(buf):
            self.pos = pos + n
            return buf[pos:pos + n]
        if n > self.size:
            raise EOFError("the pickle claims more bytes than its file has")
        data = buf[pos:] + self.file.read(n - (len(buf) - pos))
        self.buf, self.pos = b"", 0
        if len(data) < n:
            raise EOFError("the pickle is truncated")
        return data

    def _readinto(self, b) -> int:
        data = self._read(len(b))
        b[:] = data
        return len(data)

    def _readline(self) -> bytes:
        line = b""
        while True:
            buf, pos = self.buf, self.pos
            end = buf.find(b"\n", pos)
            if end >= 0:
                self.pos = end + 1
                return line + buf[pos:end + 1]
            line += buf[pos:]
            self.buf, self.pos = self.file.read(READ_BLOCK), 0
            if not self.buf or len(line) > self.size:
                return line

    # the memo

    def put(self, index: int, obj) -> None:
        memo = self.memo_list
        if index != len(memo):  # every Python pickler numbers its memo in order
            raise pickle.UnpicklingError(f"memo index {index} out of order (expected {len(memo)})")
        t = type(obj)
        if t is dict or t is list or t in self.policies:
            self.slots[id(obj)] = index
        memo.append(obj)

    def get(self, index: int):
        if index < 0:
            raise pickle.UnpicklingError(f"negative memo index {index}")
        obj = self.memo_list[index]
        if obj is DROPPED:
            raise DroppedReference(f"memo entry {index} refers back to a storage record or state that no DCP "
                                   "writer refers back to")
        return obj

    def _release(self, obj, value) -> None:
        """The memo slot of `obj` (if it has one) now holds `value`."""
        slot = self.slots.pop(id(obj), None)
        if slot is not None and self.memo_list[slot] is obj:
            self.memo_list[slot] = value

    def intern(self, t: tuple) -> tuple:
        """An equal tuple already made, for a Size (at most MAX_DIMS ints) and a tuple of at most
        MAX_DIMS interned Sizes (a Size's arguments); any other tuple as it is, never hashed."""
        if len(t) > MAX_DIMS:
            return t
        sizes = self.sizes
        if not t or type(t[0]) is int:
            for x in t:
                if type(x) is not int:
                    return t
            u = self.tuples.setdefault(t, t)
            if u is t:  # new
                sizes.add(id(t))
            return u
        for x in t:
            if id(x) not in sizes:
                return t
        return self.tuples.setdefault(t, t)

    def check_key(self, key) -> None:
        """Refuse a dict key or set member whose hash would visit more than KEY_BUDGET values (a
        tuple's hash visits every value under it, shared ones once per path); other values hash
        in bounded time (strings and bytes cache theirs, records hash by identity)."""
        todo, count = [key], 0
        while todo:
            t = todo.pop()
            if isinstance(t, tuple):
                count += len(t) + 1
                if count > KEY_BUDGET:
                    raise pickle.UnpicklingError(f"a dict key or set member of more than {KEY_BUDGET} values")
                todo.extend(t)

    def fill(self, target, items: list):
        """SETITEMS' flat [key, value, ...] into a dict (or what pickle would set them on), keys checked."""
        if len(items) % 2:
            raise pickle.UnpicklingError("odd number of items for SETITEMS")
        for i in range(0, len(items), 2):
            key = items[i]
            if type(key) is not str:
                self.check_key(key)
            target[key] = items[i + 1]
        return target

    def check_stack(self, stack: list) -> None:
        """Refuse a pickle whose stacks hold more than STACK_LIMIT values and levels: no writer
        comes near (picklers batch SETITEMS and APPENDS by 1000, DCP's records nest a few levels),
        and an empty list or dict costs some 60 bytes per byte of file. Checked as each block is
        read: the stacks grow at most READ_BLOCK values past the limit."""
        metastack = self.metastack
        if len(stack) + len(metastack) + sum(map(len, metastack)) > STACK_LIMIT:
            raise pickle.UnpicklingError(f"the pickle holds more than {STACK_LIMIT} values on its stack at once; "
                                         "no DCP writer makes one")

    # records

    def build(self, inst, state) -> object:
        """BUILD of a record: its state set as the C unpickler sets it, then compacted by its policy;
        the state dict (and lists in it) leave the memo, and the record's slot keeps the compact
        value or DROPPED. A record that does not compact stays as it is."""
        policy = self.policies[type(inst)]
        value = policy.from_state(state) if type(state) is dict else None
        if value is None:
            inst.__setstate__(state)
            try:
                value = policy.compact(inst)
            except (KeyError, TypeError, ValueError, IndexError, AttributeError, OverflowError):
                return inst  # the C path's record: refused where it is used, as from the C unpickler
        else:
            inst.fields = state  # as __setstate__ sets it
        if type(value) is Chunk and id(value[0]) in self.sizes and id(value[1]) in self.sizes:
            value = self.chunks.setdefault(value, value)  # ints only: an equal chunk is the same chunk
        memo, opened = self.memo_list, self.opened
        slot = opened[-1] if opened else -1
        if slot >= 0 and memo[slot] is inst and memo[slot + 1] is state:  # started by _empty_tuple
            opened.pop()
            memo[slot], memo[slot + 1] = (value if policy.keep else DROPPED), DROPPED
        else:
            self._release(inst, value if policy.keep else DROPPED)
            self._release(state, DROPPED)
        if policy.containers and type(state) is dict:
            for v in state.values():
                if type(v) is list or type(v) is dict:
                    self._release(v, DROPPED)
        return value

    def set_items(self, target, items: list):
        """SETITEM(S) into `target`; a dict that receives storage records becomes a StorageTable
        (returned, to replace it on the stack and in the memo)."""
        if type(target) is StorageTable:
            target.add_items(items)
            return target
        if type(target) is dict and not target and items and type(items[0]) is IndexKey:
            table = StorageTable(self.path)
            table.add_items(items)
            self._release(target, table)
            return table
        return self.fill(target, items)

    def load(self):
        """The unpickled object; the memo and the rest are let go as soon as it is made (the reader
        methods set on the instance make a cycle, which the paused cycle collector would not free)."""
        try:
            return self._run()
        finally:
            self.memo_list, self.slots, self.opened, self.tuples, self.chunks, self.strings = [], {}, [], {}, {}, {}
            self.sizes, self.calls = set(), {}
            self.stack, self.metastack, self.buf = [], [], b""
            self.read = self.readline = self.readinto = None

    def _run(self):
        """Run the pickle. The opcodes of DCP's records run inline, and their usual sequences at
        once (a record's start, a torch.Size, a record's state and its BUILD); the rest through
        `_other`, each with the same effect on the stack and the memo as pickle's own handler."""
        self.metastack, self.stack = metastack, stack = [], []
        memo = self.memo_list
        buf, pos, limit = b"", 0, -1
        try:
            while True:
                if pos > limit:
                    buf, pos = self._refill(buf, pos), 0
                    limit = len(buf) - LOOKAHEAD
                    self.check_stack(stack)
                op = buf[pos]
                pos += 1
                if op == 0x6A:  # LONG_BINGET
                    index = int.from_bytes(buf[pos:pos + 4], "little")
                    pos += 4
                    obj = memo[index]
                    stack.append(obj if obj is not DROPPED else self.get(index))
                elif op == 0x68:  # BINGET
                    obj = memo[buf[pos]]
                    pos += 1
                    stack.append(obj if obj is not DROPPED else self.get(buf[pos - 1]))
                elif op == 0x4B:  # BININT1
                    stack.append(buf[pos])
                    pos += 1
                elif op == 0x28:  # MARK
                    metastack.append(stack)
                    stack = []
                elif op == 0x29:  # EMPTY_TUPLE: usually a record's start
                    pos, stack = self._empty_tuple(buf, pos, stack)
                elif op == 0x86:  # TUPLE2: usually a torch.Size
                    pos = self._tuple2(buf, pos, stack)
                elif op == 0x75:  # SETITEMS: usually a record's state, then its BUILD
                    pos, stack = self._setitems(buf, pos, stack)
                elif op == 0x8C:  # SHORT_BINUNICODE
                    pos = self._short_text(buf, pos, stack)
                elif op == 0x4D:  # BININT2
                    stack.append(buf[pos] | buf[pos + 1] << 8)
                    pos += 2
                elif op == 0x4A:  # BININT
                    stack.append(int.from_bytes(buf[pos:pos + 4], "little", signed=True))
                    pos += 4
                elif op == 0x94:  # MEMOIZE (most are taken with the opcode before them)
                    self._memoize(stack[-1])
                elif op == 0x2E:  # STOP
                    if pos > len(buf):
                        raise EOFError("the pickle is truncated")
                    return stack.pop()
                else:
                    buf, pos, stack = self._other(op, buf, pos, stack)
                    limit = len(buf) - LOOKAHEAD  # pickle's handlers may have read on
        except IndexError:  # an opcode's bytes run past the end of the file
            if self.exhausted and pos > len(buf) - LOOKAHEAD:
                raise EOFError("the pickle is truncated") from None
            raise

    def _short_text(self, buf: bytes, pos: int, stack: list) -> int:
        """SHORT_BINUNICODE, and the MEMOIZE after it; equal strings are one object (every `__0_0.distcp`)."""
        end = pos + 1 + buf[pos]
        text = str(buf[pos + 1:end], "utf-8", "surrogatepass")
        text = self.strings.setdefault(text, text)
        stack.append(text)
        if buf[end] == 0x94:  # MEMOIZE
            self.memo_list.append(text)
            return end + 1
        return end

    def _memoize(self, obj) -> None:
        if type(obj) is dict or type(obj) is list or type(obj) in self.policies:
            self.slots[id(obj)] = len(self.memo_list)
        self.memo_list.append(obj)

    def _empty_tuple(self, buf: bytes, pos: int, stack: list) -> tuple[int, list]:
        """EMPTY_TUPLE; with the NEWOBJ MEMOIZE EMPTY_DICT MEMOIZE MARK after it, a record and its state dict."""
        if buf[pos:pos + 5] == b"\x81\x94}\x94(" and stack and stack[-1] in self.records:
            cls, memo = stack[-1], self.memo_list
            record, state = object.__new__(cls), {}
            if cls in self.policies:  # its BUILD finds the two slots here
                self.opened.append(len(memo))
            memo.append(record)
            memo.append(state)
            stack[-1] = record
            stack.append(state)
            self.metastack.append(stack)
            return pos + 5, []
        stack.append(())
        return pos, stack

    def _tuple2(self, buf: bytes, pos: int, stack: list) -> int:
        """TUPLE2; with MEMOIZE TUPLE1 MEMOIZE REDUCE MEMOIZE after it, applied to torch.Size (tuple), a Size."""
        b = stack.pop()
        a = stack[-1]
        t = (a, b)
        if type(a) is int and type(b) is int:
            u = self.tuples.setdefault(t, t)
            if u is t:  # new
                self.sizes.add(id(t))
            t = u
        else:
            t = self.intern(t)
        if buf[pos:pos + 5] == b"\x94\x85\x94R\x94" and len(stack) > 1 and stack[-2] is tuple:
            one = (t,)
            self.memo_list.extend((t, self.tuples.setdefault(one, one) if id(t) in self.sizes else one, t))
            stack.pop()
            stack[-1] = t
            return pos + 5
        stack[-1] = t
        if buf[pos] == 0x94:  # MEMOIZE
            self.memo_list.append(t)
            pos += 1
        return pos

    def _setitems(self, buf: bytes, pos: int, stack: list) -> tuple[int, list]:
        """SETITEMS; with BUILD after it, into a record's state dict, that record built."""
        items, stack = stack, self.metastack.pop()
        target = stack[-1]
        if buf[pos] == 0x62 and type(target) is dict and not target and len(stack) > 1:  # BUILD next
            value = self._build_from_items(stack[-2], target, items)
            if value is not None:
                stack.pop()
                stack[-1] = value
                return pos + 1, stack
        if type(target) is dict and not (items and type(items[0]) is IndexKey):
            self.fill(target, items)
        else:
            stack[-1] = self.set_items(target, items)
        if buf[pos] == 0x62 and len(stack) > 1 and type(stack[-2]) in self.policies:  # BUILD of a record
            state = stack.pop()
            stack[-1] = self.build(stack[-1], state)
            pos += 1
        return pos, stack

    def _build_from_items(self, record, state: dict, items: list):
        """A record's compact value straight from its SETITEMS items, its state dict never filled:
        only where nothing else can see that dict (the record and its empty dict are the two memo
        slots _empty_tuple just made, both let go here) and the items are exactly what DCP writes.
        None where `build` must run."""
        policy, opened, memo = self.policies.get(type(record)), self.opened, self.memo_list
        slot = opened[-1] if opened else -1
        if policy is None or slot < 0 or memo[slot] is not record or memo[slot + 1] is not state:
            return None
        value = policy.from_items(items, self.sizes)
        if value is None:
            return None
        if type(value) is Chunk:
            value = self.chunks.setdefault(value, value)  # of interned Sizes: an equal chunk is the same chunk
        opened.pop()
        memo[slot], memo[slot + 1] = (value if policy.keep else DROPPED), DROPPED
        return value

    def _other(self, op: int, buf: bytes, pos: int, stack: list) -> tuple[bytes, int, list]:
        """The opcodes that DCP's pickles use less often, then any other through `_fallback`."""
        if op == 0x85:  # TUPLE1
            stack[-1] = self.intern((stack[-1],))
        elif op == 0x52:  # REDUCE
            args = stack.pop()
            value = stack[-1](*args)
            stack[-1] = self.intern(value) if type(value) is tuple else value
        elif op == 0x81:  # NEWOBJ
            args = stack.pop()
            stack[-1] = stack[-1].__new__(stack[-1], *args)
        elif op == 0x7D:  # EMPTY_DICT
            stack.append({})
        elif op == 0x5D:  # EMPTY_LIST
            stack.append([])
        elif op == 0x71:  # BINPUT (protocols 2 and 3, where 4 has MEMOIZE)
            self.put(buf[pos], stack[-1])
            pos += 1
        elif op == 0x72:  # LONG_BINPUT
            self.put(int.from_bytes(buf[pos:pos + 4], "little"), stack[-1])
            pos += 4
        elif op == 0x8A:  # LONG1: byte offsets past 2 GiB
            end = pos + 1 + buf[pos]
            stack.append(int.from_bytes(buf[pos + 1:end], "little", signed=True))
            pos = end
        elif op in _CONSTANTS:  # NONE, NEWTRUE, NEWFALSE
            stack.append(_CONSTANTS[op])
        elif op == 0x95:  # FRAME: a read-ahead hint; the stream is read as one
            pos += 8
        elif op == 0x62 and type(stack[-2]) in self.policies:  # BUILD of a record
            state = stack.pop()
            stack[-1] = self.build(stack[-1], state)
        elif op == 0x65 and type(self.metastack[-1][-1]) is list:  # APPENDS to a list
            items, stack = stack, self.metastack.pop()
            stack[-1].extend(items)
        elif op == 0x61 and type(stack[-2]) is list:  # APPEND to a list
            stack[-2].append(stack.pop())
        else:
            return self._fallback(op, buf, pos, stack)
        return buf, pos, stack

    def _fallback(self, op: int, buf: bytes, pos: int, stack: list) -> tuple[bytes, int, list]:
        """Run one opcode with pickle._Unpickler's handler (or ours, for the memo), on the same stack and bytes."""
        self.stack, self.append, self.buf, self.pos = stack, stack.append, buf, pos
        handler = _MEMO_OPS.get(op) or self.dispatch.get(op)
        if handler is None:
            raise pickle.UnpicklingError(f"invalid load key, {op:#x}")
        handler(self)
        return self.buf, self.pos, self.stack


_CONSTANTS = {0x4E: None, 0x88: True, 0x89: False}
_PLAIN = (str, int, float, bool, bytes, type(None))


def _plain_call(func):
    """A global other than a record class (OrderedDict, torch's _get_layout as str, pathlib's
    paths), called with plain values only: str() of shared nested tuples, or an OrderedDict of
    their pairs, would cost 2^depth. Pickle calls them with () or strings."""
    def call(*args):
        if not all(type(a) in _PLAIN for a in args):
            raise pickle.UnpicklingError(f"{getattr(func, '__name__', 'a global')} called with other than plain "
                                         "values")
        return func(*args)
    return call


def _binput(u: LeanUnpickler) -> None:
    u.put(u.read(1)[0], u.stack[-1])


def _long_binput(u: LeanUnpickler) -> None:
    u.put(int.from_bytes(u.read(4), "little"), u.stack[-1])


def _text_put(u: LeanUnpickler) -> None:
    u.put(int(u.readline()[:-1]), u.stack[-1])


def _text_get(u: LeanUnpickler) -> None:
    u.stack.append(u.get(int(u.readline()[:-1])))


def _binget(u: LeanUnpickler) -> None:
    u.stack.append(u.get(u.read(1)[0]))


def _build(u: LeanUnpickler) -> None:
    """BUILD on anything but a record: pickle's own (the inline BUILD handles records)."""
    pickle._Unpickler.load_build(u)


def _setitem(u: LeanUnpickler) -> None:
    value = u.stack.pop()
    key = u.stack.pop()
    u.stack[-1] = u.set_items(u.stack[-1], [key, value])


def _tuple(u: LeanUnpickler) -> None:
    items = u.pop_mark()
    u.stack.append(u.intern(tuple(items)))


def _tuple3(u: LeanUnpickler) -> None:
    c, b = u.stack.pop(), u.stack.pop()
    u.stack[-1] = u.intern((u.stack[-1], b, c))


def _long4(u: LeanUnpickler) -> None:
    raise pickle.UnpicklingError("an integer wider than 255 bytes (LONG4), which no DCP writer makes")


def _dict(u: LeanUnpickler) -> None:
    items = u.pop_mark()
    u.append(u.fill({}, items))


def _additems(u: LeanUnpickler) -> None:
    for item in u.stack:  # the items after the MARK
        u.check_key(item)
    pickle._Unpickler.load_additems(u)


def _frozenset(u: LeanUnpickler) -> None:
    for item in u.stack:
        u.check_key(item)
    pickle._Unpickler.load_frozenset(u)


def _proto(u: LeanUnpickler) -> None:
    proto = u.read(1)[0]
    if proto > pickle.HIGHEST_PROTOCOL:
        raise ValueError(f"unsupported pickle protocol: {proto}")
    u.proto = proto


def _memo_ops() -> dict:
    """The handlers that replace pickle._Unpickler's where the memo or interning is concerned."""
    ops = {pickle.BINPUT: _binput, pickle.LONG_BINPUT: _long_binput, pickle.PUT: _text_put, pickle.GET: _text_get,
           pickle.BINGET: _binget, pickle.BUILD: _build, pickle.SETITEM: _setitem, pickle.TUPLE: _tuple,
           pickle.TUPLE3: _tuple3, pickle.PROTO: _proto, pickle.LONG4: _long4, pickle.DICT: _dict,
           pickle.ADDITEMS: _additems, pickle.FROZENSET: _frozenset}
    return {code[0]: handler for code, handler in ops.items()}


_MEMO_OPS = _memo_ops()

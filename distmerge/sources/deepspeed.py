"""DeepSpeed ZeRO-1/2/3 checkpoints: engine.save_checkpoint's tag directory (TRL, accelerate, OpenRLHF,
LLaMA-Factory, Axolotl), read as byte ranges inside its files, without DeepSpeed.

The source is `checkpoint-N/` (a `latest` file naming the tag, and the HF config beside it), a
directory of tags with `latest` (OpenRLHF), or the tag directory itself. What the tag holds:

- ZeRO-1/2: `mp_rank_00_model_states.pt` (`module`: the 16-bit state dict; `param_shapes`: one
  ordered name -> shape dict per param group; `buffer_names`, `shared_params`, and the frozen
  parameters whole in `frozen_param_fragments`), and per rank `[bf16_]zero_pp_rank_R_mp_rank_00_optim_states.pt`
  whose `optimizer_state_dict.single_partition_of_fp32_groups` holds one flat fp32 partition per
  group. A group's parameters lie one after another (plus `param_alignment_paddings` where saved)
  in the concatenation of the ranks' partitions, so a parameter may straddle two ranks.
- ZeRO-3: per rank `zero_pp_rank_R_mp_rank_00_model_states.pt` (placeholders in `module`; frozen
  parameters as flat per-rank fragments) and optim files whose `fp32_flat_groups` hold, for every
  parameter in `param_shapes` order, ceil(numel / W) elements per rank; the last rank's pad is
  garbage and is never read.

Each parameter is a flat C-order run of a flat partition. A run that does not start and end on row
boundaries is cut into at most 2 * (ndim - 1) + 1 rectangles (partial first row, whole rows, partial
last row, recursively), so the planner, the validation and the kernel copy of whole-row blocks work
unchanged. The pickles name DeepSpeed classes: they are read as inert records (torch_archive.load_inert),
DeepSpeed is never imported, no pickle code runs, and the optimizer moments are never read.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass

from ..dtypes import FLOAT32, DType
from ..errors import MergeError, brief
from ..model import Catalogue, Piece, SourceTensor
from ..paths import check_file, read_tracker
from .layout import find_hf_dir
from .registry import ReadOptions, SourceFormat
from .torch_archive import StoredTensor, is_count, load_inert

NAME = "deepspeed"
LATEST = "latest"
OPTIM_FILE = re.compile(r"^(?:(?:bf16|fp16)_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")
ZERO3_MODEL_FILE = re.compile(r"^zero_pp_rank_(\d+)_mp_rank_(\d+)_model_states\.pt$")
MODEL_FILE = re.compile(r"^mp_rank_(\d+)_model_states\.pt$")
EXPERT_FILE = re.compile(r"^(expp_rank_\d+_mp_rank_\d+_optim_states"
                         r"|layer_\d+_expert_\d+_mp_rank_\d+_model_states)\.pt$")
ANY_STATE_FILE = re.compile(r"_(model|optim)_states\.pt$")
WEIGHTS = ("master", "module")
TRAINING_FILES = {LATEST, "latest_universal", "zero_to_fp32.py", "zero_to_torch.py", "adapter_config.json",
                  "trainer_state.json", "training_args.bin", "scheduler.pt"}


@dataclass
class TagFiles:
    """The files of one DeepSpeed save (one tag directory), checked to be one complete set."""

    tag_dir: str
    stage3: bool                    # per-rank zero_pp_rank_R model files (ZeRO-3)
    model: dict[int, str]           # rank -> model states file (ZeRO-1/2: rank 0 only)
    optim: dict[int, str]           # rank -> optimizer states file


@dataclass(frozen=True)
class Run:
    """A flat run of `numel` elements stored contiguously from byte `offset` of `file`."""

    file: str
    offset: int
    numel: int
    dtype: DType


# ---------------------------------------------------------------- where the save is

def detect(source: str, opts: ReadOptions = ReadOptions()) -> bool:
    """The tag directory itself, or a `latest` beside DeepSpeed's zero_to_fp32.py (every ZeRO save
    writes it) or naming a tag directory with state files: a bare `latest` may be another tool's."""
    names = os.listdir(source)
    if any(MODEL_FILE.match(n) or ZERO3_MODEL_FILE.match(n) or OPTIM_FILE.match(n) for n in names):
        return True
    if LATEST not in names:
        return False
    if "zero_to_fp32.py" in names:
        return True
    try:
        tag_dir = tag_directory(source)
    except MergeError:
        return False
    return tag_dir != source and any(ANY_STATE_FILE.search(n) for n in os.listdir(tag_dir))


def tag_directory(source: str) -> str:
    """The tag directory: the one `latest` names, or the source itself when it holds the state files."""
    latest = os.path.join(source, LATEST)
    if not os.path.lexists(latest):
        return source
    tag = read_tracker(latest, source, f"pass the tag directory (e.g. {source}/global_step100) as --source")
    if not tag or tag in (".", "..") or "/" in tag or "\\" in tag or "\0" in tag:
        raise MergeError(f"{latest} says {tag!r}, which is not a tag directory name; pass the tag directory "
                         "itself as --source")
    tag_dir = os.path.join(source, tag)
    if not os.path.isdir(tag_dir):
        raise MergeError(f"{latest} names the tag {tag!r} but {tag_dir} does not exist; the save is incomplete, "
                         "or pass the tag directory that holds the *_model_states.pt files as --source")
    return tag_dir


def hf_directory(source: str, tag_dir: str) -> str | None:
    """Where config.json is: beside `latest` (TRL, accelerate), in the tag directory, or a huggingface/ dir."""
    for d in dict.fromkeys((tag_dir, source, os.path.dirname(os.path.abspath(tag_dir)))):
        if os.path.isfile(os.path.join(d, "config.json")):
            return d
    return find_hf_dir(source)


def scan_tag(tag_dir: str, source: str) -> TagFiles:
    """The state files of the tag, refusing what is not one ZeRO save of tensor-parallel degree 1.
    Each file is checked (inside the source, a regular file) before anything opens it."""
    names = sorted(os.listdir(tag_dir))
    if os.path.isdir(os.path.join(tag_dir, "zero")):
        raise MergeError(f"{tag_dir} is a DeepSpeed universal checkpoint (ds_to_universal.py output, zero/<param>/); "
                         "it is not supported yet: pass the original ZeRO tag directory (the one with "
                         "*_optim_states.pt files) as --source")
    experts = [n for n in names if EXPERT_FILE.match(n)]
    if experts:
        raise MergeError(f"{os.path.join(tag_dir, experts[0])} is a DeepSpeed MoE expert file; checkpoints with "
                         "expert parallelism are not supported yet")
    stage3 = any(ZERO3_MODEL_FILE.match(n) for n in names)
    model = _by_rank(tag_dir, names, ZERO3_MODEL_FILE if stage3 else MODEL_FILE)
    optim = _by_rank(tag_dir, names, OPTIM_FILE)
    for path in [*model.values(), *optim.values()]:
        check_file(path, source)
    if 0 not in model:
        want = "zero_pp_rank_0_mp_rank_00_model_states.pt" if stage3 else "mp_rank_00_model_states.pt"
        raise MergeError(f"{tag_dir} has no {want}; it is not a complete DeepSpeed ZeRO save. Pass the tag directory "
                         "(or the directory with `latest`) of a complete save")
    return TagFiles(tag_dir, stage3, model, optim)


def _by_rank(tag_dir: str, names: list[str], pattern: re.Pattern) -> dict[int, str]:
    """Data-parallel rank -> path of the files `pattern` matches (ZeRO-1/2's single model file is rank 0),
    refusing model-parallel ranks above 0 and two files of one rank."""
    found: dict[int, str] = {}
    for name in names:
        m = pattern.match(name)
        if not m:
            continue
        rank, mp = (int(m.group(1)), int(m.group(2))) if pattern.groups == 2 else (0, int(m.group(1)))
        if mp != 0:
            raise MergeError(f"{os.path.join(tag_dir, name)} is a file of model-parallel rank {mp}: a tensor-parallel "
                             "DeepSpeed checkpoint (Megatron-DeepSpeed) is not supported yet")
        if rank in found:
            raise MergeError(f"{tag_dir} holds two state files for rank {rank} ({os.path.basename(found[rank])}, "
                             f"{name}); keep the files of one save only")
        found[rank] = os.path.join(tag_dir, name)
    return found


# ---------------------------------------------------------------- flat runs as rectangles

def c_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= max(n, 1)
    return tuple(reversed(strides))


def flat_blocks(shape: tuple[int, ...], start: int, stop: int):
    """Elements [start, stop) of a C-order tensor of `shape` as rectangles: (flat index of the block's
    first element, region, block shape). At most 2 * (ndim - 1) + 1 of them: a partial first row and a
    partial last row (each cut the same way one dimension down) around a block of whole rows."""
    if start >= stop:
        return
    if len(shape) <= 1:
        yield start, tuple(start for _ in shape), tuple(stop - start for _ in shape)
        return
    row = math.prod(shape[1:])
    first_whole, end_whole = -(-start // row), stop // row
    if first_whole > end_whole:  # inside one row
        yield from _in_row(shape, start // row, start % row, stop - (start // row) * row)
        return
    if start < first_whole * row:
        yield from _in_row(shape, start // row, start % row, row)
    if first_whole < end_whole:
        yield first_whole * row, (first_whole,) + (0,) * (len(shape) - 1), (end_whole - first_whole, *shape[1:])
    if end_whole * row < stop:
        yield from _in_row(shape, end_whole, 0, stop - end_whole * row)


def _in_row(shape, r: int, start: int, stop: int):
    row = math.prod(shape[1:])
    for first, region, block in flat_blocks(shape[1:], start, stop):
        yield r * row + first, (r, *region), (1, *block)


def run_pieces(runs: list[Run], pos: int, count: int, shape: tuple[int, ...], first: int) -> list[Piece]:
    """The pieces of elements [first, first + count) of a tensor of `shape`, found at positions
    [pos, pos + count) of the concatenation of `runs`."""
    pieces, run_start, strides = [], 0, c_strides(shape)
    for run in runs:
        lo, hi = max(pos, run_start), min(pos + count, run_start + run.numel)
        if lo < hi:
            a = first + lo - pos
            base = run.offset + (lo - run_start) * run.dtype.itemsize
            for flat, region, block in flat_blocks(shape, a, a + hi - lo):
                pieces.append(Piece(file=run.file, offset=base + (flat - a) * run.dtype.itemsize, shape=block,
                                    strides=strides, region=region, dtype=run.dtype))
        run_start += run.numel
    return pieces


def flat_run(t, path: str, what: str) -> Run:
    """A stored flat (1-D, contiguous) tensor as a Run, after checking it is one and lies in its record."""
    if not isinstance(t, StoredTensor) or len(t.shape) != 1 or (t.shape[0] > 1 and t.strides[0] != 1):
        raise MergeError(f"{path}: {what} is not a flat tensor; the file is not a DeepSpeed ZeRO save or is corrupt")
    if t.offset + t.shape[0] * t.dtype.itemsize > t.storage_end:
        raise MergeError(f"{path}: {what} lies outside its stored record; the file is corrupt")
    return Run(path, t.offset, t.shape[0], t.dtype)


def whole_piece(t, path: str, name: str, shape: tuple[int, ...] | None = None) -> Piece:
    """A tensor stored whole (a buffer, a ZeRO-1/2 frozen parameter, a `module` entry)."""
    if not isinstance(t, StoredTensor) or (shape is not None and tuple(t.shape) != tuple(shape)):
        raise MergeError(f"{path}: {name} is not stored as a tensor of shape {list(shape or ())}; the file is corrupt")
    piece = Piece(file=path, offset=t.offset, shape=tuple(t.shape), strides=tuple(t.strides),
                  region=(0,) * len(t.shape), dtype=t.dtype)
    if piece.numel and t.offset + piece.span_elements * t.dtype.itemsize > t.storage_end:
        raise MergeError(f"{path}: {name} lies outside its stored record; the file is corrupt")
    return piece


# ---------------------------------------------------------------- the saved states

def _state(path: str, keys: tuple[str, ...]) -> dict:
    """A state file's top-level dict, with `keys` checked to be there."""
    top = load_inert(path)
    if not isinstance(top, dict) or any(k not in top for k in keys):
        missing = [k for k in keys if not isinstance(top, dict) or k not in top]
        raise MergeError(f"{path} has no {missing[0]!r}; it is not a DeepSpeed ZeRO state file")
    return top


def _int(value, path: str, what: str) -> int:
    """An int saved plainly or as an enum record (ZeroStageEnum(3) pickles as a call with (3,))."""
    args = getattr(value, "args", None)
    if isinstance(args, tuple) and len(args) == 1:
        value = args[0]
    if not isinstance(value, int) or isinstance(value, bool):
        raise MergeError(f"{path}: {what} is {brief(value)}, not a number; the file is not a DeepSpeed ZeRO save")
    return value


def _shapes(value, path: str, what: str) -> dict[str, tuple[int, ...]]:
    """An ordered name -> shape dict, checked."""
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(s, (tuple, list))
                                              and all(isinstance(n, int) and n >= 0 for n in s)
                                              for k, s in value.items()):
        raise MergeError(f"{path}: {what} is not a dict of parameter shapes; the file is corrupt")
    return {k: tuple(s) for k, s in value.items()}


@dataclass
class OptimState:
    """What the optimizer files say: the stage, the data-parallel size and each rank's flat fp32 groups."""

    stage: int
    world: int
    groups: list[list[Run]]          # per rank, per group
    alignment_paddings: list | None  # ZeRO-1/2: per group, per parameter (newer DeepSpeed)
    saved_paddings: list             # per rank: its `group_paddings` (ZeRO-1/2: per group), or None
    slice_mappings: list             # per rank: its `param_slice_mappings` (ZeRO-1/2, newer DeepSpeed), or None

    def group_paddings(self, g: int) -> list[int]:
        """Each rank's padding of group g left out of its partition (0 where the file does not say)."""
        pads = []
        for rank, saved in enumerate(self.saved_paddings):
            pad = saved[g] if isinstance(saved, list) and g < len(saved) else 0
            if not is_count(pad):
                raise MergeError(f"{self.groups[rank][0].file}: group_paddings[{g}] is {brief(pad)}, not a count; the "
                                 "file is corrupt")
            pads.append(pad)
        return pads


def read_optim(files: TagFiles) -> OptimState:
    if not files.optim:
        raise MergeError(f"{files.tag_dir} has no *_optim_states.pt files, which hold the fp32 weights. Copy them "
                         "too, or pass --zero-weights module to take the 16-bit weights of the model states file "
                         "(ZeRO-1/2)")
    states, stage, world = {}, None, None
    for rank, path in sorted(files.optim.items()):
        osd = _state(path, ("optimizer_state_dict",))["optimizer_state_dict"]
        if not isinstance(osd, dict) or "zero_stage" not in osd or "partition_count" not in osd:
            raise MergeError(f"{path} has no zero_stage / partition_count; it is not a ZeRO optimizer state "
                             "(a ZeRO-0 save keeps no partitions: pass --zero-weights module)")
        counts = osd["partition_count"] if isinstance(osd["partition_count"], list) else [osd["partition_count"]]
        counts = {_int(c, path, "partition_count") for c in counts}
        if len(counts) != 1:
            raise MergeError(f"{path}: param groups are partitioned over different sizes {sorted(counts)} (MoE "
                             "expert groups); DeepSpeed MoE checkpoints are not supported yet")
        this = (_int(osd["zero_stage"], path, "zero_stage"), counts.pop())
        if (stage, world) != (None, None) and this != (stage, world):
            raise MergeError(f"{path} says ZeRO-{this[0]} over {this[1]} ranks, {files.optim[0]} says ZeRO-{stage} "
                             f"over {world}; the files come from different saves")
        (stage, world), states[rank] = this, osd
    return _check_ranks(files, stage, world, states)


def _check_ranks(files: TagFiles, stage: int, world: int, states: dict[int, dict]) -> OptimState:
    if stage not in (1, 2, 3):
        raise MergeError(f"{files.optim[0]} says ZeRO stage {stage}; only stages 1, 2 and 3 are read")
    missing = [r for r in range(min(world, len(files.optim) + 1)) if r not in files.optim]
    extra = sorted(r for r in files.optim if r >= world)
    if missing or extra:  # world > the files means one is missing: the first missing is among the first len + 1
        what = f"rank {missing[0]}'s optimizer file is missing" if missing else f"{files.optim[extra[0]]} is extra"
        raise MergeError(f"{files.tag_dir}: partition_count is {world} but {len(files.optim)} *_optim_states.pt "
                         f"files are present ({what}); the save is incomplete or mixed with another")
    if (stage == 3) != files.stage3:
        raise MergeError(f"{files.tag_dir}: the optimizer files say ZeRO-{stage} but the model states files are "
                         f"those of ZeRO-{3 if files.stage3 else '1/2'}; the files come from different saves")
    key = "fp32_flat_groups" if stage == 3 else "single_partition_of_fp32_groups"
    groups = []
    for rank in range(world):
        path, saved = files.optim[rank], states[rank].get(key)
        if not isinstance(saved, (list, tuple)) or not saved:
            raise MergeError(f"{path} has no {key}; it is not a ZeRO-{stage} optimizer state")
        groups.append([flat_run(t, path, f"{key}[{i}]") for i, t in enumerate(saved)])
    return OptimState(stage, world, groups, states[0].get("param_alignment_paddings"),
                      [states[rank].get("group_paddings") for rank in range(world)],
                      [states[rank].get("param_slice_mappings") for rank in range(world)])


# ---------------------------------------------------------------- parameters as pieces

def zero12_params(opt: OptimState, param_shapes: list[dict], model_path: str) -> dict[str, SourceTensor]:
    """ZeRO-1/2: each group's parameters, one after another in the rank-ordered concatenation of its
    partitions (the padding to a multiple of 2 x world size is not saved)."""
    if any(len(groups) != len(param_shapes) for groups in opt.groups):
        raise MergeError(f"{model_path} lists {len(param_shapes)} param groups but the optimizer files hold "
                         f"{len(opt.groups[0])}; the files come from different saves")
    tensors = {}
    for g, shapes in enumerate(param_shapes):
        runs = [opt.groups[rank][g] for rank in range(opt.world)]
        check_split(opt, g, runs)
        avail, offset, placed = sum(r.numel for r in runs), 0, {}
        paddings = _group_paddings(opt, g, len(shapes))
        for (name, shape), pad in zip(shapes.items(), paddings):
            numel = math.prod(shape)
            if offset + numel > avail:
                raise MergeError(f"{model_path}: param group {g} needs more than the {avail} elements its partitions "
                                 f"hold (at {name}); the optimizer files are truncated or from another save")
            tensors[name] = SourceTensor(name, shape, runs[0].dtype, run_pieces(runs, offset, numel, shape, 0))
            placed[name] = (offset, numel)
            offset += numel + pad
        align = 2 * opt.world
        if -(-offset // align) != -(-avail // align):
            raise MergeError(f"{model_path}: param group {g} holds {offset} elements but its partitions hold {avail}; "
                             "param_shapes and the optimizer files come from different saves")
        check_slices(opt, g, placed, runs[0].numel)
    return tensors


def check_split(opt: OptimState, g: int, runs: list[Run]) -> None:
    """ZeRO-1/2 cut a group's padded flat form into equal partitions and save the last without its
    padding (`group_paddings`): every rank but the last holds as many elements as rank 0, the last
    at most that, and each rank's count plus its padding is the same. A count that sums right but
    splits otherwise would shift every parameter after the boundary."""
    sizes = [r.numel for r in runs]
    padded = [s + p for s, p in zip(sizes, opt.group_paddings(g))]
    if any(s != sizes[0] for s in sizes[:-1]) or sizes[-1] > sizes[0] or any(p != padded[0] for p in padded):
        raise MergeError(f"{runs[0].file}: the fp32 partitions of param group {g} hold {sizes} elements per rank; "
                         "ZeRO-1/2 partitions are equal but for the last rank's padding. The optimizer files are "
                         "corrupt or come from different saves")


def check_slices(opt: OptimState, g: int, placed: dict[str, tuple[int, int]], part: int) -> None:
    """Newer DeepSpeed saves where each parameter's slice lies in each rank's partition
    (`param_slice_mappings`). Where a rank has them, they must be where param_shapes put the
    parameters: a shape that lies by less than the group's padding is caught here."""
    for rank, mappings in enumerate(opt.slice_mappings):
        if not isinstance(mappings, list) or g >= len(mappings) or not isinstance(mappings[g], dict):
            continue
        saved = {name: _fragment(a) for name, a in mappings[g].items()}
        saved = {name: at for name, at in saved.items() if at is None or at[1]}
        expected = {}
        for name, (offset, numel) in placed.items():
            lo, hi = max(offset, rank * part), min(offset + numel, (rank + 1) * part)
            if lo < hi:
                expected[name] = (lo - rank * part, hi - lo)
        if saved != expected:
            name = next(n for n in list(expected) + list(saved) if saved.get(n) != expected.get(n))
            raise MergeError(f"{opt.groups[rank][g].file}: param_slice_mappings puts {brief(name)} at (start, numel) "
                             f"{saved.get(name)} of rank {rank}'s partition, param_shapes at {expected.get(name)}; "
                             "the files are corrupt or come from different saves")


def _fragment(address) -> tuple[int, int] | None:
    """A `fragment_address(numel, start)` as (start, numel); None unless both are counts."""
    state, args = getattr(address, "state", None), tuple(getattr(address, "args", ()))
    numel, start = (state.get("numel"), state.get("start")) if isinstance(state, dict) else (args + (None, None))[:2]
    return (start, numel) if is_count(numel) and is_count(start) else None


def _group_paddings(opt: OptimState, g: int, count: int) -> list[int]:
    if opt.alignment_paddings is None:
        return [0] * count
    try:
        paddings = [int(p) for p in opt.alignment_paddings[g]]
    except (TypeError, ValueError, IndexError):
        paddings = None
    if paddings is None or len(paddings) != count or min(paddings, default=0) < 0:
        raise MergeError(f"{opt.groups[0][0].file}: param_alignment_paddings of group {g} do not match its "
                         f"{count} parameters; the file is corrupt")
    return paddings


def zero3_params(opt: OptimState, shapes: dict[str, tuple[int, ...]]) -> dict[str, SourceTensor]:
    """ZeRO-3: every parameter in order, ceil(numel / W) elements on each rank (rank r holds elements
    [r * part, (r + 1) * part) of its flat form; the last rank's pad is never read)."""
    sizes = [[r.numel for r in groups] for groups in opt.groups]
    for rank, s in enumerate(sizes):
        if s != sizes[0]:
            raise MergeError(f"{opt.groups[rank][0].file} holds fp32 groups of {s} elements, rank 0's hold {sizes[0]}; "
                             "the optimizer files come from different saves")
    tensors, offset = {}, 0
    for name, shape in shapes.items():
        numel = math.prod(shape)
        part, pieces = -(-numel // opt.world), []
        for rank in range(opt.world):
            first = rank * part
            pieces += run_pieces(opt.groups[rank], offset, max(0, min(part, numel - first)), shape, first)
        tensors[name] = SourceTensor(name, shape, opt.groups[0][0].dtype, pieces)
        offset += part
    if offset != sum(sizes[0]):
        raise MergeError(f"{opt.groups[0][0].file}: param_shapes need {offset} elements per rank but each rank's fp32 "
                         f"groups hold {sum(sizes[0])}; the files come from different saves")
    return tensors


def frozen_params(files: TagFiles, model0: dict, world: int) -> dict[str, SourceTensor]:
    """Parameters the optimizer does not own (a LoRA base): ZeRO-1/2 saves each whole in rank 0's file,
    ZeRO-3 a flat fragment of ceil(numel / W) 16-bit elements in each rank's model file."""
    shapes = _shapes(model0.get("frozen_param_shapes"), files.model[0], "frozen_param_shapes")
    if not shapes:
        return {}
    states = {0: model0}
    for rank in range(world if files.stage3 else 1):
        if rank not in files.model:
            raise MergeError(f"{files.tag_dir}: zero_pp_rank_{rank}_mp_rank_00_model_states.pt is missing; it holds "
                             "rank {rank}'s part of the frozen parameters. Copy the complete save")
        if rank not in states:
            states[rank] = _state(files.model[rank], ("frozen_param_fragments",))
        if not isinstance(states[rank].get("frozen_param_fragments"), dict):
            raise MergeError(f"{files.model[rank]} has no frozen_param_fragments; the file is corrupt")
    tensors = {}
    for name, shape in shapes.items():
        frags = [states[r]["frozen_param_fragments"].get(name) for r in sorted(states)]
        if not files.stage3:
            piece = whole_piece(frags[0], files.model[0], name, shape)
            tensors[name] = SourceTensor(name, shape, piece.dtype, [piece] if piece.numel else [])
            continue
        numel = math.prod(shape)
        part, pieces = -(-numel // world), []
        for rank, frag in enumerate(frags):
            run = flat_run(frag, files.model[rank], f"frozen_param_fragments[{name!r}]")
            if run.numel != part:
                raise MergeError(f"{files.model[rank]}: the fragment of {name} holds {run.numel} elements, not "
                                 f"ceil({numel} / {world}) = {part}; the file is corrupt or from another save")
            pieces += run_pieces([run], 0, max(0, min(part, numel - rank * part)), shape, rank * part)
        tensors[name] = SourceTensor(name, shape, run.dtype if frags else FLOAT32, pieces)
    return tensors


# ---------------------------------------------------------------- the catalogue

def module_tensors(model0: dict, path: str, names=None) -> dict[str, SourceTensor]:
    """Entries of rank 0's `module` state dict stored whole: its buffers, or (--zero-weights module,
    ZeRO-1/2) every tensor in the training dtype."""
    module = model0.get("module")
    if not isinstance(module, dict):
        raise MergeError(f"{path} has no `module` state dict; it is not a DeepSpeed model states file")
    tensors = {}
    for name in module if names is None else names:
        t = module.get(name)
        if not isinstance(t, StoredTensor):
            if names is None and isinstance(name, str) and name.endswith("_extra_state"):
                continue  # a module's extra state (Transformer Engine): nothing to write
            raise MergeError(f"{path}: {brief(name)} in `module` is not a tensor; the file is corrupt")
        piece = whole_piece(t, path, name)
        tensors[name] = SourceTensor(name, piece.shape, piece.dtype, [piece] if piece.numel else [])
    return tensors


def module_weights(model0: dict, path: str) -> dict[str, SourceTensor]:
    """--zero-weights module (ZeRO-1/2): every tensor of rank 0's `module`. Each parameter that
    param_shapes and frozen_param_shapes list must be among them, with its listed shape."""
    tensors = module_tensors(model0, path)
    groups = model0.get("param_shapes")
    listed = {}
    for i, group in enumerate(groups if isinstance(groups, list) else []):
        listed.update(_shapes(group, path, f"param_shapes[{i}]"))
    listed.update(_shapes(model0.get("frozen_param_shapes"), path, "frozen_param_shapes"))
    for name, shape in listed.items():
        found = tensors[name].shape if name in tensors else None
        if found != shape:
            raise MergeError(f"{path}: param_shapes lists {name} as {list(shape)} but `module` holds "
                             f"{'no such tensor' if found is None else list(found)}; the file is corrupt")
    return tensors


def master_tensors(files: TagFiles, model0: dict) -> tuple[dict[str, SourceTensor], OptimState]:
    """The fp32 master weights of the optimizer files, the frozen parameters and rank 0's buffers."""
    opt = read_optim(files)
    path = files.model[0]
    groups = model0.get("param_shapes")
    if not isinstance(groups, list):
        raise MergeError(f"{path} has no param_shapes list; it was not saved with a ZeRO optimizer")
    param_shapes = [_shapes(g, path, f"param_shapes[{i}]") for i, g in enumerate(groups)]
    if opt.stage == 3:
        trained = zero3_params(opt, {k: v for shapes in param_shapes for k, v in shapes.items()})
    else:
        trained = zero12_params(opt, param_shapes, path)
    buffer_names = model0.get("buffer_names") or []
    if not isinstance(buffer_names, list) or not all(isinstance(n, str) for n in buffer_names):
        raise MergeError(f"{path}: buffer_names is not a list of names; the file is corrupt")
    tensors = {}
    for part in (trained, frozen_params(files, model0, opt.world), module_tensors(model0, path, buffer_names)):
        twice = sorted(set(part) & set(tensors))
        if twice:
            raise MergeError(f"{path}: {twice[0]} is listed twice (trained, frozen or buffer); the file is corrupt")
        tensors.update(part)
    return tensors, opt


def add_shared(tensors: dict[str, SourceTensor], model0: dict, path: str) -> None:
    """`shared_params` {'lm_head.weight': 'model.embed_tokens.weight'}: the stored tensor under both
    names, as DeepSpeed's reconstruction gives it (the HF mapping writes one when the config ties)."""
    shared = model0.get("shared_params") or {}
    if not isinstance(shared, dict):
        raise MergeError(f"{path}: shared_params is not a dict; the file is corrupt")
    for alias, target in shared.items():
        if isinstance(alias, str) and isinstance(target, str) and target in tensors and alias not in tensors:
            t = tensors[target]
            tensors[alias] = SourceTensor(alias, t.shape, t.dtype, list(t.pieces))


def read_catalogue(source: str, opts: ReadOptions = ReadOptions()) -> Catalogue:
    if opts.zero_weights not in WEIGHTS:
        raise MergeError(f"--zero-weights {opts.zero_weights} is not one of {', '.join(WEIGHTS)}")
    tag_dir = tag_directory(source)
    files = scan_tag(tag_dir, source)
    model0 = _state(files.model[0], ("module",))
    if opts.zero_weights == "module":
        if files.stage3:
            raise MergeError(f"--zero-weights module: {tag_dir} is a ZeRO-3 save, whose model states hold only "
                             "placeholders; drop --zero-weights module (the fp32 weights are read from the "
                             "optimizer files)")
        ds_config = model0.get("ds_config") if isinstance(model0.get("ds_config"), dict) else {}
        zero = ds_config.get("zero_optimization")
        stage = zero.get("stage", "1/2") if isinstance(zero, dict) else "1/2"
        world = model0.get("dp_world_size") if isinstance(model0.get("dp_world_size"), int) else len(files.optim) or 1
        tensors = module_weights(model0, files.model[0])
        used, weights = [files.model[0]], "16-bit module weights"
        skipped = "the fp32 master weights of the optimizer files (the default, --zero-weights master)"
    else:
        tensors, opt = master_tensors(files, model0)
        add_shared(tensors, model0, files.model[0])
        stage, world = opt.stage, opt.world
        used = sorted(set(files.optim.values()) | set(files.model.values()))
        weights = "fp32 master weights"
        skipped = "the optimizer's exp_avg / exp_avg_sq, and the 16-bit module copy (--zero-weights module)"
    if not tensors:
        raise MergeError(f"{tag_dir} holds no parameters; it is not a model checkpoint")
    hf_dir = hf_directory(source, tag_dir)
    mesh = f"ZeRO-{stage} dp={world}, tag {os.path.basename(os.path.abspath(tag_dir))}, {weights}"
    return Catalogue(format=NAME, source=source, files=used, tensors=tensors, hf_dir=hf_dir, world_size=world,
                     notes=[skipped], mesh=mesh, hf_skip=training_files(hf_dir))


def training_files(hf_dir: str | None) -> tuple[str, ...]:
    """Names in the HF directory that are the training job's, not the model's: the tag directories,
    `latest`, DeepSpeed's scripts, the trainer's state, and peft's adapter_config.json (a full model
    beside it would be loaded as an adapter; --lora adapter writes its own in lora_adapter/)."""
    if not hf_dir:
        return ()
    names = []
    for name in sorted(os.listdir(hf_dir)):
        path = os.path.join(hf_dir, name)
        if name in TRAINING_FILES or (os.path.isdir(path) and not os.path.islink(path)
                                      and any(ANY_STATE_FILE.search(n) for n in os.listdir(path))):
            names.append(name)
    return tuple(names)


FORMAT = SourceFormat(name=NAME, family="hf", detect=detect, read_catalogue=read_catalogue,
                      describe="`latest` + a tag directory of *_model_states.pt / *_optim_states.pt (DeepSpeed ZeRO)")

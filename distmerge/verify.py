"""`distmerge verify`: check a merged directory on its own, against a reference HF directory, or
check a sharded source against a reference without writing anything.

Everything reads tensors a band of rows at a time, so memory stays bounded; only `--logits`
loads whole models (two of them, with transformers, on CPU).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field

import torch

from . import values
from .errors import MergeError, MergeVerifyError
from .finish import INCOMPLETE
from .integrity import MANIFEST, hash_range
from .model import dtype_size
from .st_header import DTYPES, MAX_HEADER_BYTES, count, entry_problem, read_header, read_json_object

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
COMPARE_BYTES = 16 * 2**20   # rows compared at a time
WORST_SHOWN = 10


@dataclass
class Report:
    subject: str
    checks: list[list[str]] = field(default_factory=list)    # [check, "ok" | "skipped: why" | "FAILED"]
    problems: list[str] = field(default_factory=list)
    compared: list[dict] = field(default_factory=list)       # per tensor: name, equal, max_abs, max_rel
    logits: dict | None = None

    @property
    def ok(self) -> bool:
        return not self.problems

    def check(self, name: str, problems: list[str], skipped: str | None = None) -> None:
        self.problems.extend(problems)
        self.checks.append([name, f"skipped: {skipped}" if skipped else ("FAILED" if problems else "ok")])

    def render(self) -> str:
        lines = [f"verify {self.subject}"]
        lines += [f"  {status:<8} {name}" if status in ("ok", "FAILED") else f"  {'-':<8} {name} ({status})"
                  for name, status in self.checks]
        equal = sum(c["equal"] for c in self.compared)
        if self.compared and equal == len(self.compared):
            lines.append(f"  tensors compared: {len(self.compared)}, bit-identical: {equal} (all)")
        elif self.compared:
            worst = sorted(self.compared, key=lambda c: (c["equal"], -c["max_abs"]))[:WORST_SHOWN]
            lines.append(f"  tensors compared: {len(self.compared)}, bit-identical: {equal}; worst:")
            lines.append(f"    {'tensor':<48} {'identical':>9} {'max abs diff':>13} {'max rel diff':>13}")
            lines += [f"    {c['name']:<48} {str(c['equal']):>9} {c['max_abs']:>13.3e} {c['max_rel']:>13.3e}"
                      for c in worst]
        if self.logits:
            lines.append(f"  logits: max abs diff {self.logits['max_abs']:.3e} over {self.logits['tokens']} tokens")
        lines += [f"  problem: {p}" for p in self.problems[:50]]
        if len(self.problems) > 50:
            lines.append(f"  ... and {len(self.problems) - 50} more problems")
        lines.append("  result: " + ("OK" if self.ok else f"FAILED ({len(self.problems)} problem(s))"))
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok}


# ---- reading safetensors headers: st_header.py


def header_problems(path: str, header: dict, data_start: int) -> list[str]:
    """Every tensor has a known dtype, a byte length that matches its shape, and lies inside the
    file without overlapping another; the data fills the file exactly."""
    problems, spans = [], []
    data_len = os.path.getsize(path) - data_start
    for name, info in header.items():
        problem = entry_problem(info)
        if problem:
            problems.append(f"{path}: tensor {name[:200]} {problem}")
            continue
        dtype, shape, (begin, end) = DTYPES[info["dtype"]], info["shape"], info["data_offsets"]
        if end - begin != math.prod(shape) * dtype_size(dtype):
            problems.append(f"{path}: tensor {name} {info['dtype']}{shape} needs {math.prod(shape) * dtype_size(dtype)}"
                            f" bytes but spans {end - begin}")
        if not 0 <= begin <= end <= data_len:
            problems.append(f"{path}: tensor {name} lies at bytes {begin}..{end}, outside the data ({data_len} bytes)")
        spans.append((begin, end, name))
    spans.sort()
    for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            problems.append(f"{path}: tensors {n0} and {n1} overlap")
    if spans and max(e for _, e, _ in spans) != data_len:
        problems.append(f"{path}: data is {data_len} bytes but the tensors end at {max(e for _, e, _ in spans)}")
    return problems


def plain_name(name) -> bool:
    """A file name inside the directory: no separators, no '..' (an index must not lead verify outside)."""
    return isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name \
        and "\0" not in name


def relative_name(name) -> bool:
    """A path inside the directory, subdirectories allowed (lora_adapter/adapter_model.safetensors):
    each part a plain name, so no absolute path and no '..'."""
    return isinstance(name, str) and all(plain_name(part) for part in name.split("/"))


def read_index(index_path: str) -> dict:
    """model.safetensors.index.json with its types checked: weight_map an object of tensor -> file
    name inside the directory, metadata an object whose total_size (if any) is a count."""
    try:
        with open(index_path, "rb") as f:
            index = read_json_object(f, MAX_HEADER_BYTES)
    except OSError as e:
        raise MergeVerifyError(f"{index_path} cannot be read ({e.strerror})") from None
    except ValueError as e:
        raise MergeVerifyError(f"{index_path}: {e}; it is not a valid index") from None
    weight_map, metadata = index.get("weight_map"), index.get("metadata", {})
    problem = None
    if not isinstance(weight_map, dict):
        problem = f"weight_map is {json.dumps(weight_map)[:60]}, not an object"
    elif not all(plain_name(f) for f in weight_map.values()):
        bad = next(f for f in weight_map.values() if not plain_name(f))
        problem = f"weight_map names {json.dumps(bad)[:80]}, not a file name in the directory"
    elif not isinstance(metadata, dict) or not (metadata.get("total_size") is None or count(metadata["total_size"])):
        problem = f"metadata is {json.dumps(metadata)[:80]}, not an object with a byte count total_size"
    if problem:
        raise MergeVerifyError(f"{index_path}: {problem}; it is not a valid index")
    return index


def weight_files(directory: str) -> tuple[list[str], dict | None]:
    """The weight files of an HF directory and its index (None for a single model.safetensors)."""
    index_path = os.path.join(directory, INDEX)
    if os.path.exists(index_path):
        index = read_index(index_path)
        return sorted(set(index["weight_map"].values())), index
    if os.path.exists(os.path.join(directory, SINGLE)):
        return [SINGLE], None
    raise MergeError(f"{directory} has neither {INDEX} nor {SINGLE}; it is not a safetensors HF checkpoint")


# ---- the self-check
def check_merged(target: str, allow_incomplete: bool = False, trust_remote_code: bool = False) -> Report:
    if not os.path.isdir(target):
        raise MergeError(f"{target} is not a directory; pass the merged output directory")
    report = Report(target)
    if not allow_incomplete:
        marked = os.path.exists(os.path.join(target, INCOMPLETE))
        report.check("not marked incomplete", [f"{target} holds {INCOMPLETE}: a merge did not finish writing it; "
                                               "rerun the merge with --resume"] if marked else [])
    files, index = weight_files(target)

    missing = [f for f in files if not os.path.isfile(os.path.join(target, f))]
    report.check("every file in the index exists", [f"{os.path.join(target, f)} is listed in the index but missing"
                                                     for f in missing])
    headers, problems = {}, []
    for name in files:
        if name in missing:
            continue
        path = os.path.join(target, name)
        try:
            header, data_start = read_header(path)
        except ValueError as e:
            problems.append(str(e))
            continue
        headers[name] = header
        problems += header_problems(path, header, data_start)
    report.check("every header parses and every tensor lies inside its file", problems)

    problems, seen = [], {}
    for name, header in headers.items():
        for tensor in header:
            if tensor in seen:
                problems.append(f"tensor {tensor} is stored twice: in {seen[tensor]} and {name}")
            seen[tensor] = name
    if index is not None:
        weight_map = index["weight_map"]
        problems += [f"the index maps {t} to {f}, but it is stored in {seen.get(t, 'no file')}"
                     for t, f in weight_map.items() if seen.get(t) != f and f not in missing]
        problems += [f"tensor {t} (in {f}) is not in the index" for t, f in seen.items() if t not in weight_map]
        total = sum(info["data_offsets"][1] - info["data_offsets"][0] for h in headers.values() for info in h.values()
                    if entry_problem(info) is None)
        stated = index.get("metadata", {}).get("total_size")
        if stated is not None and stated != total:
            problems.append(f"the index says total_size {stated}, the tensors hold {total} bytes")
    report.check("every tensor listed once; index and total_size agree", problems)

    manifest_path = os.path.join(target, MANIFEST)
    if os.path.exists(manifest_path):
        report.check(f"content hashes match {MANIFEST}", manifest_problems(target, manifest_path))
    else:
        report.check("content hashes", [], skipped=f"no {MANIFEST} (not written by distmerge)")

    stored = {t: headers[f][t] for t, f in seen.items() if entry_problem(headers[f][t]) is None}
    check_with_transformers(target, stored, report, trust_remote_code)
    return report


def manifest_problems(target: str, manifest_path: str) -> list[str]:
    try:
        with open(manifest_path, "rb") as f:
            files = json.load(f)["files"]
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as e:
        return [f"{manifest_path} cannot be read ({type(e).__name__})"]
    if not isinstance(files, dict):
        return [f"{manifest_path}: files is not an object"]
    problems = []
    for name, record in files.items():
        path = os.path.join(target, name)
        segments = record.get("segments", []) if isinstance(record, dict) else None
        if not relative_name(name) or not isinstance(segments, list) or not all(_segment(s) for s in segments):
            problems.append(f"{manifest_path}: the record of {name[:80]!r} is malformed")
        elif not os.path.isfile(path):
            problems.append(f"{path} is in the manifest but missing")
        elif os.path.getsize(path) != record.get("bytes"):
            problems.append(f"{path} has {os.path.getsize(path)} bytes, the manifest says {record.get('bytes')}")
        else:
            for start, end, digest in segments:
                if hash_range(path, start, end) != digest:
                    problems.append(f"{path}: content hash of bytes {start}..{end} differs from the manifest's; "
                                    "the file was changed or damaged")
    return problems


def _segment(seg) -> bool:
    return (isinstance(seg, list) and len(seg) == 3 and count(seg[0]) and count(seg[1]) and seg[0] <= seg[1]
            and isinstance(seg[2], str))


def check_with_transformers(target: str, stored: dict[str, dict], report: Report,
                            trust_remote_code: bool = False) -> None:
    """Config, tokenizer and generation config load; the architecture built on the meta device
    has exactly the stored tensors (tied copies may be absent) with the same shapes."""
    try:
        import transformers
    except ImportError:
        for name in ("config, tokenizer and generation config load", "tensors match the architecture"):
            report.check(name, [], skipped="transformers is not installed (pip install 'distmerge[verify]')")
        return
    problems = []
    try:
        config = transformers.AutoConfig.from_pretrained(target, trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds; report them all the same way
        report.check("config, tokenizer and generation config load", [f"config.json does not load: {e}"])
        return
    if any(n.startswith("tokenizer") or n in ("vocab.json", "tokenizer.model") for n in os.listdir(target)):
        try:
            transformers.AutoTokenizer.from_pretrained(target, trust_remote_code=trust_remote_code)
        except Exception as e:  # noqa: BLE001
            problems.append(f"the tokenizer does not load: {e}")
    if os.path.exists(os.path.join(target, "generation_config.json")):
        try:
            transformers.GenerationConfig.from_pretrained(target)
        except Exception as e:  # noqa: BLE001
            problems.append(f"generation_config.json does not load: {e}")
    report.check("config, tokenizer and generation config load", problems)

    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if isinstance(arch, str) and arch.isidentifier() else None
    if cls is None:
        report.check("tensors match the architecture", [],
                     skipped=f"architecture {arch!r} is not in the installed transformers")
        return
    try:
        with torch.device("meta"):
            model = cls(config)
    except Exception as e:  # noqa: BLE001 - a config transformers accepts but cannot build (negative sizes, bad types)
        report.check("tensors match the architecture", [f"config.json does not build a {arch}: "
                                                        f"{type(e).__name__}: {str(e)[:200]}"])
        return
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    aliases: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(param), []).append(name)
    tied = {n: names for names in aliases.values() if len(names) > 1 for n in names}
    rename = checkpoint_key_renamer(model, expected)
    problems, loaded = [], set()
    for name, info in stored.items():
        key, converted = rename(name)
        if key not in expected:
            problems.append(f"tensor {name} is not part of {arch}")
            continue
        loaded.add(key)
        if not converted and tuple(info["shape"]) != expected[key]:
            problems.append(f"tensor {name} has shape {info['shape']}, {arch} expects {list(expected[key])}")
    problems += [f"tensor {key} of {arch} is missing" for key in expected
                 if key not in loaded and not any(alias in loaded for alias in tied.get(key, ()))]
    report.check(f"tensors match the architecture ({arch}, tied weights allowed)", problems)


def checkpoint_key_renamer(model, expected: dict):
    """Checkpoint key -> (model key, whether a converter fuses it): transformers 5 loads some
    Hub layouts through renamings and converters (per-expert MoE weights fused into one tensor),
    so the stored names are compared through the same rules from_pretrained applies."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, rename_source_key
    except ImportError:  # transformers 4: stored names are model names
        return lambda key: (key, False)
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    prefix = getattr(model, "base_model_prefix", None)

    def rename(key):
        new, pattern = rename_source_key(key, renamings, converters, prefix, expected)
        return new, pattern is not None
    return rename


# ---- comparing tensors
class TensorCompare:
    """Accumulates the difference between matching row blocks of two tensors."""

    def __init__(self, name: str, atol: float | None, rtol: float | None):
        self.name, self.atol, self.rtol = name, atol, rtol
        self.equal, self.within, self.max_abs, self.max_rel = True, True, 0.0, 0.0

    def add(self, ours: torch.Tensor, ref: torch.Tensor) -> None:
        if not torch.equal(ours.reshape(-1).view(torch.uint8), ref.reshape(-1).view(torch.uint8)):
            self.equal = False
            a, b = ours.double(), ref.double()
            diff = (a - b).abs()
            diff = torch.where(torch.isnan(a) & torch.isnan(b), 0.0, diff)
            diff = torch.where(torch.isnan(diff), float("inf"), diff)  # a NaN on one side only is the worst
            if diff.numel():
                self.max_abs = max(self.max_abs, diff.max().item())
                self.max_rel = max(self.max_rel, (diff / b.abs().clamp_min(1e-12)).max().item())
            if self.atol is not None or self.rtol is not None:
                bound = (self.atol or 0.0) + (self.rtol or 0.0) * b.abs()
                self.within = self.within and bool((diff <= bound).all())

    @property
    def ok(self) -> bool:
        tolerant = self.atol is not None or self.rtol is not None
        return self.equal or (tolerant and self.within)

    def result(self) -> dict:
        return {"name": self.name, "equal": self.equal, "max_abs": self.max_abs, "max_rel": self.max_rel,
                "ok": self.ok}


def _rows_per_block(shape, dtype) -> int:
    row = math.prod(shape[1:]) * dtype_size(dtype) if shape else 1
    return max(1, COMPARE_BYTES // max(row, 1))


class HFDirectory:
    """The tensors of an HF safetensors directory: where each one is, read through one open handle
    per file (safetensors' own reader; slices read only the rows asked for)."""

    def __init__(self, directory: str):
        self.directory = directory
        self.locations = tensor_locations(directory)
        self.handles = {}

    def _handle(self, name: str):
        from safetensors import safe_open

        file = self.locations[name]
        if file not in self.handles:
            self.handles[file] = safe_open(os.path.join(self.directory, file), framework="pt")
        return self.handles[file]

    def slice(self, name: str):
        return self._read(name, lambda h: h.get_slice(name))

    def tensor(self, name: str) -> torch.Tensor:
        return self._read(name, lambda h: h.get_tensor(name))

    def _read(self, name: str, get):
        """safetensors' own reader on a file this module may not have checked: what it refuses
        (SafetensorError, OSError) becomes a verify failure naming the file."""
        from safetensors import SafetensorError

        try:
            return get(self._handle(name))
        except (SafetensorError, OSError, ValueError) as e:
            path = os.path.join(self.directory, self.locations[name])
            raise MergeVerifyError(f"{path}: tensor {name} cannot be read ({str(e)[:200]})") from None


def compare_with_reference(target: str, reference: str, atol: float | None, rtol: float | None,
                           report: Report | None = None) -> Report:
    """Every tensor of a merged directory against the reference's, bitwise or within atol/rtol."""
    report = report or Report(f"{target} against {reference}")
    ours, ref = HFDirectory(target), HFDirectory(reference)
    problems = [f"tensor {n} is in the reference but not in {target}" for n in ref.locations if n not in ours.locations]
    problems += [f"tensor {n} is in {target} but not in the reference" for n in ours.locations
                 if n not in ref.locations]
    for name in ours.locations:
        if name in ref.locations:
            try:
                problems += _compare_tensor(name, ours, ref, atol, rtol, report)
            except MergeVerifyError as e:
                problems.append(str(e))
    report.check("every tensor equals the reference's" if atol is None and rtol is None
                 else f"every tensor within atol={atol} rtol={rtol} of the reference's", problems)
    return report


def _compare_tensor(name: str, ours: HFDirectory, ref: HFDirectory, atol, rtol, report: Report) -> list[str]:
    """One tensor of both directories, a block of rows at a time; its problems (none when it matches)."""
    from safetensors import SafetensorError

    a, b = ours.slice(name), ref.slice(name)
    if a.get_shape() != b.get_shape() or a.get_dtype() != b.get_dtype():
        return [f"tensor {name}: {a.get_dtype()}{a.get_shape()} here, {b.get_dtype()}{b.get_shape()} in the reference"]
    cmp = TensorCompare(name, atol, rtol)
    shape = a.get_shape()
    try:
        if not shape:
            cmp.add(ours.tensor(name), ref.tensor(name))
        else:
            step = _rows_per_block(shape, DTYPES[a.get_dtype()])
            for first in range(0, shape[0], step):
                cmp.add(a[first:first + step], b[first:first + step])
    except (SafetensorError, OSError, ValueError) as e:
        return [f"tensor {name} cannot be read ({str(e)[:200]})"]
    report.compared.append(cmp.result())
    return [] if cmp.ok else [f"tensor {name} differs (max abs diff {cmp.max_abs:.3e})"]


def tensor_locations(directory: str) -> dict[str, str]:
    files, index = weight_files(directory)
    if index is not None:
        return dict(index["weight_map"])
    try:
        header, _ = read_header(os.path.join(directory, files[0]))
    except ValueError as e:
        raise MergeVerifyError(str(e)) from None
    return {name: files[0] for name in header}


def compare_source_with_reference(source: str, reference: str, atol: float | None, rtol: float | None,
                                  hf_config: str | None = None, iteration: int | None = None,
                                  vocab_size: int | None = None) -> Report:
    """Like verl's `test` operation: the sharded checkpoint's tensors, as distmerge would write
    them, against a reference HF directory; nothing is written."""
    from .bands import bands
    from .reader import BandProducer, PieceReader
    from .prepare import PrepareOptions, prepare

    # LoRA: folded, as merge does
    prepared = prepare(source, PrepareOptions(hf_config=hf_config, iteration=iteration, fallback_hf_dir=reference,
                                              vocab_size=vocab_size))
    catalogue, outputs = prepared.catalogue, prepared.outputs
    ref = HFDirectory(reference)
    report = Report(f"{source} against {reference} (no output written)")
    problems = [f"tensor {n} is in the reference but the source has nothing that maps to it"
                for n in ref.locations if n not in {o.name for o in outputs}]
    reader, casts = PieceReader(), set()
    producer = BandProducer(catalogue, reader)  # the merge's own band producer: the same values
    try:
        for out in outputs:
            if out.name not in ref.locations:
                problems.append(f"tensor {out.name} (from the source) is not in the reference")
                continue
            ref_slice = ref.slice(out.name)
            if tuple(ref_slice.get_shape()) != tuple(out.shape):
                problems.append(f"tensor {out.name}: shape {list(out.shape)} from the source, "
                                f"{ref_slice.get_shape()} in the reference")
                continue
            ref_dtype = DTYPES[ref_slice.get_dtype()]
            if out.dtype != ref_dtype:
                casts.add(f"{out.dtype} -> {ref_dtype}")
            cmp = TensorCompare(out.name, atol, rtol)
            if not out.parts:
                cmp.add(torch.zeros(out.shape, dtype=ref_dtype.torch), ref.tensor(out.name))
            for band in bands(out, catalogue):
                # as `merge --dtype` would write it (no copy when equal)
                block = producer.produce(out, band)
                block = values.to_torch(block.values, block.dtype).to(ref_dtype.torch)
                cmp.add(block, ref_slice[band.first:band.stop] if out.shape else ref.tensor(out.name))
            report.compared.append(cmp.result())
            if not cmp.ok:
                problems.append(f"tensor {out.name} differs (max abs diff {cmp.max_abs:.3e})")
    finally:
        reader.close()
    name = "every source tensor equals the reference's"
    if casts:
        name += f" (cast as --dtype would: {', '.join(sorted(casts))})"
    report.check(name, problems)
    return report


def compare_logits(target: str, reference: str, atol: float | None, rtol: float | None, report: Report) -> None:
    """Load both with transformers (CPU, stored dtype) and compare logits on a fixed prompt."""
    try:
        import transformers
    except ImportError:
        report.check("logits equal the reference's", [],
                     skipped="transformers is not installed (pip install 'distmerge[verify]')")
        return
    transformers.utils.logging.disable_progress_bar()
    ids = None
    try:
        tok = transformers.AutoTokenizer.from_pretrained(reference)
        ids = tok("The quick brown fox jumps over the lazy dog.", return_tensors="pt")["input_ids"]
    except Exception:  # noqa: BLE001 - no usable tokenizer: fall back to fixed ids
        pass
    logits = []
    for directory in (target, reference):
        try:
            config = transformers.AutoConfig.from_pretrained(directory)
            cls = getattr(transformers, (config.architectures or ["AutoModelForCausalLM"])[0], None)
            cls = cls or transformers.AutoModelForCausalLM
            model = cls.from_pretrained(directory, dtype="auto").eval()
        except Exception as e:  # noqa: BLE001 - any load failure is the same verdict
            report.check("logits equal the reference's", [f"{directory} does not load with transformers: {e}"])
            return
        if ids is None:
            ids = (torch.arange(16) * 7919 % config.vocab_size).unsqueeze(0)
        with torch.no_grad():
            logits.append(model(input_ids=ids).logits.float())
        del model
    cmp = TensorCompare("logits", atol, rtol)
    cmp.add(logits[0], logits[1])
    report.logits = {"max_abs": cmp.max_abs, "tokens": int(ids.numel()), "equal": cmp.equal}
    report.check("logits equal the reference's" if atol is None and rtol is None
                 else f"logits within atol={atol} rtol={rtol}", [] if cmp.ok else
                 [f"logits differ from the reference's: max abs diff {cmp.max_abs:.3e}"])

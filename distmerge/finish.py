"""Stage 5, finish: the target directory appears complete only at the very end.

All ranks write into a staging directory beside the target that holds a `.distmerge-incomplete`
marker. After the last barrier, rank 0 writes the index, config (with the dtype written),
generation config and tokenizer files, removes the marker and renames staging -> target.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import time

from .errors import MergeError, MergeIOError, MergeLockedError
from .integrity import DONE, HASH, JOB, done_record, hash_range, read_json, write_json
from .model import Plan, dtype_str

log = logging.getLogger("distmerge")

INCOMPLETE = ".distmerge-incomplete"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".distcp")
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def _beside(target: str, suffix: str) -> str:
    """A hidden path next to the target: .TARGET.distmerge-<suffix>."""
    target = os.path.abspath(target)
    return os.path.join(os.path.dirname(target), f".{os.path.basename(target)}.distmerge-{suffix}")


def staging_dir(target: str) -> str:
    return _beside(target, "staging")


def check_target(target: str, source: str, overwrite: bool) -> None:
    """Refuse targets that would damage the source or an existing directory, before anything is written."""
    t, s = os.path.realpath(target), os.path.realpath(source)
    if t == s or t.startswith(s + os.sep):
        raise MergeError(f"target {target} is the source or inside it; choose a --target outside {source}")
    if s.startswith(t + os.sep):
        raise MergeError(f"target {target} contains the source {source}; choose another --target")
    if os.path.exists(target):
        if not os.path.isdir(target):
            raise MergeError(f"target {target} exists and is not a directory; choose another --target")
        if os.listdir(target) and not overwrite:
            raise MergeError(f"target {target} is not empty; pass --overwrite to replace it, "
                             "or choose another --target")
    parent = os.path.dirname(os.path.abspath(target))
    while not os.path.exists(parent):  # missing parents are created; the first existing one must be writable
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        raise MergeIOError(f"cannot write in {parent} (no write permission); choose a --target you may write to")


def lock_path(target: str) -> str:
    return _beside(target, "lock")


def acquire_lock(target: str) -> str:
    """Rank 0: one merge per target. The lock file (pid, host, start time) is created atomically;
    a lock whose pid is dead on this host is stale and reported with the command that clears it."""
    path = lock_path(target)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        try:
            with open(path) as f:
                holder = json.load(f)
        except (OSError, ValueError):
            holder = {}
        pid, host = holder.get("pid"), holder.get("host")
        if host == socket.gethostname() and isinstance(pid, int) and not _alive(pid):
            raise MergeLockedError(f"{path} is a stale lock: its merge (pid {pid} on {host}) is gone. "
                                   f"Clear it with: rm {path}") from None
        raise MergeLockedError(f"another merge (pid {pid} on {host}, since {holder.get('started', '?')}) is writing "
                               f"{target}; wait for it to finish, or if it is dead: rm {path}") from None
    except OSError as e:
        raise MergeIOError(f"cannot create {path}: {e.strerror}; choose a --target you may write to") from None
    with os.fdopen(fd, "w") as f:
        json.dump({"pid": os.getpid(), "host": socket.gethostname(),
                   "started": time.strftime("%Y-%m-%d %H:%M:%S")}, f)
    return path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def release_lock(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def prepare_staging(target: str, job: dict, resume: bool) -> list[str]:
    """Rank 0: the staging directory with the incomplete marker and the job record. A crashed
    run's directory is continued with --resume (if it is the same merge) or replaced."""
    staging, warnings = staging_dir(target), []
    if os.path.exists(staging):
        earlier = read_json(os.path.join(staging, JOB))
        if resume:
            same = earlier is not None and all(earlier.get(k) == job[k] for k in ("source_files", "output_headers"))
            if not same:
                raise MergeError(f"cannot --resume: the incomplete merge in {staging} was made from another source "
                                 "or with other options (--dtype, --max-shard-size, --hf-config mapping); "
                                 "rerun the same command as the crashed run, or rerun without --resume to start over")
            return warnings
        warnings.append(f"replaced the incomplete merge in {staging} (pass --resume to continue one instead)")
    elif resume:
        warnings.append(f"--resume: no incomplete merge in {staging}; starting from the beginning")
    for w in warnings:
        log.warning("%s", w)
    try:
        if os.path.exists(staging):
            shutil.rmtree(staging)
        os.makedirs(staging)
        with open(os.path.join(staging, INCOMPLETE), "w") as f:
            f.write("distmerge has not finished writing this directory; it is not a usable checkpoint\n")
        write_json(os.path.join(staging, JOB), job)
    except OSError as e:
        raise MergeIOError(f"cannot create staging directory {staging}: {e.strerror}; "
                           "choose a --target on a writable filesystem") from None
    return warnings


def verified_done_files(plan: Plan, staging: str, rank: int) -> dict[str, str]:
    """--resume: which of this rank's planned segments a crashed run finished, each checked again:
    its done record, its byte range, the header bytes (segment 0) and a fresh content hash."""
    kept = {}
    for f, seg in plan.segments_of(rank):
        unit = plan.segment_name(f, seg)
        record = done_record(staging, unit)
        path = os.path.join(staging, f.name)
        if record is None or (record.get("start"), record.get("end")) != (seg.start, seg.end) \
                or not os.path.isfile(path) or os.path.getsize(path) < seg.end:
            continue
        if seg.index == 0:
            with open(path, "rb") as fh:
                if fh.read(len(f.header)) != f.header:
                    continue
        if hash_range(path, seg.start, seg.end) == record.get(HASH):
            kept[unit] = record[HASH]
    return kept


def check_sizes(plan: Plan, staging: str) -> None:
    """Rank 0, after every segment is closed: each file is exactly the planned size."""
    for f in plan.files:
        path = os.path.join(staging, f.name)
        size = os.path.getsize(path) if os.path.exists(path) else None
        if size != f.size:
            raise MergeIOError(f"{path} has {size} bytes, the plan says {f.size}; a write was lost. "
                               "Rerun with --resume")


def remove_run_records(staging: str) -> None:
    """The records only a running or resumed merge needs; the manifest keeps the hashes."""
    shutil.rmtree(os.path.join(staging, ".progress"), ignore_errors=True)
    shutil.rmtree(os.path.join(staging, DONE), ignore_errors=True)
    os.remove(os.path.join(staging, JOB))


def write_index(plan: Plan, staging: str) -> None:
    files = plan.model_files
    if len(files) == 1:
        return  # a single model.safetensors needs no index, as in transformers
    weight_map = {e.tensor.name: f.name for f in files for e in f.entries}
    index = {"metadata": {"total_size": sum(f.data_bytes for f in files)}, "weight_map": weight_map}
    write_json(os.path.join(staging, "model.safetensors.index.json"), index, sort_keys=False)  # HF order


def copy_hf_files(hf_dir: str | None, staging: str, config: dict, plan: Plan) -> list[str]:
    """Copy every non-weight file of the HF directory; config.json gets the dtype actually written."""
    copied = []
    if hf_dir:
        for name in sorted(os.listdir(hf_dir)):
            path = os.path.join(hf_dir, name)
            if name == "config.json" or name.endswith(WEIGHT_SUFFIXES) or name in WEIGHT_INDEXES:
                continue
            if os.path.isdir(path):
                shutil.copytree(path, os.path.join(staging, name))
            else:
                shutil.copy2(path, os.path.join(staging, name))
            copied.append(name)
    config = dict(config)
    if plan.config_dtype is not None:
        key = "dtype" if "dtype" in config else "torch_dtype"
        config[key] = dtype_str(plan.config_dtype)
    write_json(os.path.join(staging, "config.json"), config)
    return copied + ["config.json"]


def write_adapter_config(staging: str, adapter_dir: str, config: dict) -> None:
    os.makedirs(os.path.join(staging, adapter_dir), exist_ok=True)
    write_json(os.path.join(staging, adapter_dir, "adapter_config.json"), config)


def fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(staging: str, target: str, overwrite: bool) -> None:
    """Remove the marker and move staging into place; an old target is replaced only now. The
    small files written last and both directories are fsynced, so after a power loss the target
    is either absent or has its index and config (the weights' own fsync is --fsync)."""
    for name in os.listdir(staging):
        if name.endswith((".json", ".jinja", ".txt", ".model")) and os.path.isfile(os.path.join(staging, name)):
            fsync_path(os.path.join(staging, name))
    os.remove(os.path.join(staging, INCOMPLETE))
    fsync_path(staging)
    old = None
    if os.path.exists(target) and os.listdir(target):
        if not overwrite:
            raise MergeError(f"target {target} became non-empty during the merge; the result is in {staging}")
        old = staging + ".old"
        os.rename(target, old)
    elif os.path.exists(target):
        os.rmdir(target)
    os.rename(staging, target)
    fsync_path(os.path.dirname(os.path.abspath(target)))
    if old:
        shutil.rmtree(old)

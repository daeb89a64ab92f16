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
import stat
import time
from dataclasses import dataclass

from .errors import MergeError, MergeIOError, MergeLockedError
from .integrity import DONE, HASH, JOB, MANIFEST, done_record, hash_range, read_json, write_json
from .model import Plan, dtype_str
from .paths import inside

log = logging.getLogger("distmerge")

INCOMPLETE = ".distmerge-incomplete"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".distcp")
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def _beside(target: str, suffix: str) -> str:
    """A hidden path next to the target: .TARGET.distmerge-<suffix>, beside the directory a
    symlinked target resolves to (where the output is renamed into place)."""
    target = os.path.realpath(target)
    return os.path.join(os.path.dirname(target), f".{os.path.basename(target)}.distmerge-{suffix}")


def staging_dir(target: str) -> str:
    return _beside(target, "staging")


def check_target(target: str, source: str, overwrite: bool) -> None:
    """Refuse targets that would damage the source or an existing directory, before anything is written."""
    if os.path.islink(target) and not os.path.exists(target):
        raise MergeError(f"target {target} is a link to {os.readlink(target)}, which does not exist or loops; "
                         "remove the link or point it at a directory")
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
    """Rank 0: one merge per target. The lock file (pid, host, start time) is created atomically. A
    lock whose merge is gone (its pid dead on this host, or reused by another process) is taken
    over with a warning, so rerunning a crashed merge just works; a lock from another host cannot
    be checked from here and is refused with the command that clears it."""
    path = lock_path(target)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        for _ in range(3):
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                break
            except FileExistsError:
                _take_over_stale(path, target)
        else:
            raise MergeLockedError(f"{path} keeps reappearing: another merge is starting on {target}; "
                                   f"wait for it, or if none runs: rm {path}")
    except OSError as e:
        raise MergeIOError(f"cannot create {path}: {e.strerror}; choose a --target you may write to") from None
    with os.fdopen(fd, "w") as f:
        json.dump({"pid": os.getpid(), "host": socket.gethostname(), "pid_start": _process_start(os.getpid()),
                   "started": time.strftime("%Y-%m-%d %H:%M:%S")}, f)
    return path


def _read_lock(path: str) -> dict | None:
    try:
        with open(path) as f:
            holder = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, RecursionError, UnicodeDecodeError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _take_over_stale(path: str, target: str) -> None:
    """Remove the lock at `path` if its merge is gone; raise MergeLockedError if it may still run.
    The stale lock is renamed away first: of two reruns racing for it, only one succeeds."""
    holder = _read_lock(path)
    if holder is None:
        return  # released meanwhile: try again
    pid, host = holder.get("pid"), holder.get("host")
    if not (host == socket.gethostname() and isinstance(pid, int) and pid > 0 and _gone(pid, holder.get("pid_start"))):
        raise MergeLockedError(f"another merge (pid {pid} on {host}, since {holder.get('started', '?')}) is writing "
                               f"{target}; wait for it to finish, or if it is dead: rm {path}")
    aside = f"{path}.stale-{os.getpid()}"
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return  # another rerun took it first: try again
    if _read_lock(aside) != holder:  # a live lock was created between our read and the rename: put it back
        try:
            os.link(aside, path)
        finally:
            os.remove(aside)
        raise MergeLockedError(f"another merge started on {target} just now; wait for it to finish")
    os.remove(aside)
    log.warning("took over the stale lock %s: its merge (pid %s on %s, since %s) is gone", path, pid, host,
                holder.get("started", "?"))


def _process_start(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux /proc), which tells a live merge
    from an unrelated process that reuses its pid; None where /proc does not say."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _gone(pid: int, started) -> bool:
    """Whether the merge that wrote a lock is dead: its pid is free, or now names a younger process."""
    if not _alive(pid):
        return True
    now = _process_start(pid)
    return isinstance(started, int) and now is not None and now != started


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
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


MAX_HF_FILE_BYTES = 1 << 30   # tokenizers and custom code are MBs; a larger non-weight file is not one of them
MAX_HF_FILES = 10_000
MAX_HF_DEPTH = 8


@dataclass(frozen=True)
class HFFile:
    """A non-weight file to copy: its name relative to the HF directory, and its size when checked."""

    name: str
    path: str
    size: int


def _link_root(hf_dir: str) -> str:
    """Where the links of an HF directory may lead: inside it, or for a Hugging Face cache snapshot
    (REPO/snapshots/REV, whose files link to ../../blobs/HASH) inside its REPO directory."""
    parent = os.path.dirname(os.path.abspath(hf_dir))
    if os.path.basename(parent) == "snapshots" and os.path.isdir(os.path.join(os.path.dirname(parent), "blobs")):
        return os.path.realpath(os.path.dirname(parent))
    return os.path.realpath(hf_dir)


def _hf_entry(path: str, name: str, root: str, explicit: bool) -> os.stat_result:
    """The stat of one entry of the HF directory, refused unless it is a regular file or directory that
    resolves inside `root`; a directory the user named (`explicit`) may link anywhere (an HF cache
    snapshot links into ../../blobs)."""
    fix = ("replace it with the file itself, or pass --hf-config DIR naming a directory whose links you trust")
    if os.path.islink(path) and not explicit and not inside(path, root):
        raise MergeError(f"{path} is a link to {os.path.realpath(path)}, outside {root}; a checkpoint's files must "
                         f"be its own. {fix}")
    try:
        st = os.stat(path)
    except OSError as e:
        raise MergeError(f"{path} cannot be followed ({e.strerror}: a dangling link or a link loop); {fix}") from None
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
        raise MergeError(f"{path} is not a regular file (a FIFO, socket or device); remove it from the HF directory")
    if stat.S_ISREG(st.st_mode) and st.st_size > MAX_HF_FILE_BYTES:
        raise MergeError(f"{path} is {st.st_size} bytes, more than the {MAX_HF_FILE_BYTES >> 20} MiB a config, "
                         f"tokenizer or code file ever needs; move it out of the HF directory ({name} is not copied "
                         "as a weight either)")
    return st


def hf_files(hf_dir: str | None, explicit: bool = False, skip: tuple[str, ...] = ()) -> list[HFFile]:
    """The non-weight files of the HF directory that the target gets (checked, nothing opened):
    regular files only, each resolving inside the directory it comes from unless the user named
    that directory (`explicit`), none larger than MAX_HF_FILE_BYTES. Weights, indexes, config.json
    (written from the checked config) and `skip` (a format's training files) are left out."""
    if not hf_dir:
        return []
    if not explicit and os.path.islink(os.path.normpath(hf_dir)):
        raise MergeError(f"{hf_dir} is a link to {os.path.realpath(hf_dir)}; the checkpoint's HF files must be its "
                         f"own. To use that directory, name it: --hf-config {os.path.realpath(hf_dir)}")
    root, out, seen = _link_root(hf_dir), [], set()
    config = os.path.join(hf_dir, "config.json")
    if os.path.lexists(config):
        _hf_entry(config, "config.json", root, explicit)  # its JSON is read elsewhere: it must be the checkpoint's

    def walk(directory: str, rel: str, depth: int) -> None:
        if depth > MAX_HF_DEPTH or os.path.realpath(directory) in seen:
            raise MergeError(f"{directory} nests directories more than {MAX_HF_DEPTH} deep or in a loop; "
                             "it is not an HF model directory")
        seen.add(os.path.realpath(directory))
        for name in sorted(os.listdir(directory)):
            name_rel = os.path.join(rel, name) if rel else name
            if (not rel and (name in ("config.json", *WEIGHT_INDEXES, *skip))) or name.endswith(WEIGHT_SUFFIXES) \
                    or name.startswith(".distmerge") or name == MANIFEST:
                continue
            path = os.path.join(directory, name)
            st = _hf_entry(path, name_rel, root, explicit)
            if stat.S_ISDIR(st.st_mode):
                walk(path, name_rel, depth + 1)
            else:
                out.append(HFFile(name_rel, path, st.st_size))
            if len(out) > MAX_HF_FILES:
                raise MergeError(f"{hf_dir} holds more than {MAX_HF_FILES} files; it is not an HF model directory")

    try:
        walk(hf_dir, "", 0)
    except OSError as e:
        raise MergeError(f"{hf_dir} cannot be listed ({e.strerror}); pass --hf-config DIR") from None
    return out


def _copy_one(f: HFFile, dest: str) -> None:
    """Copy a checked regular file, opened without blocking (a FIFO swapped in after the check is
    refused, not waited on) and read no further than its checked size allows."""
    fd = os.open(f.path, os.O_RDONLY | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as src:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise MergeError(f"{f.path} changed into a special file during the merge; remove it and rerun")
        os.set_blocking(fd, True)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        with open(dest, "wb") as out:
            left = MAX_HF_FILE_BYTES + 1
            while left > 0:
                chunk = src.read(min(left, 1 << 20))
                if not chunk:
                    break
                out.write(chunk)
                left -= len(chunk)
        if left <= 0:
            raise MergeError(f"{f.path} grew past {MAX_HF_FILE_BYTES >> 20} MiB while it was copied; "
                             "move it out of the HF directory")


def copy_hf_files(hf_dir: str | None, staging: str, config: dict, plan: Plan, explicit: bool = False,
                  skip: tuple[str, ...] = ()) -> list[str]:
    """Copy the non-weight files of the HF directory (see hf_files); config.json gets the dtype
    actually written."""
    files = hf_files(hf_dir, explicit, skip)
    try:
        for f in files:
            _copy_one(f, os.path.join(staging, f.name))
    except OSError as e:
        raise MergeIOError(f"cannot copy {e.filename or hf_dir} into {staging}: {e.strerror}") from None
    config = dict(config)
    if plan.config_dtype is not None:
        key = "dtype" if "dtype" in config else "torch_dtype"
        config[key] = dtype_str(plan.config_dtype)
    write_json(os.path.join(staging, "config.json"), config)
    return [f.name for f in files] + ["config.json"]


def write_adapter_config(staging: str, adapter_dir: str, config: dict) -> None:
    os.makedirs(os.path.join(staging, adapter_dir), exist_ok=True)
    write_json(os.path.join(staging, adapter_dir, "adapter_config.json"), config)


def fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(staging: str, target: str, overwrite: bool) -> bool:
    """Move staging into place (a symlinked target: where it resolves); an old target is replaced
    only now. The marker stays in staging until the rename has succeeded, so a failure at any
    point leaves a directory that says it is incomplete, never one that looks finished. The small
    files and both directories are fsynced, so after a power loss the target is either absent or
    has its index and config (the weights' own fsync is --fsync). True when an earlier, non-empty
    target was replaced (--overwrite)."""
    target = os.path.realpath(target)
    try:
        for name in os.listdir(staging):
            if name.endswith((".json", ".jinja", ".txt", ".model")) and os.path.isfile(os.path.join(staging, name)):
                fsync_path(os.path.join(staging, name))
        fsync_path(staging)
        old = _move_old_target(staging, target, overwrite)
        try:
            os.rename(staging, target)
        except OSError:
            if old:
                os.rename(old, target)
            raise
        os.remove(os.path.join(target, INCOMPLETE))
        fsync_path(target)
        fsync_path(os.path.dirname(target))
    except OSError as e:
        raise MergeIOError(f"cannot move the finished output {staging} to {target}: {e.strerror}; the output "
                           "stays there, marked incomplete; rerun with --resume") from None
    if old:
        shutil.rmtree(old, ignore_errors=True)
    return old is not None


def _move_old_target(staging: str, target: str, overwrite: bool) -> str | None:
    """Make room for the rename: an empty target is removed, a non-empty one (with --overwrite)
    moved aside, and its new name returned, to be removed once the new output is in place."""
    if not os.path.lexists(target):
        return None
    if not os.path.isdir(target) or os.path.islink(target):
        raise MergeError(f"target {target} became something other than a directory during the merge; "
                         f"the result is in {staging}")
    if not os.listdir(target):
        os.rmdir(target)
        return None
    if not overwrite:
        raise MergeError(f"target {target} became non-empty during the merge; the result is in {staging}")
    old = staging + ".old"
    if os.path.lexists(old):
        shutil.rmtree(old)
    os.rename(target, old)
    return old

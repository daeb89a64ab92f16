"""Where a checkpoint may lead: every file it names must resolve inside it and be a regular file.

No distmerge imports beyond errors, so every reader can check a file before it opens it.
"""
from __future__ import annotations

import os
import stat
from dataclasses import dataclass

from .errors import MergeError


@dataclass(frozen=True)
class SourceFile:
    """A data file as checked: its size, once (a piece's span is checked against it)."""

    path: str
    size: int


def inside(path: str, root: str) -> bool:
    """Whether `path`, with every symlink resolved, lies inside `root` (also resolved)."""
    real, real_root = os.path.realpath(path), os.path.realpath(root)
    return real == real_root or real.startswith(real_root.rstrip(os.sep) + os.sep)


def check_dir(path: str, root: str) -> str:
    """A directory a format found in the source (a trainer's model folder, a step or iteration
    directory) must resolve inside it: checked before anything in it is opened."""
    if not inside(path, root):
        raise MergeError(f"{path} resolves to {os.path.realpath(path)}, outside the source {root}; a checkpoint "
                         "may only hold its own directories. Pass the real directory as --source, or copy it in")
    return path


def check_file(path: str, root: str) -> SourceFile:
    """A data file must resolve inside the source directory and be a regular file."""
    if not inside(path, root):
        raise MergeError(f"{path} resolves to {os.path.realpath(path)}, outside the source {root}; a checkpoint "
                         "may only name its own files. Copy the real files into the checkpoint directory")
    try:
        st = os.stat(path)
    except OSError as e:
        raise MergeError(f"{path} is named by the checkpoint's metadata but cannot be read ({e.strerror}); "
                         "copy the complete checkpoint") from None
    if not stat.S_ISREG(st.st_mode):
        raise MergeError(f"{path} is not a regular file; a checkpoint's data files must be plain files")
    return SourceFile(path, st.st_size)


TRACKER_LIMIT = 128  # bytes: a tracker names a tag or an iteration, never more


def read_tracker(path: str, root: str, fix: str) -> str:
    """The text of a tracker file (DeepSpeed's `latest`, Megatron-LM's
    latest_checkpointed_iteration.txt): checked inside the source and regular first, then one short
    line of printable ASCII. Anything else is refused without echoing its bytes, which may be
    another file's. `fix` ends each message: what to pass instead."""
    check_file(path, root)
    try:
        with open(path, "rb") as f:
            raw = f.read(TRACKER_LIMIT + 1)
    except OSError as e:
        raise MergeError(f"{path} cannot be read ({e.strerror}); {fix}") from None
    text = raw.strip()
    if len(raw) > TRACKER_LIMIT or not text.isascii() or not text.decode("ascii").isprintable():
        raise MergeError(f"{path} is not one short line of text, as a tracker file is; {fix}")
    return text.decode("ascii")

"""Errors a user can act on: one message naming the file or tensor and the fix."""


class MergeError(Exception):
    """Bad input or a refused operation. The CLI prints the message (no traceback) and exits 2."""

    exit_code = 2
    all_ranks = True  # raised identically by every rank (metadata stages), so rank 0 alone reports it


class MergeIOError(MergeError):
    """Reading or writing failed (disk full, permission, truncated file)."""

    exit_code = 4


def truncated_source(path: str, at: int, needed: int) -> MergeIOError:
    return MergeIOError(f"{path} ended at byte {at} but a tensor piece needs bytes up to {needed}; "
                        "the file is truncated, copy it again")


class MergeLockedError(MergeError):
    """Another merge holds the target (or left a stale lock)."""

    exit_code = 5


class MergeVerifyError(MergeError):
    """A verification found a difference or a damaged file."""

    exit_code = 3


class MergeAbortedError(MergeIOError):
    """The run was interrupted: another rank died, or this one got SIGTERM/SIGINT. The staging
    directory stays, marked incomplete, for `--resume`."""


_SCALARS = (str, int, float, bool, type(None))


def one_line(text: str, limit: int = 200) -> str:
    """A message part on one line of at most `limit` characters (a parser's or a pickle's own
    messages span several, and may quote the file)."""
    return " ".join(text.split())[:limit]


def brief(value, limit: int = 80) -> str:
    """An untrusted value (read from a checkpoint) for a message, on one short line: the repr of a
    scalar or of a flat list or tuple of at most 64 scalars; any other value by its type. A nested
    container is never printed: a pickle can share its members so that printing it takes 2^depth
    steps, and an integer past 4300 digits cannot be printed at all."""
    flat = type(value) in (list, tuple) and len(value) <= 64 and all(type(v) in _SCALARS for v in value)
    if type(value) in _SCALARS or flat:
        try:
            return one_line(repr(value), limit)
        except ValueError:
            return "an integer too large to print"
    size = f" of {len(value)}" if type(value) in (list, tuple, dict) else ""
    return f"a {type(value).__name__}{size}"

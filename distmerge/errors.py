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

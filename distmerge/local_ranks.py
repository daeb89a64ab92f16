"""`merge --local-ranks N`: N ranks on this machine without torchrun.

torchrun starts a launcher and N fresh interpreters, and each imports torch: about 2 s more than
one process on a small machine, more than the whole merge of a few GB. Here the process that has
already imported torch forks its N ranks, which set the same environment torchrun would (RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) and run the ordinary code path. Nothing is started
before the fork (no threads, no process group), which is what makes fork safe here.

The parent does what torchrun does when a rank fails: it stops the others with SIGTERM (each
unwinds, releases the lock and leaves its partial output marked incomplete) and exits with the
first failing rank's code. A SIGTERM or SIGINT to the parent is passed on to every rank.
"""
from __future__ import annotations

import os
import signal
import socket
import sys
import traceback
from typing import Callable

from .errors import MergeAbortedError, MergeError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_local_ranks(n: int, run_rank: Callable[[], int]) -> int:
    """Fork n ranks that each call run_rank(); the first non-zero exit code, else 0."""
    if "RANK" in os.environ:
        raise MergeError("--local-ranks starts its own ranks; inside torchrun, srun or another launcher "
                         "leave it out (the launcher's ranks are used)")
    if n < 1:
        raise MergeError(f"--local-ranks must be at least 1, not {n}")
    port = os.environ.get("MASTER_PORT") or str(free_port())
    if n > 1:  # the ranks form a process group: torch is imported once here, not in each forked rank
        import torch.distributed  # noqa: F401
    sys.stdout.flush()
    sys.stderr.flush()
    ranks: dict[int, int] = {}  # pid -> rank
    for rank in range(n):
        pid = os.fork()
        if pid == 0:
            _run_child(rank, n, port, run_rank)
        ranks[pid] = rank
    return _wait_for(ranks)


def _run_child(rank: int, n: int, port: str, run_rank: Callable[[], int]) -> None:
    """In a forked rank: the launcher's environment, run_rank(), then exit without teardown."""
    code = 1
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the parent, which sends SIGTERM
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(n), LOCAL_RANK=str(rank),
                          LOCAL_WORLD_SIZE=str(n), MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        code = run_rank()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)  # no interpreter teardown: the parent owns it


def _wait_for(ranks: dict[int, int]) -> int:
    """Wait for every rank; the first failure stops the others. SIGTERM/SIGINT to the parent are
    passed on to each rank once."""
    stopping = False

    def stop_all(signum=signal.SIGTERM, frame=None):
        nonlocal stopping
        if stopping:  # one SIGTERM per rank: a second would interrupt the cleanup the first started
            return
        stopping = True
        for pid in ranks:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    previous = {s: signal.signal(s, stop_all) for s in (signal.SIGTERM, signal.SIGINT)}
    first_failure = 0
    try:
        while ranks:
            try:
                pid, status = os.wait()
            except ChildProcessError:
                break
            ranks.pop(pid, None)
            code = os.waitstatus_to_exitcode(status)
            if code != 0 and first_failure == 0:
                # a rank killed by a signal reads as an abort, as under torchrun
                first_failure = code if code > 0 else MergeAbortedError.exit_code
                stop_all()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return first_failure

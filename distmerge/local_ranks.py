"""`merge --local-ranks N`: N ranks on this machine without torchrun.

torchrun starts a launcher and N fresh interpreters, and each imports torch: about 2 s more than
one process on a small machine, more than the whole merge of a few GB. Here one process forks
its N ranks, which set the same environment torchrun would (RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) and run the ordinary code path. Nothing is started
before the fork (no threads, no process group), which is what makes fork safe here.

With `links` (the direct transport, which passes only objects between ranks) the ranks need no
torch process group: each is joined to rank 0 by a socket pair made before the fork
(group.LocalGroup), and nobody imports torch unless the merge computes. Otherwise the parent
imports torch.distributed once, before the fork, and the ranks form a gloo or NCCL group.

The parent does what torchrun does when a rank fails: it stops the others with SIGTERM (each
unwinds, releases the lock and leaves its partial output marked incomplete) and exits with the
first failing rank's code. A SIGTERM or SIGINT to the parent is passed on to every rank.
"""
from __future__ import annotations

import os
import signal
import socket
import sys
import time
import traceback
from typing import Callable

from .errors import MergeAbortedError, MergeError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_links: dict[int, socket.socket] | None = None  # in a forked rank: its sockets (see links())


def links() -> dict[int, socket.socket] | None:
    """In a rank forked with links: rank 0's sockets to ranks 1..N-1, or another rank's one socket
    to rank 0 (keyed by the peer's rank); None anywhere else."""
    return _links


def wants_links(transport: str, backend: str) -> bool:
    """Whether forked ranks can do without a torch process group: the direct transport passes
    only objects between ranks; an explicit --backend asks for torch's."""
    return transport == "direct" and backend in ("auto", "fsdp", "megatron")


def run_local_ranks(n: int, run_rank: Callable[[], int], with_links: bool = False) -> int:
    """Fork n ranks that each call run_rank(); the first non-zero exit code, else 0. With
    `with_links` the ranks talk through socket pairs (links()), else through a torch group."""
    if "RANK" in os.environ:
        raise MergeError("--local-ranks starts its own ranks; inside torchrun, srun or another launcher "
                         "leave it out (the launcher's ranks are used)")
    if n < 1:
        raise MergeError(f"--local-ranks must be at least 1, not {n}")
    port = os.environ.get("MASTER_PORT") or str(free_port())
    if n > 1 and not with_links:  # a torch group: torch is imported once here, not in each forked rank
        import torch.distributed  # noqa: F401
    pairs = {peer: socket.socketpair() for peer in range(1, n)} if with_links else {}
    sys.stdout.flush()
    sys.stderr.flush()
    ranks: dict[int, int] = {}  # pid -> rank
    for rank in range(n):
        pid = os.fork()
        if pid == 0:
            _keep_links(rank, pairs, with_links)
            _run_child(rank, n, port, run_rank)
        ranks[pid] = rank
    for a, b in pairs.values():  # the ranks hold them now: a rank that exits closes its ends for good
        a.close()
        b.close()
    return _wait_for(ranks)


def _keep_links(rank: int, pairs: dict[int, tuple[socket.socket, socket.socket]], with_links: bool) -> None:
    """In a forked rank: keep its own ends of the socket pairs, close every other end it inherited."""
    global _links
    if not with_links:
        return
    mine = {peer: pair[0] for peer, pair in pairs.items()} if rank == 0 else {0: pairs[rank][1]}
    for pair in pairs.values():
        for s in pair:
            if all(s is not kept for kept in mine.values()):
                s.close()
    _links = mine


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
                _let_others_end(ranks)  # a refusal all ranks share: rank 0 is still printing it
                stop_all()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return first_failure


def _let_others_end(ranks: dict[int, int], seconds: float = 2.0) -> None:
    """Wait up to `seconds` for the other ranks to exit by themselves (reaping them), before the
    SIGTERM that would cut short rank 0's message of a refusal every rank received."""
    deadline = time.monotonic() + seconds
    while ranks and time.monotonic() < deadline:
        pid, _ = os.waitpid(-1, os.WNOHANG)
        if pid == 0:
            time.sleep(0.02)
        else:
            ranks.pop(pid, None)

"""Progress across all ranks without extra collectives: each rank keeps its byte count in a tiny
file in the staging directory; a thread on rank 0 sums them.

On a terminal that sum drives one tqdm bar. When stderr is a file or a pipe (SLURM's output file, a
pipeline's log), tqdm's carriage-return updates would pile up on one line, so rank 0 logs a plain
line now and then instead: bytes, rate and ETA, at each further 10% but at most one line every
few seconds, and a line at least every minute while the merge is slow."""
from __future__ import annotations

import logging
import os
import struct
import sys
import threading
import time
from dataclasses import dataclass

from tqdm import tqdm

log = logging.getLogger("distmerge")
POLL_S = 0.5


@dataclass
class LogLines:
    """Decides when a plain progress line is due and writes its text."""

    total: int
    min_interval_s: float = 5.0   # never more often than this
    step: float = 0.10            # a line at each further 10% ...
    heartbeat_s: float = 60.0     # ... or after this long without one
    started: float = 0.0
    last_time: float = 0.0
    last_fraction: float = 0.0

    def start(self, now: float) -> None:
        self.started = self.last_time = now

    def due(self, done: int, now: float) -> str | None:
        """The line to print for `done` bytes at time `now`, or None when none is due yet."""
        fraction = done / self.total if self.total else 1.0
        since = now - self.last_time
        if since < self.min_interval_s or done >= self.total:
            return None
        if fraction - self.last_fraction < self.step and since < self.heartbeat_s:
            return None
        self.last_time, self.last_fraction = now, fraction
        return self.text(done, now)

    def text(self, done: int, now: float) -> str:
        elapsed = max(now - self.started, 1e-9)
        rate = done / elapsed
        eta = f"{(self.total - done) / rate:.0f} s" if rate > 0 else "unknown"
        return (f"progress: {done / 1e9:.3f} of {self.total / 1e9:.3f} GB ({100 * done / max(self.total, 1):.0f}%), "
                f"{rate / 1e9:.2f} GB/s, ETA {eta}")


class Progress:
    def __init__(self, staging: str, rank: int, world_size: int, total: int, enabled: bool):
        self.dir = os.path.join(staging, ".progress")
        os.makedirs(self.dir, exist_ok=True)
        self.world_size, self.count = world_size, 0
        self.fd = os.open(os.path.join(self.dir, f"rank-{rank}"), os.O_RDWR | os.O_CREAT, 0o644)
        self.bar = self.lines = self.thread = None
        self.stop = threading.Event()
        if rank == 0 and enabled:
            if sys.stderr.isatty():
                self.bar = tqdm(total=total, unit="B", unit_scale=True, desc="merge", file=sys.stderr,
                                dynamic_ncols=True, mininterval=POLL_S)
            else:
                self.lines = LogLines(total)
                self.lines.start(time.monotonic())
            self.thread = threading.Thread(target=self._poll, daemon=True)
            self.thread.start()

    def __call__(self, nbytes: int) -> None:
        self.count += nbytes
        os.pwrite(self.fd, struct.pack("<Q", self.count), 0)

    def _total(self) -> int:
        total = 0
        for r in range(self.world_size):
            try:
                with open(os.path.join(self.dir, f"rank-{r}"), "rb") as f:
                    data = f.read(8)
                total += struct.unpack("<Q", data)[0] if len(data) == 8 else 0
            except OSError:
                pass
        return total

    def _poll(self) -> None:
        while not self.stop.wait(POLL_S):
            done = self._total()
            if self.bar is not None:
                self.bar.n = done
                self.bar.refresh()
            else:
                line = self.lines.due(done, time.monotonic())
                if line:
                    log.info("%s", line)

    def close(self, final_total: int | None = None) -> None:
        self.stop.set()
        os.close(self.fd)
        if self.thread is not None:
            self.thread.join()
        if self.bar is not None:
            self.bar.n = final_total if final_total is not None else self._total()
            self.bar.close()

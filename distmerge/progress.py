"""Progress across all ranks without extra collectives: each rank keeps its byte count in a tiny
file in the staging directory; a thread on rank 0 sums them into one tqdm bar."""
from __future__ import annotations

import os
import struct
import sys
import threading

from tqdm import tqdm


class Progress:
    def __init__(self, staging: str, rank: int, world_size: int, total: int, enabled: bool):
        self.dir = os.path.join(staging, ".progress")
        os.makedirs(self.dir, exist_ok=True)
        self.world_size, self.count = world_size, 0
        self.fd = os.open(os.path.join(self.dir, f"rank-{rank}"), os.O_RDWR | os.O_CREAT, 0o644)
        self.bar = None
        self.stop = threading.Event()
        if rank == 0 and enabled:
            self.bar = tqdm(total=total, unit="B", unit_scale=True, desc="merge", file=sys.stderr,
                            dynamic_ncols=True, mininterval=0.5)
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
        while not self.stop.wait(0.5):
            self.bar.n = self._total()
            self.bar.refresh()

    def close(self, final_total: int | None = None) -> None:
        self.stop.set()
        os.close(self.fd)
        if self.bar is not None:
            self.thread.join()
            self.bar.n = final_total if final_total is not None else self._total()
            self.bar.close()

"""Process-group setup: rank and world from torchrun's environment, world size 1 without it.

NCCL with CUDA tensors where GPUs are visible, gloo otherwise. An existing process group (when
distmerge runs inside a live torchrun job) is used as is and left alive. Ranks forked by
`--local-ranks` for the direct transport talk through socket pairs instead (group.LocalGroup):
torch is imported only for a torch process group, so a merge that copies bytes never needs it.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import sys
from dataclasses import dataclass

from . import local_ranks, values
from .errors import MergeAbortedError, MergeError
from .group import LocalGroup, TorchGroup


@dataclass
class Runtime:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None       # the torch process group's; None without one
    owns_group: bool = False
    group: TorchGroup | LocalGroup | None = None   # None for one rank; a torch backend's by default

    def __post_init__(self):
        if self.group is None and self.backend is not None:
            self.group = TorchGroup(self.device if self.backend == "nccl" else None)

    @property
    def device(self):
        """Where exchanged pieces live (a torch.device): CUDA for NCCL, CPU for gloo."""
        import torch
        if self.backend == "nccl":
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")

    def on_rank0(self, fn) -> None:
        """Run fn on rank 0 alone; a refusal there (MergeError) is raised on every rank, so all
        ranks stop together with one message instead of waiting on rank 0 forever."""
        error = None
        if self.rank == 0:
            try:
                fn()
            except MergeError as e:
                error = e
            except BaseException:
                if self.world_size > 1:
                    self.group.broadcast(MergeAbortedError("rank 0 failed; its message says why"))
                raise
        if self.world_size > 1:
            error = self.group.broadcast(error)
        if error is not None:
            raise error

    def gather_objects(self, obj) -> list:
        """Every rank's obj, in rank order, on every rank."""
        if self.world_size == 1:
            return [obj]
        return self.group.all_gather(obj)

    def gather_dicts(self, d: dict) -> dict:
        merged = {}
        for part in self.gather_objects(d):
            merged.update(part)
        return merged

    def close(self) -> None:
        if self.group is not None:
            self.group.close()
        if self.owns_group:
            import torch.distributed as dist
            if dist.is_initialized():
                dist.destroy_process_group()


def start(backend: str = "auto", timeout_s: float = 1800) -> Runtime:
    live = sys.modules.get("torch.distributed")  # a live group means torch.distributed is imported
    if live is not None and live.is_available() and live.is_initialized():
        return Runtime(live.get_rank(), live.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)),
                       live.get_backend())
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Runtime()
    links = local_ranks.links()
    if links is not None:  # forked by --local-ranks, for the direct transport
        rank = int(os.environ["RANK"])
        return Runtime(rank, world, rank, group=LocalGroup(rank, links, timeout_s))
    return _torch_group(backend, world, timeout_s)


def _torch_group(backend: str, world: int, timeout_s: float) -> Runtime:
    """A torch process group of its own (torchrun, srun, --local-ranks with torch)."""
    import torch
    import torch.distributed as dist
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if backend == "auto":
        # NCCL needs a GPU of its own per rank; with more ranks per node than GPUs, use gloo
        backend = "nccl" if gpus >= local_world else "gloo"
    elif backend == "nccl" and gpus < local_world:
        raise MergeError(f"--backend nccl needs one GPU per rank, but this node runs {local_world} ranks "
                         f"and sees {gpus} GPU(s); use --nproc-per-node {gpus} or --backend gloo")
    kwargs = {}
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
        kwargs["device_id"] = torch.device("cuda", local_rank)
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
    return Runtime(dist.get_rank(), dist.get_world_size(), local_rank, backend, owns_group=True)


@contextlib.contextmanager
def intra_op_threads(ranks_on_this_machine: int):
    """torch threads for the casts: half this rank's share of the cores (the other half reads and
    writes). torch's default, every core, is 2-3x slower for casts on a small machine, where those
    threads fight the rank's own reader and writer. An explicit OMP_NUM_THREADS wins. Set when
    torch is first used (values.torch), restored after."""
    if "OMP_NUM_THREADS" not in os.environ:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        values.set_threads(max(1, cores // (2 * max(1, ranks_on_this_machine))))
    try:
        yield
    finally:
        values.set_threads(None)

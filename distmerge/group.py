"""How the ranks of one merge talk to each other: rank 0 broadcasts (the prepared job, a refusal),
sends each rank its share, and gathers every rank's result. Nothing else passes between ranks
with the direct transport; the collective transport also sends pieces, through torch.

- TorchGroup: torch.distributed (torchrun, SLURM, a live job, `--local-ranks` with the collective
  transport or an explicit --backend).
- LocalGroup: the ranks `--local-ranks` forks, each joined to rank 0 by a socket pair made before
  the fork. No torch: a merge that copies bytes starts in a fifth of a second, not a second.

Objects are pickled: they come from rank 0 or another rank of this job, the trust torch's own
object collectives give.
"""
from __future__ import annotations

import pickle
import socket
import struct

from .errors import MergeAbortedError

_LENGTH = struct.Struct("<Q")


class TorchGroup:
    """Object collectives over torch.distributed's process group."""

    def __init__(self, device=None):
        self.device = device  # where collectives put their buffers: CUDA for NCCL, else None (CPU)

    def broadcast(self, obj):
        """Rank 0's obj, on every rank."""
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0, device=self.device)
        return box[0]

    def all_gather(self, obj) -> list:
        import torch.distributed as dist

        out = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out

    def send(self, obj, dst: int) -> None:
        """A pickled object to one rank: its size, then its bytes."""
        import torch
        import torch.distributed as dist

        data = bytearray(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))
        device = self.device or "cpu"
        dist.send(torch.tensor([len(data)], dtype=torch.int64, device=device), dst=dst)
        dist.send(torch.frombuffer(data, dtype=torch.uint8).to(device), dst=dst)

    def recv(self, src: int):
        """What send() sent, unpickled from the received buffer in place. torch's recv_object_list
        copies the buffer to bytes first: a third copy of a share that is, for a checkpoint of
        millions of chunks, the largest thing the rank ever holds."""
        import torch
        import torch.distributed as dist

        device = self.device or "cpu"
        size = torch.empty(1, dtype=torch.int64, device=device)
        dist.recv(size, src=src)
        buf = torch.empty(int(size.item()), dtype=torch.uint8, device=device)
        dist.recv(buf, src=src)
        with memoryview(buf.cpu().numpy()) as view:
            return pickle.loads(view)

    def close(self) -> None:
        pass


class LocalGroup:
    """Object collectives between forked ranks, through rank 0: `links` are rank 0's sockets to
    ranks 1..N-1 on rank 0, the one socket to rank 0 on any other. A rank that stops closes its
    end, so the others stop too (MergeAbortedError) instead of waiting; so does one that stays
    silent past `timeout` seconds."""

    def __init__(self, rank: int, links: dict[int, socket.socket], timeout: float):
        self.rank, self.links = rank, links
        for s in links.values():
            s.settimeout(timeout)

    def broadcast(self, obj):
        if self.rank == 0:
            for peer in sorted(self.links):
                self.send(obj, peer)
            return obj
        return self.recv(0)

    def all_gather(self, obj) -> list:
        if self.rank != 0:
            self.send(obj, 0)
            return self.recv(0)
        gathered = [obj] + [self.recv(peer) for peer in sorted(self.links)]
        return self.broadcast(gathered)

    def send(self, obj, dst: int) -> None:
        data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        try:
            self.links[dst].sendall(_LENGTH.pack(len(data)))
            self.links[dst].sendall(data)
        except OSError as e:
            raise _lost(dst, e) from None

    def recv(self, src: int):
        link = self.links[src]
        try:
            size = _LENGTH.unpack(_recv_exactly(link, _LENGTH.size))[0]
            return pickle.loads(_recv_exactly(link, size))
        except OSError as e:
            raise _lost(src, e) from None

    def close(self) -> None:
        for s in self.links.values():
            s.close()
        self.links = {}


def _recv_exactly(link: socket.socket, n: int) -> bytearray:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = link.recv_into(view[got:])
        if k == 0:
            raise ConnectionResetError("the other rank closed its end")
        got += k
    return buf


def _lost(peer: int, e: OSError) -> MergeAbortedError:
    why = "it did not answer within --timeout" if isinstance(e, TimeoutError) else "it stopped"
    return MergeAbortedError(f"lost contact with another rank (rank {peer}: {why}); that rank's own message, if it "
                             "printed one, says why. The partial output stays marked incomplete: rerun with --resume")

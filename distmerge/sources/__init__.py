"""Stage 1, detect/read: recognise the source format and build its Catalogue (metadata only)."""
from __future__ import annotations

import os

from ..errors import MergeError
from ..model import Catalogue
from . import dcp, fsdp, megatron, megatron_legacy

# order matters: a legacy Megatron-LM run also has latest_checkpointed_iteration.txt
FORMATS = [fsdp, megatron_legacy, megatron, dcp]  # each module has detect(dir) -> bool and read_catalogue(dir) -> Catalogue


def read_source(source: str, iteration: int | None = None, quick: bool = False) -> Catalogue:
    """quick (inspect without --check-all): verl FSDP reads rank 0's metadata only."""
    if not os.path.exists(source):
        raise MergeError(f"source {source} does not exist")
    if not os.path.isdir(source):
        raise MergeError(f"source {source} is not a directory; pass the checkpoint directory "
                         "(e.g. checkpoints/global_step_100/actor)")
    if not os.listdir(source):
        raise MergeError(f"source {source} is empty; pass the directory that holds the checkpoint files")
    if iteration is not None:  # Megatron-LM's iter_XXXXXXX directories
        if megatron_legacy.resolve(source, iteration):
            return megatron_legacy.read_catalogue(source, iteration)
        return megatron.read_catalogue(source, iteration)
    for fmt in FORMATS:
        if fmt.detect(source):
            return fmt.read_catalogue(source, first_rank_only=True) if quick and fmt is fsdp else fmt.read_catalogue(source)
    raise MergeError(f"{source} is not a checkpoint distmerge knows: no model_world_size_W_rank_R.pt files "
                     "(verl FSDP), no .metadata (PyTorch DCP) and no metadata.json / dist_ckpt / iter_* (Megatron torch_dist) found. Pass the directory that holds them")

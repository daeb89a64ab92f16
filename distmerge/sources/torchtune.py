"""torchtune's DCP checkpoints (DistributedCheckpointer: dist_epoch_N/ holding one DCP of model,
optimizer and recipe state). torchtune's names are its own: they are renamed to the Meta names
torchtune itself converts from (its convert_weights._FROM_META), which are torchtitan's 0.2.x names,
so its Llama models map through arch/torchtitan.py, RoPE row order included. The folder layout is
dcp_layouts.TORCHTUNE; the chunks are read by the DCP reader.
"""
from __future__ import annotations

import os
import re

from ..errors import MergeError
from ..model import Catalogue
from .dcp import METADATA, catalogue_of, locate_or_refuse, read_metadata
from .dcp_layouts import TORCHTUNE as TORCHTUNE_WRITER
from .dcp_layouts import Located, locate, strip_wrapper
from .registry import ReadOptions, SourceFormat

# torchtune's module names -> Meta's (= torchtitan 0.2.x's), the inverse of torchtune's convert_weights._FROM_META
TORCHTUNE_TO_META = {
    "tok_embeddings.weight": "tok_embeddings.weight",
    "norm.scale": "norm.weight",
    "output.weight": "output.weight",
    "layers.{}.attn.q_proj.weight": "layers.{}.attention.wq.weight",
    "layers.{}.attn.k_proj.weight": "layers.{}.attention.wk.weight",
    "layers.{}.attn.v_proj.weight": "layers.{}.attention.wv.weight",
    "layers.{}.attn.output_proj.weight": "layers.{}.attention.wo.weight",
    "layers.{}.sa_norm.scale": "layers.{}.attention_norm.weight",
    "layers.{}.mlp_norm.scale": "layers.{}.ffn_norm.weight",
    "layers.{}.mlp.w1.weight": "layers.{}.feed_forward.w1.weight",
    "layers.{}.mlp.w2.weight": "layers.{}.feed_forward.w2.weight",
    "layers.{}.mlp.w3.weight": "layers.{}.feed_forward.w3.weight",
}
TORCHTUNE_KEY = re.compile(r"^model\.(tok_embeddings\.weight$|layers\.\d+\.(attn|sa_norm|mlp_norm)\.)")
_LAYER_INDEX = re.compile(r"^layers\.(\d+)\.")


def _torchtune_names(names: list[str], ckpt: str) -> dict[str, str]:
    """torchtune's names (under the 'model' key) as Meta's; a name outside the table is refused by name."""
    renamed, unknown = {}, []
    for name, inner in strip_wrapper(names, TORCHTUNE_WRITER, ckpt).items():
        m = _LAYER_INDEX.match(inner)
        abstract = _LAYER_INDEX.sub("layers.{}.", inner) if m else inner
        meta = TORCHTUNE_TO_META.get(abstract)
        if meta is None:
            unknown.append(inner)
        else:
            renamed[name] = meta.format(m.group(1)) if m else meta
    if unknown:
        raise MergeError(f"{ckpt}: torchtune tensors {', '.join(unknown[:3])}{' ...' if len(unknown) > 3 else ''} "
                         "have no mapping; distmerge reads torchtune's Llama-family models (no biases, no LoRA "
                         "or fused layers). Export this one with torchtune's FullModelHFCheckpointer")
    return renamed


def detect_torchtune(source: str, opts: ReadOptions = ReadOptions()) -> bool:
    """A DCP directory (or a torchtune output folder of dist_epoch_N/) whose names are torchtune's."""
    located = locate(source)
    if located is None or located.writer not in (None, TORCHTUNE_WRITER):
        return False
    try:
        entries = read_metadata(os.path.join(located.ckpt, METADATA))[0]
    except MergeError:  # unreadable: the plain DCP reader reports it
        return False
    return any(TORCHTUNE_KEY.match(name) for name in entries)


def read_torchtune(source: str, opts: ReadOptions = ReadOptions()) -> Catalogue:
    """torchtune's model tensors under Meta's names (the torchtitan family maps them); optimizer and
    recipe state are skipped."""
    located = locate_or_refuse(source)
    if located.writer is None:
        located = Located(located.ckpt, TORCHTUNE_WRITER, (f"recognised {TORCHTUNE_WRITER.name} by its names",))
    return catalogue_of("torchtune", source, located, lambda names: _torchtune_names(names, located.ckpt))


FORMAT = SourceFormat(name="torchtune", family="torchtitan", detect=detect_torchtune,
                         read_catalogue=read_torchtune, describe="torchtune's DCP dist_epoch_N/.metadata")

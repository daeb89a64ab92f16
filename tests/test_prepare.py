"""Fast, in-process: prepare()'s validation of catalogues and of the config against the tensors.

The sources are tiny DCP checkpoints written by torch.distributed.checkpoint itself in this process.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from distmerge.dtypes import FLOAT16, FLOAT32
from distmerge.errors import MergeError
from distmerge.model import Catalogue, Piece, SourceTensor
from distmerge.prepare import PrepareOptions, prepare
from distmerge.validate import validate_catalogue

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4, "num_attention_heads": 2,
          "num_key_value_heads": 1, "head_dim": 2, "intermediate_size": 6, "vocab_size": 8, "num_hidden_layers": 1,
          "tie_word_embeddings": True}


def tiny_llama(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = {"model.embed_tokens.weight": (8, 4), "model.layers.0.self_attn.q_proj.weight": (4, 4),
              "model.layers.0.self_attn.k_proj.weight": (2, 4), "model.layers.0.self_attn.v_proj.weight": (2, 4),
              "model.layers.0.self_attn.o_proj.weight": (4, 4), "model.layers.0.mlp.gate_proj.weight": (6, 4),
              "model.layers.0.mlp.up_proj.weight": (6, 4), "model.layers.0.mlp.down_proj.weight": (4, 6),
              "model.layers.0.input_layernorm.weight": (4,), "model.layers.0.post_attention_layernorm.weight": (4,),
              "model.norm.weight": (4,)}
    return {name: torch.randn(shape, generator=g) for name, shape in shapes.items()}


def write(tmp: Path, state: dict, config: dict) -> Path:
    dcp.save({"model": state}, checkpoint_id=str(tmp / "dcp"), no_dist=True)
    (tmp / "huggingface").mkdir()
    (tmp / "huggingface" / "config.json").write_text(json.dumps(config))
    return tmp / "dcp"


def test_a_tied_config_over_a_separately_trained_head_is_refused_and_untie_keeps_it(tmp_path):
    state = tiny_llama()
    state["lm_head.weight"] = state["model.embed_tokens.weight"] + 1
    source = write(tmp_path, state, CONFIG)
    with pytest.raises(MergeError, match="--untie-word-embeddings"):
        prepare(str(source))
    p = prepare(str(source), PrepareOptions(untie_word_embeddings=True))
    assert "lm_head.weight" in {o.name for o in p.outputs}
    assert p.config["tie_word_embeddings"] is False


def test_a_tied_head_equal_to_the_embedding_is_dropped(tmp_path):
    state = tiny_llama()
    state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
    p = prepare(str(write(tmp_path, state, CONFIG)))
    assert "lm_head.weight" not in {o.name for o in p.outputs}


@pytest.mark.parametrize("field, value", [("hidden_size", 8), ("num_hidden_layers", 2), ("intermediate_size", 5),
                                          ("num_key_value_heads", 2), ("vocab_size", 9)])
def test_a_config_of_another_model_is_refused(tmp_path, field, value):
    with pytest.raises(MergeError, match="config"):
        prepare(str(write(tmp_path, tiny_llama(), CONFIG | {field: value})))


@pytest.mark.parametrize("config", [[1, 2], "x", {"hidden_size": "4"}, {"architectures": "Llama"},
                                    {"tie_word_embeddings": "yes"}, {"text_config": []}])
def test_config_json_of_the_wrong_shape_is_refused(tmp_path, config):
    source = write(tmp_path, tiny_llama(), CONFIG)
    text = json.dumps(config if not isinstance(config, dict) else CONFIG | config)
    (tmp_path / "huggingface" / "config.json").write_text(text)
    with pytest.raises(MergeError, match="config.json"):
        prepare(str(source))


def test_deeply_nested_config_json_is_refused(tmp_path):
    source = write(tmp_path, tiny_llama(), CONFIG)
    (tmp_path / "huggingface" / "config.json").write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(MergeError, match="config.json"):
        prepare(str(source))


def catalogue_with(tmp_path: Path, **piece) -> Catalogue:
    data = tmp_path / "data.bin"
    data.write_bytes(bytes(64))
    fields = dict(file=str(data), offset=0, shape=(2, 4), strides=(4, 1), region=(0, 0), dtype=FLOAT32)
    p = Piece(**(fields | piece))
    t = SourceTensor("w", (2, 4), FLOAT32, [p])
    return Catalogue(format="test", source=str(tmp_path), files=[str(data)], tensors={"w": t}, hf_dir=None)


@pytest.mark.parametrize("piece, message", [
    ({"offset": -8}, "negative"),
    ({"strides": (-4, 1)}, "overlap"),
    ({"strides": (0, 1)}, "overlap"),
    ({"strides": (4, 0)}, "overlap"),
    ({"strides": (1, 1)}, "overlap"),
    ({"offset": 40}, "needs bytes up to"),
    ({"shape": (2, 4), "strides": (400, 1)}, "needs bytes up to"),
    ({"region": (1, 0)}, "outside the tensor"),
    ({"shape": (1, 4)}, "cover 4 of its 8"),
    ({"dtype": FLOAT16}, "tensor is"),
    ({"region": (0,)}, "disagree in rank"),
])
def test_hostile_piece_records_are_refused(tmp_path, piece, message):
    with pytest.raises(MergeError, match=message):
        validate_catalogue(catalogue_with(tmp_path, **piece))


def test_overlapping_pieces_with_the_right_element_count_are_refused(tmp_path):
    c = catalogue_with(tmp_path, shape=(1, 4))
    t = c.tensors["w"]
    t.pieces = [t.pieces[0], Piece(t.pieces[0].file, 0, (1, 4), (4, 1), (0, 0), FLOAT32)]  # row 0 twice
    with pytest.raises(MergeError, match="overlaps or holes"):
        validate_catalogue(c)


def test_files_outside_the_source_and_special_files_are_refused(tmp_path):
    outside = tmp_path / "secret"
    outside.write_bytes(bytes(64))
    src = tmp_path / "src"
    src.mkdir()
    (src / "link.bin").symlink_to(outside)
    for path in (str(outside), str(src / "link.bin"), str(src / ".." / "secret"), "/dev/zero"):
        c = catalogue_with(src)
        c.tensors["w"].pieces = [Piece(path, 0, (2, 4), (4, 1), (0, 0), FLOAT32)]
        with pytest.raises(MergeError, match="outside the source|not a regular file"):
            validate_catalogue(c)
    fifo = src / "fifo"
    import os
    os.mkfifo(fifo)
    c = catalogue_with(src)
    c.tensors["w"].pieces = [Piece(str(fifo), 0, (2, 4), (4, 1), (0, 0), FLOAT32)]
    with pytest.raises(MergeError, match="not a regular file"):
        validate_catalogue(c)


def test_a_valid_catalogue_passes(tmp_path):
    validate_catalogue(catalogue_with(tmp_path))
    c = catalogue_with(tmp_path, shape=(2, 2), strides=(1, 2))  # a transposed (column-major) block is fine
    c.tensors["w"] = SourceTensor("w", (2, 2), FLOAT32, c.tensors["w"].pieces)
    validate_catalogue(c)

"""The fast tier: in-process tests on small synthetic catalogues, no subprocesses.

Each catalogue here is written for real: every tensor's bytes go to small files, cut into pieces
(row blocks, column shards) as a sharded checkpoint would hold them. Outputs are then made by the
same band producer the merge uses, and compared with values computed independently with torch.
"""
from __future__ import annotations

import argparse

import pytest
import torch

from distmerge import bands as bands_mod
from distmerge import values as values_mod
from distmerge.arch import megatron_gpt
from distmerge.bands import Band, bands, row_runs, whole_block
from distmerge.dtypes import FLOAT32, UINT8, of_torch
from distmerge.errors import MergeError
from distmerge.model import Catalogue, FileEntry, OutputFile, OutputTensor, Piece, SourceRows, SourceTensor
from distmerge.plan import cut_segments
from distmerge.reader import BandProducer, PieceReader
from distmerge.sources import megatron_legacy


def write_tensor(path, name: str, t: torch.Tensor, dim: int = 0, n: int = 1) -> SourceTensor:
    """`t` stored in `n` pieces cut along `dim`, each piece contiguous in its own stretch of `path`."""
    pieces, offset, start = [], 0, 0
    with open(path, "wb") as f:
        for block in t.chunk(n, dim) if t.dim() else [t]:
            data = block.contiguous()
            f.write(data.reshape(-1).view(torch.uint8).numpy().tobytes())
            region = tuple(start if d == dim else 0 for d in range(t.dim()))
            dtype = of_torch(t.dtype)
            pieces.append(Piece(str(path), offset, tuple(data.shape), tuple(data.stride()), region, dtype))
            offset += data.numel() * data.element_size()
            start += data.shape[dim] if t.dim() else 0
    return SourceTensor(name, tuple(t.shape), of_torch(t.dtype), pieces)


def catalogue_of(tmp_path, tensors: dict, family: str = "hf", cuts: dict | None = None) -> Catalogue:
    """A catalogue of real files; cuts: name -> (dim, pieces)."""
    stored = {}
    for k, (name, t) in enumerate(tensors.items()):
        dim, n = (cuts or {}).get(name, (0, 1))
        stored[name] = write_tensor(tmp_path / f"t{k}.bin", name, t, dim, n)
    files = sorted({p.file for t in stored.values() for p in t.pieces})
    return Catalogue(format="test", source=str(tmp_path), files=files, tensors=stored, hf_dir=None, family=family)


def produce(out: OutputTensor, catalogue: Catalogue) -> torch.Tensor:
    """The output tensor as the merge makes it: band by band, through the band producer."""
    reader = PieceReader()
    try:
        producer = BandProducer(catalogue, reader)
        blocks = [values_mod.to_torch(*producer.produce(out, band)) for band in bands(out, catalogue)]
    finally:
        reader.close()
    if not out.parts:
        return torch.zeros(out.shape, dtype=out.dtype.torch)
    return (torch.cat(blocks) if out.shape else blocks[0]).reshape(out.shape)


def values(shape, dtype=torch.float32, seed=0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


# ---------------------------------------------------------------- band geometry

@pytest.mark.parametrize("cut", [(0, 1), (0, 3), (1, 2)])
def test_bands_cut_at_pieces_and_band_bytes_and_assemble_the_stored_bytes(tmp_path, monkeypatch, cut):
    """Bands stay inside a piece where pieces are row blocks, hold at most BAND_BYTES, cover the
    rows once in order, and their assembled bytes are the tensor's (row blocks and column shards)."""
    monkeypatch.setattr(bands_mod, "BAND_BYTES", 3 * 8 * 4)  # 3 rows of 8 float32
    w = values((10, 8))
    catalogue = catalogue_of(tmp_path, {"w": w}, cuts={"w": cut})
    out = OutputTensor("w", (10, 8), FLOAT32, [SourceRows("w", (), 0, 10)])
    cut_bands = bands(out, catalogue)
    assert [(b.first, b.stop) for b in cut_bands] == list(zip([b.first for b in cut_bands],
                                                              [b.first for b in cut_bands[1:]] + [10]))
    assert cut_bands[0].first == 0 and all(b.stop - b.first <= 3 for b in cut_bands)
    if cut == (0, 3):  # pieces of rows 0-3, 4-6, 7-9: no band crosses a piece boundary
        assert {4, 7} <= {b.first for b in cut_bands}
        assert all(len(b.reads) == 1 and whole_block(b) is not None for b in cut_bands)
    if cut == (1, 2):  # column shards: every band reads both, none is one stored block
        assert all(len(b.reads) == 2 and whole_block(b) is None for b in cut_bands)
    assert torch.equal(produce(out, catalogue), w)


def test_a_row_wider_than_a_band_is_one_band_and_a_scalar_is_one_row(tmp_path, monkeypatch):
    monkeypatch.setattr(bands_mod, "BAND_BYTES", 4)
    catalogue = catalogue_of(tmp_path, {"w": values((3, 5)), "s": torch.tensor(7.5)})
    w_bands = bands(OutputTensor("w", (3, 5), FLOAT32, [SourceRows("w", (), 0, 3)]), catalogue)
    assert [(b.first, b.stop) for b in w_bands] == [(0, 1), (1, 2), (2, 3)]
    scalar = OutputTensor("s", (), FLOAT32, [SourceRows("s", (), 0, 1)])
    assert [(b.first, b.stop) for b in bands(scalar, catalogue)] == [(0, 1)]
    assert produce(scalar, catalogue).item() == 7.5


def test_parts_of_a_stacked_tensor_take_their_layer_and_rows(tmp_path):
    stacked = values((3, 6, 4))
    catalogue = catalogue_of(tmp_path, {"s": stacked}, cuts={"s": (0, 3)})  # one piece per layer
    parts = [SourceRows("s", (2,), 4, 6), SourceRows("s", (0,), 0, 2)]
    out = OutputTensor("o", (4, 4), FLOAT32, parts)
    assert torch.equal(produce(out, catalogue), torch.cat([stacked[2, 4:6], stacked[0, 0:2]]))
    assert [b.reads[0].lead for b in bands(out, catalogue)] == [(0,), (0,)]  # each piece holds one layer


# ---------------------------------------------------------------- the row gather

def rope_order(head_dim: int) -> tuple[int, ...]:
    """HF's Llama permutation of one head's rows (interleaved pairs -> rotate-half), as
    transformers' convert_llama_weights_to_hf writes it: w.view(h, d/2, 2, in).transpose(1, 2)."""
    rows = torch.arange(head_dim).view(1, head_dim // 2, 2).transpose(1, 2).reshape(-1)
    return tuple(rows.tolist())


def permute_like_hf(w: torch.Tensor, heads: int) -> torch.Tensor:
    rows, cols = w.shape
    return w.view(heads, rows // heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


@pytest.mark.parametrize("band_rows, cut", [(1024, (0, 1)), (8, (0, 1)), (8, (0, 3)), (3, (0, 2)), (8, (1, 2))])
def test_row_gather_streams_rope_permutation_in_bounded_coalesced_bands(tmp_path, monkeypatch, band_rows, cut):
    """q with 4 heads of 8 rows, permuted within each head: equal to HF's permutation, each band at
    most BAND_BYTES; a band of whole heads reads one run of source rows (one read per piece)."""
    monkeypatch.setattr(bands_mod, "BAND_BYTES", band_rows * 6 * 2)  # band_rows rows of 6 bf16
    heads, head_dim = 4, 8
    wq = values((heads * head_dim, 6), torch.bfloat16)
    catalogue = catalogue_of(tmp_path, {"wq": wq}, cuts={"wq": cut})
    part = SourceRows("wq", (), 0, heads * head_dim, rope_order(head_dim))
    out = OutputTensor("q", tuple(wq.shape), of_torch(wq.dtype), [part])
    cut_bands = bands(out, catalogue)
    assert torch.equal(produce(out, catalogue), permute_like_hf(wq, heads))
    assert all((b.stop - b.first) * 6 * 2 <= bands_mod.BAND_BYTES for b in cut_bands)
    if band_rows >= head_dim:  # whole heads per band: one run of source rows, one read per piece it spans
        assert all(len(b.runs) == 1 and (b.stop - b.first) % head_dim == 0 for b in cut_bands)
        pieces_per_run = 2 if cut == (1, 2) else 1
        assert all(len(b.reads) <= pieces_per_run * cut[1] for b in cut_bands)
        if cut == (0, 1):
            assert all(len(b.reads) == 1 for b in cut_bands)
    else:  # a band inside a head reads just its rows: runs of the rows it takes
        assert max(len(b.runs) for b in cut_bands) > 1
        assert sum(b.stop - b.first for b in cut_bands) == heads * head_dim


def test_row_gather_of_a_layer_of_a_stacked_tensor_with_an_offset(tmp_path):
    stacked = values((2, 12, 3))
    catalogue = catalogue_of(tmp_path, {"s": stacked})
    order = (2, 0, 1)
    out = OutputTensor("o", (6, 3), FLOAT32, [SourceRows("s", (1,), 3, 9, order)])
    expected = stacked[1, [5, 3, 4, 8, 6, 7]]
    assert torch.equal(produce(out, catalogue), expected)


def test_row_runs_and_refused_orders():
    assert row_runs(torch.tensor([5, 3, 4, 9, 10, 0])) == ((0, 1), (3, 6), (9, 11))
    with pytest.raises(MergeError, match="permute"):
        SourceRows("w", (), 0, 8, (0, 0, 1, 2))
    with pytest.raises(MergeError, match="divides"):
        SourceRows("w", (), 0, 6, (1, 0, 3, 2))


def test_a_lora_fold_of_gathered_rows_is_refused(tmp_path):
    from distmerge.model import LoraDelta

    catalogue = catalogue_of(tmp_path, {"w": values((4, 2))})
    out = OutputTensor("w", (4, 2), FLOAT32, [SourceRows("w", (), 0, 4, (1, 0))], LoraDelta("a", "b", 1.0))
    with pytest.raises(MergeError, match="LoRA"):
        bands(out, catalogue)


# ---------------------------------------------------------------- Megatron rules

LAYERS, HIDDEN, HEADS, GROUPS, HEAD_DIM, FFN, VOCAB, EXPERTS = 2, 8, 4, 2, 2, 6, 10, 3


def megatron_config(arch="LlamaForCausalLM", **extra) -> dict:
    return {"architectures": [arch], "hidden_size": HIDDEN, "num_attention_heads": HEADS,
            "num_key_value_heads": GROUPS, "head_dim": HEAD_DIM, "intermediate_size": FFN,
            "num_hidden_layers": LAYERS, "vocab_size": VOCAB, "tie_word_embeddings": False, **extra}


def map_megatron(tmp_path, tensors: dict, config: dict, cuts=None) -> tuple[dict, Catalogue]:
    catalogue = catalogue_of(tmp_path, tensors, family="megatron", cuts=cuts)
    outputs = megatron_gpt.map_outputs(catalogue, config, lambda d: d)
    return {o.name: o for o in outputs}, catalogue


def dense_tensors() -> dict:
    group = (HEADS // GROUPS + 2) * HEAD_DIM
    return {"embedding.word_embeddings.weight": values((VOCAB + 6, HIDDEN), seed=1),  # padded vocab
            "decoder.layers.self_attention.linear_qkv.weight": values((LAYERS, GROUPS * group, HIDDEN), seed=2),
            "decoder.layers.mlp.linear_fc1.weight": values((LAYERS, 2 * FFN, HIDDEN), seed=3),
            "decoder.layers.mlp.linear_fc2.weight": values((LAYERS, HIDDEN, FFN), seed=4),
            "decoder.final_layernorm.weight": values((HIDDEN,), seed=5),
            "output_layer.weight": values((VOCAB + 6, HIDDEN), seed=6)}


def test_qkv_groups_gate_up_halves_and_vocab_trim(tmp_path):
    t = dense_tensors()
    outs, catalogue = map_megatron(tmp_path, t, megatron_config(), cuts={
        "decoder.layers.self_attention.linear_qkv.weight": (1, 2)})  # split over rows: TP-like
    q_rows = HEADS // GROUPS * HEAD_DIM
    group = q_rows + 2 * HEAD_DIM
    for i in range(LAYERS):
        qkv = t["decoder.layers.self_attention.linear_qkv.weight"][i].view(GROUPS, group, HIDDEN)
        for proj, rows in (("q", slice(0, q_rows)), ("k", slice(q_rows, q_rows + HEAD_DIM)),
                           ("v", slice(q_rows + HEAD_DIM, group))):
            expected = qkv[:, rows].reshape(-1, HIDDEN)
            assert torch.equal(produce(outs[f"model.layers.{i}.self_attn.{proj}_proj.weight"], catalogue), expected)
        fc1 = t["decoder.layers.mlp.linear_fc1.weight"][i]
        assert torch.equal(produce(outs[f"model.layers.{i}.mlp.gate_proj.weight"], catalogue), fc1[:FFN])
        assert torch.equal(produce(outs[f"model.layers.{i}.mlp.up_proj.weight"], catalogue), fc1[FFN:])
        assert torch.equal(produce(outs[f"model.layers.{i}.mlp.down_proj.weight"], catalogue),
                           t["decoder.layers.mlp.linear_fc2.weight"][i])
    assert torch.equal(produce(outs["model.embed_tokens.weight"], catalogue),
                       t["embedding.word_embeddings.weight"][:VOCAB])
    assert outs["lm_head.weight"].shape == (VOCAB, HIDDEN)
    assert list(outs)[:2] == ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight"]
    assert list(outs)[-2:] == ["model.norm.weight", "lm_head.weight"]


@pytest.mark.parametrize("change, needle", [({"num_key_value_heads": 1}, "num_key_value_heads=1"),
                                            ({"vocab_size": VOCAB + 7}, "vocab_size="),
                                            ({"intermediate_size": FFN + 1}, "needs")])
def test_a_config_that_disagrees_with_the_tensors_is_refused(tmp_path, change, needle):
    with pytest.raises(MergeError, match=needle):
        map_megatron(tmp_path, dense_tensors(), megatron_config(**change))


def test_experts_router_and_router_bias(tmp_path):
    t = {"embedding.word_embeddings.weight": values((VOCAB, HIDDEN)),
         "decoder.layers.mlp.router.weight": values((LAYERS, EXPERTS, HIDDEN), seed=1),
         "decoder.layers.mlp.router.expert_bias": values((LAYERS, EXPERTS), seed=2),
         "decoder.layers.mlp.experts.experts.linear_fc1.weight": values((LAYERS, EXPERTS, 2 * FFN, HIDDEN), seed=3),
         "decoder.layers.mlp.experts.experts.linear_fc2.weight": values((LAYERS, EXPERTS, HIDDEN, FFN), seed=4)}
    config = megatron_config("DeepseekV3ForCausalLM", n_routed_experts=EXPERTS, moe_intermediate_size=FFN,
                             tie_word_embeddings=True)
    outs, catalogue = map_megatron(tmp_path, t, config)
    fc1 = t["decoder.layers.mlp.experts.experts.linear_fc1.weight"]
    fc2 = t["decoder.layers.mlp.experts.experts.linear_fc2.weight"]
    for i in range(LAYERS):
        for e in range(EXPERTS):
            at = f"model.layers.{i}.mlp.experts.{e}."
            assert torch.equal(produce(outs[at + "gate_proj.weight"], catalogue), fc1[i, e, :FFN])
            assert torch.equal(produce(outs[at + "up_proj.weight"], catalogue), fc1[i, e, FFN:])
            assert torch.equal(produce(outs[at + "down_proj.weight"], catalogue), fc2[i, e])
        assert torch.equal(produce(outs[f"model.layers.{i}.mlp.gate.e_score_correction_bias"], catalogue),
                           t["decoder.layers.mlp.router.expert_bias"][i])
    with pytest.raises(MergeError, match="route differently"):  # Mixtral has no place for expert_bias
        map_megatron(tmp_path, t, megatron_config("MixtralForCausalLM", num_local_experts=EXPERTS,
                                                  tie_word_embeddings=True))
    with pytest.raises(MergeError, match="holds 3 experts"):
        map_megatron(tmp_path, t, {**config, "n_routed_experts": 4})


def test_every_family_gives_a_key_the_same_tp_split():
    """The legacy reader joins TP ranks by the rules: a key must split the same way in every family."""
    for rules in (megatron_gpt.LAYER_RULES, *megatron_gpt.FAMILY_RULES.values()):
        for key, rule in rules.items():
            assert megatron_gpt.TP_SPLITS[key] == rule.tp, key
    assert megatron_gpt.tp_split("decoder.layers.self_attention.linear_kv_up_proj.weight") == megatron_gpt.COLUMN
    assert megatron_gpt.tp_split("decoder.layers.mlp.experts.experts.linear_fc2.weight") == megatron_gpt.ROW
    assert megatron_gpt.tp_split("output_layer.weight") == megatron_gpt.COLUMN
    assert megatron_gpt.tp_split("decoder.layers.unknown.weight") == megatron_gpt.REPLICATED


# ---------------------------------------------------------------- legacy TP stacking

def save_legacy(tmp_path, tp: int, full: dict, te: bool) -> None:
    """Megatron-LM legacy files of TP ranks cut from `full` the way megatron-core splits each key."""
    splits = {"linear_qkv.weight": "column", "linear_fc1.weight": "gate_up", "linear_proj.weight": "row",
              "linear_fc2.weight": "row",
              "linear_q_up_proj.weight": "column", "linear_kv_down_proj.weight": "replicated" if te else "column",
              "word_embeddings.weight": "column"}
    for t in range(tp):
        state = {}
        for name, w in full.items():
            split = next((s for k, s in splits.items() if name.endswith(k)), "replicated")
            if split == "column":
                w = w.chunk(tp, 0)[t]
            elif split == "row":
                w = w.chunk(tp, 1)[t]
            elif split == "gate_up":
                gate, up = w.chunk(2, 0)
                w = torch.cat([gate.chunk(tp, 0)[t], up.chunk(tp, 0)[t]])
            state[name] = w.clone()
        rank_dir = tmp_path / "iter_0000001" / f"mp_rank_{t:02d}"
        rank_dir.mkdir(parents=True)
        args = argparse.Namespace(tensor_model_parallel_size=tp, pipeline_model_parallel_size=1)
        torch.save({"model": state, "args": args, "iteration": 1}, rank_dir / "model_optim_rng.pt")
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("1")


@pytest.mark.parametrize("te", [False, True])
def test_legacy_tp_ranks_are_joined_as_the_rules_split_them(tmp_path, te):
    """Column (QKV, MLA's up projections, embedding), row (linear_proj), gate/up halves (fc1) and
    replicated (norms) tensors of two TP ranks join into the global tensors; MLA's down projection
    is column-parallel in the local spec and whole on every rank in TE's (fused layer norms)."""
    full = {"embedding.word_embeddings.weight": values((12, 4), seed=1),
            "decoder.layers.0.self_attention.linear_qkv.weight": values((8, 4), seed=2),
            "decoder.layers.0.self_attention.linear_proj.weight": values((4, 6), seed=3),
            "decoder.layers.0.mlp.linear_fc1.weight": values((8, 4), seed=4),
            "decoder.layers.0.self_attention.linear_q_up_proj.weight": values((6, 4), seed=5),
            "decoder.layers.0.self_attention.linear_kv_down_proj.weight": values((10, 4), seed=6),
            ("decoder.layers.0.self_attention.linear_kv_up_proj.layer_norm_weight" if te
             else "decoder.layers.0.input_layernorm.weight"): values((4,), seed=7)}
    save_legacy(tmp_path, 2, full, te)
    catalogue = megatron_legacy.read_catalogue(str(tmp_path))
    assert catalogue.mesh == "tp=2 x pp=1" and catalogue.world_size == 2
    for name, w in full.items():
        stacked = name.replace("decoder.layers.0.", "decoder.layers.")
        source = catalogue.tensors[stacked]
        lead = (0,) if stacked != name else ()
        assert source.shape == (1,) * len(lead) + tuple(w.shape), name
        out = OutputTensor(name, tuple(w.shape), of_torch(w.dtype), [SourceRows(stacked, lead, 0, w.shape[0])])
        assert torch.equal(produce(out, catalogue), w), name


def test_legacy_keys_of_some_layers_only_are_kept_per_layer(tmp_path):
    """Dense and MoE layers mixed (DeepSeek-V3's first dense layer): a key every layer has is
    stacked, one that only some have is kept per layer as torch_dist does, experts stacked in it."""
    qkv = values((2, 8, 4), seed=1)
    fc1, experts = values((8, 4), seed=2), values((3, 4, 6), seed=3)
    full = {"decoder.layers.0.self_attention.linear_qkv.weight": qkv[0],
            "decoder.layers.1.self_attention.linear_qkv.weight": qkv[1],
            "decoder.layers.0.mlp.linear_fc1.weight": fc1,
            **{f"decoder.layers.1.mlp.experts.local_experts.{j}.linear_fc2.weight": experts[j] for j in range(3)}}
    save_legacy(tmp_path, 2, full, te=False)
    tensors = megatron_legacy.read_catalogue(str(tmp_path)).tensors
    assert sorted(tensors) == ["decoder.layers.0.mlp.linear_fc1.weight",
                               "decoder.layers.1.mlp.experts.experts.linear_fc2.weight",
                               "decoder.layers.self_attention.linear_qkv.weight"]
    catalogue = megatron_legacy.read_catalogue(str(tmp_path))
    for name, index, expected in (("decoder.layers.self_attention.linear_qkv.weight", (1,), qkv[1]),
                                  ("decoder.layers.0.mlp.linear_fc1.weight", (), fc1),
                                  ("decoder.layers.1.mlp.experts.experts.linear_fc2.weight", (2,), experts[2])):
        out = OutputTensor(name, tuple(expected.shape), of_torch(expected.dtype),
                           [SourceRows(name, index, 0, expected.shape[0])])
        assert torch.equal(produce(out, catalogue), expected), name


# ---------------------------------------------------------------- segments

def test_cut_segments_keeps_whole_tensors_and_tiles_the_file():
    sizes = [10, 30, 5, 5, 100, 1]
    entries, offset = [], 0
    for k, n in enumerate(sizes):
        entries.append(FileEntry(OutputTensor(f"t{k}", (n,), UINT8, []), offset, offset + n))
        offset += n
    f = OutputFile("model.safetensors", entries, header=b"h" * 16)
    segments = cut_segments(f, 40)
    assert [(s.first, s.stop) for s in segments] == [(0, 2), (2, 4), (4, 5), (5, 6)]
    assert segments[0].start == 0 and segments[-1].end == f.size
    assert all(a.end == b.start for a, b in zip(segments, segments[1:]))
    assert [s.index for s in segments] == [0, 1, 2, 3]
    assert all(sum(sizes[s.first:s.stop]) <= 40 for s in segments if s.stop - s.first > 1)
    assert len(cut_segments(f, 10**9)) == 1


def test_band_type_names_its_fields():
    """The geometry is plain named data: printable, comparable, and the same on every rank."""
    w = SourceTensor("w", (2, 2), FLOAT32, [Piece("f", 0, (2, 2), (2, 1), (0, 0), FLOAT32)])
    catalogue = Catalogue("test", "/", ["f"], {"w": w}, None)
    out = OutputTensor("w", (2, 2), FLOAT32, [SourceRows("w", (), 0, 2)])
    band = bands(out, catalogue)[0]
    assert isinstance(band, Band) and band.runs == ((0, 2),) and band.reads[0].piece == 0
    assert bands(out, catalogue) == [band]
    assert "Read(piece=0, lead=(), first=0, stop=2, at=0)" in repr(band)


# ---------------------------------------------------------------- the engine, in process

def test_rank_engine_writes_copied_gathered_folded_and_zero_tensors(tmp_path, monkeypatch):
    """One rank runs a plan in process: a tensor copied file to file, a row-gathered one in many
    bands, a LoRA fold and a zero bias; safetensors reads back the expected values."""
    from safetensors.torch import load_file

    from distmerge.engine import RankRunner
    from distmerge.model import LoraDelta
    from distmerge.plan import make_plan
    from distmerge.runtime import Runtime

    monkeypatch.setattr(bands_mod, "BAND_BYTES", 4 * 6 * 4)  # 4 rows of 6 float32
    t = {"w": values((16, 6), seed=1), "q": values((16, 6), seed=2), "base": values((5, 6), seed=3),
         "lora_a": values((2, 6), seed=4), "lora_b": values((5, 2), seed=5)}
    catalogue = catalogue_of(tmp_path, t, cuts={"q": (0, 2)})
    order = rope_order(8)
    outputs = [OutputTensor("w", (16, 6), FLOAT32, [SourceRows("w", (), 0, 16)]),
               OutputTensor("q", (16, 6), FLOAT32, [SourceRows("q", (), 0, 16, order)]),
               OutputTensor("base", (5, 6), FLOAT32, [SourceRows("base", (), 0, 5)],
                            LoraDelta("lora_a", "lora_b", 0.5)),
               OutputTensor("bias", (3,), FLOAT32, [])]
    plan = make_plan(catalogue, outputs, 1, 10**9, "direct")
    staging = tmp_path / "staging"
    staging.mkdir()
    stats = RankRunner(plan, catalogue, str(staging), Runtime(), lambda n: None).run()
    written = load_file(staging / "model.safetensors")
    assert stats["bytes"] == plan.total_bytes
    assert torch.equal(written["w"], t["w"])
    assert torch.equal(written["q"], permute_like_hf(t["q"], 2))
    assert torch.equal(written["base"], t["base"] + (t["lora_b"] @ t["lora_a"]) * 0.5)
    assert torch.equal(written["bias"], torch.zeros(3))


@pytest.mark.timeout(10)
def test_brief_never_prints_a_nested_container():
    """A pickle can share members so that printing a value takes 2^depth steps: messages print
    scalars and flat lists of scalars only."""
    from distmerge.errors import brief

    bomb = (0, 0)
    for _ in range(60):
        bomb = (bomb, bomb)
    assert brief(bomb) == "a tuple of 2"
    assert brief([bomb]) == "a list of 1"
    assert brief([1, 2, "x"]) == "[1, 2, 'x']"
    assert brief("a\nb" * 100, 10) == "'a\\nba\\nba"
    assert brief(10 ** 5000) == "an integer too large to print"

"""Small pure functions of the plan and the FSDP reader."""
from __future__ import annotations

import os
import signal
import time

import pytest
import torch
from distmerge.cli import sigterm_unwinds
from distmerge.errors import MergeAbortedError, MergeError
from distmerge.plan import balance, group_into_files, in_runs, parse_size
from distmerge.sources.fsdp import shard_region

SHARD0 = ("shard", 0)
STRIDED0 = ("strided", 0, 2)  # FSDP's _StridedShard(0, split_factor=2) over TP's Shard(0)


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("500MB") == 500 * 10**6
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("1234") == 1234
    with pytest.raises(MergeError):
        parse_size("five")


@pytest.mark.parametrize("rows, world", [(10, 4), (5, 4), (2, 4), (1001, 2), (0, 3)])
def test_shard_region_follows_torch_chunk(rows, world):
    chunks = torch.arange(rows).chunk(world) if rows else ()
    covered = []
    for rank in range(world):
        offsets, sizes = shard_region((rows, 3), (world,), (rank,), (SHARD0,))
        expected = chunks[rank].tolist() if rank < len(chunks) else []
        assert list(range(offsets[0], offsets[0] + sizes[0])) == expected
        assert sizes[1] == 3
        covered += expected
    assert covered == list(range(rows))


def test_shard_region_fsdp_over_tp():
    # FSDP (mesh dim 0) over TP (mesh dim 1) on a column-parallel weight: TP splits first.
    seen = []
    for f in range(2):
        for t in range(2):
            offsets, sizes = shard_region((64, 8), (2, 2), (f, t), (STRIDED0, SHARD0))
            assert offsets[0] == t * 32 + f * 16 and sizes == [16, 8]
            seen.append(offsets[0])
    assert sorted(seen) == [0, 16, 32, 48]
    assert shard_region((64, 8), (2, 2), (1, 0), (("replicate",), ("shard", 1))) == ([0, 0], [64, 4])


def test_group_into_files_and_balance():
    class T:
        def __init__(self, n):
            self.nbytes = n
    groups = group_into_files([T(4), T(4), T(10), T(1)], 8)
    assert [[t.nbytes for t in g] for g in groups] == [[4, 4], [10], [1]]
    assert balance([10, 8, 1], 2) == [0, 1, 1]
    # segments go to ranks in runs of about equal bytes, in order: ranks keep to different files
    assert in_runs([4, 4, 4, 4], 2) == [0, 0, 1, 1]
    assert in_runs([4, 4, 4, 4, 4, 4], 3) == [0, 0, 1, 1, 2, 2]
    assert in_runs([10, 1, 1, 1], 2) == [0, 1, 1, 1]
    assert in_runs([3], 4) == [2] and in_runs([0, 0], 2) == [0, 0]


def test_fast_metadata_reader_agrees_with_torch_load(checkpoint):
    """The restricted unpickler and torch.load(weights_only=True) see the same tensors, offsets,
    shapes, placements and mesh coordinates, in every fixture layout."""
    import zipfile

    from conftest import LAYOUTS
    from distmerge.sources import torch_archive as ta

    for layout in LAYOUTS:
        for path in sorted(checkpoint(layout).glob("model_world_size_*.pt")):
            with zipfile.ZipFile(path) as z, open(path, "rb") as f:
                offsets = ta._record_offsets(f, z)
                pkl = next(n for n in z.namelist() if n.endswith("data.pkl"))
                fast = ta._convert_fast(ta._FastUnpickler(z.read(pkl), pkl[: -len("data.pkl")], offsets).load(), str(path))
            assert fast == ta._load_with_torch(str(path)), path


def test_only_the_first_sigterm_unwinds_and_the_cleanup_it_starts_finishes():
    """torchrun and the --local-ranks parent can both send SIGTERM: the second must not cut the
    cleanup (lock release, staging marked incomplete) that the first one started."""
    previous = signal.getsignal(signal.SIGTERM)
    cleaned = False
    with pytest.raises(MergeAbortedError, match="stopped by signal SIGTERM"):
        with sigterm_unwinds():
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)  # interrupted by the handler's exception
                raise AssertionError("SIGTERM did not unwind")
            finally:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.05)  # the handler runs here, and must not raise again
                cleaned = True
    assert cleaned
    assert signal.getsignal(signal.SIGTERM) is previous


def test_fast_metadata_reader_takes_the_mesh_shape_from_releases_before_mesh_layout(tmp_path, monkeypatch):
    """torch releases before _MeshLayout pickle a DeviceMesh's rank tensor (`mesh`, shaped like the
    mesh) and no `_layout`. Such a DTensor is written here by patching DeviceMesh's pickled state to
    that older form; the fast reader must take the mesh shape from the tensor (not fall back)."""
    import torch.distributed as dist
    from conftest import free_port
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    from distmerge.sources import torch_archive as ta

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1, 1), mesh_dim_names=("dp", "tp"))
        weight = distribute_tensor(torch.arange(12.0).view(4, 3), mesh, [Shard(0), Shard(1)])
        monkeypatch.setattr(DeviceMesh, "__getstate__", lambda self: {
            "device_type": "cpu", "mesh": torch.zeros(1, 1, dtype=torch.int), "_coordinate_on_dim": [0, 0],
            "_mesh_dim_names": ("dp", "tp")})
        torch.save({"w": weight}, tmp_path / "old_mesh.pt")
    finally:
        dist.destroy_process_group()
    stored = ta._convert_fast(ta._fast_load(str(tmp_path / "old_mesh.pt"), inert_unknown=False), "old_mesh.pt")["w"]
    assert (stored.shape, stored.mesh_shape, stored.coordinate, stored.mesh_dim_names) == ((4, 3), (1, 1), (0, 0),
                                                                                           ("dp", "tp"))
    assert stored.placements == (("shard", 0), ("shard", 1))


def test_verify_report_shows_no_worst_table_when_every_tensor_is_identical():
    from distmerge.verify import Report

    same = [{"name": f"t{i}", "equal": True, "max_abs": 0.0, "max_rel": 0.0} for i in range(3)]
    text = Report("x", compared=same).render()
    assert "bit-identical: 3 (all)" in text and "worst" not in text
    differs = same + [{"name": "bad", "equal": False, "max_abs": 1.0, "max_rel": 1.0}]
    assert "worst:" in Report("x", compared=differs).render()


def test_manifest_names_may_name_a_subdirectory_but_never_leave_the_target():
    from distmerge.verify import relative_name

    assert relative_name("model.safetensors") and relative_name("lora_adapter/adapter_model.safetensors")
    for bad in ("../secret", "/etc/passwd", "a/../../b", "a//b", "", "a\\b", 3, "lora_adapter/."):
        assert not relative_name(bad), bad

"""fscale.hw.mesh: torch's DeviceMesh (1-D, 2-D, sub-meshes) or None -> named dims and groups."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import fscale as fs
from fscale.hw import comm
from fscale.hw import mesh as meshes
from tests.dist import run_world
from tests.helpers import error_text

# ----------------------------------------------------------------------------- world of one


def test_none_is_the_whole_world_as_one_data_parallel_dim():
    m = meshes.resolve(None)
    assert m.dims == (meshes.WORLD_DIM,) == ("dp",)
    assert m.sizes == (1,) and m.size() == 1 and m.size("dp") == 1
    assert m.rank("dp") == 0
    assert m.group("dp") is None  # the comm table's "single" backend
    assert m.device_mesh is None
    assert repr(m) == "Mesh(dp=1)"
    assert comm.backend(m.group("dp")) == "single"


def test_a_resolved_mesh_resolves_to_itself():
    m = meshes.resolve(None)
    assert meshes.resolve(m) is m
    two = meshes.Mesh(("replicate", "shard"), (1, 1), (None, None))
    assert meshes.resolve(two) is two
    assert two.size() == 1 and two.rank("shard") == 0 and two.group("replicate") is None


def test_sizes_of_a_2d_mesh():
    m = meshes.Mesh(("replicate", "shard"), (3, 4), (None, None))
    assert m.size() == 12 and m.size("replicate") == 3 and m.size("shard") == 4
    assert repr(m) == "Mesh(replicate=3, shard=4)"


@pytest.mark.parametrize("bad", ["dp", 2, (2, 2), [0, 1], object()])
def test_anything_else_is_refused_naming_what_to_pass(bad):
    with pytest.raises(TypeError, match=r"mesh must be a torch DeviceMesh \(init_device_mesh"):
        meshes.resolve(bad)
    with pytest.raises(TypeError, match="mesh must be a torch DeviceMesh"):
        fs.train_step(lambda p, b: p["w"].sum(), fs.optim.sgd(0.1), mesh=bad)


@pytest.mark.parametrize("method", ["group", "size", "rank"])
def test_unknown_dim_lists_the_dims(method):
    m = meshes.Mesh(("replicate", "shard"), (1, 1), (None, None))
    with pytest.raises(
        ValueError,
        match=r"the mesh has no dim 'nope'; its dims are \['replicate', 'shard'\].*"
        r"mesh_dim_names",
    ):
        getattr(m, method)("nope")


def test_pick_defaults_to_the_last_dim_and_checks_a_given_one():
    m = meshes.Mesh(("replicate", "shard"), (1, 1), (None, None))
    assert meshes.pick(m, None, "x") == "shard"
    assert meshes.pick(m, "replicate", "x") == "replicate"
    with pytest.raises(
        ValueError, match=r"shard_zero\(shard_dim=\.\.\.\): the mesh has no dim 'nope'"
    ):
        meshes.pick(m, "nope", "shard_zero(shard_dim=...)")


# ----------------------------------------------------------------------------- gloo world of 4


def _ranks(group) -> list[int]:
    return sorted(dist.get_process_group_ranks(group))


def _summary(m: meshes.Mesh) -> dict:
    return {
        "dims": m.dims,
        "sizes": m.sizes,
        "size": m.size(),
        "rank": {d: m.rank(d) for d in m.dims},
        "groups": {d: _ranks(m.group(d)) for d in m.dims},
        # A collective on each dim's group: the sum of the global ranks in it.
        "sums": {
            d: comm.all_reduce(torch.tensor([float(dist.get_rank())]), group=m.group(d)).item()
            for d in m.dims
        },
    }


def _world_fn(rank, world):
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    out = {
        "2d": _summary(meshes.resolve(mesh)),
        "shard": _summary(meshes.resolve(mesh["shard"])),
        "replicate": _summary(meshes.resolve(mesh["replicate"])),
        "both": _summary(meshes.resolve(mesh["replicate", "shard"])),
        "1d_named": _summary(meshes.resolve(init_device_mesh("cpu", (4,), mesh_dim_names=("x",)))),
        "1d_unnamed": _summary(meshes.resolve(init_device_mesh("cpu", (4,)))),
        "none": _summary(meshes.resolve(None)),
        "2d_unnamed": error_text(lambda: meshes.resolve(init_device_mesh("cpu", (2, 2)))),
        "not_member": error_text(lambda: meshes.resolve(DeviceMesh("cpu", [0, 1]))),
    }
    # The step and shard_zero hold what they were given; a sub-mesh given to both is
    # the same mesh (mesh["shard"] is a new DeviceMesh object each time).
    step = fs.train_step(lambda p, b: p["w"].sum(), fs.optim.sgd(0.1), mesh=mesh["shard"])
    out["step"] = (step.mesh.dims, step.mesh.sizes, step.mesh.device_mesh == mesh["shard"])
    z = fs.shard_zero(step, 3, mesh=mesh["shard"])
    out["zero_sub"] = (z.mesh.dims, z.mesh.sizes, z.mesh.device_mesh == mesh["shard"])
    z = fs.shard_zero(fs.train_step(lambda p, b: p["w"].sum(), fs.optim.sgd(0.1)), 3, mesh=mesh)
    out["zero"] = (z.mesh.dims, z.mesh.sizes, z.mesh.device_mesh is mesh)
    return out


@pytest.fixture(scope="module")
def world4():
    return run_world(_world_fn, 4)


def test_a_2d_mesh_has_named_dims_coordinates_and_a_group_per_dim(world4):
    for rank, out in enumerate(world4):
        m = out["2d"]
        assert m["dims"] == ("replicate", "shard") and m["sizes"] == (2, 2) and m["size"] == 4
        # init_device_mesh lays ranks out row-major: [[0, 1], [2, 3]].
        assert m["rank"] == {"replicate": rank // 2, "shard": rank % 2}
        shard = [rank - rank % 2, rank - rank % 2 + 1]
        replicate = [rank % 2, rank % 2 + 2]
        assert m["groups"] == {"replicate": replicate, "shard": shard}
        assert m["sums"] == {"replicate": sum(replicate), "shard": sum(shard)}
        assert out["both"] == m  # mesh["replicate", "shard"] is the same mesh


def test_a_sub_mesh_is_a_1d_mesh_over_its_group(world4):
    for rank, out in enumerate(world4):
        for dim, group in (
            ("shard", [rank - rank % 2, rank - rank % 2 + 1]),
            ("replicate", [rank % 2, rank % 2 + 2]),
        ):
            m = out[dim]
            assert m["dims"] == (dim,) and m["sizes"] == (2,) and m["size"] == 2
            assert m["rank"] == {dim: group.index(rank)}
            assert m["groups"] == {dim: group} and m["sums"] == {dim: sum(group)}


def test_1d_meshes_keep_their_name_or_get_the_default_one(world4):
    for rank, out in enumerate(world4):
        assert out["1d_named"]["dims"] == ("x",)
        assert out["1d_unnamed"]["dims"] == ("dp",)
        for key in ("1d_named", "1d_unnamed"):
            m = out[key]
            assert m["sizes"] == (4,) and m["rank"] == {m["dims"][0]: rank}
            assert list(m["groups"].values()) == [[0, 1, 2, 3]]
            assert list(m["sums"].values()) == [6.0]
        # None: the whole world, rank and group of the default process group.
        assert out["none"]["dims"] == ("dp",) and out["none"]["sizes"] == (4,)
        assert out["none"]["rank"] == {"dp": rank} and out["none"]["sums"] == {"dp": 6.0}


def test_bad_device_meshes_raise_naming_the_fix(world4):
    for rank, out in enumerate(world4):
        assert out["2d_unnamed"].startswith("ValueError: a 2-D mesh needs dim names")
        assert "mesh_dim_names=('replicate', 'shard')" in out["2d_unnamed"]
        if rank < 2:
            assert out["not_member"] == "ok"
        else:
            assert out["not_member"] == (
                f"ValueError: rank {rank} is not in the mesh (ranks [0, 1]); every rank that "
                "runs the step must be in its mesh."
            )


def test_the_step_and_shard_zero_keep_the_mesh_they_were_given(world4):
    for out in world4:
        assert out["step"] == (("shard",), (2,), True)
        assert out["zero_sub"] == (("shard",), (2,), True)
        assert out["zero"] == (("replicate", "shard"), (2, 2), True)

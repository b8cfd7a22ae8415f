"""Bad meshes, unit policies and leaves fail when the step is built, naming the fix.

Mesh errors need a process group: one gloo world of 3 builds every bad case (and
trains the odd leaves below) and reports each rank's error messages.

"A leaf whose size cannot be placed": shard_zero pads dim 0 to a multiple of the
shard dim ([Note: shard layout]), so every size is placeable -- 0-d, one row on three
ranks, an odd row count, no rows, rows of nothing. What can be wrong is a
``Placement`` itself (a dim both sharded and replicated, a tensor dim it does not
have): those raise. The leaves are proved by round trip and training instead.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import fscale as fs
from fscale.placement import Placement, placement_of
from fscale.state import describe
from tests.dist import run_world
from tests.helpers import error_text

WORLD = 3


def _loss(p, b):
    return p["w"].sum()


def _step(**kw):
    return fs.train_step(_loss, fs.optim.sgd(0.1), **kw)


# ----------------------------------------------------------------------------- odd leaves


class _Odd(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.scale = nn.Parameter(torch.tensor(1.5))  # 0-d
        self.row = nn.Parameter(torch.randn(1, 5))  # one row: two of three ranks hold padding
        self.odd = nn.Parameter(torch.randn(7, 3))
        self.empty = nn.Parameter(torch.zeros(0, 4))  # no rows
        self.thin = nn.Parameter(torch.zeros(3, 0))  # rows of nothing

    def forward(self, x):
        h = self.scale * (x @ self.row.T) + (x[:, :3] @ self.odd.T).sum(1, keepdim=True)
        return h + self.empty.sum() + self.thin.sum()


def _odd_problem():
    params, apply = fs.functional(_Odd())

    def loss_fn(p, batch):
        return apply(p, batch).pow(2).mean()

    mask = fs.optim.decay_mask_default(params)
    opt = fs.optim.adamw(1e-2, weight_decay=0.1, mask=mask)
    return params, loss_fn, opt


def _odd_batches():
    g = torch.Generator().manual_seed(3)
    return [torch.randn(4 * WORLD, 5, generator=g) for _ in range(5)]


def _odd_train(rank, world, stage):
    params, loss_fn, opt = _odd_problem()
    full = {n: t.detach().clone() for n, t in params.items()}
    step = fs.train_step(loss_fn, opt)
    if stage:
        step = fs.shard_zero(step, stage)
    params, state = step.init(params)
    layout = {}
    if stage:
        for n, t in params.items() if stage == 3 else state["shard_zero"]["master"].items():
            p = placement_of(t)
            layout[n] = (tuple(t.shape), p.shape, p.local_shape(step.mesh))
        describe(state)  # every leaf describes itself
    round_trip = {n: t.clone() for n, t in fs.gather_params(params, state).items()}
    n = 4 * WORLD // world
    for batch in _odd_batches():
        params, state, _ = step(params, state, batch[rank * n : (rank + 1) * n])
    trained = {n: t.clone() for n, t in fs.gather_params(params, state).items()}
    return {"full": full, "round_trip": round_trip, "trained": trained, "layout": layout}


# ----------------------------------------------------------------------------- bad meshes


def _world_fn(rank, world):
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

    mesh = init_device_mesh("cpu", (1, world), mesh_dim_names=("replicate", "shard"))
    unnamed = init_device_mesh("cpu", (1, world))
    lonely = DeviceMesh("cpu", [0])  # ranks 1 and 2 are not in it
    out = {
        # torch refuses these itself, before fscale sees them.
        "too_big": error_text(lambda: init_device_mesh("cpu", (2, 2))),
        "no_such_rank": error_text(lambda: DeviceMesh("cpu", [0, 7])),
        "no_such_sub_mesh": error_text(lambda: mesh["nope"]),
        # fscale's own checks.
        "not_member_step": error_text(lambda: _step(mesh=lonely)),
        "not_member_zero": error_text(lambda: fs.shard_zero(_step(), 3, mesh=lonely)),
        "unnamed_step": error_text(lambda: _step(mesh=unnamed)),
        "unnamed_zero": error_text(lambda: fs.shard_zero(_step(), 2, mesh=unnamed)),
        "shard_dim": error_text(lambda: fs.shard_zero(_step(), 3, mesh=mesh, shard_dim="nope")),
        "sub_mesh_dim": error_text(
            lambda: fs.shard_zero(_step(), 3, mesh=mesh["shard"], shard_dim="replicate")
        ),
        "differs": error_text(lambda: fs.shard_zero(_step(mesh=mesh), 1, mesh=mesh["shard"])),
        "world_size": error_text(lambda: fs.shard_zero(_step(), 3, mesh=mesh, world_size=2)),
        # ...and what is fine.
        "same_mesh": error_text(lambda: fs.shard_zero(_step(mesh=mesh), 3, mesh=mesh)),
        "shard_over_replicate": error_text(
            lambda: fs.shard_zero(_step(), 1, mesh=mesh, shard_dim="replicate")
        ),
    }
    out["odd"] = {stage: _odd_train(rank, world, stage) for stage in (1, 2, 3)}
    return out


@pytest.fixture(scope="module")
def world3():
    return run_world(_world_fn, WORLD)


def test_meshes_torch_refuses(world3):
    for out in world3:
        assert out["too_big"].startswith("RuntimeError: Mesh should not be bigger than default")
        assert out["no_such_rank"].startswith("ValueError: Rank 7 is out of range")
        assert out["no_such_sub_mesh"].startswith("KeyError")
        assert "'nope'" in out["no_such_sub_mesh"]
        assert "['replicate', 'shard']" in out["no_such_sub_mesh"]


def test_a_rank_outside_the_mesh(world3):
    for rank, out in enumerate(world3):
        for key in ("not_member_step", "not_member_zero"):
            if rank == 0:
                assert out[key] == "ok"
            else:
                assert out[key] == (
                    f"ValueError: rank {rank} is not in the mesh (ranks [0]); every rank that "
                    "runs the step must be in its mesh."
                )


def test_a_2d_mesh_without_dim_names(world3):
    for out in world3:
        for key in ("unnamed_step", "unnamed_zero"):
            assert out[key] == (
                "ValueError: a 2-D mesh needs dim names; build it with "
                "init_device_mesh(..., mesh_dim_names=('replicate', 'shard'))."
            )


def test_a_shard_dim_the_mesh_does_not_have(world3):
    for out in world3:
        assert out["shard_dim"] == (
            "ValueError: shard_zero(shard_dim=...): the mesh has no dim 'nope'; its dims are "
            "['replicate', 'shard']. Pass one of them, or name the mesh's dims with "
            "init_device_mesh(..., mesh_dim_names=...)."
        )
        # A sub-mesh keeps only its own dim.
        assert out["sub_mesh_dim"].startswith(
            "ValueError: shard_zero(shard_dim=...): the mesh has no dim 'replicate'; its dims "
            "are ['shard']."
        )


def test_a_mesh_that_disagrees_with_the_step_or_world_size(world3):
    for out in world3:
        assert out["differs"] == (
            "ValueError: shard_zero's mesh differs from the step's mesh; pass the same mesh to "
            "train_step(mesh=...) and shard_zero(mesh=...), or only one of them."
        )
        assert out["world_size"].startswith(
            "ValueError: shard_zero(world_size=2) but the mesh dim 'shard' has 3 ranks; launch "
            "with that many processes"
        )
        assert out["same_mesh"] == "ok" and out["shard_over_replicate"] == "ok"


@pytest.mark.parametrize("bad", ["dp", (1, 2), 3])
def test_a_mesh_that_is_not_a_device_mesh(bad):
    msg = r"mesh must be a torch DeviceMesh \(init_device_mesh\(\.\.\.\)\), a sub-mesh"
    with pytest.raises(TypeError, match=msg):
        _step(mesh=bad)
    with pytest.raises(TypeError, match=msg):
        fs.shard_zero(_step(), 3, mesh=bad)


# ----------------------------------------------------------------------------- leaves


def test_placements_that_cannot_hold_a_leaf():
    with pytest.raises(ValueError, match=r"shards and replicates over the same mesh dims \['x'\]"):
        Placement((4, 2), shard=("x",), replicate=("x", "y"))
    with pytest.raises(ValueError, match=r"placement dim 2 is outside a tensor of shape \(4, 2\)"):
        Placement((4, 2), shard=("x",), dim=2)


def _rows(shape) -> tuple[int, ...]:
    shape = shape or (1,)  # a 0-d leaf is one row
    return (math.ceil(shape[0] / WORLD), *shape[1:])


def test_every_leaf_size_is_placed_and_round_trips(world3):
    reference = _odd_train(0, 1, 0)["trained"]  # the world of one, same global batches
    for rank, out in enumerate(world3):
        for stage, got in out["odd"].items():
            what = f"rank {rank} stage {stage}"
            for name, full in got["full"].items():
                # Each rank holds ceil(rows / 3) padded rows; the placement says so too.
                local, shape, placed = got["layout"][name]
                assert local == placed == _rows(full.shape), (what, name, local, placed)
                assert shape == tuple(full.shape), (what, name)
                assert torch.equal(got["round_trip"][name], full), (what, name)
                trained, want = got["trained"][name], reference[name]
                assert trained.shape == want.shape == full.shape, (what, name)
                if want.numel():
                    err = ((trained - want).abs().max() / want.abs().max()).item()
                    assert err <= 1e-5, f"{what} {name}: {err:.2e}"
            assert not torch.equal(got["trained"]["odd"], got["full"]["odd"]), what  # it trained


# ----------------------------------------------------------------------------- unit policies


class _Blocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(3, 4)
        self.blocks = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)])


def test_a_unit_policy_naming_no_module():
    model = _Blocks()
    with pytest.raises(
        ValueError,
        match=r"unit policy names \['nope'\], which _Blocks does not have; its modules "
        r"include \['embed', 'blocks', 'blocks\.0'",
    ):
        _step(model=model, units=["nope"])
    with pytest.raises(ValueError, match=r"unit policy names \[''\], which _Blocks"):
        _step(model=model, units=["blocks.0", ""])  # the root is not a unit


def test_a_unit_class_not_in_the_model():
    with pytest.raises(
        ValueError,
        match=r"unit policy selects no module of _Blocks \(modules of type Conv2d\); name a "
        r"module class it contains",
    ):
        _step(model=_Blocks(), units=nn.Conv2d)
    with pytest.raises(ValueError, match=r"selects no module of _Blocks"):
        _step(model=_Blocks(), units=lambda name, module: False)
    with pytest.raises(ValueError, match=r"selects no module of _Blocks \(\[\]\)"):
        _step(model=_Blocks(), units=[])


def test_unit_policies_of_the_wrong_kind():
    with pytest.raises(TypeError, match=r"unit policy must be a module class, a list of module"):
        _step(model=_Blocks(), units="blocks")
    with pytest.raises(ValueError, match=r"units=\.\.\.\) names modules of the model, but no"):
        _step(units=["blocks.0"])
    with pytest.raises(TypeError, match=r"model must be an nn\.Module or the apply of fs\.func"):
        _step(model=3)


def test_good_unit_policies():
    params, apply = fs.functional(_Blocks())
    assert _step(model=apply).units.names == ("blocks.0", "blocks.1")  # fs.functional's apply
    assert _step(model=_Blocks(), units=nn.Linear).units.names == (
        "embed",
        "blocks.0",
        "blocks.1",
    )
    assert _step(model=_Blocks(), units=["blocks"]).units.names == ("blocks",)


def test_a_unit_hook_without_a_model_or_units():
    def hook(name, forward):
        return forward

    with pytest.raises(
        ValueError,
        match=r"wrap wraps the model's units, but the step does not know the model: build it "
        r"with fs\.train_step\(loss_fn, opt, model=model\)",
    ):
        _step().with_transform(fs.Transform("wrap"), unit_hook=hook)
    flat = nn.Sequential(nn.Linear(2, 2))
    with pytest.raises(
        ValueError, match=r"Sequential has none \(no ModuleList\); pass train_step\(\.\.\., units"
    ):
        _step(model=flat).with_transform(fs.Transform("wrap"), unit_hook=hook)
    _step(model=flat, units=["0"]).with_transform(fs.Transform("wrap"), unit_hook=hook)

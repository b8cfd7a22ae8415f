"""Optimizers that take norms (LAMB's per-leaf trust ratio, clip_by_global_norm) equal the
world of one when shard_zero or tensor_parallel splits the leaves they see.

An elementwise optimizer is right on any shard; a norm is not: before
[Note: norms of sharded leaves] (fscale/optim/sharded.py) each rank took LAMB's
trust ratio of its own rows only and clipped by its own rows' norm, and trained
silently away from the reference. In float64, so the only differences left are
summation orders (1e-9).
"""

from __future__ import annotations

import copy

import pytest
import torch

import fscale as fs
from fscale.models import GPT, GPTConfig, gpt_loss
from tests.dist import run_world
from tests.helpers import error_text, max_rel_error, mlp, regression_batches, regression_loss

STEPS, SEQ, BATCH = 4, 8, 4
WIDTHS = (5, 7, 3)  # rows that 2 and 4 ranks split unevenly (padding, empty shards)


def _optimizer(kind: str):
    if kind == "lamb":
        return fs.optim.lamb(2e-2, weight_decay=0.1, mask=fs.optim.decay_mask_default)
    # A max norm well below the grads' norm: every step clips.
    return fs.optim.chain(fs.optim.clip_by_global_norm(0.05), fs.optim.adamw(1e-2))


def _problem(model_kind: str):
    torch.manual_seed(0)
    if model_kind == "gpt":
        model = GPT(GPTConfig.tiny(n_head=4, seq_len=SEQ, bias=False)).double()
        g = torch.Generator().manual_seed(7)
        batches = [
            {k: torch.randint(0, 256, (BATCH, SEQ), generator=g) for k in ("x", "y")}
            for _ in range(STEPS)
        ]
        return model, gpt_loss, batches
    if model_kind == "moe":  # capacity drops decided per rank: see _reference
        cfg = GPTConfig.moe_tiny(
            n_head=4, seq_len=SEQ, capacity_factor=1.0, min_capacity=1, bias=False
        )
        return GPT(cfg).double(), gpt_loss, _problem("gpt")[2]
    model = mlp(list(WIDTHS), seed=3).double()
    batches = regression_batches(STEPS, BATCH, WIDTHS[0], WIDTHS[-1])
    batches = [{k: v.double() for k, v in b.items()} for b in batches]
    return model, regression_loss, batches


def _mesh(layout, world):
    from torch.distributed.device_mesh import init_device_mesh

    if layout[0] == "hsdp":
        return init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard"))
    return init_device_mesh("cpu", (world,), mesh_dim_names=(layout[0],))


def _train(model_kind, opt_kind, layout, rank=0, world=1, accumulate=1):
    """``layout``: None (plain), ("zero" | "hsdp", stage), ("tp",), ("ep",) or
    ("offload",); every rank of a tp group sees the whole batch, data ranks a slice."""
    model, make_loss, batches = _problem(model_kind)
    params, apply = fs.functional(copy.deepcopy(model))
    kind = layout[0] if layout else None
    mesh = _mesh(layout, world) if kind in ("tp", "ep", "hsdp") else None
    step = fs.train_step(
        make_loss(apply), _optimizer(opt_kind), mesh=mesh, model=apply, accumulate=accumulate
    )
    per = BATCH // world
    if kind in ("zero", "hsdp"):
        step = fs.shard_zero(step, layout[1], mesh=mesh)
    elif kind == "offload":  # over shard_zero(1) on a world above one
        zero = fs.shard_zero(step, 1) if world > 1 else step
        step = fs.offload(zero, "cpu", overlap=False, subgroup_mb=1e-4)  # a group per leaf
    elif kind == "ep":
        step = fs.expert_parallel(step, dim="ep")
    elif kind == "tp":
        step, per = fs.tensor_parallel(step, dim="tp"), BATCH
    params, state = step.init(params)
    for batch in batches:
        start = 0 if per == BATCH else rank * per
        params, state, _ = step(
            params, state, {k: v[start : start + per] for k, v in batch.items()}
        )
    return fs.gather_params(params, state, mesh=step.mesh)


def _reference(model_kind, opt_kind, world):
    # An MoE rank routes (and drops over capacity) its own slice: the world of one
    # with one micro-batch per rank makes the same decisions.
    return _train(model_kind, opt_kind, None, accumulate=world if model_kind == "moe" else 1)


CASES = [
    *((m, o, ("zero", s)) for m in ("gpt", "mlp") for o in ("lamb", "clip") for s in (1, 2, 3)),
    *((m, o, (k,)) for m, k in (("gpt", "tp"), ("moe", "ep")) for o in ("lamb", "clip")),
    *(("mlp", o, ("hsdp", s)) for o in ("lamb", "clip") for s in (1, 3)),
]


def _world_fn(rank, world, cases):
    out = {case: _train(*case, rank=rank, world=world) for case in cases}
    for opt_kind in ("lamb", "clip"):
        case = ("mlp", opt_kind, ("offload",))
        out[case] = error_text(lambda o=opt_kind: _train("mlp", o, ("offload",), rank, world))
    return out


@pytest.mark.parametrize("world", [2, 4])
def test_norm_taking_optimizers_over_shards_equal_world_of_one(world):
    # World 2 runs every layout but HSDP; world 4 the MLP (its rows split unevenly, some
    # shards empty) under ZeRO and under HSDP (2 replicas x 2 shards).
    if world == 2:
        cases = [c for c in CASES if c[2][0] != "hsdp"]
    else:
        cases = [c for c in CASES if c[0] == "mlp"]
    results = run_world(_world_fn, world, cases)
    for model_kind, opt_kind, layout in cases:
        expected = _reference(model_kind, opt_kind, world)
        untrained = fs.functional(_problem(model_kind)[0])[0]
        assert max_rel_error(untrained, expected) > 1e-3  # the steps moved the params
        for rank, by_case in enumerate(results):
            got = by_case[(model_kind, opt_kind, layout)]
            err = max_rel_error(got, expected)
            assert err <= 1e-9, (model_kind, opt_kind, layout, rank, err)
    # Offload runs the optimizer a group of leaves at a time in a worker thread, where
    # no collective can run: a norm over shards or over every leaf is refused, by name.
    for by_case in results:
        lamb, clip = (by_case[("mlp", o, ("offload",))] for o in ("lamb", "clip"))
        assert lamb.startswith("RuntimeError: lamb takes a norm over leaves that offload"), lamb
        assert "train_step(clip_norm=...)" in lamb
        assert clip.startswith("RuntimeError: global_norm (clip_by_global_norm) takes a norm"), clip
        assert "every leaf, but offload" in clip


def test_offload_takes_whole_leaf_norms_and_refuses_a_norm_over_every_leaf():
    expected = _train("mlp", "lamb", None)
    assert max_rel_error(_train("mlp", "lamb", ("offload",)), expected) <= 1e-12
    text = error_text(lambda: _train("mlp", "clip", ("offload",)))
    assert "runs the optimizer on a group of leaves at a time" in text, text

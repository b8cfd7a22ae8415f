"""The MoE GPT under expert, tensor and data parallelism (and ZeRO-3) equals the world of one.

One gloo world of 4 runs every mesh of the MoE issue, each with and without
``shard_zero(3)``, for 5 AdamW steps: (dp=2, ep=2), (ep=4), (dp=2, tp=2) and
(tp=2, ep=2) (TED). The reference is the world of one with one micro-batch per data
rank (``accumulate=data ranks``): a rank routes, and drops over capacity, its own
tokens exactly as that micro-batch does, so routing, losses and params must agree.
Everything runs in float64 and must agree to 1e-9: float64 shows the maths is the
same. The same world also runs every mesh in fp32 ([Note: fp32 equality under Adam]).

[Note: fp32 equality under Adam]
In fp32 a rank's matmuls and all-reduces sum in another order than the world of one,
and AdamW amplifies that rounding: its step ``lr * m / (sqrt(v) + eps)`` is about
``lr`` whatever the grad's size, so an element whose grad is a cancelling sum (small
against its terms) moves by ``lr`` times its grad's *relative* rounding error; and at
step 1 (``g / (|g| + eps)``) an element with ``|g|`` near ``eps = 1e-8`` moves by
up to ``lr * dg / (4 eps)``: this model has such grads (e.g. 1.8e-8 in an expert's
``w_out``; measured: a 4e-10 grad difference moves it by 5.6e-5 = 0.6% of ``lr``).
Those param differences feed the next steps' grads. Measured after 5 steps (lr=1e-2;
2026-12, CPU): the fp32 world of one is itself 4e-4 (ep meshes, 4 micro-batches) to
1e-3 (tp meshes, 2) from float64 in the worst element relative to its tensor's
max-abs, 1.3e-5 to 3.1e-5 norm-wise in the worst tensor, 4.9e-6 to 1.2e-5 norm-wise
over all params; the parallel fp32 runs are that far from it (tp meshes: 9e-4,
3.2e-5, 1.1e-5) and as far from float64 as it is. With SGD instead of AdamW every
one of these is below 2e-7: rounding, amplified by Adam, not a wrong sum. So the
fp32 test asks what the parallel run can promise in fp32: the same routing decision
in every router call, losses to 1e-6, and params that add at most 1e-5 (norm-wise
over all params, relative) to the fp32 world of one's own distance from exact
arithmetic (the float64 world of one), with no element more than three times as far
from it as the world of one's worst (the worst element is one element's rounding: on
2026-12-04's CPU the (tp, ep) meshes' reached 2.04x, 1.44e-3 against 7.1e-4, with
every norm-wise bound held). A wrong expert slice, shard or scale moves params by
orders of magnitude more than rounding does (the float64 test pins those to 1e-9).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import itertools
import sys

import pytest
import torch

import fscale as fs
import fscale.models.moe  # noqa: F401  (its route is recorded: _routing_recorded)
from fscale.models import GPT, GPTConfig, gpt_loss
from tests.dist import run_world
from tests.helpers import max_rel_error

STEPS, SEQ, PER = 5, 8, 2
MESHES = [(("dp", "ep"), (2, 2)), (("ep",), (4,)), (("dp", "tp"), (2, 2)), (("tp", "ep"), (2, 2))]


def _model(dtype) -> GPT:
    torch.manual_seed(0)
    cfg = GPTConfig.moe_tiny(n_head=4, seq_len=SEQ, capacity_factor=1.0, min_capacity=1, bias=False)
    return GPT(cfg).to(dtype)


def _data_ranks(names, sizes) -> int:
    return int(torch.tensor([s for n, s in zip(names, sizes, strict=True) if n != "tp"]).prod())


@contextlib.contextmanager
def _routing_recorded():
    """Every router decision made inside: ``(experts [T, k], kept [k * T])`` per call."""
    module = sys.modules["fscale.models.moe"]
    calls, original = [], module.route

    def route(logits, **kwargs):
        r = original(logits, **kwargs)
        calls.append((r.experts.clone(), r.pos >= 0))
        return r

    module.route = route
    try:
        yield calls
    finally:
        module.route = original


def _train(names, sizes, mesh=None, data_rank=0, zero=False, extra=None, dtype=None):
    """``(params, losses, layout, whole params, router decisions)`` after STEPS steps."""
    if dtype is None:
        dtype = torch.float64 if extra != "bf16" else torch.float32
    data = _data_ranks(names, sizes)
    params, apply = fs.functional(copy.deepcopy(_model(dtype)))
    step = fs.train_step(
        gpt_loss(apply), fs.optim.adamw(1e-2, weight_decay=0.1), mesh=mesh, model=apply,
        accumulate=1 if mesh is not None else data, clip_norm=0.5,
    )  # fmt: skip
    if mesh is not None:
        if "ep" in names:
            step = fs.expert_parallel(step, dim="ep")
        if "tp" in names:
            step = fs.tensor_parallel(step, dim="tp")
        if extra == "checkpoint":
            step = fs.checkpoint_activations(step)
        if extra == "bf16":
            step = fs.mixed_precision(step, "bf16")
        if zero:
            step = fs.shard_zero(step, 3, shard_dim="ep" if "dp" not in names else "dp")
    params, state = step.init(params)
    layout = dict(zip(state["layout"].paths, state["layout"].placements, strict=True))
    g = torch.Generator().manual_seed(3)
    losses = []
    with _routing_recorded() as routes:
        for _ in range(STEPS):
            batch = {k: torch.randint(0, 256, (PER * data, SEQ), generator=g) for k in ("x", "y")}
            if mesh is not None:
                batch = {k: v[PER * data_rank : PER * (data_rank + 1)] for k, v in batch.items()}
            params, state, metrics = step(params, state, batch)
            losses.append(float(metrics["loss"]))
    whole = fs.gather_params(params, state, mesh=step.mesh) if mesh is not None else None
    if zero:
        params = fs.gather_params(params, state)
    params = {k: v.detach().clone() for k, v in params.items()}
    return params, losses, layout, whole, routes


@functools.cache
def _reference(data: int, dtype: torch.dtype):
    """The world of one with ``data`` micro-batches (shared by the tests)."""
    return _train(("dp",), (data,), dtype=dtype)


def _rank(rank, world):
    from torch.distributed.device_mesh import init_device_mesh

    out = {}
    for names, sizes in MESHES:
        mesh = init_device_mesh("cpu", sizes, mesh_dim_names=names)
        data_rank = 0
        for n in names:  # rank-major over the data dims
            if n != "tp":
                data_rank = data_rank * mesh[n].size() + mesh[n].get_local_rank()
        coords = {n: mesh[n].get_local_rank() for n in names}
        for zero in (False, True):
            params, losses, layout, whole, _ = _train(names, sizes, mesh, data_rank, zero)
            out[names, zero] = (params, losses, layout if not zero else None, coords, whole)
            # [Note: fp32 equality under Adam]: full params, losses, router decisions.
            _, losses, _, whole, routes = _train(
                names, sizes, mesh, data_rank, zero, dtype=torch.float32
            )
            out[names, zero, "fp32"] = (whole, losses, routes, data_rank)
        if names == ("tp", "ep"):  # TED inside activation checkpointing, and under bf16
            for extra in ("checkpoint", "bf16"):
                params, losses, layout, whole, _ = _train(
                    names, sizes, mesh, data_rank, True, extra
                )
                out[names, extra] = (params, losses, layout, coords, whole)
    return out


def _assemble(pieces, placement, mesh_sizes) -> torch.Tensor:
    """The full tensor from every rank's piece, placed by its mesh coordinates."""
    full = torch.full(placement.shape, float("nan"), dtype=pieces[0][0].dtype)
    for piece, coords in pieces:
        index = [slice(None)] * len(placement.shape)
        part = 0
        for d in placement.shard:
            part = part * mesh_sizes[d] + coords[d]
        parts = placement.parts(type("M", (), {"size": lambda self, d: mesh_sizes[d]})())
        axis, chunks = placement.dim, placement.chunks
        rows = placement.shape[axis] // chunks // parts
        view = full
        for dim, extra_axis in placement.extra:
            n = placement.shape[extra_axis] // mesh_sizes[dim]
            index[extra_axis] = slice(coords[dim] * n, (coords[dim] + 1) * n)
        for k in range(chunks):
            index[axis] = slice(
                k * parts * rows + part * rows, k * parts * rows + (part + 1) * rows
            )
            view[tuple(index)] = piece.narrow(axis, k * rows, rows)
    assert not torch.isnan(full).any()
    return full


@pytest.fixture(scope="module")
def world():
    return run_world(_rank, 4, timeout=300)


@pytest.mark.parametrize(("mesh", "zero"), list(itertools.product(MESHES, (False, True))))
def test_moe_gpt_equals_world_of_one(world, mesh, zero):
    names, sizes = mesh
    expected, expected_losses = _reference(_data_ranks(names, sizes), torch.float64)[:2]
    tol = 1e-9
    layout = world[0][names, False][2]
    full = {}
    for name, placement in layout.items():
        if placement is None or not placement.split_dims:
            full[name] = world[0][names, zero][0][name]
            continue
        pieces = [(world[r][names, zero][0][name], world[r][names, zero][3]) for r in range(4)]
        full[name] = _assemble(pieces, placement, dict(zip(names, sizes, strict=True)))
    for r in range(4):
        assert world[r][names, zero][1] == pytest.approx(expected_losses, rel=tol)
    assert max_rel_error(full, expected) <= tol
    # fs.gather_params(..., mesh=step.mesh) puts the slices back together on every rank.
    for r in range(4):
        assert max_rel_error(world[r][names, zero][4], expected) <= tol
    split_over_ep = [n for n, p in layout.items() if p is not None and "ep" in p.split_dims]
    assert bool(split_over_ep) == ("ep" in names)
    assert all(".experts." in n for n in split_over_ep)


def test_ted_with_checkpointing_and_bf16(world):
    """shard_zero(3) over checkpoint_activations / mixed_precision over TED: activation
    checkpointing changes no bit (float64, 1e-9); bf16 compute stays within 2% of the
    fp32 world of one's losses (routing is decided on fp32 router logits)."""
    names, sizes = ("tp", "ep"), (2, 2)
    expected, expected_losses = _reference(_data_ranks(names, sizes), torch.float64)[:2]
    for r in range(4):
        assert world[r][names, "checkpoint"][1] == pytest.approx(expected_losses, rel=1e-9)
        assert max_rel_error(world[r][names, "checkpoint"][4], expected) <= 1e-9
        assert world[r][names, "bf16"][1] == pytest.approx(expected_losses, rel=2e-2)


def _normwise(a: dict, b: dict) -> float:
    """``||a - b|| / ||b||`` over every param at once."""
    num = sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in b)
    return (num / sum(float(b[k].double().pow(2).sum()) for k in b)) ** 0.5


@pytest.mark.parametrize(("mesh", "zero"), list(itertools.product(MESHES, (False, True))))
def test_moe_gpt_in_fp32_equals_world_of_one(world, mesh, zero):
    """fp32, 5 AdamW steps ([Note: fp32 equality under Adam]): the same routing
    decision in every router call, losses to 1e-6, params adding at most 1e-5
    (norm-wise, relative) to the fp32 world of one's own distance from float64."""
    names, sizes = mesh
    data = _data_ranks(names, sizes)
    ref32, losses32, _, _, routes32 = _reference(data, torch.float32)
    exact = _reference(data, torch.float64)[0]
    whole, _, _, _ = world[0][names, zero, "fp32"]
    layers = len(routes32) // (STEPS * data)
    for r in range(4):
        got, losses, routes, data_rank = world[r][names, zero, "fp32"]
        # Every rank ends with the same full params (fs.gather_params).
        assert all(torch.equal(got[k], whole[k]) for k in whole), r
        assert losses == pytest.approx(losses32, rel=1e-6, abs=0), (r, losses, losses32)
        # A rank routes its micro-batch: call (step s, layer b) is the world of one's
        # call b of micro-batch data_rank in step s. The same choices, the same drops.
        assert len(routes) == STEPS * layers
        for s, b in itertools.product(range(STEPS), range(layers)):
            (experts, kept), (want_experts, want_kept) = (
                routes[s * layers + b],
                routes32[(s * data + data_rank) * layers + b],
            )
            assert torch.equal(experts, want_experts), (r, s, b)
            assert torch.equal(kept, want_kept), (r, s, b)
    floor = _normwise(ref32, exact)  # fp32's own error on one process
    assert _normwise(whole, exact) <= floor + 1e-5, (_normwise(whole, exact), floor)
    assert _normwise(whole, ref32) <= floor + 1e-5, (_normwise(whole, ref32), floor)
    assert max_rel_error(whole, exact) <= 3 * max_rel_error(ref32, exact), (
        max_rel_error(whole, exact),
        max_rel_error(ref32, exact),
    )

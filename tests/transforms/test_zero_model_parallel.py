"""shard_zero over expert_parallel / tensor_parallel equals the world of one.

One gloo world of 4 runs every configuration (a world costs seconds to start):

- ``shard_zero(expert_parallel(step), stage)`` on (dp=2, ep=2), stages 1, 2, 3
  sharded over dp, and stage 3 sharded over ep (the expert banks, split over ep,
  are then kept whole): the toy MoE of test_expert_parallel.py; reference: the world
  of one with one micro-batch per rank (``accumulate=4``);
- ``shard_zero(tensor_parallel(step), stage)`` on (dp=2, tp=2), stages 1, 2, 3: the
  dense tiny GPT in float64 (see test_tensor_parallel.py); reference: the world of
  one on the global batch;
- ``shard_zero(tensor_parallel(expert_parallel(step)), 3)`` on (tp=2, ep=2): the MoE
  GPT in float64; reference: the world of one with one micro-batch per data rank.

Params are gathered with ``fs.gather_params`` (ZeRO's rows), then the model-parallel
slices are put back together across ranks, as the EP / TP tests do.
"""

from __future__ import annotations

import copy

import pytest
import torch

import fscale as fs
from fscale.models import GPT, GPTConfig, gpt_loss
from tests.dist import run_world
from tests.helpers import error_text, max_rel_error
from tests.transforms.test_expert_parallel import ToyBank, ToyNet
from tests.transforms.test_expert_parallel import _batches as toy_batches
from tests.transforms.test_expert_parallel import _loss as toy_loss

STEPS, SEQ, PER = 3, 8, 2
OPT = lambda: fs.optim.adamw(1e-2, weight_decay=0.1)


# ----------------------------------------------------------------------------- runs


def _toy(mesh, rank, stage, shard_dim, accumulate=1):
    """The toy MoE; on a mesh: shard_zero(expert_parallel(step)); rank = data rank."""
    params, apply = fs.functional(copy.deepcopy(ToyNet()))
    step = fs.train_step(
        toy_loss(apply), OPT(), mesh=mesh, model=apply, accumulate=accumulate, clip_norm=0.5
    )
    if mesh is not None:
        step = fs.expert_parallel(step, dim="ep", experts=ToyBank)
        step = fs.shard_zero(step, stage, shard_dim=shard_dim)
    params, state = step.init(params)
    per = 8 // (4 if mesh is not None else 1)
    losses = []
    for batch in toy_batches(8):
        local = {k: v[per * rank : per * (rank + 1)] for k, v in batch.items()}
        params, state, metrics = step(params, state, local)
        losses.append(float(metrics["loss"]))
    return params, state, losses


def _gpt(experts: int) -> GPT:
    torch.manual_seed(0)
    cfg = GPTConfig.tiny(n_head=4, seq_len=SEQ)
    if experts:
        cfg = GPTConfig.tiny(n_head=4, seq_len=SEQ, experts=experts, top_k=2, capacity_factor=None)
    return GPT(cfg).double()


def _gpt_batches(data_ranks: int):
    g = torch.Generator().manual_seed(7)
    n = PER * data_ranks
    return [
        {k: torch.randint(0, 256, (n, SEQ), generator=g) for k in ("x", "y")} for _ in range(STEPS)
    ]


def _clip(experts: int):
    # TED included: a bank split over ep and tp carries both (Placement.extra), so the
    # grad norm sums its squares over both dims.
    return 0.5


def _gpt_run(mesh, data_rank, data_ranks, experts, stage=None, accumulate=1, layout_only=False):
    """The GPT; on a mesh: shard_zero(tensor_parallel([expert_parallel](step)), stage)."""
    params, apply = fs.functional(copy.deepcopy(_gpt(experts)))
    step = fs.train_step(
        gpt_loss(apply), OPT(), mesh=mesh, model=apply, accumulate=accumulate,
        clip_norm=_clip(experts),
    )  # fmt: skip
    if mesh is not None:
        if experts and not layout_only:
            step = fs.expert_parallel(step, dim="ep")
        step = fs.tensor_parallel(step, dim="tp")
        if layout_only:  # tensor_parallel's placements alone, to put slices back together
            laid, _ = step.init(params)
            return {k: getattr(v, "_fscale_placement", None) for k, v in laid.items()}
        step = fs.shard_zero(step, stage)
    params, state = step.init(params)
    losses = []
    for batch in _gpt_batches(data_ranks):
        local = {k: v[PER * data_rank : PER * (data_rank + 1)] for k, v in batch.items()}
        params, state, metrics = step(params, state, local)
        losses.append(float(metrics["loss"]))
    return params, state, losses


def _finish(params, state, losses):
    full = fs.gather_params(params, state)  # collective: every rank of the shard group
    return {k: v.detach().clone() for k, v in full.items()}, losses


def _rank(rank, world):
    from torch.distributed.device_mesh import init_device_mesh

    out = {}
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "ep"))
    for stage, shard_dim in ((1, "dp"), (2, "dp"), (3, "dp"), (3, "ep")):
        out["ep", stage, shard_dim] = _finish(*_toy(mesh, rank, stage, shard_dim))
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    dp = mesh["dp"].get_local_rank()
    out["tp", "layout"] = _gpt_run(mesh, dp, 2, 0, layout_only=True)
    for stage in (1, 2, 3):
        out["tp", stage] = _finish(*_gpt_run(mesh, dp, 2, 0, stage))
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("tp", "ep"))
    ep = mesh["ep"].get_local_rank()
    out["ted", "layout"] = _gpt_run(mesh, ep, 2, 4, layout_only=True)
    out["ted", 3] = _finish(*_gpt_run(mesh, ep, 2, 4, 3))
    return out


def _unsplit(pieces: list[torch.Tensor], placement) -> torch.Tensor:
    """The full tensor from every tp rank's piece (each holds its part of every chunk)."""
    chunked = [p.chunk(placement.chunks, dim=placement.dim) for p in pieces]
    return torch.cat(
        [torch.cat([c[i] for c in chunked], dim=placement.dim) for i in range(placement.chunks)],
        dim=placement.dim,
    )


@pytest.fixture(scope="module")
def results():
    return run_world(_rank, 4, timeout=300)


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("stage,shard_dim", [(1, "dp"), (2, "dp"), (3, "dp"), (3, "ep")])
def test_zero_over_expert_parallel(results, stage, shard_dim):
    expected, expected_losses = _finish(*_toy(None, 0, None, None, accumulate=4))
    key = ("ep", stage, shard_dim)
    for rank in range(4):  # mesh (dp, ep): rank = 2 * dp + ep
        params, losses = results[rank][key]
        assert losses == pytest.approx(expected_losses, rel=1e-6)
        dense = {k: v for k, v in params.items() if ".experts." not in k}
        assert max_rel_error(dense, {k: expected[k] for k in dense}) <= 1e-5
        assert params["blocks.0.experts.w_in"].shape[0] == 2  # this ep rank's experts
    for dp in range(2):
        bank = {
            k: torch.cat([results[2 * dp + e][key][0][k] for e in range(2)])
            for k in expected
            if ".experts." in k
        }
        assert max_rel_error(bank, {k: expected[k] for k in bank}) <= 1e-5


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_over_tensor_parallel(results, stage):
    params, apply = fs.functional(copy.deepcopy(_gpt(0)))
    step = fs.train_step(gpt_loss(apply), OPT(), model=apply, clip_norm=0.5)
    params, state = step.init(params)
    expected_losses = []
    for batch in _gpt_batches(2):
        params, state, metrics = step(params, state, batch)
        expected_losses.append(float(metrics["loss"]))
    layout = results[0]["tp", "layout"]
    assert any(p is not None and p.sharded for p in layout.values())
    for dp in range(2):  # mesh (dp, tp): rank = 2 * dp + tp
        got = [results[2 * dp + t]["tp", stage] for t in range(2)]
        for _, losses in got:
            assert losses == pytest.approx(expected_losses, rel=1e-12)
        full = {
            k: got[0][0][k]
            if p is None or not p.sharded
            else _unsplit([got[t][0][k] for t in range(2)], p)
            for k, p in layout.items()
        }
        assert max_rel_error(full, params) <= 1e-9


def test_zero3_over_ted(results):
    params, apply = fs.functional(copy.deepcopy(_gpt(4)))
    step = fs.train_step(gpt_loss(apply), OPT(), model=apply, accumulate=2, clip_norm=_clip(4))
    params, state = step.init(params)
    expected_losses = []
    for batch in _gpt_batches(2):
        params, state, metrics = step(params, state, batch)
        expected_losses.append(float(metrics["loss"]))
    layout = results[0]["ted", "layout"]  # tensor_parallel's splits (experts: then ep, dim 0)
    for rank in range(4):
        assert results[rank]["ted", 3][1] == pytest.approx(expected_losses, rel=1e-12)
    full = {}
    for name, p in layout.items():
        # mesh (tp, ep): rank = 2 * tp + ep
        by_ep = []
        for e in range(2):
            pieces = [results[2 * t + e]["ted", 3][0][name] for t in range(2)]
            tp_split = p is not None and p.sharded and "tp" in p.shard
            by_ep.append(_unsplit(pieces, p) if tp_split else pieces[0])
        full[name] = torch.cat(by_ep) if ".experts." in name else by_ep[0]
    assert max_rel_error(full, params) <= 1e-9


# ----------------------------------------------------------------------------- errors


def _errors(rank, world):
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    params, apply = fs.functional(_gpt(0))
    step = fs.train_step(gpt_loss(apply), OPT(), mesh=mesh, model=apply)
    tp = fs.tensor_parallel(step, dim="tp")
    on_tp = error_text(lambda: fs.shard_zero(tp, 3, shard_dim="tp"))
    default = fs.shard_zero(tp, 3)  # the last *data* dim, not tp
    # fs.save refuses rows of slices split along dim 1 (Rowwise) or in fused chunks (qkv).
    params, state = fs.shard_zero(tp, 1).init(params)
    save = error_text(lambda: fs.save("/nonexistent-never-written", params, state))
    return on_tp, default.policy(fs.policies.ZeroPolicy), save


def test_build_errors(results):
    on_tp, policy, save = run_world(_errors, 4)[0]
    assert "shards over tensor_parallel's dim; shard over a data dim" in on_tp
    assert policy.shard_dim == "dp" and policy.replicate_dims == ()
    assert "fs.save" in save and "no placement on the full tensor" in save

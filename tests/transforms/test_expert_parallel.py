"""expert_parallel on gloo worlds equals the world of one: same routing, same params.

The reference is the world of one on the global batch with one micro-batch per
rank (``accumulate=world``): a rank routes (and drops, under a capacity) its own
tokens, exactly as a micro-batch of that size does. The toy bank below follows the
expert-bank contract of ``fscale.models.moe.Experts`` (stacked weights on dim 0,
``forward(tokens sorted by expert, counts)``) with a plain loop, so these tests pin
the transform alone; tests/models/test_moe.py runs the MoE GPT.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fscale as fs
from fscale.transforms.expert_parallel import _expert_major
from tests.dist import run_world
from tests.helpers import error_text, max_rel_error

EXPERTS, DIM, HIDDEN, SEQ, STEPS = 4, 6, 5, 3, 3


class ToyBank(nn.Module):
    """Every expert's two weights stacked on dim 0; a loop over experts (the contract)."""

    def __init__(self, experts: int):
        super().__init__()
        self.w_in = nn.Parameter(torch.randn(experts, DIM, HIDDEN) * 0.3)
        self.w_out = nn.Parameter(torch.randn(experts, HIDDEN, DIM) * 0.3)

    def forward(self, x, counts):
        assert counts.numel() == self.w_in.shape[0]
        outs = [
            torch.tanh(part @ self.w_in[e]) @ self.w_out[e]
            for e, part in enumerate(torch.split(x, counts.tolist()))
        ]
        return torch.cat(outs) if outs else x[:0]


class ToyMoE(nn.Module):
    """Top-2 softmax routing, dropless, tokens sorted by expert for the bank."""

    def __init__(self, experts: int):
        super().__init__()
        self.router = nn.Linear(DIM, experts, bias=False)
        self.experts = ToyBank(experts)
        self.num_experts = experts

    def forward(self, h):
        x = h.reshape(-1, DIM)
        weights, chosen = F.softmax(self.router(x), -1).topk(2, dim=-1)
        flat = chosen.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.num_experts)
        y = self.experts(x.repeat_interleave(2, 0)[order], counts)
        out = torch.zeros_like(y).index_copy(0, order, y)
        out = (out.view(-1, 2, DIM) * weights.unsqueeze(-1)).sum(1)
        return h + out.view_as(h)


class ToyNet(nn.Module):
    def __init__(self, experts: int = EXPERTS):
        super().__init__()
        torch.manual_seed(5)
        self.embed = nn.Linear(2, DIM)
        self.blocks = nn.ModuleList(ToyMoE(experts) for _ in range(2))
        self.head = nn.Linear(DIM, 1)

    def forward(self, x):
        h = self.embed(x)
        for block in self.blocks:
            h = block(h)
        return self.head(h).squeeze(-1)


def _batches(global_batch: int):
    g = torch.Generator().manual_seed(11)
    return [
        {
            "x": torch.randn(global_batch, SEQ, 2, generator=g),
            "y": torch.randn(global_batch, SEQ, generator=g),
        }
        for _ in range(STEPS)
    ]


def _loss(apply):
    return lambda p, b: F.mse_loss(apply(p, b["x"]), b["y"])


def _train(mesh, rank: int, world: int, ep_dim: str | None, accumulate: int = 1, ranks=None):
    model = ToyNet()
    params, apply = fs.functional(copy.deepcopy(model))
    step = fs.train_step(
        _loss(apply), fs.optim.adamw(1e-2, weight_decay=0.1), mesh=mesh, model=apply,
        accumulate=accumulate, clip_norm=0.5,
    )  # fmt: skip
    if ep_dim is not None:
        step = fs.expert_parallel(step, dim=ep_dim, experts=ToyBank)
    params, state = step.init(params)
    batches = _batches(2 * (ranks or world))
    per = 2 * (ranks or world) // world
    losses = []
    for batch in batches:
        local = {k: v[per * rank : per * (rank + 1)] for k, v in batch.items()}
        params, state, metrics = step(params, state, local)
        losses.append(float(metrics["loss"]))
    return {k: v.detach().clone() for k, v in params.items()}, losses, metrics


def _reference(world: int):
    return _train(None, 0, 1, None, accumulate=world, ranks=world)


def _rank(rank, world, shapes):
    from torch.distributed.device_mesh import init_device_mesh

    out = {}
    for names, sizes in shapes:
        mesh = init_device_mesh("cpu", sizes, mesh_dim_names=names)
        params, losses, metrics = _train(mesh, rank, world, "ep")
        out[names] = (params, losses, metrics["comm_bytes_by_tag"])
    return out


def _full(results, names, sizes, name):
    """An expert weight put back together from the ranks along ``ep`` (first row)."""
    ep = sizes[names.index("ep")]
    stride = 1 if names[-1] == "ep" else sizes[-1]
    return torch.cat([results[r * stride][names][0][name] for r in range(ep)])


@pytest.mark.parametrize(
    "world,shapes",
    [
        (2, [(("ep",), (2,))]),
        (4, [(("dp", "ep"), (2, 2)), (("ep",), (4,))]),
    ],
)
def test_expert_parallel_equals_world_of_one(world, shapes):
    expected, expected_losses, _ = _reference(world)
    results = run_world(_rank, world, shapes)
    for names, sizes in shapes:
        for rank in range(world):
            params, losses, tags = results[rank][names]
            assert losses == pytest.approx(expected_losses, rel=1e-6)
            assert {"ep.dispatch", "ep.combine", "ep.counts"} <= set(tags)
            dense = {k: v for k, v in params.items() if ".experts." not in k}
            assert max_rel_error(dense, {k: expected[k] for k in dense}) <= 1e-5
            local = EXPERTS // sizes[names.index("ep")]
            assert params["blocks.0.experts.w_in"].shape[0] == local
        bank = {k: _full(results, names, sizes, k) for k in expected if ".experts." in k}
        assert max_rel_error(bank, {k: expected[k] for k in bank}) <= 1e-5


def test_expert_major_order():
    # Two sources, two local experts: segments arrive (s0e0=2, s0e1=1, s1e0=1, s1e1=3).
    received = torch.tensor([[2, 1], [1, 3]])
    order = _expert_major(received)
    # Expert-major: e0 from s0 (rows 0,1), e0 from s1 (row 3), e1 from s0 (row 2), e1 from s1.
    assert order.tolist() == [0, 1, 3, 2, 4, 5, 6]


def _bad_rank(rank, world):
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("ep",))
    model = ToyNet(experts=3)
    params, apply = fs.functional(model)
    step = fs.train_step(_loss(apply), fs.optim.sgd(0.1), mesh=mesh, model=apply)
    uneven = error_text(lambda: fs.expert_parallel(step, experts=ToyBank))
    no_dim = error_text(lambda: fs.expert_parallel(step, dim="expert", experts=ToyBank))
    model = ToyNet()
    params, apply = fs.functional(model)
    step = fs.train_step(_loss(apply), fs.optim.sgd(0.1), mesh=mesh, model=apply)
    report = fs.explain(fs.expert_parallel(step, experts=ToyBank), params)
    return uneven, no_dim, report, params


def test_build_errors_and_explain():
    uneven, no_dim, report, params = run_world(_bad_rank, 2)[0]
    # explain: the mesh, and each rank's bytes with half of every bank.
    full = sum(t.numel() * 4 for t in params.values())
    banks = sum(t.numel() * 4 for n, t in params.items() if ".experts." in n)
    per_rank = full - banks // 2
    assert "Mesh(ep=2)" in report and "ep.dispatch" in report
    assert f"({per_rank / 1024:.1f} KiB per rank before ZeRO)" in report, report
    assert "3 experts" in uneven and "divisible by 2" in uneven
    assert "no dim 'expert'" in no_dim
    model = nn.Sequential(nn.Linear(2, 2))
    params, apply = fs.functional(model)
    step = fs.train_step(lambda p, b: apply(p, b).sum(), fs.optim.sgd(0.1), model=apply)
    assert "units" in error_text(lambda: fs.expert_parallel(step, experts=ToyBank))
    step = fs.shard_zero(fs.train_step(_loss(apply), fs.optim.sgd(0.1), model=ToyNet()), 3)
    assert "Apply expert_parallel first" in error_text(
        lambda: fs.expert_parallel(step, experts=ToyBank)
    )

"""Data parallel on gloo worlds of 2 and 4 equals the world of one on the global batch."""

from __future__ import annotations

import copy

import pytest
import torch

import fscale as fs
from tests.dist import run_world
from tests.helpers import (
    TiedLM,
    lm_batches,
    lm_loss,
    max_rel_error,
    mlp,
    regression_batches,
    regression_loss,
)

STEPS = 10
GLOBAL_BATCH = 8


def _problem(kind: str):
    if kind == "mlp":
        model = mlp([5, 13, 7, 3], seed=3)
        return model, regression_loss, regression_batches(STEPS, GLOBAL_BATCH, 5, 3)
    torch.manual_seed(3)
    return TiedLM(), lm_loss, lm_batches(STEPS, GLOBAL_BATCH, 6, vocab=11)


def _train(kind: str, rank: int, world: int, accumulate: int = 1):
    model, make_loss, batches = _problem(kind)
    params, apply = fs.functional(copy.deepcopy(model))
    step = fs.train_step(
        make_loss(apply),
        fs.optim.adamw(lr=1e-2, weight_decay=0.1),
        accumulate=accumulate,
        clip_norm=1.0,
    )
    params, state = step.init(params)
    per_rank = GLOBAL_BATCH // world
    traffic = []
    for batch in batches:
        local = {k: v[rank * per_rank : (rank + 1) * per_rank] for k, v in batch.items()}
        params, state, metrics = step(params, state, local)
        traffic.append(metrics["comm_bytes"])
    return params, traffic


def _rank_fn(rank, world, kind, accumulate):
    return _train(kind, rank, world, accumulate)


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("kind", ["mlp", "tied_lm"])
def test_data_parallel_equals_world_of_one(world, kind):
    expected, _ = _train(kind, 0, 1)
    results = run_world(_rank_fn, world, kind, 2 if world == 2 else 1)
    grad_bytes = sum(t.numel() * 4 for t in expected.values())
    for params, traffic in results:
        assert max_rel_error(params, expected) <= 1e-5
        # One mean all-reduce of every grad per step, and the step's 4-byte non-finite
        # vote that also averages the loss (fscale/_guard.py); nothing else.
        assert traffic[-1] == {"all_reduce": grad_bytes + 4}

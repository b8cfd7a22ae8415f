"""compile_units: the eager step's results (fp32, within 1e-6) in every stack, ZeRO's
gathers outside the compiled region, recompiles counted and bounded, misuse refused.

TorchInductor compiles on CPU. The GPT block's forward is compiled once and shared
by every case of a process (Dynamo caches it by its code); the gloo world of 2 runs
stages 1/2/3 in one world.
"""

from __future__ import annotations

import pytest
import torch

import fscale as fs
from fscale.models.gpt import GPT, GPTConfig
from fscale.transforms import compile as compile_mod
from tests.dist import run_world
from tests.helpers import error_text, lm_loss

STEPS = 3
CFG = GPTConfig.tiny(n_layer=3)
SEQ = 16
TOL = 1e-6  # fused kernels reorder float sums; lr 1e-4 keeps Adam from amplifying it


def _batches(rank: int = 0, world: int = 1, seq: int = SEQ):
    gen = torch.Generator().manual_seed(3)
    out = []
    for _ in range(STEPS):
        tokens = torch.randint(0, CFG.vocab_size, (4, seq + 1), generator=gen)
        mine = tokens[rank * 4 // world : (rank + 1) * 4 // world]
        out.append({"x": mine[:, :-1], "y": mine[:, 1:]})
    return out


def _run(stack, rank: int = 0, world: int = 1, seq: int = SEQ):
    """Gathered params and per-step metrics of ``stack(train_step)`` after STEPS steps."""
    torch.manual_seed(0)
    model = GPT(CFG)
    params, apply = fs.functional(model)
    params = {k: v.clone() for k, v in params.items()}
    step = stack(fs.train_step(lm_loss(apply), fs.optim.adamw(1e-4), model=apply))
    params, state = step.init(params)
    metrics = []
    for batch in _batches(rank, world, seq):
        params, state, m = step(params, state, batch)
        metrics.append(m)
    return fs.gather_params(params, state), metrics


def _max_diff(a: dict, b: dict) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


STACKS = {
    "plain": lambda s: s,
    "zero1": lambda s: fs.shard_zero(s, 1),
    "zero2": lambda s: fs.shard_zero(s, 2),
    "zero3": lambda s: fs.shard_zero(s, 3),
}


def test_equals_eager_in_every_stack():
    got = {}
    for name, stack in {
        **STACKS,
        "checkpoint over zero3": lambda s: fs.checkpoint_activations(fs.shard_zero(s, 3)),
        "selective": lambda s: fs.checkpoint_activations(s, policy="selective"),
        "offload over zero3": lambda s: fs.offload(
            fs.shard_zero(s, 3), "cpu", what=("optimizer", "params")
        ),
    }.items():
        ref, _ = _run(stack)
        out, metrics = _run(lambda s, stack=stack: stack(fs.compile_units(s)))
        got[name] = _max_diff(out, ref)
        assert metrics[-1]["compiled_graphs"] >= 1
    assert all(d <= TOL for d in got.values()), got
    # One compiled block forward serves all units of all stacks (same shapes and dtypes).
    assert metrics[-1]["compiled_graphs"] <= 2, metrics[-1]["compiled_graphs"]


def test_bf16_under_zero3_matches_eager():
    # In bf16 the compiled block keeps fused intermediates in fp32 where eager rounds
    # each op to bf16: the losses agree to bf16's precision, not bit for bit (and Adam
    # turns tiny grad differences into +-lr updates, so params are not compared).
    _, ref = _run(lambda s: fs.shard_zero(fs.mixed_precision(s, "bf16"), 3))
    _, out = _run(lambda s: fs.shard_zero(fs.mixed_precision(fs.compile_units(s), "bf16"), 3))
    for a, b in zip(out, ref, strict=True):
        assert abs(float(a["loss"]) - float(b["loss"])) <= 4e-3 * float(b["loss"])


def _world(rank: int, world: int) -> dict:
    out = {}
    for name, stack in STACKS.items():
        if name == "plain":
            continue
        ref, _ = _run(stack, rank, world)
        got, m = _run(lambda s, stack=stack: stack(fs.compile_units(s)), rank, world)
        out[name] = (_max_diff(got, ref), m[-1]["compiled_graphs"])
    return out


def test_equals_eager_on_a_gloo_world_of_two():
    for rank_out in run_world(_world, 2, timeout=600):
        for name, (diff, graphs) in rank_out.items():
            assert diff <= TOL, (name, diff)
            assert 1 <= graphs <= 2, (name, graphs)


def test_recompiles_are_counted_and_bounded():
    torch._dynamo.reset()  # count from zero: the cache is per code object, process-wide
    stack = lambda s: fs.compile_units(s, dynamic=False, max_graphs=2)  # noqa: E731
    _, metrics = _run(stack, seq=8)
    assert [m["compiled_graphs"] for m in metrics] == [1, 1, 1]
    _, metrics = _run(stack, seq=12)  # a second shape: a second graph
    assert metrics[-1]["compiled_graphs"] == 2
    text = error_text(lambda: _run(stack, seq=10))
    assert "'blocks.0''s forward was compiled 3 times (max_graphs=2)" in text
    assert "dynamic=True" in text and "fs.curriculum" in text


def test_misuse_is_refused_naming_the_fix():
    torch.manual_seed(0)
    params, apply = fs.functional(GPT(CFG))
    step = fs.train_step(lm_loss(apply), fs.optim.adamw(1e-4), model=apply)
    text = error_text(lambda: fs.compile_units(fs.checkpoint_activations(step)))
    assert "compile_units must be the first unit transform applied" in text
    assert "checkpoint_activations(fs.compile_units(step), ...)" in text
    assert "torch.compile does not take" in error_text(lambda: fs.compile_units(step, fast=1))
    assert "max_graphs must be an int >= 1" in error_text(
        lambda: fs.compile_units(step, max_graphs=0)
    )
    bare = fs.train_step(lm_loss(apply), fs.optim.adamw(1e-4))
    assert "model=model" in error_text(lambda: fs.compile_units(bare))
    plan = fs.explain(fs.compile_units(step), params)
    assert "compile_units: each unit's forward runs torch.compile'd" in str(plan)


@pytest.mark.parametrize("name", ["MAX_GRAPHS"])
def test_default_bound_is_below_dynamos_limit(name):
    config = torch._dynamo.config
    limit = getattr(config, "recompile_limit", None) or config.cache_size_limit
    assert getattr(compile_mod, name) < limit

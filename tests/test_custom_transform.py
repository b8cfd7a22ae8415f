"""A transform written outside fscale composes with shard_zero through the core's protocol.

``fp16_grad_reduction`` below replaces the lowering of the tagged grad reduction
(``"zero.grads"``) for its own step only: it reduces an fp16 copy of the payload
with the default lowering and counts its calls in its own state slot. It touches no
file of fscale and reads nothing private. One gloo world of 2 runs every case.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fscale as fs
from fscale.hw import comm
from fscale.optim.base import apply_gradients
from fscale.state import describe
from tests.dist import run_world
from tests.helpers import max_rel_error

NAME = "fp16_grad_reduction"


def fp16_grad_reduction(
    step: fs.Step, *, dtype=torch.float16, tag: str = "zero.grads", name: str = NAME
) -> fs.Step:
    """Run the collectives tagged ``tag`` on a ``dtype`` copy of their payload.

    Args:
      step: the step to transform (apply it over ``shard_zero``).
      dtype: the dtype the payload travels in (``torch.float32``: a no-op cast).
      tag: the tagged collective to replace.
      name: the transform's name and its state slot, ``state[name]["calls"]``
        counting the replaced collectives.
    """
    inner_init = step.stages.init

    def init(s, params):
        params, state = inner_init(s, params)
        state[name] = {"calls": 0}
        return params, state

    def lowering(call, t, **kwargs):
        call.state = {"calls": call.state["calls"] + 1}
        kwargs["async_op"] = False  # a plain tensor is wrapped as a completed handle
        return call.default(t.to(dtype), **kwargs).to(t.dtype)

    record = fs.Transform(name, options={"dtype": dtype, "tag": tag})
    return step.with_transform(record, lowerings={tag: lowering}, init=init)


# ----------------------------------------------------------------------------- problem

STEPS = 10
BATCH = 8  # 4 rows per rank; accumulate=2 splits those in 2
D_IN, D_OUT = 5, 3
# Reduced grads per step, by (stage, accumulate), for _Net (units blocks.0, blocks.1
# and the root; all grads fit one 25 MiB bucket): stages 1/2 reduce-scatter one bucket,
# stage 3 one unit at a time, stage 1 with accumulation all-reduces one bucket.
CASES = {(1, 1): 1, (2, 1): 1, (3, 1): 3, (1, 2): 1}


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(4)
        self.blocks = nn.ModuleList([nn.Linear(D_IN, 13), nn.Linear(13, 7)])
        self.head = nn.Linear(7, D_OUT)

    def forward(self, x):
        for block in self.blocks:
            x = torch.tanh(block(x))
        return self.head(x)


def _batches():
    g = torch.Generator().manual_seed(2)
    return [
        {"x": torch.randn(BATCH, D_IN, generator=g), "y": torch.randn(BATCH, D_OUT, generator=g)}
        for _ in range(STEPS)
    ]


def _problem():
    params, apply = fs.functional(_Net())

    def loss_fn(p, batch):
        return F.mse_loss(apply(p, batch["x"]), batch["y"])

    opt = fs.optim.adamw(1e-2, weight_decay=0.1, mask=fs.optim.decay_mask_default(params))
    return params, loss_fn, opt


def _zero(stage, accumulate=1):
    params, loss_fn, opt = _problem()
    return fs.shard_zero(fs.train_step(loss_fn, opt, accumulate=accumulate), stage), params


def _local(batch, rank, world):
    n = BATCH // world
    return {k: v[rank * n : (rank + 1) * n] for k, v in batch.items()}


def _gathered(params, state):
    return {n: t.clone() for n, t in fs.gather_params(params, state).items()}


def _fresh(params: dict) -> dict:
    return {n: t.detach().clone() for n, t in params.items()}  # a step donates its inputs


def _train(step, params, rank, world):
    """Train alone; returns gathered params, the final state's slot and zero.grads calls."""
    params, state = step.init(_fresh(params))
    calls = []
    for batch in _batches():
        with comm.counting() as counts:
            params, state, _ = step(params, state, _local(batch, rank, world))
        calls.append(counts.tags["zero.grads"].calls if "zero.grads" in counts.tags else 0)
    slot = describe(state).get(f"{NAME}/calls")
    return _gathered(params, state), slot, calls


def _by_hand(rank, world, accumulate, dtype):
    """Data parallelism written out: each rank's (micro-batch averaged) grads rounded to
    ``dtype``, summed and halved in ``dtype`` (gloo's average), then AdamW in fp32."""
    params, loss_fn, opt = _problem()
    params = _fresh(params)
    opt_state = opt.init(params)
    for batch in _batches():
        per_rank = []
        for r in range(world):
            total = None
            xs = _local(batch, r, world)["x"].chunk(accumulate)
            ys = _local(batch, r, world)["y"].chunk(accumulate)
            for x, y in zip(xs, ys, strict=True):
                leaves = {n: t.detach().requires_grad_(True) for n, t in params.items()}
                loss = loss_fn(leaves, {"x": x, "y": y})
                grads = torch.autograd.grad(loss, list(leaves.values()))
                grads = dict(zip(leaves, grads, strict=True))
                total = grads if total is None else {n: total[n].add_(grads[n]) for n in grads}
            if accumulate > 1:
                total = {n: g.mul_(1 / accumulate) for n, g in total.items()}
            per_rank.append(total)
        reduced = {}
        for n in params:
            acc = per_rank[0][n].to(dtype)
            for g in per_rank[1:]:
                acc = acc + g[n].to(dtype)
            reduced[n] = acc.div_(world).to(torch.float32)
        params, opt_state = apply_gradients(opt, reduced, opt_state, params)
    return params


def _world_fn(rank, world):
    out = {}
    for stage, accumulate in CASES:
        step, params = _zero(stage, accumulate)
        out[("plain", stage, accumulate)] = _train(step, params, rank, world)
        out[("noop", stage, accumulate)] = _train(
            fp16_grad_reduction(step, dtype=torch.float32), params, rank, world
        )
        # The fp16 step and a step built without the transform, called in turns.
        custom = fp16_grad_reduction(step)
        other, _ = _zero(stage, accumulate)
        p_custom, s_custom = custom.init(_fresh(params))
        p_other, s_other = other.init(_fresh(params))
        calls = []
        for batch in _batches():
            local = _local(batch, rank, world)
            with comm.counting() as counts:
                p_custom, s_custom, _ = custom(p_custom, s_custom, local)
            calls.append(counts.tags["zero.grads"].calls)
            p_other, s_other, _ = other(p_other, s_other, local)
        out[("fp16", stage, accumulate)] = (
            _gathered(p_custom, s_custom),
            describe(s_custom)[f"{NAME}/calls"],
            calls,
        )
        out[("other", stage, accumulate)] = (_gathered(p_other, s_other), NAME in s_other, None)
    for stage in (2, 3):
        step, params = _zero(stage)
        out[("unused", stage, 1)] = _train(
            fp16_grad_reduction(step, tag="nobody.uses"), params, rank, world
        )
    for accumulate in (1, 2):
        out[("hand", accumulate)] = _by_hand(rank, world, accumulate, torch.float16)
        out[("hand32", accumulate)] = _by_hand(rank, world, accumulate, torch.float32)
    return out


@pytest.fixture(scope="module")
def world2():
    return run_world(_world_fn, 2)


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- tests


def test_counts_every_replaced_collective_in_its_own_state_slot(world2):
    for rank, out in enumerate(world2):
        for (stage, accumulate), per_step in CASES.items():
            what = f"rank {rank} stage {stage} accumulate {accumulate}"
            _, slot, calls = out[("fp16", stage, accumulate)]
            assert calls == [per_step] * STEPS, (what, calls)  # the tagged calls made
            assert slot == per_step * STEPS, (what, slot)  # ...each through the lowering
            _, slot, calls = out[("noop", stage, accumulate)]
            assert slot == per_step * STEPS, (what, slot)
            assert out[("plain", stage, accumulate)][1] is None, what  # no slot without it


def test_fp16_reduction_equals_the_same_rounding_by_hand(world2):
    for rank, out in enumerate(world2):
        for stage, accumulate in CASES:
            what = f"rank {rank} stage {stage} accumulate {accumulate}"
            got = out[("fp16", stage, accumulate)][0]
            # Measured: 0 (bit for bit) for every case, and the same for fp32 by hand.
            err = max_rel_error(got, out[("hand", accumulate)])
            assert err <= 1e-6, f"{what} vs fp16 by hand: {err:.2e}"
            plain = out[("plain", stage, accumulate)][0]
            assert max_rel_error(plain, out[("hand32", accumulate)]) <= 1e-6, what
            # ...and the fp16 rounding is really there (measured 7.6e-5 from fp32).
            gap = max_rel_error(got, plain)
            assert 1e-5 < gap < 1e-3, f"{what}: fp16 vs fp32 {gap:.2e}"


def test_a_no_op_cast_changes_nothing(world2):
    for rank, out in enumerate(world2):
        for stage, accumulate in CASES:
            noop, plain = out[("noop", stage, accumulate)][0], out[("plain", stage, accumulate)][0]
            assert _equal(noop, plain), (rank, stage, accumulate)


def test_another_step_in_the_same_process_is_unaffected(world2):
    for rank, out in enumerate(world2):
        for stage, accumulate in CASES:
            other, has_slot, _ = out[("other", stage, accumulate)]
            assert not has_slot
            assert _equal(other, out[("plain", stage, accumulate)][0]), (rank, stage, accumulate)


def test_a_lowering_for_a_tag_nobody_uses_is_never_called(world2):
    for rank, out in enumerate(world2):
        for stage in (2, 3):
            params, slot, _ = out[("unused", stage, 1)]
            assert slot == 0, (rank, stage)
            assert _equal(params, out[("plain", stage, 1)][0]), (rank, stage)


def test_two_transforms_replacing_one_tag_raise_at_build_time_naming_both():
    step, _ = _zero(2)
    step = fp16_grad_reduction(step)
    with pytest.raises(
        ValueError,
        match=r"bf16_grad_reduction replaces the lowering of 'zero\.grads', which "
        r"fp16_grad_reduction already replaced; bf16_grad_reduction and "
        r"fp16_grad_reduction cannot share a stack",
    ):
        fp16_grad_reduction(step, dtype=torch.bfloat16, name="bf16_grad_reduction")
    # Other tags stay free for another transform.
    fp16_grad_reduction(step, tag="zero.params", name="fp16_param_gather")


def test_composes_in_the_world_of_one():
    # No process group: the "single" lowerings, same protocol.
    for stage in (1, 2, 3):
        step, params = _zero(stage)
        params, slot, calls = _train(fp16_grad_reduction(step), params, 0, 1)
        assert slot == sum(calls) == CASES[(stage, 1)] * STEPS
        assert all(torch.isfinite(t).all() for t in params.values())

"""Reliability guards of the step (issue 15): each was a silent path, each test fails
without its guard.

- A NaN/inf loss or grad on any rank: the step changes nothing on any rank, says so
  (``nonfinite``, ``skipped_steps``) and raises ``FloatingPointError`` after
  ``max_nonfinite_skips`` in a row -- fp32, bf16, fp16 at its loss-scale floor,
  plain data parallel and ZeRO 1/3.
- ``metrics["loss"]`` is the global mean, ``local_loss`` the rank's; ``lr`` reported.
- ``step.init`` refuses ranks with different params (or broadcasts rank 0's).
- ZeRO-3 ranks running equal-sized units in different orders fail on the first step.
- Stale state, a bad learning rate, quantized params raise (one process).

The multi-rank cases share one gloo world of 2 (``_world_fn``), which returns what
each rank saw; the tests read it.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fscale as fs
from fscale.state import TensorEntry, describe
from tests.dist import run_world
from tests.helpers import error_text, mlp, regression_batches, regression_loss

WORLD = 2


def _snapshot(params, state) -> dict:
    """Gathered params, the optimizer state and the count, cloned."""
    out = {f"param/{k}": v.clone() for k, v in fs.gather_params(params, state).items()}
    for path, e in describe(state).items():
        if path.startswith(("optimizer", "shard_zero/master")):
            out[path] = e.tensor.clone() if isinstance(e, TensorEntry) else e
    return out


def _same(a: dict, b: dict) -> bool:
    if set(a) != set(b):
        return False
    for k in a:
        x, y = a[k], b[k]
        if isinstance(x, torch.Tensor):
            if not torch.equal(x, y):
                return False
        elif x != y:
            return False
    return True


def _finite(snap: dict) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in snap.values() if isinstance(v, torch.Tensor))


def _problem(kind: str, stage: int, rank: int, **kw):
    params, apply = fs.functional(mlp([3, 8, 2]))
    loss = regression_loss(apply)
    lr = fs.optim.linear_warmup(1e-2, 4)
    step = fs.train_step(loss, fs.optim.adamw(lr, weight_decay=0.1), **kw)
    if kind == "fp16":
        step = fs.mixed_precision(step, "fp16", init_scale=4.0, hysteresis=1)
    elif kind == "bf16":
        step = fs.mixed_precision(step, "bf16")
    if stage:
        step = fs.shard_zero(step, stage)
    batches = [
        {k: v[rank * 4 : (rank + 1) * 4] for k, v in b.items()}
        for b in regression_batches(3, 4 * WORLD, 3, 2)
    ]
    return step, params, batches


def _poisoned(batch: dict, rank: int, where: int = 1) -> dict:
    if rank != where:
        return batch
    x = batch["x"].clone()
    x[0, 0] = float("nan")
    return {**batch, "x": x}


def _nonfinite_case(rank: int, kind: str, stage: int, clip) -> dict:
    """Two good steps, a step with a NaN in rank 1's batch, a good step."""
    step, params, batches = _problem(kind, stage, rank, clip_norm=clip)
    params, state = step.init(params)
    out = {"metrics": []}
    for b in batches[:2]:
        params, state, m = step(params, state, b)
        out["metrics"].append(m)
    before = _snapshot(params, state)
    params, state, m = step(params, state, _poisoned(batches[2], rank))
    out["metrics"].append(m)
    out["unchanged"] = _same(_snapshot(params, state), before)
    params, state, m = step(params, state, batches[2])
    out["metrics"].append(m)
    after = _snapshot(params, state)
    out["moved"] = not _same(after, before) and _finite(after)
    out["count"] = state["count"]
    return out


def _limit_case(rank: int, kind: str, stage: int) -> str:
    """NaN on rank 1 every step: the step raises FloatingPointError on every rank."""
    step, params, batches = _problem(kind, stage, rank, max_nonfinite_skips=3)
    params, state = step.init(params)
    seen = []
    try:
        for _ in range(8):
            params, state, m = step(params, state, _poisoned(batches[0], rank))
            seen.append(m["skipped_steps"])
    except FloatingPointError as e:
        return f"after {seen}: {e}"
    return f"no error after {seen}"


class _Twin(nn.Module):
    """Two blocks of equal size; rank 1 runs them in the other order."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)])

    def forward(self, x, order=(0, 1)):
        for i in order:
            x = torch.tanh(self.blocks[i](x))
        return x


def _order_case(rank: int) -> str:
    model = _Twin()
    params, apply = fs.functional(model)
    order = (0, 1) if rank == 0 else (1, 0)

    def loss_fn(p, batch):
        return apply(p, batch, order=order).pow(2).mean()

    step = fs.shard_zero(fs.train_step(loss_fn, fs.optim.sgd(0.1), model=model), 3)
    params, state = step.init(params)
    return error_text(lambda: step(params, state, torch.ones(2, 4)))


def _init_cases(rank: int) -> dict:
    def build(seed, **kw):
        params, apply = fs.functional(mlp([3, 4, 2], seed=seed))
        return fs.train_step(regression_loss(apply), fs.optim.sgd(0.1), **kw), params

    out = {}
    step, params = build(rank)  # a different seed per rank
    out["check"] = error_text(lambda: step.init(params))
    step, params = build(rank, sync_init="broadcast")
    params, _ = step.init(params)
    out["broadcast"] = {k: v.clone() for k, v in params.items()}
    out["rank0"] = dict(fs.functional(mlp([3, 4, 2], seed=0))[0])
    step, params = build(rank)
    out["zero"] = error_text(lambda: fs.shard_zero(step, 1).init(params))
    step, params = build(rank, sync_init="off")
    out["off"] = error_text(lambda: step.init(params))
    step, params = build(0)
    out["same"] = error_text(lambda: step.init(params))
    return out


def _world_fn(rank: int, world: int) -> dict:
    out = {"nonfinite": {}, "limit": {}}
    for kind, stage, clip in (
        ("fp32", 0, None),
        ("fp32", 0, 1.0),
        ("bf16", 0, None),
        ("fp16", 0, None),
        ("fp32", 1, None),
        ("bf16", 3, 1.0),
        ("fp16", 3, None),
    ):
        out["nonfinite"][(kind, stage, clip)] = _nonfinite_case(rank, kind, stage, clip)
    for kind, stage in (("fp32", 0), ("bf16", 3), ("fp16", 0)):
        out["limit"][(kind, stage)] = _limit_case(rank, kind, stage)
    out["init"] = _init_cases(rank)
    out["order"] = _order_case(rank)  # last: it leaves the world mid-step
    return out


def test_guards_on_a_gloo_world_of_two():
    results = run_world(_world_fn, WORLD)
    failures = []

    def check(ok, what):
        if not ok:
            failures.append(what)

    for rank, got in enumerate(results):
        for case, r in got["nonfinite"].items():
            what = f"rank {rank} {case}"
            m = r["metrics"]
            check([x["nonfinite"] for x in m] == [False, False, True, False], what)
            check([x["skipped_steps"] for x in m] == [0, 0, 1, 1], what)
            check(r["unchanged"], f"{what}: the NaN step changed params or optimizer state")
            check(r["moved"], f"{what}: the next good step did not train")
            check(r["count"] == 4, what)
            # The global mean loss: the same on both ranks, the mean of their own.
            other = results[1 - rank]["nonfinite"][case]["metrics"]
            for i in (0, 1, 3):
                mean = (m[i]["local_loss"] + other[i]["local_loss"]) / 2
                check(torch.allclose(m[i]["loss"], mean, rtol=1e-6), f"{what}: loss {i}")
                check(torch.equal(m[i]["loss"], other[i]["loss"]), f"{what}: loss {i}")
            check(bool(torch.isnan(m[2]["loss"])), f"{what}: the NaN step's global loss")
            # rank 0's own loss was finite on the step rank 1 poisoned.
            check(bool(torch.isfinite(m[2]["local_loss"])) == (rank == 0), what)
            # warmup schedule: lr of update k is 1e-2 * k / 4; the skip did not advance it.
            lrs = [x.get("lr") for x in m]
            check(lrs == [0.0, 0.0025, None, 0.005], f"{what}: lr {lrs}")
            if case[0] == "fp16":
                check(m[2]["overflow"] is True and m[3]["overflow"] is False, what)
        for case, text in got["limit"].items():
            what = f"rank {rank} limit {case}"
            check(text.startswith("after ") and "FloatingPointError" not in text, what)
            check("3 steps in a row had a non-finite loss" in text, f"{what}: {text}")
            if case[0] == "fp16":
                # init_scale 4, hysteresis 1: 4 and 2 are expected overflows, then three at 1.
                check(text.startswith("after [1, 2, 3, 4]") and "floor" in text, f"{what}: {text}")
            else:
                check(text.startswith("after [1, 2]:"), f"{what}: {text}")
        check("ranks disagree on the next unit" in got["order"], f"rank {rank}: {got['order']}")
        init = got["init"]
        for key in ("check", "zero"):
            check(
                "ranks hold different params: '0.bias' differs across mesh dim" in init[key]
                and "rank 0: sum=" in init[key]
                and "rank 1: sum=" in init[key]
                and "sync_init='broadcast'" in init[key],
                f"rank {rank} init {key}: {init[key]}",
            )
        check(init["off"] == "ok" and init["same"] == "ok", f"rank {rank}: {init}")
        check(
            all(torch.equal(init["broadcast"][k], init["rank0"][k]) for k in init["rank0"]),
            f"rank {rank}: broadcast",
        )
    assert not failures, "\n".join(failures)


# ----------------------------------------------------------------------------- one process


def _plain(opt=None, **kw):
    params, apply = fs.functional(mlp([3, 4, 2]))
    step = fs.train_step(regression_loss(apply), opt or fs.optim.adamw(1e-2), **kw)
    return step, params, regression_batches(3, 4, 3, 2)


def test_stale_state_raises_and_names_the_fix():
    for opt in (fs.optim.adamw(1e-2), fs.optim.sgd(0.1)):  # fused in place / out of place
        step, params, batches = _plain(opt)
        p0, s0 = step.init(params)
        p1, s1, _ = step(p0, s0, batches[0])
        with pytest.raises(ValueError, match=r"stale state: .* Rebind on every call"):
            step(p1, s0, batches[1])
        if p1["0.weight"] is not p0["0.weight"]:  # out of place: the old params are stale
            with pytest.raises(ValueError, match=r"stale params: param '0.weight' is from"):
                step(p0, s1, batches[1])
        p2, s2, _ = step(p1, s1, batches[1])  # the newest pair still works
        step(p2, s2, batches[2])


def test_a_call_that_raises_consumes_nothing():
    step, params, batches = _plain(max_nonfinite_skips=1)
    params, state = step.init(params)
    bad = {**batches[0], "x": torch.full_like(batches[0]["x"], float("nan"))}
    with pytest.raises(FloatingPointError, match="max_nonfinite_skips=1"):
        step(params, state, bad)
    params, state, metrics = step(params, state, batches[1])
    assert not metrics["nonfinite"] and state["guard"]["skipped_steps"] == 0


def test_nonfinite_off_trains_through_and_reports_on_device():
    step, params, batches = _plain(nonfinite="off")
    params, state = step.init(params)
    bad = {**batches[0], "x": torch.full_like(batches[0]["x"], float("nan"))}
    params, state, metrics = step(params, state, bad)
    assert isinstance(metrics["nonfinite"], torch.Tensor) and bool(metrics["nonfinite"])
    assert not torch.isfinite(params["0.weight"]).all()  # no protection: documented


@pytest.mark.parametrize(
    "schedule, value",
    [(lambda count: -1e-3, "-0.001"), (lambda count: float("nan"), "nan")],
)
def test_a_bad_learning_rate_raises_at_the_step(schedule, value):
    step, params, batches = _plain(fs.optim.adamw(schedule))
    params, state = step.init(params)
    with pytest.raises(ValueError, match=rf"schedule of lr returned {value} at count 0"):
        step(params, state, batches[0])


def test_quantized_params_are_refused():
    params, apply = fs.functional(mlp([64, 64, 2]))
    q = fs.quantize(dict(params), "int8", group_size=32)
    step = fs.train_step(regression_loss(apply), fs.optim.sgd(0.1))
    with pytest.raises(TypeError, match=r"param '0.weight' is a QuantizedWeight .* quantize after"):
        step.init(q)


def test_lr_is_reported_for_every_optimizer():
    for opt in (
        fs.optim.sgd(0.5),
        fs.optim.adamw(fs.optim.constant(0.25)),
        fs.optim.lion(0.125),
        fs.optim.chain(fs.optim.clip_by_global_norm(1.0), fs.optim.lamb(0.0625)),
    ):
        step, params, batches = _plain(opt)
        params, state = step.init(params)
        _, _, metrics = step(params, state, batches[0])
        assert metrics["lr"] in (0.5, 0.25, 0.125, 0.0625), opt
        assert metrics["loss"] is metrics["local_loss"]  # world of one


def test_skips_on_device_when_the_whole_update_can():
    """[Note: skipping on the device]: which stacks take the guard's verdict as a device
    flag into the update (no host read before it) and which read it first."""
    step, _, _ = _plain()
    assert step.skips_on_device()  # fused AdamW
    assert fs.shard_zero(step, 1).skips_on_device() and fs.shard_zero(step, 3).skips_on_device()
    assert fs.mixed_precision(step, "bf16").skips_on_device()
    assert not _plain(fs.optim.sgd(0.1))[0].skips_on_device()
    assert not _plain(nonfinite="off")[0].skips_on_device()
    assert not fs.offload(step, "cpu").skips_on_device()  # the host optimizer
    chained = fs.optim.chain(fs.optim.clip_by_global_norm(1.0), fs.optim.adamw(1e-2))
    assert not _plain(chained)[0].skips_on_device()  # an earlier link may keep state
    assert fs.optim.chain(fs.optim.adamw(1e-2)).skips_on_device

    def update(ctx, grads, params):
        return step.stages.update(ctx, grads, params)

    custom = step.with_transform(fs.Transform("mine"), update=update)
    assert not custom.skips_on_device() and custom.unsafe_to_skip == ("mine",)
    safe = fs.Transform("mine", capabilities=frozenset({fs.policies.SKIP_SAFE_UPDATE}))
    assert step.with_transform(safe, update=update).skips_on_device()


def test_the_device_skip_reaches_the_optimizer_and_restores_the_state():
    """The optimizer runs inside ``skipping(flag)`` with the verdict as a tensor; on a
    non-finite step the state objects that come back are the ones that went in."""
    seen = []
    inner = fs.optim.adamw(1e-2)

    def update_params(grads, state, params):
        seen.append(fs.optim.base.skip_flag())
        return inner.update_params(grads, state, params)

    spy = fs.optim.GradientTransformation(inner.init, inner.update, update_params, True)
    step, params, batches = _plain(spy)
    params, state = step.init(params)
    params, state, _ = step(params, state, batches[0])
    assert isinstance(seen[-1], torch.Tensor) and not bool(seen[-1])
    bad = {**batches[1], "x": torch.full_like(batches[1]["x"], float("nan"))}
    weights = params["0.weight"].clone()
    opt_before = state["optimizer"]
    params, state, metrics = step(params, state, bad)
    assert bool(seen[-1]) and metrics["nonfinite"] is True and "lr" not in metrics
    assert state["optimizer"] is opt_before and state["optimizer"].count == 1
    assert torch.equal(params["0.weight"], weights)
    params, state, metrics = step(params, state, batches[1])
    assert state["optimizer"].count == 2 and metrics["lr"] == 1e-2


# ----------------------------------------------------------------------------- late verdict


def _late_run(nonfinite: str, wrap, poisoned=(2, 3, 6), n=9, settle=True, **kw):
    """n calls of a warm-up-scheduled AdamW step, NaN batches at ``poisoned``; returns
    the final snapshot (settled), the guard counters and the per-call metrics."""
    step, params, batches = _problem("fp32", 0, 0, nonfinite=nonfinite, **kw)
    step = wrap(step)
    params, state = step.init(params)
    seen = []
    for i in range(n):
        b = batches[i % len(batches)]
        if i in poisoned:
            b = {**b, "x": torch.full_like(b["x"], float("nan"))}
        params, state, metrics = step(params, state, b)
        seen.append(metrics)
    if settle:
        fs._guard.settle(state)
    return _snapshot(params, state), state["guard"], seen, (step, params, state, batches)


@pytest.mark.parametrize(
    "wrap",
    [
        lambda s: s,
        lambda s: fs.mixed_precision(s, "bf16"),
        lambda s: fs.shard_zero(s, 3),
        lambda s: fs.shard_zero(fs.mixed_precision(s, "bf16"), 1),
    ],
    ids=["plain", "bf16", "zero3", "bf16-zero1"],
)
def test_a_verdict_read_a_call_late_gives_the_same_run_bit_for_bit(wrap):
    """[Note: reading the verdict a step late]: skipped calls, settled during the next
    call, leave params, optimizer state, count and schedule exactly as an immediate read
    (two skips in a row and a lone one; the warm-up schedule makes a wrongly advanced
    count visible in the params)."""
    now, guard_now, m_now, _ = _late_run("skip_now", wrap)
    late, guard_late, m_late, _ = _late_run("skip_late", wrap)
    assert _same(late, now) and _finite(late)
    assert guard_late == guard_now == {"skipped_steps": 3, "consecutive": 0}
    assert [m["nonfinite"] for m in m_now] == [i in (2, 3, 6) for i in range(9)]
    # Late: a device bool per call, and counters that lag one call.
    assert [bool(m["nonfinite"]) for m in m_late] == [m["nonfinite"] for m in m_now]
    assert all(isinstance(m["nonfinite"], torch.Tensor) for m in m_late)
    assert [m["skipped_steps"] for m in m_late] == [0, 0, 0, 1, 2, 2, 2, 3, 3]


def test_a_late_verdict_raises_at_the_limit_one_call_later():
    run = ("skip_late", lambda s: s)
    with pytest.raises(FloatingPointError, match="2 steps in a row .*max_nonfinite_skips=2"):
        _late_run(*run, poisoned=(1, 2), n=4, max_nonfinite_skips=2)
    # The call that ends the second skip returns; the raise comes in the next one.
    _, guard, _, _ = _late_run(*run, poisoned=(1, 2), n=3, max_nonfinite_skips=3)
    assert guard["consecutive"] == 2


def test_save_settles_a_late_verdict(tmp_path):
    """A checkpoint never holds an unsettled call: saving right after a skipped call
    and loading gives what the immediate read gives."""
    _, _, _, (step, params, state, batches) = _late_run("skip_late", lambda s: s, (4,), 5, False)
    assert "pending" in state["guard"]
    fs.save(tmp_path / "ck", params, state)
    assert "pending" not in state["guard"] and state["guard"]["skipped_steps"] == 1
    loaded_params, loaded = fs.load(tmp_path / "ck", step, _problem("fp32", 0, 0)[1])
    want, _, _, _ = _late_run("skip_now", lambda s: s, (4,), n=5)
    assert _same(_snapshot(loaded_params, loaded), want)


def test_skip_late_needs_an_update_that_skips_on_the_device_and_cpu_skip_reads_now():
    step, params, batches = _plain(fs.optim.sgd(0.1), nonfinite="skip_late")
    params, state = step.init(params)
    with pytest.raises(ValueError, match=r"nonfinite='skip_late'\) needs an update that skips"):
        step(params, state, batches[0])
    step, params, batches = _plain()  # "skip" on CPU: no run-ahead to protect
    params, state = step.init(params)
    bad = {**batches[0], "x": torch.full_like(batches[0]["x"], float("nan"))}
    _, state, metrics = step(params, state, bad)
    assert metrics["nonfinite"] is True and "pending" not in state["guard"]

"""compress_comm's 1-bit optimizers: exact warm-up, bytes, error feedback, convergence, resume.

One gloo world of 4 runs every training case (``_world``, cached); the assertions read
its results. The compressed mean is checked in one process with a simulated N.
"""

from __future__ import annotations

import copy
import functools
import math
import pathlib
import sysconfig

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fscale as fs
from fscale import tree
from fscale.hw import comm
from fscale.models.gpt import GPT, GPTConfig, gpt_loss
from fscale.state import describe
from fscale.transforms._compress.onebit import (
    NAME,
    TAG,
    _zero_one_schedule,
    onebit_adam,
    onebit_lamb,
    zero_one_adam,
)
from fscale.transforms._compress.onebit_allreduce import (
    compressed_mean,
    plan_layout,
    plan_momentum_layout,
    simulate_mean,
)
from fscale.transforms.compress import compress_comm
from tests.dist import run_world

WORLD = 4
STEPS = 80
FREEZE = 40
GLOBAL_BATCH = 16


def _gpt():
    torch.manual_seed(3)
    return GPT(GPTConfig.tiny(seq_len=32, bias=False))


@functools.cache
def _text() -> torch.Tensor:
    """Python source bytes from the stdlib (the text GPT of examples/train_gpt.py)."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    buf = bytearray()
    for name in ("argparse.py", "dataclasses.py", "functools.py", "typing.py"):
        buf += (root / name).read_bytes()
    return torch.frombuffer(buf, dtype=torch.uint8).long()


def _batches(n, batch=GLOBAL_BATCH, seed=1):
    """``n`` global batches of random 32-byte windows of the text."""
    data, g = _text(), torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        starts = torch.randint(0, len(data) - 33, (batch,), generator=g)
        w = torch.stack([data[s : s + 33] for s in starts.tolist()])
        out.append({"x": w[:, :-1], "y": w[:, 1:]})
    return out


def _method(name):
    return {
        "adam": None,
        "lamb": None,
        "onebit_adam": onebit_adam(freeze_step=FREEZE),
        "zero_one_adam": zero_one_adam(
            var_freeze_step=FREEZE, var_update_scaler=16, local_step_scaler=16, local_step_clipper=2
        ),
        "onebit_lamb": onebit_lamb(freeze_step=FREEZE),
    }[name]


def _opt(name):
    return fs.optim.lamb(1e-2) if "lamb" in name else fs.optim.adamw(2e-3, weight_decay=0.01)


def _train(rank, world, name, bf16=False, steps=STEPS):
    params, apply = fs.functional(_gpt())
    step = fs.train_step(gpt_loss(apply), _opt(name))
    if bf16:
        step = fs.mixed_precision(step, "bf16")
    if _method(name) is not None:
        step = compress_comm(step, _method(name))
    params, state = step.init(params)
    per = GLOBAL_BATCH // world
    out = {"bytes": []}
    for i, batch in enumerate(_batches(steps, GLOBAL_BATCH)):
        local = {k: v[rank * per : (rank + 1) * per] for k, v in batch.items()}
        params, state, metrics = step(params, state, local)
        out["bytes"].append(dict(metrics["comm_bytes_by_tag"]))
        if i + 1 == FREEZE:
            out["at_freeze"] = {k: v.clone() for k, v in params.items()}
    with torch.no_grad():
        out["eval"] = float(gpt_loss(apply)(params, _batches(1, 64, seed=99)[0]))
    out["params"] = params
    return out


CASES = [
    ("adam", False),
    ("onebit_adam", False),
    ("zero_one_adam", False),
    ("lamb", False),
    ("onebit_lamb", False),
    ("adam", True),
    ("onebit_adam", True),
]


def _world_fn(rank, world):
    results = {case: _train(rank, world, *case) for case in CASES}
    # The collective itself, on this rank's own vector (compared with the simulation).
    lay = plan_momentum_layout(1000, world)
    x = torch.randn(1000, generator=torch.Generator().manual_seed(rank))
    ew, es = torch.zeros(lay.padded), torch.zeros(lay.server)

    class _Comm:  # ctx.comm's interface over the plain comm table
        def all_to_all(self, tag, t, group=None):
            return comm.all_to_all(t, group=group, tag=tag)

        def all_gather(self, tag, t, group=None):
            return comm.all_gather(t, group=group, tag=tag)

    results["mean"] = [compressed_mean(_Comm(), TAG, None, x, ew, es, lay) for _ in range(2)]
    return results


@functools.cache
def _world():
    return run_world(_world_fn, WORLD, timeout=300)


# ----------------------------------------------------------------------------- world 4


def test_warmup_equals_plain_adam_exactly():
    for rank in _world():
        plain, onebit = rank[("adam", False)], rank[("onebit_adam", False)]
        for k, v in plain["at_freeze"].items():
            assert torch.equal(v, onebit["at_freeze"][k]), k
        # Warm-up steps move the same bytes under the same tag.
        assert plain["bytes"][:FREEZE] == onebit["bytes"][:FREEZE]


def test_ranks_hold_equal_params():
    ranks = _world()
    for case in CASES:
        for k, v in ranks[0][case]["params"].items():
            for other in ranks[1:]:
                assert torch.equal(v, other[case]["params"][k]), (case, k)


def test_bytes_after_warmup_at_most_a_sixteenth_of_fp32_all_reduce():
    rank = _world()[0]
    fp32 = rank[("adam", False)]["bytes"][-1]["dp.grads"]
    for name in ("onebit_adam", "onebit_lamb"):
        after = rank[(name, False)]["bytes"][FREEZE:]
        assert all("dp.grads" not in b for b in after)
        ratio = max(b[TAG] for b in after) / fp32
        assert ratio <= 1 / 16, (name, ratio)  # scales included
        assert ratio > 1 / 32  # the signs (n/8 + n/8N bytes) must be there


def test_zero_one_adam_skips_rounds_after_variance_freeze():
    rank = _world()[0]
    window = slice(FREEZE + 16, STEPS)  # sync every 2nd step

    def total(name):
        return sum(sum(b.values()) for b in rank[(name, False)]["bytes"][window])

    assert total("zero_one_adam") < 0.6 * total("onebit_adam")
    local = [
        b
        for b in rank[("zero_one_adam", False)]["bytes"][window]
        if TAG not in b and "dp.grads" not in b
    ]
    assert len(local) >= 10  # local steps move no grads and no momentum


def _gaps():
    rank = _world()[0]
    pairs = {
        "onebit_adam": (("onebit_adam", False), ("adam", False)),
        "zero_one_adam": (("zero_one_adam", False), ("adam", False)),
        "onebit_lamb": (("onebit_lamb", False), ("lamb", False)),
        "onebit_adam_bf16": (("onebit_adam", True), ("adam", True)),
    }
    return {k: rank[a]["eval"] / rank[b]["eval"] - 1 for k, (a, b) in pairs.items()}


# Measured here (text GPT, world 4, 80 steps, 40 of warm-up), above the full-precision
# optimizer over data seeds 1-3 (seed 1 is this run): 1-bit Adam +0.8/+1.8/+1.4% (bf16
# +1.3%), 0/1 Adam +0.7/+0.6/+0.3%, 1-bit LAMB -0.3/-0.7/+0.5%. Before the 8-bit scale
# codes per 32 elements ([Note: 8-bit scale codes]) and 0/1 Adam's grads exchange
# between variance updates ([Note: 0/1 Adam's 1-bit steps between variance updates]):
# +1.8/+2.2/+1.9%, +4.1/+3.9/+3.1%, +4.1/+4.5/+4.9%. The issue asks for 2%.
_BOUNDS = {
    "onebit_adam": 0.02,
    "onebit_adam_bf16": 0.02,
    "onebit_lamb": 0.01,
    "zero_one_adam": 0.01,
}


def test_convergence_close_to_full_precision():
    rank = _world()[0]
    assert rank[("adam", False)]["eval"] < 0.8 * math.log(256)  # the text is being learned
    for name, gap in _gaps().items():
        assert abs(gap) <= _BOUNDS[name], (name, gap)


@pytest.mark.parametrize("name", list(_BOUNDS))
def test_convergence_within_two_percent_of_full_precision(name):
    gap = _gaps()[name]
    assert abs(gap) <= 0.02, (name, gap)


def test_compressed_mean_in_a_world_equals_the_simulation():
    ranks = _world()
    lay = plan_momentum_layout(1000, WORLD)
    xs = [torch.randn(1000, generator=torch.Generator().manual_seed(r)) for r in range(WORLD)]
    ews = [torch.zeros(lay.padded) for _ in range(WORLD)]
    ess = [torch.zeros(lay.server) for _ in range(WORLD)]
    for call in range(2):
        want = simulate_mean(xs, ews, ess, lay)
        for r in ranks:
            assert torch.equal(r["mean"][call], want)


# ----------------------------------------------------------------------------- the collective


@settings(max_examples=25, deadline=None)
@given(
    world=st.integers(1, 4),
    n=st.integers(1, 300),
    steps=st.integers(1, 40),
    kind=st.sampled_from(["randn", "sparse", "biased"]),
    seed=st.integers(0, 2**16),
    codes=st.booleans(),
)
def test_error_feedback_keeps_error_bounded_and_sum_tracked(world, n, steps, kind, seed, codes):
    g = torch.Generator().manual_seed(seed)
    lay = plan_momentum_layout(n, world) if codes else plan_layout(n, world)
    ews = [torch.zeros(lay.padded) for _ in range(world)]
    ess = [torch.zeros(lay.server) for _ in range(world)]
    true_sum, got_sum = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    biggest = 0.0
    for _ in range(steps):
        xs = [torch.randn(n, generator=g) for _ in range(world)]
        if kind == "sparse":
            xs = [x * (torch.rand(n, generator=g) < 0.05) for x in xs]
        elif kind == "biased":
            xs = [x + 3.0 for x in xs]
        biggest = max(biggest, *(float(x.norm()) for x in xs))
        true_sum += torch.stack(xs).double().mean(0)
        got_sum += simulate_mean(xs, ews, ess, lay).double()
    # Telescoping: sum(outputs) = sum(true means) - mean(worker errors) - server errors.
    residual = torch.stack(ews).double().mean(0)[:n] + torch.cat(ess).double()[:n]
    torch.testing.assert_close(
        true_sum - got_sum, residual, atol=1e-4 * steps * (1 + biggest), rtol=0
    )
    # Bounded: with scale = mean|y|, ||e'|| <= q (||x|| + ||e||), q = sqrt(1 - 1/chunk), so
    # ||e|| <= q / (1 - q) * max||x|| whatever the number of steps; the server's input
    # is bounded by the workers' (1 + q / (1 - q)) max||x||. A coded scale is within
    # 2^(1/8) of mean|y|: q = sqrt(1 - 0.99/chunk) ([Note: 8-bit scale codes]).
    q = (1 - (0.99 if lay.codes else 1.0) / lay.chunk) ** 0.5
    worker_bound = q / (1 - q) * biggest
    assert max(float(e.norm()) for e in ews) <= worker_bound * 1.001 + 1e-6
    server_bound = q / (1 - q) * (biggest + worker_bound)
    assert float(torch.cat(ess).norm()) <= server_bound * 1.001 + 1e-6


def test_zero_one_variance_correction_counts_only_variance_updates():
    """v moved only on "variance" steps: its bias correction must count those, not the
    steps ([Note: 0/1 Adam, simplified]); counting steps made every later step larger."""
    m = zero_one_adam(
        var_freeze_step=8, var_update_scaler=2, local_step_scaler=1000, local_step_clipper=2
    )
    params, apply = fs.functional(_gpt())
    step = compress_comm(fs.train_step(gpt_loss(apply), _opt("zero_one_adam")), m)
    params, state = step.init(params)
    for k, b in enumerate(_batches(7, 4)):
        params, state, metrics = step(params, state, b)
        assert metrics["compress_phase"] == _zero_one_schedule(m, k)
    moved = sum(_zero_one_schedule(m, k) == "variance" for k in range(7))
    assert moved == 5 < state["optimizer"].count == 7  # variance at 0, 1, 2, 4, 6
    assert state[NAME]["v_count"] == moved


def test_compressed_momentum_is_one_magnitude_per_chunk_in_units_of_the_step():
    """[Note: compress what the step uses]: in a world of one the first compressed step's
    momentum is C(m / denom) * denom, so |m / denom| is one value per chunk (live
    coordinates); compressing m itself would make |m| one value per chunk instead."""
    params, apply = fs.functional(_gpt())
    opt = fs.optim.adam(2e-3)
    step = compress_comm(fs.train_step(gpt_loss(apply), opt), onebit_adam(freeze_step=3))
    params, state = step.init(params)
    for b in _batches(4, 4):
        params, state, metrics = step(params, state, b)
    assert metrics["compress_phase"] == "onebit"
    hp = opt.hyperparams
    ms = [t for t in tree.leaves(state["optimizer"].exp_avg) if t is not None]
    vs = [t for t in tree.leaves(state["optimizer"].exp_avg_sq) if t is not None]
    m = torch.cat([t.reshape(-1) for t in ms])
    v = torch.cat([t.reshape(-1) for t in vs])
    denom = v.sqrt() / math.sqrt(1 - hp["b2"] ** 3) + hp["eps"]
    lay = plan_momentum_layout(m.numel(), 1)
    u = torch.zeros(lay.padded)
    u[: m.numel()] = (m / denom).abs()
    live = torch.zeros(lay.padded, dtype=torch.bool)
    live[: m.numel()] = v > 0
    u, live = u.view(-1, lay.chunk), live.view(-1, lay.chunk)
    top = torch.where(live, u, 0.0).amax(dim=1, keepdim=True)
    assert (top > 0).all()
    torch.testing.assert_close(torch.where(live, u, top), top.expand_as(u), rtol=1e-5, atol=0)
    # ... and |m| is not (the denominators differ inside chunks).
    mags = torch.zeros(lay.padded)
    mags[: m.numel()] = m.abs()
    mags = mags.view(-1, lay.chunk)
    assert (mags.amax(dim=1) > 2 * torch.where(live, mags, math.inf).amin(dim=1)).any()


@pytest.mark.parametrize("threshold", [0.1, 0.002])
def test_onebit_lamb_factor_from_the_fresh_variance_by_hand(threshold):
    """[Note: 1-bit LAMB's fresh variance], recomputed from the state around each
    compressed step (world of one, weight decay on): the fresh variance moves with the
    grads the synced momentum implies, the factor is max(denom / denom') pulled to 1 by
    Adam's share of the direction, clipped to its bounds and near its last value."""
    hp = dict(lr=1e-2, b1=0.9, b2=0.999, eps=1e-6, wd=0.01)
    method = onebit_lamb(freeze_step=3, factor_threshold=threshold)
    params, apply = fs.functional(_gpt())
    opt = fs.optim.lamb(hp["lr"], weight_decay=hp["wd"])
    step = compress_comm(fs.train_step(gpt_loss(apply), opt), method)
    params, state = step.init(params)
    moved = 0
    for b in _batches(9, 4):
        before = [p.detach().clone() for p in tree.leaves(params) if p is not None]
        opt_state = state["optimizer"]
        m_prev = [t.clone() for t in tree.leaves(opt_state.exp_avg) if t is not None]
        fresh_prev, last = state[NAME]["fresh_variance"].clone(), state[NAME]["factor"].clone()
        params, state, metrics = step(params, state, b)
        if metrics["compress_phase"] != "onebit":
            continue
        s, t = state[NAME], state["optimizer"].count
        ms = [x for x in tree.leaves(state["optimizer"].exp_avg) if x is not None]
        vs = [x for x in tree.leaves(state["optimizer"].exp_avg_sq) if x is not None]
        if t - 1 == s["v_count"]:
            fresh_prev = torch.cat([v.reshape(-1) for v in vs])
        m, mp = torch.cat([x.reshape(-1) for x in ms]), torch.cat([x.reshape(-1) for x in m_prev])
        g = (m - hp["b1"] * mp) / (1 - hp["b1"])
        fresh = hp["b2"] * fresh_prev + (1 - hp["b2"]) * g * g
        torch.testing.assert_close(s["fresh_variance"], fresh, rtol=1e-5, atol=1e-12)
        want, off = [], 0
        for x, v, p in zip(ms, vs, before, strict=True):
            n = x.numel()
            d = v.sqrt() / math.sqrt(1 - hp["b2"] ** s["v_count"]) + hp["eps"]
            d2 = fresh[off : off + n].view_as(v).sqrt() / math.sqrt(1 - hp["b2"] ** t) + hp["eps"]
            off += n
            adam = x / d / (1 - hp["b1"] ** t)
            share = min(1.0, float(adam.norm() / (adam + hp["wd"] * p).norm()))
            f = float((d / d2).max()) * share + 1 - share
            want.append(min(max(f, 0.5), 4.0))
        want = torch.tensor(want)
        want = torch.minimum(torch.maximum(want, last * (1 - threshold)), last * (1 + threshold))
        torch.testing.assert_close(s["factor"], want, rtol=1e-4, atol=0)
        moved += 1
    assert moved == 6
    assert not torch.equal(s["factor"], torch.ones_like(s["factor"]))  # it moved


def test_onebit_lamb_unit_factors_keep_the_frozen_trust_ratios():
    """factor_min = factor_max = 1: the warm-up ratios step unchanged, whatever the fresh
    variance says; the default factor changes the params."""

    def run(**kw):
        params, apply = fs.functional(_gpt())
        step = compress_comm(
            fs.train_step(gpt_loss(apply), fs.optim.lamb(1e-2)), onebit_lamb(freeze_step=3, **kw)
        )
        params, state = step.init(params)
        for b in _batches(6, 4):
            params, state, _ = step(params, state, b)
        return params, state

    unit, state = run(factor_min=1.0, factor_max=1.0)
    assert torch.equal(state[NAME]["factor"], torch.ones_like(state[NAME]["factor"]))
    assert state[NAME]["fresh_variance"].abs().sum() > 0
    default, _ = run()
    assert any(not torch.equal(unit[k], default[k]) for k in unit)


def test_zero_one_schedule():
    m = zero_one_adam(
        var_freeze_step=20, var_update_scaler=3, local_step_scaler=4, local_step_clipper=4
    )
    acts = [_zero_one_schedule(m, k) for k in range(40)]
    # Variance updates at 0,1,2, then every 2nd (3,5,7), every 4th (9,13,17), ...
    assert [k for k in range(20) if acts[k] == "variance"] == [0, 1, 2, 3, 5, 7, 9, 13, 17]
    assert set(acts[:20]) == {"variance", "onebit"}
    assert acts[20:24] == ["onebit"] * 4  # H = 1
    assert acts[24:28] == ["local", "sync", "local", "sync"]  # H = 2
    assert acts[28:32] == ["local", "local", "local", "sync"]  # H = 4 (clipped)


# ----------------------------------------------------------------------------- resume, errors


def _resume_case(tmp_path, name):
    method = {
        "onebit_adam": onebit_adam(freeze_step=3),
        "zero_one_adam": zero_one_adam(
            var_freeze_step=3, var_update_scaler=1, local_step_scaler=1, local_step_clipper=4
        ),
        "onebit_lamb": onebit_lamb(freeze_step=3),
    }[name]
    model = _gpt()
    batches = _batches(10, batch=4)

    def build():
        params, apply = fs.functional(copy.deepcopy(model))
        return compress_comm(fs.train_step(gpt_loss(apply), _opt(name)), method), params

    step, params = build()
    params, state = step.init(params)
    for i, b in enumerate(batches):
        params, state, _ = step(params, state, b)
        if i == 5:  # mid-window for 0/1 Adam (a local step just ran)
            fs.save(tmp_path / name, params, state)
    step2, fresh = build()
    params2, state2 = fs.load(tmp_path / name, step2, fresh)
    assert state2[NAME]["v_count"] > 0  # restored (a fresh slot has 0)
    for b in batches[6:]:
        params2, state2, _ = step2(params2, state2, b)
    for k in params:
        assert torch.equal(params[k], params2[k]), (name, k)
    assert state2[NAME]["v_count"] == state[NAME]["v_count"]
    assert state2[NAME].get("window") == state[NAME].get("window")
    keys = ["worker_error", "server_error"]
    if name == "onebit_lamb":  # [Note: 1-bit LAMB's fresh variance]
        keys += ["fresh_variance", "factor"]
        assert not torch.equal(state2[NAME]["factor"], torch.ones_like(state2[NAME]["factor"]))
    for key in keys:
        assert torch.equal(state[NAME][key], state2[NAME][key])
        # The buffers were in use (in a world of one the server recompresses chunks of
        # +-scale, exactly with coded scales: its error stays zero).
        assert state[NAME][key].abs().sum() > 0 or key == "server_error"


@pytest.mark.parametrize("name", ["onebit_adam", "zero_one_adam", "onebit_lamb"])
def test_resume_equals_uninterrupted_run(tmp_path, name):
    _resume_case(tmp_path, name)


def _plain(opt=None):
    params, apply = fs.functional(_gpt())
    return fs.train_step(gpt_loss(apply), opt or fs.optim.adam(1e-3))


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda: onebit_adam(freeze_step=-1), ValueError, "freeze_step must be an int >= 1"),
        (lambda: onebit_adam(freeze_step=0), ValueError, "freeze_step must be an int >= 1"),
        (lambda: onebit_adam(freeze_step=True), ValueError, "freeze_step"),
        (lambda: onebit_lamb(freeze_step=5, coeff_beta=1.0), ValueError, r"coeff_beta .* \[0, 1\)"),
        (
            lambda: onebit_lamb(freeze_step=5, factor_min=2.0, factor_max=1.0),
            ValueError,
            r"0 < factor_min <= factor_max .* factor_min=2.0, factor_max=1.0",
        ),
        (lambda: onebit_lamb(freeze_step=5, factor_min=0), ValueError, "factor_min"),
        (lambda: onebit_lamb(freeze_step=5, factor_threshold=-0.1), ValueError, "threshold"),
        (lambda: onebit_lamb(freeze_step=5, factor_max="4"), ValueError, "factor_max"),
        (lambda: zero_one_adam(var_freeze_step=10, local_step_clipper=0), ValueError, "clipper"),
        (
            lambda: compress_comm(_plain(fs.optim.lamb(1e-2)), onebit_adam(freeze_step=5)),
            ValueError,
            r"fs.optim.adam\(...\) or fs.optim.adamw\(...\), but its optimizer is lamb",
        ),
        (
            lambda: compress_comm(_plain(), onebit_lamb(freeze_step=5)),
            ValueError,
            r"fs.optim.lamb\(...\), but its optimizer is adam",
        ),
        (
            lambda: compress_comm(
                _plain(fs.optim.chain(fs.optim.clip_by_global_norm(1.0), fs.optim.adam(1e-3))),
                zero_one_adam(var_freeze_step=5),
            ),
            ValueError,
            "does not describe itself",
        ),
        (
            lambda: compress_comm(fs.shard_zero(_plain(), 3), onebit_adam(freeze_step=5)),
            ValueError,
            r"over shard_zero\(stage=3\).*Stage 3 is refused by design",
        ),
        (
            lambda: fs.shard_zero(compress_comm(_plain(), onebit_adam(freeze_step=5)), 3),
            ValueError,
            "shard_zero cannot be applied over compress_comm",
        ),
        (lambda: compress_comm(_plain(), object()), TypeError, "not a compression method"),
    ],
)
def test_bad_inputs_raise_naming_the_fix(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_state_slot_describes_itself():
    step = compress_comm(_plain(), zero_one_adam(var_freeze_step=2))
    params, _ = fs.functional(_gpt())
    _, state = step.init(params)
    entries = describe(state)
    assert entries[f"{NAME}/worker_error"].placement.shard == ("dp",)
    assert entries[f"{NAME}/window/sum_lr"] == 0.0


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_mixed_precision_composes_in_either_order(dtype):
    def run(outer):
        params, apply = fs.functional(_gpt())
        step = fs.train_step(gpt_loss(apply), fs.optim.adam(2e-3))
        method = onebit_adam(freeze_step=3)
        if outer:
            step = compress_comm(fs.mixed_precision(step, dtype), method)
        else:
            step = fs.mixed_precision(compress_comm(step, method), dtype)
        params, state = step.init(params)
        for b in _batches(6, 4):
            params, state, metrics = step(params, state, b)
        assert metrics["compress_phase"] == "onebit"
        return params

    a, b = run(True), run(False)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_explain_shows_the_compressed_collectives():
    params, apply = fs.functional(_gpt())
    step = compress_comm(
        fs.train_step(gpt_loss(apply), fs.optim.adam(1e-3)), onebit_adam(freeze_step=3)
    )
    plan = fs.plan(step, params)
    assert "compress_comm buffers" in plan.memory
    assert not any(c.tag == "dp.grads" for c in plan.collectives)


@pytest.mark.parametrize("name", ["onebit_adam", "zero_one_adam", "adam_l2"])
def test_blockwise_cpu_step_equals_the_leafwise_step_bitwise(monkeypatch, name):
    """[Note: the 1-bit Adam step in blocks on a CPU]: blocks that split leaves, the
    cached denominators and dead positions, the decode into the momentum: the bits of
    the leaf-by-leaf step (world of one; decoupled decay and L2)."""
    from fscale.transforms._compress import onebit as ob
    from fscale.transforms._compress import onebit_allreduce as ar

    def run(blockwise: bool):
        monkeypatch.setattr(ob, "_BLOCK", 1000)
        monkeypatch.setattr(ar, "CPU_BLOCK", 96)  # decoded blocks of 3 rows: the step per block
        if not blockwise:
            monkeypatch.setattr(ob, "_blockwise_ok", lambda lv: False)
        params, apply = fs.functional(_gpt())
        opt = fs.optim.adam(2e-3, weight_decay=0.01) if name == "adam_l2" else _opt(name)
        method = (
            zero_one_adam(var_freeze_step=3, local_step_scaler=1000)
            if name == "zero_one_adam"
            else onebit_adam(freeze_step=3)
        )
        step = compress_comm(fs.train_step(gpt_loss(apply), opt), method)
        params, state = step.init(params)
        for b in _batches(8, 4):
            params, state, metrics = step(params, state, b)
        assert metrics["compress_phase"] == "onebit"
        monkeypatch.undo()
        return params, state

    (p1, s1), (p2, s2) = run(True), run(False)
    assert all(torch.equal(p1[k], p2[k]) for k in p1)
    for key in ("exp_avg", "exp_avg_sq"):
        a = tree.leaves(getattr(s1["optimizer"], key))
        b = tree.leaves(getattr(s2["optimizer"], key))
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True) if x is not None)
    assert torch.equal(s1[NAME]["worker_error"], s2[NAME]["worker_error"])
    assert torch.equal(s1[NAME]["server_error"], s2[NAME]["server_error"])

"""mixed_precision: bf16/fp16 track fp32, compose with shard_zero; fp16 overflows skip steps."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn.functional as F

import fscale as fs
from fscale.models.gpt import GPT, GPTConfig
from fscale.transforms import mixed_precision, shard_zero
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


def _flat(params: dict) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in params.values()])


def _global_rel(a: dict, b: dict) -> float:
    """``|a - b| / |b|`` over all params at once (2-norms)."""
    return ((_flat(a) - _flat(b)).norm() / _flat(b).norm()).item()


def _problem(kind: str, seed: int = 0):
    if kind == "mlp":
        model = mlp([5, 13, 7, 3], seed=seed)
        return model, regression_loss, regression_batches(STEPS, GLOBAL_BATCH, 5, 3, seed=seed + 1)
    if kind == "tied_lm":
        torch.manual_seed(seed)
        return TiedLM(), lm_loss, lm_batches(STEPS, GLOBAL_BATCH, 6, vocab=11, seed=seed + 1)
    # No biases: the key part of a qkv bias has an exactly-zero true gradient, so Adam
    # turns rounding noise into full-size steps there (true of any two float orders).
    torch.manual_seed(seed)
    cfg = GPTConfig.tiny(bias=False, tie_embeddings=(kind == "gpt"))
    return GPT(cfg), lm_loss, lm_batches(STEPS, GLOBAL_BATCH, 8, vocab=cfg.vocab_size, seed=seed)


def _train(kind, dtype, *, optimizer=None, steps=STEPS, clip_norm=1.0, rank=0, world=1, **mp):
    """Params (full, fp32), per-step losses and the last metrics of ``steps`` steps."""
    model, make_loss, batches = _problem(kind)
    params, apply = fs.functional(copy.deepcopy(model))
    optimizer = optimizer or fs.optim.adamw(lr=1e-2, weight_decay=0.1)
    stage = mp.pop("stage", None)
    step = fs.train_step(
        make_loss(apply), optimizer, clip_norm=clip_norm, accumulate=mp.pop("accumulate", 1)
    )
    if dtype is not None:
        step = mixed_precision(step, dtype, **mp)
    if stage:
        step = shard_zero(step, stage)
    params, state = step.init(params)
    per_rank = GLOBAL_BATCH // world
    losses, metrics = [], {}
    for batch in batches[:steps]:
        local = {k: v[rank * per_rank : (rank + 1) * per_rank] for k, v in batch.items()}
        params, state, metrics = step(params, state, local)
        losses.append(metrics["loss"])
    return fs.gather_params(params, state), torch.stack(losses), metrics, state


# ----------------------------------------------------------------------------- vs fp32

# Measured over 6 seeds (max), the seed used here in brackets. Params after 10 AdamW
# steps, global relative 2-norm error, mlp/tied_lm: bf16 7e-3 [1.3e-3], fp16 2e-4
# [1.8e-4]; GPT: bf16 9e-2 [4.8e-2], fp16 2.6e-2 [1.7e-2] -- Adam turns the rounding
# noise of its many near-zero grads into full-size steps, so GPT is held to its loss
# curve and first-step grads instead. Losses: bf16 1.5e-2 [6.4e-3], fp16 1.3e-3
# [9.2e-4]; first-step grads: bf16 1e-2 [6.4e-3], fp16 1.3e-3 [8.1e-4]. The bounds
# are ~2-3x the maxima.
_PARAM_TOL = {"bf16": 2e-2, "fp16": 1e-3}
_LOSS_TOL = {"bf16": 3e-2, "fp16": 4e-3}
_GRAD_TOL = {"bf16": 2e-2, "fp16": 3e-3}
# fp16 starts from a scale that does not overflow in the first steps, so no step is
# skipped and the runs are comparable step for step (the default 2**16 overflows:
# the fp16 loss-grad of 65536 exceeds fp16's 65504, as in DeepSpeed's first steps).
_FP16 = {"init_scale": 1024.0}


# One SGD step with lr=1 moves the params by exactly -grad. The clip norm is never
# reached; it only makes the step report the grad norm.
_SGD_STEP = {"optimizer": fs.optim.sgd(lr=1.0), "steps": 1, "clip_norm": 1e9}


@functools.cache
def _fp32(kind: str, one_sgd_step: bool):
    return _train(kind, None, **(_SGD_STEP if one_sgd_step else {}))


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
@pytest.mark.parametrize("kind", ["mlp", "tied_lm", "gpt"])
def test_tracks_fp32_reference(kind, dtype):
    extra = _FP16 if dtype == "fp16" else {}
    expected, ref_losses, _, _ = _fp32(kind, False)
    params, losses, metrics, state = _train(kind, dtype, **extra)

    assert all(p.dtype == torch.float32 for p in params.values())  # fp32 masters
    assert losses.dtype == torch.float32
    loss_err = ((losses - ref_losses).abs() / ref_losses.abs()).max().item()
    assert loss_err <= _LOSS_TOL[dtype], f"losses {loss_err:.2e}"
    if kind != "gpt":
        assert _global_rel(params, expected) <= _PARAM_TOL[dtype]
    if dtype == "fp16":
        assert metrics["skipped_steps"] == 0 and state["mixed_precision"]["skipped_steps"] == 0

    # The grads of one step, and their norm: that of the unscaled grads (clipping sees
    # them), not off by the loss scale.
    p0 = fs.functional(copy.deepcopy(_problem(kind)[0]))[0]
    ref_params, _, ref_metrics, _ = _fp32(kind, True)
    mp_params, _, metrics, _ = _train(kind, dtype, **_SGD_STEP, **extra)
    g_ref = {k: p0[k] - v for k, v in ref_params.items()}
    g_mp = {k: p0[k] - v for k, v in mp_params.items()}
    assert _global_rel(g_mp, g_ref) <= _GRAD_TOL[dtype]
    norm_err = abs(metrics["grad_norm"] / ref_metrics["grad_norm"] - 1).item()
    assert norm_err <= _GRAD_TOL[dtype]


def test_loss_scaling_rescues_grads_that_underflow_in_fp16():
    # d(loss)/dw = 1e-8 * x: below fp16's smallest subnormal (6e-8) unless scaled.
    def loss_fn(params, batch):
        return (params["w"] * batch["x"]).sum() * 1e-8

    x = torch.linspace(0.5, 1.5, 6)
    moved = {}
    for scale in (1.0, 2.0**15):
        step = mixed_precision(
            fs.train_step(loss_fn, fs.optim.sgd(lr=1.0)), "fp16", init_scale=scale
        )
        params, state = step.init({"w": torch.zeros(6)})
        params, state, metrics = step(params, state, {"x": x})
        assert metrics["loss_scale"].item() == scale and not metrics["overflow"]
        moved[scale] = -params["w"]
    assert torch.equal(moved[1.0], torch.zeros(6))  # the grads underflowed to zero
    torch.testing.assert_close(moved[2.0**15], 1e-8 * x, rtol=2e-3, atol=0)


def test_bf16_has_no_loss_scaling_and_cast_inputs_false_leaves_the_batch():
    seen = []

    def loss_fn(params, batch):
        seen.append((params["w"].dtype, batch["x"].dtype, batch["i"].dtype))
        return (params["w"] * batch["x"].to(params["w"].dtype)).sum()

    batch = {"x": torch.ones(3), "i": torch.arange(3)}
    for cast_inputs, x_dtype in ((True, torch.bfloat16), (False, torch.float32)):
        step = fs.train_step(loss_fn, fs.optim.sgd(lr=0.1))
        step = mixed_precision(step, torch.bfloat16, cast_inputs=cast_inputs)
        params, state = step.init({"w": torch.zeros(3)})
        params, state, metrics = step(params, state, batch)
        assert seen[-1] == (torch.bfloat16, x_dtype, torch.int64)  # ids are never cast
        assert "mixed_precision" not in state and "loss_scale" not in metrics
        assert params["w"].dtype == torch.float32
        torch.testing.assert_close(params["w"], torch.full((3,), -0.1))


# ----------------------------------------------------------------------------- overflow


def _boom_loss(params, batch):
    # batch["boom"] is 1.0, or inf on the step that must overflow.
    return F.mse_loss(params["w"] * batch["x"], batch["y"]) * batch["boom"].sum()


def _boom_batches(pattern: str, rank: int = 0, boom_rank: int | None = None):
    """One batch per character: "." clean, "!" overflow (on ``boom_rank`` only, if given)."""
    g = torch.Generator().manual_seed(rank)
    out = []
    for c in pattern:
        bad = c == "!" and (boom_rank is None or rank == boom_rank)
        out.append(
            {
                "x": torch.randn(4, 8, generator=g),
                "y": torch.randn(4, 8, generator=g),
                "boom": torch.tensor([float("inf") if bad else 1.0]),
            }
        )
    return out


def _run_pattern(pattern, **mp):
    """Snapshots around each step (inputs are donated: later steps reuse the buffers)."""
    step = fs.train_step(_boom_loss, fs.optim.adamw(lr=1e-2), clip_norm=1.0)
    step = mixed_precision(step, "fp16", **mp)
    params, state = step.init({"w": torch.linspace(-1, 1, 8)})
    log = []
    for batch in _boom_batches(pattern):
        before = {"w": params["w"].clone(), "opt": copy.deepcopy(state["optimizer"])}
        params, state, metrics = step(params, state, batch)
        log.append(
            {
                "before": before,
                "w": params["w"].clone(),
                "opt": copy.deepcopy(state["optimizer"]),
                "count": state["count"],
                "slot": dict(state["mixed_precision"]),
                "metrics": metrics,
            }
        )
    return log


def test_overflow_skips_the_step_and_halves_the_scale():
    log = _run_pattern("..!.", init_scale=64.0, hysteresis=1)
    entry = log[2]
    before, metrics = entry["before"], entry["metrics"]
    assert metrics["overflow"] is True and metrics["skipped_steps"] == 1
    assert metrics["loss_scale"].item() == 64.0  # the scale this step tried
    assert torch.equal(entry["w"], before["w"])  # bit for bit
    assert entry["opt"].count == before["opt"].count == 2
    assert torch.equal(entry["opt"].exp_avg["w"], before["opt"].exp_avg["w"])
    assert torch.equal(entry["opt"].exp_avg_sq["w"], before["opt"].exp_avg_sq["w"])
    assert entry["slot"]["scale"].item() == 32.0
    assert entry["count"] == 3  # calls of the step, skipped ones included
    # The step after it updates normally, with the new scale.
    entry = log[3]
    assert entry["metrics"]["overflow"] is False
    assert entry["metrics"]["loss_scale"].item() == 32.0
    assert entry["metrics"]["skipped_steps"] == 1
    assert entry["opt"].count == 3 and not torch.equal(entry["w"], entry["before"]["w"])
    assert all(not e["metrics"]["overflow"] for e in log[:2])


def test_hysteresis_takes_two_overflows_before_halving():
    log = _run_pattern("!!!.", init_scale=64.0)  # default hysteresis=2
    assert [e["slot"]["scale"].item() for e in log] == [64.0, 32.0, 16.0, 16.0]
    assert [e["slot"]["hysteresis"] for e in log] == [1, 1, 1, 1]
    assert [e["metrics"]["skipped_steps"] for e in log] == [1, 2, 3, 3]
    assert all(torch.equal(e["w"], log[0]["before"]["w"]) for e in log[:3])
    assert log[2]["opt"].count == 0 and log[3]["opt"].count == 1


def test_scale_grows_after_growth_interval_clean_steps_and_restores_hysteresis():
    log = _run_pattern("!...!....", init_scale=16.0, growth_interval=3)
    slots = [e["slot"] for e in log]
    assert [s["scale"].item() for s in slots] == [16, 16, 16, 32, 32, 32, 32, 64, 64]
    assert [s["hysteresis"] for s in slots] == [1, 1, 1, 2, 1, 1, 1, 2, 2]
    assert [s["clean_steps"] for s in slots] == [0, 1, 2, 0, 0, 1, 2, 0, 1]


def test_scale_never_drops_below_min_scale():
    log = _run_pattern("!!!", init_scale=4.0, hysteresis=1, min_scale=2.0)
    assert [e["slot"]["scale"].item() for e in log] == [2.0, 2.0, 2.0]


def _overflow_rank_fn(rank, world, stage):
    """Rank 1's grads overflow on step 0, in w's rows 2-3 only: the rows rank 1 owns."""
    w0 = torch.linspace(-1, 1, 4)

    def loss_fn(params, batch):
        return (params["w"] * batch["x"]).sum() + (params["b"] * batch["x"][:2]).sum()

    step = mixed_precision(fs.train_step(loss_fn, fs.optim.adamw(lr=0.1)), "fp16", init_scale=8.0)
    if stage:
        step = shard_zero(step, stage)
    params, state = step.init({"w": w0.clone(), "b": torch.zeros(2)})
    out = []
    for bad in (True, False):
        x = torch.ones(4)
        if bad and rank == 1:
            x[3] = 1e4  # its grad, 1e4 * scale 8, is inf in fp16 (max 65504)
        params, state, metrics = step(params, state, {"x": x})
        # With state: the fp32 masters (stages 1/2 keep fp16 compute copies as params).
        full = {k: v.clone() for k, v in fs.gather_params(params, state).items()}
        out.append((full, metrics["overflow"], metrics["skipped_steps"]))
    return out


@pytest.mark.parametrize("stage", [None, 2, 3])
def test_overflow_on_one_rank_skips_the_step_on_every_rank(stage):
    # Under shard_zero(2/3) the reduce-scatter leaves rank 0 with finite grads for its
    # rows 0-1: only the all-reduced flag tells it to skip.
    results = run_world(_overflow_rank_fn, 2, stage)
    w0 = torch.linspace(-1, 1, 4)
    for skipped, after in results:
        params, overflow, skipped_steps = skipped
        assert overflow is True and skipped_steps == 1
        assert torch.equal(params["w"], w0) and torch.equal(params["b"], torch.zeros(2))
        params, overflow, _ = after
        assert overflow is False and not torch.equal(params["w"], w0)
    assert torch.equal(results[0][1][0]["w"], results[1][1][0]["w"])


# ----------------------------------------------------------------------------- shard_zero


def _compose_fn(rank, world, cases):
    out = {}
    for kind, dtype, stage, accumulate, mp in cases:
        clip = 0.5 if kind == "mlp" else None
        params, _, metrics, _ = _train(
            kind,
            dtype,
            rank=rank,
            world=world,
            clip_norm=clip,
            stage=stage,
            accumulate=accumulate,
            **mp,
        )
        out[(kind, dtype, stage, accumulate, tuple(mp.items()))] = (params, metrics["comm_bytes"])
    return out


_BF16_REDUCE = {"reduce_dtype": torch.bfloat16}
_WORLD2_CASES = [
    *(("mlp", "bf16", s, 1, {}) for s in (1, 2, 3)),
    ("mlp", "fp16", 2, 1, _FP16),
    *(("mlp", "bf16", s, 1, _BF16_REDUCE) for s in (1, 2, 3)),
    *(
        ("gpt_untied", d, s, 1, _FP16 if d == "fp16" else {})
        for d in ("bf16", "fp16")
        for s in (1, 2, 3)
    ),
]


@pytest.fixture(scope="module")
def world2():
    return run_world(_compose_fn, 2, _WORLD2_CASES)


@pytest.fixture(scope="module")
def world1():
    # The references run in a world of one too: ranks run one thread, and thread
    # count changes the matmul summation order, hence bf16 roundings.
    cases = {(k, d, None, 2, tuple(m.items())): None for k, d, _, _, m in _WORLD2_CASES}
    cases.update(
        {(k, d, None, 1, tuple(m.items())): None for k, d, _, _, m in _WORLD2_CASES if k == "mlp"}
    )
    return run_world(_compose_fn, 1, [(k, d, s, a, dict(m)) for k, d, s, a, m in cases])[0]


def test_shard_zero_over_mixed_precision_equals_world_of_one(world1, world2):
    # Same global batch. With accumulate=2 the world of one rounds each half-batch's
    # grads to bf16/fp16 exactly as each rank does: the maths is the same, and the
    # results agree to fp32 rounding (bit for bit without clipping; with clipping the
    # sharded grad norm sums in another order). Without accumulate, the bf16 grads of
    # the full batch are rounded once instead of per half: bf16-level differences.
    # GPT is untied here: ZeRO-3 gathers a tied unit twice (embedding, then head), so
    # its two grad contributions are summed in fp32 after the reduce-scatter instead of
    # in bf16 before it -- legitimately different roundings (1e-3 after one step).
    for rank, by_case in enumerate(world2):
        for (kind, dtype, stage, _, mp), (params, _) in by_case.items():
            assert all(p.dtype == torch.float32 for p in params.values())
            same_maths = world1[(kind, dtype, None, 2, mp)][0]
            err = max_rel_error(params, same_maths)
            what = f"rank {rank} {kind} {dtype} stage {stage} {mp}"
            if kind == "mlp":  # measured <= 1e-7
                assert err <= 1e-6, f"{what}: {err:.2e}"
            else:
                assert err == 0.0, f"{what}: {err:.2e}"
            if kind == "mlp":
                # Measured 1.0e-3 (bf16), 8.8e-5 (fp16), 9.2e-4 (bf16 reduce).
                err = max_rel_error(params, world1[(kind, dtype, None, 1, mp)][0])
                assert err <= 5e-3, f"{what} vs one step per batch: {err:.2e}"


def test_reduce_dtype_halves_the_gradient_bytes_in_every_stage(world2):
    by_case = world2[0]
    grad_bytes = sum(p.numel() * 4 for p in by_case[("mlp", "bf16", 1, 1, ())][0].values())
    bf16 = tuple(_BF16_REDUCE.items())
    # One micro-batch: every stage reduce-scatters the padded shards in backward.
    assert grad_bytes > 0
    for stage in (1, 2, 3):
        fp32_bytes = by_case[("mlp", "bf16", stage, 1, ())][1]["reduce_scatter"]
        assert by_case[("mlp", "bf16", stage, 1, bf16)][1]["reduce_scatter"] == fp32_bytes // 2


# ----------------------------------------------------------------------------- plan


def _plan_fn(rank, world):
    params, apply = fs.functional(mlp([5, 13, 7, 3]))
    step = fs.train_step(regression_loss(apply), fs.optim.adamw(lr=1e-2))
    out = {}
    for dtype, reduce in (("bf16", torch.float32), ("fp16", torch.bfloat16)):
        mp = mixed_precision(step, dtype, reduce_dtype=reduce)
        params_, state = mp.init(dict(params))
        batch = regression_batches(1, 4, 5, 3)[0]
        _, _, metrics = mp(params_, state, batch)
        out[dtype] = (fs.plan(mp, params), metrics["comm_bytes"], fs.explain(mp, params))
    return out


def test_plan_matches_the_traffic_and_names_the_compute_dtype():
    out = run_world(_plan_fn, 2)[0]
    plan, traffic, text = out["bf16"]
    # The 4 bytes: the step's non-finite vote, which also averages the loss
    # (fscale/_guard.py); fp16's overflow flag rides on it (one vote, not two).
    assert [(c.op, c.stage, c.bytes) for c in plan.collectives] == [
        ("all_reduce", "reduce_grads", plan.param_bytes),
        ("all_reduce", "finish_grads", 4),
    ]
    assert traffic == {"all_reduce": plan.param_bytes + 4}
    assert "compute in bf16" in text and "mixed_precision(param_dtype=torch.bfloat16" in text
    plan, traffic, text = out["fp16"]
    assert [(c.op, c.stage, c.bytes) for c in plan.collectives] == [
        ("all_reduce", "reduce_grads", plan.param_bytes // 2),
        ("all_reduce", "finish_grads", 4),
    ]
    assert traffic == {"all_reduce": plan.param_bytes // 2 + 4}
    assert "loss scaling" in text and "grads reduced in bf16" in text


# ----------------------------------------------------------------------------- errors


def _step():
    return fs.train_step(lambda p, b: p["w"].sum(), fs.optim.sgd(lr=0.1))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"dtype": "fp8"}, ValueError, r"unknown compute dtype 'fp8'; use one of 'bf16', 'fp16'"),
        ({"dtype": torch.float32}, ValueError, r"unknown compute dtype torch.float32.*leave"),
        ({"reduce_dtype": torch.int8}, ValueError, r"reduce_dtype must be a floating dtype"),
        ({"reduce_dtype": "int8"}, ValueError, r"reduce_dtype must be a floating dtype.*'int8'"),
        ({"init_scale": 0.0}, ValueError, r"init_scale must be finite and > 0, got 0.0"),
        ({"init_scale": -2.0}, ValueError, r"init_scale must be finite and > 0"),
        ({"init_scale": float("inf")}, ValueError, r"init_scale must be finite"),
        ({"init_scale": "big"}, TypeError, r"init_scale must be a number"),
        ({"min_scale": 0.0}, ValueError, r"min_scale must be finite and > 0, got 0.0"),
        ({"init_scale": 0.5}, ValueError, r"init_scale=0.5 is below min_scale=1.0"),
        ({"growth_interval": 0}, ValueError, r"growth_interval must be an int >= 1.*got 0"),
        ({"growth_interval": 2.5}, ValueError, r"growth_interval must be an int >= 1"),
        ({"hysteresis": 0}, ValueError, r"hysteresis must be an int >= 1.*got 0"),
        ({"cast_inputs": "yes"}, TypeError, r"cast_inputs must be a bool"),
    ],
)
def test_bad_arguments_fail_at_build_time(kwargs, error, match):
    kwargs = {"dtype": "fp16", **kwargs}
    with pytest.raises(error, match=match):
        mixed_precision(_step(), **kwargs)


def test_stack_errors():
    with pytest.raises(
        ValueError,
        match=r"mixed_precision cannot be applied over shard_zero: apply mixed_precision "
        r"first: shard_zero\(mixed_precision\(step\), stage\)",
    ):
        mixed_precision(shard_zero(_step(), 2), "bf16")
    with pytest.raises(ValueError, match="mixed_precision is applied twice"):
        mixed_precision(mixed_precision(_step(), "bf16"), "fp16")
    assert fs.mixed_precision is mixed_precision


def test_half_params_are_refused_at_init():
    step = mixed_precision(_step(), "bf16")
    with pytest.raises(
        ValueError, match=r"keeps fp32 master weights, but param 'w' is torch.bfloat16"
    ):
        step.init({"w": torch.zeros(3, dtype=torch.bfloat16)})

"""A catalogue of bad inputs across every transform, each with its message checked.

Extends ``tests/test_errors.py`` (the step's own checks) and
``tests/test_build_errors.py`` (meshes, units, leaves) without repeating them. It
holds every silent case of issue 15 that the step guards (a NaN batch in fp32, bf16
and fp16, stale state, a bad learning rate, quantized params, ranks with different
params, ZeRO-3 ranks running units in different orders): each now raises, naming
what was wrong and the fix. The multi-rank ones run in one gloo world of 2.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fscale as fs
from tests.dist import run_world
from tests.helpers import error_text, mlp, regression_batches, regression_loss


def _problem(opt=None, *, widths=(3, 4, 2), **kw):
    params, apply = fs.functional(mlp(list(widths)))
    step = fs.train_step(regression_loss(apply), opt or fs.optim.adamw(1e-2), **kw)
    return step, dict(params), apply


def _batch(n=4):
    return regression_batches(1, n, 3, 2)[0]


def _nan_batch():
    b = _batch()
    return {**b, "x": torch.full_like(b["x"], float("nan"))}


def _run(step, params, batches):
    params, state = step.init(params)
    for b in batches:
        params, state, _ = step(params, state, b)


class _Blocks(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList([nn.Linear(3, 3), nn.Linear(3, 3)])

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x


# ----------------------------------------------------------------------------- silent cases


def _nan_fp32():
    step, params, _ = _problem(max_nonfinite_skips=2)
    _run(step, params, [_batch(), _nan_batch(), _nan_batch()])


def _nan_bf16():
    step, params, _ = _problem(max_nonfinite_skips=2)
    _run(fs.mixed_precision(step, "bf16"), params, [_nan_batch(), _nan_batch()])


def _nan_fp16_at_floor():
    step, params, _ = _problem(max_nonfinite_skips=2)
    step = fs.mixed_precision(step, "fp16", init_scale=1.0, min_scale=1.0)
    _run(step, params, [_nan_batch(), _nan_batch()])


def _inf_loss_finite_grads():
    # The loss is inf while every grad is finite: the vote reads the loss too.
    params, apply = fs.functional(mlp([3, 4, 2]))

    def loss_fn(p, b):
        return F.mse_loss(apply(p, b["x"]), b["y"]) + b["y"].new_tensor(float("inf"))

    step = fs.train_step(loss_fn, fs.optim.sgd(0.1), max_nonfinite_skips=1)
    _run(step, dict(params), [_batch()])


def _nan_zero3():
    step, params, _ = _problem(max_nonfinite_skips=1)
    _run(fs.shard_zero(step, 3), params, [_nan_batch()])


def _nan_offload(**kw):
    step, params, _ = _problem(max_nonfinite_skips=1)
    _run(fs.offload(step, "cpu", **kw), params, [_batch(), _nan_batch()])


def _inf_grad_offload():
    # sqrt at 0: a finite loss whose grad is inf, so the streamed update already ran.
    model = torch.nn.Linear(4, 1)
    params, apply = fs.functional(model)

    def loss_fn(p, b):
        return torch.sqrt((apply(p, b["x"]) * 0.0).square()).sum()

    step = fs.offload(fs.train_step(loss_fn, fs.optim.adamw(1e-3)), "cpu")
    _run(step, params, [{"x": torch.ones(2, 4)}])


def _stale_state():
    step, params, _ = _problem()
    params, state = step.init(params)
    new_params, _, _ = step(params, state, _batch())
    step(new_params, state, _batch())


def _stale_params():
    # An unfused optimizer: the step returns new param tensors, the old ones are stale.
    step, params, _ = _problem(fs.optim.chain(fs.optim.scale_by_learning_rate(0.1)))
    params, state = step.init(params)
    _, state, _ = step(params, state, _batch())
    step(params, state, _batch())


def _negative_lr():
    step, params, _ = _problem(fs.optim.adamw(lambda count: 1e-3 - 1e-3 * count))
    _run(step, params, [_batch(), _batch(), _batch()])


def _nan_lr():
    step, params, _ = _problem(fs.optim.sgd(lambda count: float("nan")))
    _run(step, params, [_batch()])


def _quantized():
    step, params, _ = _problem(widths=(64, 64, 2))
    step.init(fs.quantize(params, "int8", group_size=32))


# ----------------------------------------------------------------------------- the catalogue

CASES = [
    # train_step: the guards' own options
    ("nonfinite mode", lambda: _problem(nonfinite="ignore"), ValueError,
     r"nonfinite must be one of \('skip', 'skip_now', 'skip_late', 'off'\), got 'ignore'"),
    ("max_nonfinite_skips 0", lambda: _problem(max_nonfinite_skips=0), ValueError,
     r"max_nonfinite_skips must be an int >= 1 \(or None: never raise\), got 0"),
    ("max_nonfinite_skips bool", lambda: _problem(max_nonfinite_skips=True), ValueError,
     r"max_nonfinite_skips must be an int >= 1"),
    ("sync_init mode", lambda: _problem(sync_init="rank0"), ValueError,
     r"sync_init must be one of \('check', 'broadcast', 'off'\), got 'rank0'"),
    # train_step: the silent cases of issue 15
    ("NaN batch fp32", _nan_fp32, FloatingPointError,
     r"2 steps in a row had a non-finite loss .*max_nonfinite_skips=2.*last good step"),
    ("NaN batch bf16", _nan_bf16, FloatingPointError, r"2 steps in a row had a non-finite"),
    ("NaN batch fp16 at the loss-scale floor", _nan_fp16_at_floor, FloatingPointError,
     r"2 steps in a row.*loss scale is at its floor"),
    ("inf loss, finite grads", _inf_loss_finite_grads, FloatingPointError,
     r"1 steps in a row had a non-finite loss"),
    ("NaN batch ZeRO-3", _nan_zero3, FloatingPointError, r"1 steps in a row"),
    ("NaN batch offload", lambda: _nan_offload(overlap=False), FloatingPointError,
     r"1 steps in a row"),
    ("NaN batch offload streaming in backward", _nan_offload, FloatingPointError,
     r"1 steps in a row"),
    ("inf grad, finite loss, offload streaming in backward", _inf_grad_offload,
     FloatingPointError,
     r"a non-finite grad with a finite loss .* already ran on the grads during backward .* "
     r"Load the last checkpoint"),
    ("stale state", _stale_state, ValueError,
     r"stale state: this state is from step call 0 .* Rebind on every call"),
    ("stale params", _stale_params, ValueError,
     r"stale params: param '0.bias' is from step call 0, the state from call 1"),
    ("negative lr", _negative_lr, ValueError,
     r"the schedule of lr returned -0.001 at count 2 \(updates done so far\); it must be "
     r"finite and >= 0"),
    ("NaN lr", _nan_lr, ValueError, r"the schedule of lr returned nan at count 0"),
    ("quantized params", _quantized, TypeError,
     r"param '0.weight' is a QuantizedWeight \(quantized, packed\): it cannot be trained\. "
     r"Train the full-precision params"),
    # train_step: the loss
    ("has_aux without aux", lambda: _run(
        fs.train_step(lambda p, b: p["0.weight"].sum(), fs.optim.sgd(0.1), has_aux=True),
        _problem()[1], [_batch()]), ValueError,
     r"has_aux=True\): loss_fn must return \(loss, metrics_dict\), got a Tensor"),
    ("python float loss", lambda: _run(
        fs.train_step(lambda p, b: 1.0, fs.optim.sgd(0.1)), _problem()[1], [_batch()]),
     ValueError, r"loss_fn must return a scalar tensor, got float"),
    ("integer loss", lambda: _run(
        fs.train_step(lambda p, b: (p["0.weight"].sum() > 0).long(), fs.optim.sgd(0.1)),
        _problem()[1], [_batch()]), ValueError, r"returned a torch.int64 tensor"),
    ("units without model", lambda: _problem(units="blocks"), ValueError,
     r"names modules of the model, but no model was given"),
    # mixed_precision
    ("mp compute dtype", lambda: fs.mixed_precision(_problem()[0], "fp8"), ValueError,
     r"unknown compute dtype 'fp8'; use one of 'bf16', 'fp16'"),
    ("mp reduce dtype", lambda: fs.mixed_precision(_problem()[0], "bf16", reduce_dtype="int8"),
     ValueError, r"reduce_dtype must be a floating dtype .* got 'int8'"),
    ("mp init_scale", lambda: fs.mixed_precision(_problem()[0], "fp16", init_scale=0.0),
     ValueError, r"init_scale must be finite and > 0, got 0.0"),
    ("mp scale below floor",
     lambda: fs.mixed_precision(_problem()[0], "fp16", init_scale=1.0, min_scale=2.0),
     ValueError, r"init_scale=1.0 is below min_scale=2.0"),
    ("mp hysteresis", lambda: fs.mixed_precision(_problem()[0], "fp16", hysteresis=0),
     ValueError, r"hysteresis must be an int >= 1"),
    ("mp cast_inputs", lambda: fs.mixed_precision(_problem()[0], "bf16", cast_inputs="yes"),
     TypeError, r"cast_inputs must be a bool"),
    ("mp half masters", lambda: fs.mixed_precision(_problem()[0], "bf16").init(
        {k: v.half() for k, v in _problem()[1].items()}), ValueError,
     r"keeps fp32 master weights, but param '0.bias' is torch.float16"),
    ("mp over shard_zero", lambda: fs.mixed_precision(fs.shard_zero(_problem()[0], 2), "bf16"),
     ValueError, r"apply mixed_precision first"),
    # shard_zero
    ("zero stage", lambda: fs.shard_zero(_problem()[0], 4), ValueError,
     r"stage must be 1, 2 or 3, got 4"),
    ("zero prefetch", lambda: fs.shard_zero(_problem()[0], 3, prefetch=-1), ValueError,
     r"prefetch must be an int >= 0, got -1"),
    ("zero unit policy", lambda: fs.shard_zero(_problem()[0], 3, unit="blocks"), TypeError,
     r"unit must be a callable param_name -> key, got str"),
    ("zero bucket", lambda: fs.shard_zero(_problem()[0], 2, bucket_mb=0), ValueError,
     r"bucket_mb must be > 0, got 0"),
    ("zero check_order", lambda: fs.shard_zero(_problem()[0], 3, check_order="always"),
     ValueError, r"check_order must be True, False or 'first', got 'always'"),
    ("zero params not a dict", lambda: fs.shard_zero(_problem()[0], 1).init(
        list(_problem()[1].values())), TypeError, r"needs the params dict from fs.functional"),
    # offload
    ("offload tier", lambda: fs.offload(_problem()[0], "disk"), ValueError,
     r"offload: unknown tier 'disk'"),
    ("offload what", lambda: fs.offload(_problem()[0], "cpu", what=("grads",)), ValueError,
     r"offload: what=\('grads',\)"),
    ("offload delayed nvme", lambda: fs.offload(
        _problem()[0], "nvme", path="/tmp", delayed_update=True), ValueError,
     r"delayed_update=True .* is for tier='cpu'"),
    ("offload under zero", lambda: fs.shard_zero(fs.offload(_problem()[0], "cpu"), 2),
     ValueError, r"apply offload last"),
    # checkpoint_activations
    ("ckpt policy", lambda: fs.checkpoint_activations(_problem()[0], "everything"), ValueError,
     r"unknown policy 'everything'"),
    ("ckpt without model", lambda: fs.checkpoint_activations(_problem()[0]), ValueError,
     r"does not know the model: build it with fs.train_step\(loss_fn, opt, model=model\)"),
    # quantize
    ("quantize format", lambda: fs.quantize(_problem(widths=(64, 64, 2))[1], "int3"),
     ValueError, r"int3"),
    # optim
    ("adamw lr", lambda: fs.optim.adamw(-1.0), ValueError,
     r"adamw: lr must be a float >= 0 or a schedule"),
    ("adamw b1", lambda: fs.optim.adamw(1e-3, b1=1.0), ValueError,
     r"b1 must be a float in \[0, 1\), got 1.0"),
    ("adamw eps", lambda: fs.optim.adamw(1e-3, eps=0.0), ValueError, r"eps must be a float > 0"),
    ("empty chain", lambda: fs.optim.chain(), ValueError, r"chain\(\) needs at least one"),
    ("chain of a torch optimizer", lambda: fs.optim.chain(fs.optim.sgd(0.1), "adam"), TypeError,
     r"chain\(\) argument 1 is str, not a GradientTransformation"),
    ("warmup_cosine order", lambda: fs.optim.warmup_cosine(1.0, 10, 5), ValueError,
     r"decay_steps=5\) is shorter than warmup_steps=10"),
    ("cosine alpha", lambda: fs.optim.cosine_decay(1.0, 10, alpha=2.0), ValueError,
     r"alpha\) must be in \[0, 1\], got 2.0"),
]  # fmt: skip


@pytest.mark.parametrize(("what", "fn", "kind", "pattern"), CASES, ids=[c[0] for c in CASES])
def test_bad_input(what, fn, kind, pattern):
    with pytest.raises(kind, match=pattern):
        fn()


def test_the_catalogue_is_long_enough():
    assert len(CASES) + len(_WORLD_CASES) >= 30


# ----------------------------------------------------------------------------- multi-rank


def _world_fn(rank, world):
    def drifted(**kw):
        params, apply = fs.functional(mlp([3, 4, 2], seed=rank))  # a seed per rank
        return fs.train_step(regression_loss(apply), fs.optim.sgd(0.1), **kw), dict(params)

    def order():
        model = _Blocks()
        params, apply = fs.functional(model)
        swap = rank == 1

        def loss_fn(p, x):
            blocks = list(model.blocks)
            y = x
            for name in ["blocks.1", "blocks.0"] if swap else ["blocks.0", "blocks.1"]:
                i = int(name[-1])
                y = F.linear(y, p[f"blocks.{i}.weight"], p[f"blocks.{i}.bias"])
            del blocks
            return y.pow(2).mean()

        step = fs.shard_zero(fs.train_step(loss_fn, fs.optim.sgd(0.1), model=model), 3)
        params, state = step.init(params)
        step(params, state, torch.ones(2, 3))

    out = {}
    step, params = drifted()
    out["rank drift"] = error_text(lambda: step.init(params))
    step, params = drifted()
    out["rank drift ZeRO-3"] = error_text(lambda: fs.shard_zero(step, 3).init(params))
    out["ZeRO-3 unit order"] = error_text(order)
    return out


_WORLD_CASES = {
    "rank drift": (
        r"ValueError: step.init: ranks hold different params: '0.bias' differs across mesh "
        r"dim 'dp' \(rank 0: sum=\S+, rank 1: sum=\S+\).*sync_init='broadcast'"
    ),
    "rank drift ZeRO-3": r"ranks hold different params: '0.bias'",
    "ZeRO-3 unit order": (
        r"RuntimeError: shard_zero\(3\): ranks disagree on the next unit to gather "
        r"\(rank 0: 'blocks.0', rank 1: 'blocks.1'\)"
    ),
}


def test_bad_inputs_across_ranks():
    import re

    for rank, got in enumerate(run_world(_world_fn, 2)):
        for what, pattern in _WORLD_CASES.items():
            assert re.search(pattern, got[what], re.S), (rank, what, got[what])

"""adam / adamw against torch.optim.Adam / AdamW; update vs fused update_params."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fscale.hw import dispatch
from fscale.optim import AdamState, adam, adamw, apply_updates, linear_warmup, value_at

from ._helpers import (
    TOL,
    clone,
    make_grads,
    make_params,
    rel_err,
    run_fscale,
    run_torch,
    seeds,
    shapes,
)

hparams = st.fixed_dictionaries(
    {
        "lr": st.floats(1e-4, 1e-1),
        "b1": st.floats(0.0, 0.99),
        "b2": st.floats(0.0, 0.9999),
        "eps": st.floats(1e-8, 1e-3),
        "weight_decay": st.floats(0.0, 0.2),
    }
)


def _torch_kw(h):
    return {
        "lr": h["lr"],
        "betas": (h["b1"], h["b2"]),
        "eps": h["eps"],
        "weight_decay": h["weight_decay"],
    }


@settings(max_examples=20, deadline=None)
@given(shape_list=shapes, seed=seeds, h=hparams)
def test_adamw_equals_torch_both_paths(shape_list, seed, h):
    params = make_params(shape_list, seed)
    grads = make_grads(params, seed)
    want = run_torch(lambda p: torch.optim.AdamW(p.values(), **_torch_kw(h)), params, grads)
    tx = adamw(**h)
    got, state = run_fscale(tx, params, grads)
    got_fused, state_fused = run_fscale(tx, params, grads, fused=True)
    assert rel_err(got, want, params) <= TOL
    assert rel_err(got_fused, want, params) <= TOL
    assert state.count == state_fused.count == len(grads)
    assert rel_err(state.exp_avg, state_fused.exp_avg) <= TOL
    assert rel_err(state.exp_avg_sq, state_fused.exp_avg_sq) <= TOL


@settings(max_examples=20, deadline=None)
@given(shape_list=shapes, seed=seeds, h=hparams)
def test_adam_l2_equals_torch_both_paths(shape_list, seed, h):
    params = make_params(shape_list, seed)
    grads = make_grads(params, seed)
    want = run_torch(lambda p: torch.optim.Adam(p.values(), **_torch_kw(h)), params, grads)
    tx = adam(**h)
    got, _ = run_fscale(tx, params, grads)
    got_fused, _ = run_fscale(tx, params, grads, fused=True)
    assert rel_err(got, want, params) <= TOL
    assert rel_err(got_fused, want, params) <= TOL


def test_adamw_schedule_equals_torch_with_lr_set_per_step():
    params = make_params([(4, 3), (3,)], 0)
    grads = make_grads(params, 0)
    lr = linear_warmup(1e-2, 5, start=1e-3)
    want = run_torch(
        lambda p: torch.optim.AdamW(p.values(), lr=1.0, weight_decay=0.1),
        params,
        grads,
        lrs=lambda k: value_at(lr, k),
    )
    for fused in (False, True):
        got, _ = run_fscale(adamw(lr, weight_decay=0.1), params, grads, fused=fused)
        assert rel_err(got, want, params) <= TOL


def test_state_layout_and_fp32_moments_for_bf16_params():
    params = {"w": torch.randn(4, 3, dtype=torch.bfloat16), "b": None}
    state = adamw(1e-3).init(params)
    assert isinstance(state, AdamState) and state.count == 0
    assert state.exp_avg["w"].dtype == torch.float32 and state.exp_avg["b"] is None
    assert state.exp_avg_sq["w"].dtype == torch.float32


def test_bf16_params_update_and_fused_agree():
    params = make_params([(8, 4), (4,)], 3, dtype=torch.bfloat16)
    grads = make_grads(params, 3, steps=3)
    got, state = run_fscale(adamw(1e-2, weight_decay=0.1), params, grads)
    got_fused, state_fused = run_fscale(adamw(1e-2, weight_decay=0.1), params, grads, fused=True)
    # The kernel rounds m and the denominator to the param dtype before dividing.
    assert rel_err(got_fused, got) <= 2e-2
    assert rel_err(state_fused.exp_avg, state.exp_avg) <= 1e-6


def test_none_grads_pass_through_both_paths():
    params = {"a": torch.randn(3, 2), "b": torch.randn(4)}
    grads = {"a": torch.randn(3, 2), "b": None}
    for fused in (False, True):
        tx = adamw(1e-2, weight_decay=0.1)
        state = tx.init(clone(params))
        p = clone(params)
        if fused:
            new, state = tx.update_params(clone(grads), state, p)
        else:
            updates, state = tx.update(clone(grads), state, p)
            assert updates["b"] is None
            new = apply_updates(p, updates)
        assert torch.equal(new["b"], params["b"])
        assert not torch.equal(new["a"], params["a"])
        assert torch.count_nonzero(state.exp_avg["b"]) == 0


def test_fused_updates_in_place_and_returns_same_tensors():
    params = make_params([(5, 2), (2,)], 1)
    tx = adamw(1e-2)
    state = tx.init(params)
    grads = make_grads(params, 1, steps=1)[0]
    new, new_state = tx.update_params(grads, state, params)
    assert all(new[k] is params[k] for k in params)
    assert all(new_state.exp_avg[k] is state.exp_avg[k] for k in params)
    assert new_state.count == 1


def test_fused_groups_by_decay_and_resolves_once_per_device_dtype(monkeypatch):
    calls, impl_calls = [], []
    real = dispatch.resolve

    def spy_resolve(op, device, dtype=None):
        calls.append((op, getattr(device, "dtype", dtype)))
        lowering = real(op, device, dtype)

        def impl(*lists, **kw):
            impl_calls.append((len(lists[0]), kw["weight_decay"], kw["step"]))
            return lowering.impl(*lists, **kw)

        return dispatch.Lowering(op=op, impl=impl, name="spy")

    monkeypatch.setattr(dispatch, "resolve", spy_resolve)
    params = {
        "w1": torch.randn(3, 3),
        "w2": torch.randn(2, 3),
        "b": torch.randn(3),
        "w64": torch.randn(2, 2, dtype=torch.float64),
    }
    tx = adamw(1e-2, weight_decay=0.1, mask=lambda p: {k: v.ndim >= 2 for k, v in p.items()})
    state = tx.init(params)
    for _ in range(3):
        grads = {k: torch.randn_like(v) for k, v in params.items()}
        params, state = tx.update_params(grads, state, params)
    assert sorted(str(d) for _, d in calls) == ["torch.float32", "torch.float64"]
    # per step: fp32 decayed (w1, w2), fp32 not decayed (b), fp64 decayed (w64)
    assert sorted(impl_calls[:3]) == [(1, 0.0, 1), (1, 0.1, 1), (2, 0.1, 1)]
    assert len(impl_calls) == 9 and impl_calls[-1][2] == 3


@pytest.mark.parametrize("make", [adam, adamw])
@pytest.mark.parametrize(
    "kw, match",
    [
        ({"lr": -1.0}, r"lr must be a float >= 0 or a schedule.*-1\.0"),
        ({"lr": "fast"}, r"lr must be .*'fast'"),
        ({"lr": 1e-3, "b1": 1.0}, r"b1 must be a float in \[0, 1\), got 1\.0"),
        ({"lr": 1e-3, "b2": -0.1}, r"b2 must be a float in \[0, 1\), got -0\.1"),
        ({"lr": 1e-3, "eps": 0.0}, r"eps must be a float > 0, got 0\.0"),
        ({"lr": 1e-3, "weight_decay": -0.01}, r"weight_decay must be a float >= 0.*-0\.01"),
        ({"lr": float("nan")}, r"lr must be .*nan"),
    ],
)
def test_bad_hyperparameters_raise(make, kw, match):
    with pytest.raises(ValueError, match=match):
        make(**kw)


def test_unknown_keyword_is_a_type_error():
    with pytest.raises(TypeError):
        adamw(1e-3, beta1=0.9)


def test_mismatched_grads_or_missing_params_raise():
    params = {"a": torch.randn(2, 2), "b": torch.randn(2)}
    tx = adamw(1e-3, weight_decay=0.1)
    state = tx.init(params)
    with pytest.raises(ValueError, match=r"adamw: the gradients.*missing \['b'\]"):
        tx.update({"a": torch.randn(2, 2)}, state, params)
    with pytest.raises(ValueError, match=r"needs the params"):
        tx.update({k: torch.randn_like(v) for k, v in params.items()}, state)

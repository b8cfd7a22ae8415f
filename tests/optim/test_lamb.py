"""lamb against the paper's update (with bias correction) written out per tensor."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fscale.optim import AdamState, apply_updates, decay_mask_default, lamb

from ._helpers import TOL, make_grads, make_params, rel_err, run_fscale, seeds, shapes


def lamb_reference(params, grads_seq, *, lr, b1, b2, eps, weight_decay, decay):
    """You et al. 2019, Algorithm 2 with phi = identity, one tensor at a time."""
    params = {k: p.clone() for k, p in params.items()}
    m = {k: torch.zeros_like(p) for k, p in params.items()}
    v = {k: torch.zeros_like(p) for k, p in params.items()}
    for t, grads in enumerate(grads_seq, start=1):
        for k in params:
            g = grads[k]
            m[k] = b1 * m[k] + (1 - b1) * g
            v[k] = b2 * v[k] + (1 - b2) * g * g
            m_hat = m[k] / (1 - b1**t)
            v_hat = v[k] / (1 - b2**t)
            r = m_hat / (v_hat.sqrt() + eps)
            if decay[k]:
                r = r + weight_decay * params[k]
            w_norm, r_norm = params[k].norm(), r.norm()
            trust = w_norm / r_norm if w_norm > 0 and r_norm > 0 else 1.0
            params[k] = params[k] - lr * trust * r
    return params


@settings(max_examples=20, deadline=None)
@given(
    shape_list=shapes,
    seed=seeds,
    lr=st.floats(1e-4, 1e-2),
    b1=st.floats(0.0, 0.99),
    b2=st.floats(0.5, 0.999),
    eps=st.floats(1e-8, 1e-4),
    weight_decay=st.floats(0.0, 0.1),
    use_mask=st.booleans(),
)
def test_lamb_equals_reference(shape_list, seed, lr, b1, b2, eps, weight_decay, use_mask):
    params = make_params(shape_list, seed)
    grads = make_grads(params, seed)
    mask = decay_mask_default if use_mask else None
    decay = decay_mask_default(params) if use_mask else {k: True for k in params}
    want = lamb_reference(
        params, grads, lr=lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, decay=decay
    )
    tx = lamb(lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=mask)
    got, state = run_fscale(tx, params, grads)
    assert isinstance(state, AdamState) and state.count == len(grads)
    assert rel_err(got, want, params) <= TOL


def test_trust_ratio_is_one_for_zero_param_and_zero_update():
    params = {"zero": torch.zeros(3, 2), "w": torch.randn(3, 2), "still": torch.randn(4)}
    grads = {"zero": torch.randn(3, 2), "w": torch.randn(3, 2), "still": torch.zeros(4)}
    tx = lamb(0.1)
    updates, _ = tx.update(dict(grads), tx.init(params), params)
    # ||w|| = 0: the step is lr * the Adam direction (magnitude ~1 per element at t=1).
    adam_dir = grads["zero"] / (grads["zero"].abs() + 1e-6)
    assert torch.allclose(updates["zero"], -0.1 * adam_dir, rtol=1e-5)
    # ||r|| = 0 (zero grad, no decay): no NaN, no move.
    assert torch.equal(apply_updates(params, updates)["still"], params["still"])
    # a normal leaf moves by exactly lr * ||w|| in norm.
    assert torch.allclose(updates["w"].norm(), 0.1 * params["w"].norm(), rtol=1e-5)


def test_needs_params():
    tx = lamb(1e-3)
    params = {"w": torch.randn(2, 2)}
    with pytest.raises(ValueError, match="lamb needs the params for its trust ratio"):
        tx.update({"w": torch.randn(2, 2)}, tx.init(params))


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"lr": -1.0}, r"lamb: lr must be a float >= 0 or a schedule.*-1\.0"),
        ({"lr": 1e-3, "b1": -0.1}, r"b1 must be a float in \[0, 1\), got -0\.1"),
        ({"lr": 1e-3, "b2": 1.0}, r"b2 must be a float in \[0, 1\), got 1\.0"),
        ({"lr": 1e-3, "eps": -1e-6}, r"eps must be a float > 0, got -1e-06"),
        ({"lr": 1e-3, "weight_decay": -1.0}, r"weight_decay must be a float >= 0.*-1\.0"),
    ],
)
def test_bad_hyperparameters_raise(kw, match):
    with pytest.raises(ValueError, match=match):
        lamb(**kw)

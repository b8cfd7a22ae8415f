"""lion against the paper's update written out per tensor."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fscale.optim import LionState, decay_mask_default, lion

from ._helpers import TOL, make_grads, make_params, rel_err, run_fscale, seeds, shapes


def lion_reference(params, grads_seq, *, lr, b1, b2, weight_decay, decay):
    """Chen et al. 2023, Program 1, one tensor at a time."""
    params = {k: p.clone() for k, p in params.items()}
    m = {k: torch.zeros_like(p) for k, p in params.items()}
    for grads in grads_seq:
        for k in params:
            g = grads[k]
            update = torch.sign(b1 * m[k] + (1 - b1) * g)
            wd = weight_decay if decay[k] else 0.0
            params[k] = params[k] - lr * (update + wd * params[k])
            m[k] = b2 * m[k] + (1 - b2) * g
    return params, m


@settings(max_examples=20, deadline=None)
@given(
    shape_list=shapes,
    seed=seeds,
    lr=st.floats(1e-5, 1e-2),
    b1=st.floats(0.0, 0.99),
    b2=st.floats(0.0, 0.999),
    weight_decay=st.floats(0.0, 1.0),
    use_mask=st.booleans(),
)
def test_lion_equals_reference(shape_list, seed, lr, b1, b2, weight_decay, use_mask):
    params = make_params(shape_list, seed)
    grads = make_grads(params, seed)
    mask = decay_mask_default if use_mask else None
    decay = decay_mask_default(params) if use_mask else {k: True for k in params}
    want, want_m = lion_reference(
        params, grads, lr=lr, b1=b1, b2=b2, weight_decay=weight_decay, decay=decay
    )
    tx = lion(lr, b1=b1, b2=b2, weight_decay=weight_decay, mask=mask)
    got, state = run_fscale(tx, params, grads)
    assert isinstance(state, LionState) and state.count == len(grads)
    assert rel_err(got, want, params) <= TOL
    # m is an average of the grads: its rounding errors are ulps of the largest of them.
    largest = {k: torch.stack([g[k].abs() for g in grads]).amax(0) for k in grads[-1]}
    assert rel_err(state.exp_avg, want_m, largest) <= TOL


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"lr": -1e-4}, r"lion: lr must be a float >= 0 or a schedule.*-0\.0001"),
        ({"lr": 1e-4, "b1": 1.2}, r"b1 must be a float in \[0, 1\), got 1\.2"),
        ({"lr": 1e-4, "b2": 1.0}, r"b2 must be a float in \[0, 1\), got 1\.0"),
        ({"lr": 1e-4, "weight_decay": -0.1}, r"weight_decay must be a float >= 0.*-0\.1"),
    ],
)
def test_bad_hyperparameters_raise(kw, match):
    with pytest.raises(ValueError, match=match):
        lion(**kw)

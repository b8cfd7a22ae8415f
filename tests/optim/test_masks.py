"""Weight-decay masks: the default skips 1-D params; optimizers honour them like param groups."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings

from fscale.optim import adamw, decay_mask_default, lion, sgd

from ._helpers import TOL, make_grads, make_params, rel_err, run_fscale, run_torch, seeds
from ._helpers import shapes as shape_lists


def test_decay_mask_default():
    params = {
        "wte": torch.zeros(10, 4),
        "attn": {"weight": torch.zeros(4, 4), "bias": torch.zeros(4)},
        "ln": {"weight": torch.zeros(4), "bias": torch.zeros(4)},
        "conv": torch.zeros(2, 3, 3, 3),
        "frozen": None,
    }
    assert decay_mask_default(params) == {
        "wte": True,
        "attn": {"weight": True, "bias": False},
        "ln": {"weight": False, "bias": False},
        "conv": True,
        "frozen": False,
    }


def _torch_two_groups(params, **kw):
    decay = [p for p in params.values() if p.ndim >= 2]
    no_decay = [p for p in params.values() if p.ndim < 2]
    wd = kw.pop("weight_decay")
    groups = [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]], kw


@settings(max_examples=20, deadline=None)
@given(shape_list=shape_lists, seed=seeds)
def test_adamw_mask_equals_torch_param_groups(shape_list, seed):
    params = make_params(shape_list, seed)
    grads = make_grads(params, seed)

    def make_torch(p):
        groups, kw = _torch_two_groups(p, lr=1e-2, weight_decay=0.1)
        return torch.optim.AdamW(groups, **kw)

    want = run_torch(make_torch, params, grads)
    explicit = decay_mask_default(params)
    for mask in (decay_mask_default, explicit):
        for fused in (False, True):
            tx = adamw(1e-2, weight_decay=0.1, mask=mask)
            got, _ = run_fscale(tx, params, grads, fused=fused)
            assert rel_err(got, want, params) <= TOL


def test_sgd_mask_equals_torch_param_groups():
    params = make_params([(3, 4), (4,), (2, 2)], 5)
    grads = make_grads(params, 5)

    def make_torch(p):
        groups, kw = _torch_two_groups(p, lr=0.1, momentum=0.9, weight_decay=0.05)
        return torch.optim.SGD(groups, **kw)

    want = run_torch(make_torch, params, grads)
    tx = sgd(0.1, momentum=0.9, weight_decay=0.05, mask=decay_mask_default)
    got, _ = run_fscale(tx, params, grads)
    assert rel_err(got, want, params) <= TOL


def test_masked_out_leaf_gets_no_decay():
    params = {"w": torch.ones(2, 2), "b": torch.ones(2)}
    tx = lion(0.1, weight_decay=1.0, mask=decay_mask_default)
    zero = {k: torch.zeros_like(v) for k, v in params.items()}
    updates, _ = tx.update(zero, tx.init(params), params)
    assert torch.equal(updates["b"], torch.zeros(2))  # sign(0) = 0 and no decay
    assert torch.allclose(updates["w"], torch.full((2, 2), -0.1))


def test_mismatched_mask_raises_readably():
    params = {"w": torch.ones(2, 2), "b": torch.ones(2)}
    grads = {k: torch.ones_like(v) for k, v in params.items()}
    for mask in ({"w": True}, lambda p: {"w": True, "b": False, "extra": True}):
        tx = adamw(1e-3, weight_decay=0.1, mask=mask)
        with pytest.raises(ValueError, match=r"adamw: the weight-decay mask does not match"):
            tx.update(dict(grads), tx.init(params), params)
    with pytest.raises(ValueError, match=r"missing \['b'\]"):
        tx = adamw(1e-3, weight_decay=0.1, mask={"w": True})
        tx.update(dict(grads), tx.init(params), params)


def test_non_bool_mask_leaf_raises():
    params = {"w": torch.ones(2, 2), "b": torch.ones(2)}
    tx = adamw(1e-3, weight_decay=0.1, mask={"w": True, "b": "no"})
    with pytest.raises(ValueError, match=r"mask leaves must be Python bools.*b='no'"):
        tx.update({k: torch.ones_like(v) for k, v in params.items()}, tx.init(params), params)

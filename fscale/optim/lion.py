"""Lion: the sign of an interpolated momentum (Chen et al. 2023).

Per leaf::

    d = sign(b1 m + (1 - b1) g)
    p -= lr * (d + wd * p)           # wd on masked leaves only
    m = b2 m + (1 - b2) g

State ``LionState(count, exp_avg)``: one moment, fp32 or wider, like the params.
Lion's updates have unit magnitude per element, so its lr is typically 3-10x
smaller than AdamW's and its weight decay 3-10x larger (the paper's advice).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from fscale.optim import _checks
from fscale.optim._leaves import as_dtypes, gather, scatter, split, subset, zeros_moments
from fscale.optim.base import GradientTransformation
from fscale.optim.masks import decayed_positions
from fscale.optim.schedules import value_at


class LionState(NamedTuple):
    count: int  # updates done so far
    exp_avg: Any  # the momentum (pytree like params, fp32 or wider, None where params are None)


def lion(
    lr,
    b1: float = 0.9,
    b2: float = 0.99,
    weight_decay=0.0,
    mask=None,
) -> GradientTransformation:
    """EvoLved Sign Momentum: ``p -= lr * (sign(b1 m + (1-b1) g) + wd p)``, ``m = b2 m + (1-b2) g``.

    Args:
      lr: learning rate, a float >= 0 or a schedule ``count -> float``.
      b1: interpolation factor for the update direction, in [0, 1).
      b2: momentum decay, in [0, 1).
      weight_decay: decoupled decay (multiplied by ``lr``), a float >= 0 or a schedule.
      mask: which leaves to decay: pytree of bools like params, a callable
        ``params -> pytree of bools`` (e.g. ``decay_mask_default``), or None (all).

    Returns:
      A ``GradientTransformation`` with state ``LionState(count, exp_avg)``.

    References:
      Chen et al., "Symbolic Discovery of Optimization Algorithms", NeurIPS 2023
      (arXiv:2302.06675), Program 1.

    Example::

        tx = lion(lr=1e-4, weight_decay=1.0, mask=decay_mask_default)
        state = tx.init(params)
        params, state = apply_gradients(tx, grads, state, params)
    """
    owner = "lion"
    _checks.non_negative(owner, "lr", lr)
    b1 = _checks.unit_interval(owner, "b1", b1)
    b2 = _checks.unit_interval(owner, "b2", b2)
    _checks.non_negative(owner, "weight_decay", weight_decay)

    def init(params):
        return LionState(count=0, exp_avg=zeros_moments(params))

    @torch.no_grad()
    def update(updates, state, params=None):
        count = state.count
        lr_t, wd_t = value_at(lr, count, "lr"), value_at(weight_decay, count, "weight_decay")
        new_state = LionState(count + 1, state.exp_avg)
        leaves, spec, idx = split(updates)
        if not idx:
            return updates, new_state
        what = f"{owner}: the gradients (vs the optimizer state)"
        ms = gather(state.exp_avg, updates, idx, what=what)
        gs = as_dtypes(subset(leaves, idx), ms)
        ds = torch._foreach_mul(ms, b1)
        torch._foreach_add_(ds, gs, alpha=1.0 - b1)
        torch._foreach_sign_(ds)
        if wd_t != 0.0:
            decayed = decayed_positions(mask, params, idx, owner=owner, wd=wd_t)
            if decayed:
                ps = gather(params, updates, idx, what=f"{owner}: the params")
                torch._foreach_add_(subset(ds, decayed), subset(ps, decayed), alpha=wd_t)
        torch._foreach_mul_(ds, -lr_t)
        torch._foreach_lerp_(ms, gs, 1.0 - b2)
        return scatter(spec, leaves, idx, ds), new_state

    return GradientTransformation(init, update)

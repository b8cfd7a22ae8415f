"""SGD with momentum, equal to ``torch.optim.SGD``.

State ``SGDState(count, momentum_buffer)``: ``momentum_buffer`` is a pytree
like the params (fp32 or wider, ``None`` where params are ``None``), or
``None`` altogether when ``momentum == 0``.

Usage::

    tx = sgd(lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    updates, state = tx.update(grads, state, params)
    params = apply_updates(params, updates)
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from fscale.optim import _checks
from fscale.optim._leaves import as_dtypes, gather, scatter, split, subset, zeros_moments
from fscale.optim.base import GradientTransformation
from fscale.optim.masks import decayed_positions
from fscale.optim.schedules import value_at


class SGDState(NamedTuple):
    count: int  # updates done so far
    momentum_buffer: Any  # pytree like params, or None when momentum == 0


def sgd(
    lr,
    momentum: float = 0.0,
    nesterov: bool = False,
    weight_decay=0.0,
    dampening: float = 0.0,
    mask=None,
) -> GradientTransformation:
    """SGD with (Nesterov) momentum and L2 weight decay, equal to ``torch.optim.SGD``.

    ``d = g + wd * p``; with momentum ``buf = d`` on the first update, then
    ``buf = momentum * buf + (1 - dampening) * d``; ``d = d + momentum * buf``
    (Nesterov) or ``d = buf``; the delta is ``-lr * d``.

    Args:
      lr: learning rate, a float >= 0 or a schedule ``count -> float``.
      momentum: momentum factor, in [0, 1).
      nesterov: use Nesterov momentum (needs ``momentum > 0`` and ``dampening == 0``).
      weight_decay: L2 coefficient added to the gradient, a float >= 0 or a schedule.
      dampening: dampening for momentum, in [0, 1].
      mask: which leaves get weight decay: pytree of bools like params, a callable
        ``params -> pytree of bools`` (e.g. ``decay_mask_default``), or None (all).

    Returns:
      A ``GradientTransformation`` with state ``SGDState(count, momentum_buffer)``.

    References:
      Sutskever et al., "On the importance of initialization and momentum in deep learning", 2013.

    Example::

        tx = sgd(lr=0.1, momentum=0.9)
        state = tx.init(params)
        params, state = apply_gradients(tx, grads, state, params)
    """
    owner = "sgd"
    _checks.non_negative(owner, "lr", lr)
    momentum = _checks.unit_interval(owner, "momentum", momentum)
    dampening = _checks.unit_interval(owner, "dampening", dampening, closed=True)
    _checks.non_negative(owner, "weight_decay", weight_decay)
    if not isinstance(nesterov, bool):
        raise ValueError(f"{owner}: nesterov must be a bool, got {nesterov!r}.")
    if nesterov and (momentum == 0.0 or dampening != 0.0):
        raise ValueError(
            f"{owner}: nesterov=True needs momentum > 0 and dampening == 0, got "
            f"momentum={momentum}, dampening={dampening}."
        )

    def init(params):
        buf = zeros_moments(params) if momentum != 0.0 else None
        return SGDState(count=0, momentum_buffer=buf)

    def direction(updates, state, params):
        """The step direction (before ``-lr``), the new state and where the leaves go."""
        count = state.count
        wd_t = value_at(weight_decay, count, "weight_decay")
        new_state = SGDState(count + 1, state.momentum_buffer)
        leaves, spec, idx = split(updates)
        if not idx:
            return None, new_state, (spec, leaves, idx)
        ds = subset(leaves, idx)
        if wd_t != 0.0:
            decayed = decayed_positions(mask, params, idx, owner=owner, wd=wd_t)
            if decayed:
                ps = gather(params, updates, idx, what=f"{owner}: the params")
                torch._foreach_add_(subset(ds, decayed), subset(ps, decayed), alpha=wd_t)
        if momentum != 0.0:
            bufs = gather(
                state.momentum_buffer, updates, idx, what=f"{owner}: the gradients (vs the state)"
            )
            if count == 0:
                torch._foreach_copy_(bufs, ds)
            else:
                torch._foreach_mul_(bufs, momentum)
                torch._foreach_add_(bufs, as_dtypes(ds, bufs), alpha=1.0 - dampening)
            if nesterov:
                ds = as_dtypes(ds, bufs)
                torch._foreach_add_(ds, bufs, alpha=momentum)
            else:
                ds = bufs
        return ds, new_state, (spec, leaves, idx)

    @torch.no_grad()
    def update(updates, state, params=None):
        ds, new_state, (spec, leaves, idx) = direction(updates, state, params)
        if ds is None:
            return updates, new_state
        ds = torch._foreach_mul(ds, -value_at(lr, state.count, "lr"))
        return scatter(spec, leaves, idx, ds), new_state

    @torch.no_grad()
    def update_params(grads, state, params):
        # torch.optim.SGD's single rounding: p.add_(d, alpha=-lr), in place.
        ds, new_state, (_, _, idx) = direction(grads, state, params)
        if ds is not None:
            ps = gather(params, grads, idx, what=f"{owner}: the params")
            torch._foreach_add_(ps, as_dtypes(ds, ps), alpha=-value_at(lr, state.count, "lr"))
        return params, new_state

    return GradientTransformation(init, update, update_params)

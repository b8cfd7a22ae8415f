"""LAMB: Adam's direction rescaled per layer by a trust ratio (You et al. 2019).

Per leaf ("layer"), with ``t = count + 1``::

    m = b1 m + (1 - b1) g            v = b2 v + (1 - b2) g^2
    r = (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps) + wd * p      # wd on masked leaves only
    trust = ||p|| / ||r||            (1 where either norm is 0)
    p -= lr * trust * r

Choices, following Algorithm 2 of the paper (ICLR 2020 version) and NVIDIA's
FusedLAMB defaults: Adam's bias correction is applied to both moments (the
arXiv v1 algorithm omits it; with it the early steps are not damped); the
scaling function phi is the identity (no clamping of ||p||); eps sits outside
the square root; the trust ratio is applied to every leaf, masked or not (the
mask only selects weight decay).

State ``AdamState(count, exp_avg, exp_avg_sq)`` (the same layout as ``adamw``).
"""

from __future__ import annotations

import torch

from fscale.optim import _checks
from fscale.optim._leaves import as_dtypes, gather, scatter, split, subset, zeros_moments
from fscale.optim.adam import AdamState, bias_corrected_denom, update_moments_
from fscale.optim.base import GradientTransformation
from fscale.optim.masks import decayed_positions
from fscale.optim.schedules import value_at
from fscale.optim.sharded import leaf_norms


def lamb(
    lr,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    weight_decay=0.0,
    mask=None,
) -> GradientTransformation:
    """Layer-wise adaptive large-batch optimizer: Adam direction, per-leaf trust ratio.

    See the module docstring for the exact update and the choices made (bias
    correction on, identity scaling function, trust ratio 1 where ``||p||`` or
    ``||r||`` is 0).

    Args:
      lr: learning rate, a float >= 0 or a schedule ``count -> float``.
      b1: first-moment decay, in [0, 1).
      b2: second-moment decay, in [0, 1).
      eps: added to the denominator, > 0.
      weight_decay: decoupled decay folded into the direction before the trust
        ratio, a float >= 0 or a schedule.
      mask: which leaves to decay: pytree of bools like params, a callable
        ``params -> pytree of bools`` (e.g. ``decay_mask_default``), or None (all).

    Returns:
      A ``GradientTransformation`` with state ``AdamState(count, exp_avg, exp_avg_sq)``.

    References:
      You et al., "Large Batch Optimization for Deep Learning: Training BERT in
      76 minutes", ICLR 2020 (arXiv:1904.00962).

    Example::

        tx = chain(clip_by_global_norm(1.0),
                   lamb(lr=2e-3, weight_decay=0.01, mask=decay_mask_default))
        state = tx.init(params)
        params, state = apply_gradients(tx, grads, state, params)
    """
    owner = "lamb"
    _checks.non_negative(owner, "lr", lr)
    b1 = _checks.unit_interval(owner, "b1", b1)
    b2 = _checks.unit_interval(owner, "b2", b2)
    eps = _checks.positive(owner, "eps", eps)
    _checks.non_negative(owner, "weight_decay", weight_decay)

    def init(params):
        return AdamState(count=0, exp_avg=zeros_moments(params), exp_avg_sq=zeros_moments(params))

    @torch.no_grad()
    def update(updates, state, params=None):
        if params is None:
            raise ValueError(
                f"{owner} needs the params for its trust ratio: call update(grads, state, params)."
            )
        count = state.count
        step = count + 1
        lr_t, wd_t = value_at(lr, count, "lr"), value_at(weight_decay, count, "weight_decay")
        new_state = AdamState(count + 1, state.exp_avg, state.exp_avg_sq)
        leaves, spec, idx = split(updates)
        if not idx:
            return updates, new_state
        what = f"{owner}: the gradients (vs the optimizer state)"
        ms = gather(state.exp_avg, updates, idx, what=what)
        vs = gather(state.exp_avg_sq, updates, idx, what=what)
        ps = gather(params, updates, idx, what=f"{owner}: the params")
        update_moments_(ms, vs, as_dtypes(subset(leaves, idx), ms), b1, b2)
        denom = bias_corrected_denom(vs, b2, eps, step)
        rs = torch._foreach_div(ms, denom)
        torch._foreach_div_(rs, 1.0 - b1**step)
        if wd_t != 0.0:
            decayed = decayed_positions(mask, params, idx, owner=owner, wd=wd_t)
            if decayed:
                torch._foreach_add_(subset(rs, decayed), subset(ps, decayed), alpha=wd_t)
        # Trust ratios for all leaves at once on the first device: no host sync. Leaves
        # that are shards here sum their norms over the ranks in one all-reduce
        # ([Note: norms of sharded leaves] in fscale/optim/sharded.py).
        first = rs[0].device
        both = leaf_norms([*ps, *rs], [*idx, *idx], owner=owner)
        w = torch.stack([n.to(first, torch.float32) for n in both[: len(ps)]])
        u = torch.stack([n.to(first, torch.float32) for n in both[len(ps) :]])
        trust = torch.where((w > 0) & (u > 0), w / u, torch.ones_like(w)) * -lr_t
        scales = [t.to(r.device, r.dtype) for t, r in zip(trust.unbind(), rs, strict=True)]
        torch._foreach_mul_(rs, scales)
        return scatter(spec, leaves, idx, rs), new_state

    hyperparams = dict(
        name=owner, lr=lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=mask
    )
    return GradientTransformation(init, update, hyperparams=hyperparams)

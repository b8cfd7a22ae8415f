"""Adam and AdamW: ``torch.optim.Adam`` / ``torch.optim.AdamW`` as pure transformations.

Both keep the state ``AdamState(count, exp_avg, exp_avg_sq)``: ``count`` is a
Python int (updates done so far; bias correction uses ``count + 1``), the
moments are pytrees like the params, in fp32 even for bf16/fp16 params (fp64
stays fp64), ``None`` where the param is ``None``.

Two paths with the same maths:

- ``update`` returns deltas (``torch._foreach_*`` ops over the leaves; the
  moments are updated in place).
- ``update_params`` is fused: leaves are grouped by (device, param dtype, grad
  dtype, decayed or not) and each group goes to the ``"adamw_update"`` kernel
  from the dispatch table, which updates params and moments in place; the same
  param tensors are returned. The lowering is resolved once per (device, dtype)
  for the life of the optimizer (one build of the step), not per call.

[Note: per-param step] torch.optim keeps a step count per param, so a param
whose grad is ``None`` for a while gets a different bias correction there than
here, where ``count`` is shared. With a gradient for every param at every step
(the usual case) the two agree.

Usage::

    tx = adamw(lr=3e-4, weight_decay=0.1, mask=decay_mask_default)
    state = tx.init(params)
    params, state = apply_gradients(tx, grads, state, params)    # fused path
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from fscale.hw import dispatch
from fscale.kernels import adamw as _adamw_kernel  # registers the "adamw_update" reference
from fscale.optim import _checks
from fscale.optim._leaves import as_dtypes, gather, scatter, split, subset, zeros_moments
from fscale.optim.base import GradientTransformation, skip_flag
from fscale.optim.masks import decayed_positions
from fscale.optim.schedules import value_at


class AdamState(NamedTuple):
    """State of ``adam``, ``adamw`` and ``lamb``."""

    count: int  # updates done so far; bias correction uses step = count + 1
    exp_avg: Any  # first moment (pytree like params, fp32 or wider, None where params are None)
    exp_avg_sq: Any  # second moment (same layout)


def _check_common(owner, lr, b1, b2, eps, weight_decay):
    _checks.non_negative(owner, "lr", lr)
    _checks.unit_interval(owner, "b1", b1)
    _checks.unit_interval(owner, "b2", b2)
    _checks.positive(owner, "eps", eps)
    _checks.non_negative(owner, "weight_decay", weight_decay)


def update_moments_(exp_avgs: list, exp_avg_sqs: list, grads: list, b1: float, b2: float) -> None:
    """``m = b1 m + (1-b1) g`` and ``v = b2 v + (1-b2) g^2`` in place (torch.optim's ops)."""
    torch._foreach_lerp_(exp_avgs, grads, 1.0 - b1)
    torch._foreach_mul_(exp_avg_sqs, b2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - b2)


def bias_corrected_denom(exp_avg_sqs: list, b2: float, eps: float, step: int) -> list:
    """``sqrt(v) / sqrt(1 - b2**step) + eps``, new tensors (torch.optim's order of operations)."""
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, (1.0 - b2**step) ** 0.5)
    torch._foreach_add_(denom, eps)
    return denom


def _adam_family(*, owner, lr, b1, b2, eps, weight_decay, mask, decoupled):
    b1, b2, eps = float(b1), float(b2), float(eps)
    kernels: dict[tuple[torch.device, torch.dtype], dispatch.Lowering] = {}

    def init(params):
        return AdamState(count=0, exp_avg=zeros_moments(params), exp_avg_sq=zeros_moments(params))

    def prepare(updates, state, params):
        """Shared front half: hyper-parameters, live leaves, and L2 decay folded into the grads."""
        count = state.count
        lr_t, wd_t = value_at(lr, count, "lr"), value_at(weight_decay, count, "weight_decay")
        leaves, spec, idx = split(updates)
        what = f"{owner}: the gradients (vs the optimizer state)"
        ms = gather(state.exp_avg, updates, idx, what=what)
        vs = gather(state.exp_avg_sq, updates, idx, what=what)
        gs = subset(leaves, idx)
        ps, decayed = None, []
        if params is not None:
            ps = gather(params, updates, idx, what=f"{owner}: the params")
        if wd_t != 0.0 and idx:
            decayed = decayed_positions(mask, params, idx, owner=owner, wd=wd_t)
            if not decoupled and decayed:
                # torch.optim.Adam's L2: grad += wd * param, before the moments.
                torch._foreach_add_(subset(gs, decayed), subset(ps, decayed), alpha=wd_t)
        return count, lr_t, wd_t, leaves, spec, idx, gs, ms, vs, ps, decayed

    @torch.no_grad()
    def update(updates, state, params=None):
        count, lr_t, wd_t, leaves, spec, idx, gs, ms, vs, ps, decayed = prepare(
            updates, state, params
        )
        new_state = AdamState(count + 1, state.exp_avg, state.exp_avg_sq)
        if not idx:
            return updates, new_state
        skip = skip_flag()
        if skip is not None and bool(skip):  # the unfused path reads the flag on the host
            return scatter(spec, leaves, idx, [torch.zeros_like(g) for g in gs]), state
        step = count + 1
        update_moments_(ms, vs, as_dtypes(gs, ms), b1, b2)
        denom = bias_corrected_denom(vs, b2, eps, step)
        # [Note: rounding like torch.optim] torch computes p * (1 - lr wd) + (-step_size m) / denom.
        # The Adam term below has those exact roundings, and fl(p * (1 - lr wd)) - p is exact
        # (Sterbenz, as lr * wd <= 1/2 in practice), so apply_updates' p + delta matches
        # torch bit for bit without decay and to within rare 1-ulp ties with it.
        deltas = torch._foreach_mul(ms, -lr_t / (1.0 - b1**step))
        torch._foreach_div_(deltas, denom)
        if decoupled and decayed:
            shrink = torch._foreach_mul(subset(ps, decayed), 1.0 - lr_t * wd_t)
            torch._foreach_sub_(shrink, subset(ps, decayed))
            torch._foreach_add_(subset(deltas, decayed), shrink)
        return scatter(spec, leaves, idx, deltas), new_state

    def kernel_for(p: torch.Tensor) -> dispatch.Lowering:
        key = (p.device, p.dtype)
        if key not in kernels:
            kernels[key] = dispatch.resolve(_adamw_kernel.OP, p)
        return kernels[key]

    @torch.no_grad()
    def update_params(grads, state, params):
        if params is None:
            raise ValueError(f"{owner}.update_params(grads, state, params) needs the params.")
        count, lr_t, wd_t, _, _, idx, gs, ms, vs, ps, decayed = prepare(grads, state, params)
        decayed = set(decayed) if decoupled else set()
        skip = skip_flag()  # [Note: skipping on the device] in fscale/optim/base.py
        groups: dict[tuple, tuple[list, list, list, list]] = {}
        for j, (p, g, m, v) in enumerate(zip(ps, gs, ms, vs, strict=True)):
            key = (p.device, p.dtype, g.dtype, m.dtype, j in decayed)
            group = groups.setdefault(key, ([], [], [], []))
            for lst, x in zip(group, (p, g, m, v), strict=True):
                lst.append(x)
        for key, (p_list, g_list, m_list, v_list) in groups.items():
            # Only with a flag: a lowering registered before ``skip`` existed still works.
            flag = {} if skip is None else {"skip": skip.to(p_list[0].device)}
            kernel_for(p_list[0]).impl(
                p_list,
                g_list,
                m_list,
                v_list,
                lr=lr_t,
                beta1=b1,
                beta2=b2,
                eps=eps,
                weight_decay=wd_t if key[-1] else 0.0,
                step=count + 1,
                **flag,
            )
        return params, AdamState(count + 1, state.exp_avg, state.exp_avg_sq)

    # It writes params and state only through the kernel, whose CPU lowerings can write
    # elsewhere ([Note: writing the step elsewhere] in fscale/kernels/_elsewhere.py): the
    # mark lets offload offer its buffers to a save. A wrapper that replaces this
    # function (compress_comm's 1-bit rows write moments themselves) has no mark.
    update_params.writes_only_through = _adamw_kernel.OP

    hyperparams = dict(
        name=owner, lr=lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=mask,
        decoupled=decoupled,
    )  # fmt: skip
    return GradientTransformation(
        init, update, update_params, skips_on_device=True, hyperparams=hyperparams
    )


def adamw(
    lr,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay=0.01,
    mask=None,
) -> GradientTransformation:
    """Adam with decoupled weight decay, equal to ``torch.optim.AdamW``.

    ``p -= lr * wd * p`` (masked leaves only), then the bias-corrected Adam step
    ``p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)`` with
    ``t = count + 1``. Has a fused ``update_params`` (the ``"adamw_update"`` kernel).

    Args:
      lr: learning rate, a float >= 0 or a schedule ``count -> float``.
      b1: first-moment decay, in [0, 1).
      b2: second-moment decay, in [0, 1).
      eps: added to the denominator, > 0.
      weight_decay: decoupled decay coefficient (multiplied by ``lr``), a float
        >= 0 or a schedule.
      mask: which leaves to decay: pytree of bools like params, a callable
        ``params -> pytree of bools`` (e.g. ``decay_mask_default``), or None (all).

    Returns:
      A ``GradientTransformation`` with state ``AdamState(count, exp_avg, exp_avg_sq)``.

    References:
      Kingma & Ba, "Adam: A Method for Stochastic Optimization", 2015.
      Loshchilov & Hutter, "Decoupled Weight Decay Regularization", 2019.

    Example::

        tx = adamw(lr=warmup_cosine(6e-4, 2000, 600_000, end=6e-5), weight_decay=0.1,
                   b2=0.95, mask=decay_mask_default)
        state = tx.init(params)
        params, state = apply_gradients(tx, grads, state, params)
    """
    _check_common("adamw", lr, b1, b2, eps, weight_decay)
    return _adam_family(
        owner="adamw",
        lr=lr,
        b1=b1,
        b2=b2,
        eps=eps,
        weight_decay=weight_decay,
        mask=mask,
        decoupled=True,
    )


def adam(
    lr,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay=0.0,
    mask=None,
) -> GradientTransformation:
    """Adam, equal to ``torch.optim.Adam`` (weight decay is L2: ``grad += wd * param``).

    Has a fused ``update_params``: the L2 term is added into the (donated)
    grads, then the ``"adamw_update"`` kernel runs with no decoupled decay.

    Args:
      lr: learning rate, a float >= 0 or a schedule ``count -> float``.
      b1: first-moment decay, in [0, 1).
      b2: second-moment decay, in [0, 1).
      eps: added to the denominator, > 0.
      weight_decay: L2 coefficient added to the gradient, a float >= 0 or a schedule.
      mask: which leaves get the L2 term (as in ``adamw``), or None (all).

    Returns:
      A ``GradientTransformation`` with state ``AdamState(count, exp_avg, exp_avg_sq)``.

    References:
      Kingma & Ba, "Adam: A Method for Stochastic Optimization", 2015.

    Example::

        tx = adam(lr=1e-3)
        updates, state = tx.update(grads, state, params)
        params = apply_updates(params, updates)
    """
    _check_common("adam", lr, b1, b2, eps, weight_decay)
    return _adam_family(
        owner="adam",
        lr=lr,
        b1=b1,
        b2=b2,
        eps=eps,
        weight_decay=weight_decay,
        mask=mask,
        decoupled=False,
    )

"""Small gradient transformations to chain with the optimizers.

Each is a ``GradientTransformation``: ``scale``, ``scale_by_learning_rate``,
``clip_by_global_norm``, ``add_decayed_weights`` and ``masked`` (run a
transformation on a subset of the leaves). Updates are donated, as everywhere
in fscale: they may be scaled in place, so use the returned tree.

Usage::

    tx = chain(clip_by_global_norm(1.0), adamw(lr=3e-4))
    updates, state = tx.update(grads, state, params)
    state[0].norm                                  # the pre-clip gradient norm, for metrics
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from fscale import tree
from fscale.optim import _checks, sharded
from fscale.optim._leaves import gather, split, subset
from fscale.optim.base import GradientTransformation
from fscale.optim.masks import mask_leaves
from fscale.optim.schedules import value_at


class ScheduleState(NamedTuple):
    """State of a transformation whose hyper-parameter may follow a schedule."""

    count: int  # updates done so far (the schedule's argument for the next update)


class ClipByGlobalNormState(NamedTuple):
    norm: torch.Tensor  # 0-d fp32: global 2-norm of the last updates, before clipping


def scale(factor: float) -> GradientTransformation:
    """Multiply every update by ``factor``.

    Args:
      factor: a finite float (may be negative).

    Example::

        tx = chain(scale(0.5), sgd(lr=0.1))
    """
    factor = _checks.finite("scale", "factor", factor)

    def init(params):
        return ()

    @torch.no_grad()
    def update(updates, state, params=None):
        live = [x for x in tree.leaves(updates) if x is not None]
        if live and factor != 1.0:
            torch._foreach_mul_(live, factor)
        return updates, state

    return GradientTransformation(init, update)


def scale_by_learning_rate(lr) -> GradientTransformation:
    """Multiply updates by ``-lr``: gradients become descent deltas.

    Args:
      lr: learning rate, a float >= 0 or a schedule ``count -> float``.

    Example::

        tx = chain(add_decayed_weights(1e-4), scale_by_learning_rate(warmup_cosine(0.1, 10, 100)))
    """
    lr = _checks.non_negative("scale_by_learning_rate", "lr", lr)

    def init(params):
        return ScheduleState(count=0)

    @torch.no_grad()
    def update(updates, state, params=None):
        step = -value_at(lr, state.count, "lr")
        live = [x for x in tree.leaves(updates) if x is not None]
        if live:
            torch._foreach_mul_(live, step)
        return updates, ScheduleState(count=state.count + 1)

    return GradientTransformation(init, update)


def global_norm(updates: Any) -> torch.Tensor:
    """The 2-norm of all leaves together (``None`` leaves skipped), as a 0-d tensor.

    Computed as ``torch.nn.utils.get_total_norm``: per-tensor norms grouped by
    (device, dtype), then the norm of those. Half-precision leaves are reduced
    in fp32. Leaves that are shards here sum their squares over the ranks
    ([Note: norms of sharded leaves] in ``fscale/optim/sharded.py``).
    """
    sharded.refuse_total_norm("global_norm (clip_by_global_norm)")
    leaves = tree.leaves(updates)
    positions = [i for i, x in enumerate(leaves) if x is not None]
    live = [leaves[i] for i in positions]
    if not live:
        return torch.zeros((), dtype=torch.float32)
    if sharded.any_split(positions):  # [Note: norms of sharded leaves]
        return sharded.total_norm(live, positions, owner="clip_by_global_norm")
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for x in live:
        groups.setdefault((x.device, x.dtype), []).append(x)
    first = live[0].device
    norms = []
    for (_, dtype), xs in groups.items():
        kw = {"dtype": torch.float32} if dtype in (torch.float16, torch.bfloat16) else {}
        norms.extend(torch._foreach_norm(xs, 2, **kw))
    return torch.linalg.vector_norm(torch.stack([n.to(first) for n in norms]))


def clip_by_global_norm(max_norm: float) -> GradientTransformation:
    """Scale updates by ``max_norm / (norm + 1e-6)`` when their global norm exceeds ``max_norm``.

    Same semantics as ``torch.nn.utils.clip_grad_norm_`` (including its 1e-6,
    and multiplying by the clamped coefficient instead of branching, so no
    host-device sync). The pre-clip norm is kept in the state
    (``ClipByGlobalNormState.norm``) for the step's metrics.

    Args:
      max_norm: the largest allowed global norm, a float > 0.

    References:
      Pascanu et al., "On the difficulty of training recurrent neural networks", 2013.

    Example::

        tx = chain(clip_by_global_norm(1.0), adamw(lr=3e-4))
    """
    max_norm = _checks.positive("clip_by_global_norm", "max_norm", max_norm)

    def init(params):
        live = [p for p in tree.leaves(params) if p is not None]
        device = live[0].device if live else None
        return ClipByGlobalNormState(norm=torch.zeros((), dtype=torch.float32, device=device))

    @torch.no_grad()
    def update(updates, state, params=None):
        live = [x for x in tree.leaves(updates) if x is not None]
        norm = global_norm(updates)
        if live:
            coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
            by_device: dict[torch.device, list[torch.Tensor]] = {}
            for x in live:
                by_device.setdefault(x.device, []).append(x)
            for device, xs in by_device.items():
                torch._foreach_mul_(xs, coef.to(device))
        return updates, ClipByGlobalNormState(norm=norm)

    return GradientTransformation(init, update)


def add_decayed_weights(weight_decay, mask=None) -> GradientTransformation:
    """Add ``weight_decay * param`` to the updates (L2 / decoupled decay, by where it is chained).

    Chained before an adaptive optimizer it is L2 regularisation; chained after
    the preconditioner and before ``scale_by_learning_rate`` it is decoupled
    (AdamW-style) decay.

    Args:
      weight_decay: a float >= 0 or a schedule.
      mask: which leaves to decay: a pytree of bools like params, a callable
        ``params -> pytree of bools`` (e.g. ``decay_mask_default``), or None (all).

    References:
      Loshchilov & Hutter, "Decoupled Weight Decay Regularization", 2019.

    Example::

        tx = chain(add_decayed_weights(5e-4, mask=decay_mask_default), scale_by_learning_rate(0.1))
    """
    weight_decay = _checks.non_negative("add_decayed_weights", "weight_decay", weight_decay)

    def init(params):
        return ScheduleState(count=0)

    @torch.no_grad()
    def update(updates, state, params=None):
        wd = value_at(weight_decay, state.count, "weight_decay")
        new_state = ScheduleState(count=state.count + 1)
        if wd == 0.0:
            return updates, new_state
        if params is None:
            raise ValueError(
                "add_decayed_weights needs the params: call update(updates, state, params)."
            )
        leaves, _, idx = split(updates)
        keep = mask_leaves(mask, params, owner="add_decayed_weights")
        idx = [i for i in idx if keep is None or keep[i]]
        if idx:
            ps = gather(params, updates, idx, what="add_decayed_weights: the params")
            torch._foreach_add_(subset(leaves, idx), ps, alpha=wd)
        return updates, new_state

    return GradientTransformation(init, update)


def masked(inner: GradientTransformation, mask) -> GradientTransformation:
    """Run ``inner`` only on the leaves where ``mask`` is True; the others pass through unchanged.

    The masked-out leaves are shown to ``inner`` as ``None`` (fscale's "no
    gradient" leaf), so ``inner`` keeps no state for them.

    Args:
      inner: the transformation to apply to the selected leaves.
      mask: a pytree of bools like params, or a callable ``params -> pytree of bools``.

    Example::

        # LAMB on the matrices, plain SGD on biases and norms
        tx = chain(masked(lamb(1e-3), decay_mask_default),
                   masked(sgd(1e-2), lambda p: tree.map(lambda x: x.ndim < 2, p)))
    """
    if not isinstance(inner, GradientTransformation):
        raise TypeError(
            f"masked(inner=...) needs a GradientTransformation, got {type(inner).__name__}."
        )
    if mask is None:
        raise ValueError(
            "masked(inner, mask) needs a mask; to transform every leaf use inner itself."
        )

    def hide(t, keep):
        leaves, spec = tree.flatten(t)
        return tree.unflatten(spec, [x if k else None for x, k in zip(leaves, keep, strict=True)])

    def init(params):
        keep = mask_leaves(mask, params, owner="masked")
        return inner.init(hide(params, keep))

    def update(updates, state, params=None):
        like = params if params is not None else updates
        keep = mask_leaves(mask, like, owner="masked")
        if params is not None:
            tree.assert_same_structure(params, updates, what="masked: the updates")
        inner_updates, state = inner.update(
            hide(updates, keep), state, None if params is None else hide(params, keep)
        )
        leaves, spec = tree.flatten(updates)
        merged = [
            n if k else o for n, o, k in zip(tree.leaves(inner_updates), leaves, keep, strict=True)
        ]
        return tree.unflatten(spec, merged), state

    return GradientTransformation(init, update)

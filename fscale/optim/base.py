"""The optimizer protocol: two pure functions, optax style.

``init(params) -> state`` and ``update(updates, state, params) -> (updates,
state)``. ``update`` turns gradients into the *deltas* added to the params by
``apply_updates``. An optimizer may also offer ``update_params``: the same
maths fused with the apply (one pass over memory, used for the Triton AdamW
kernel); it may reuse the buffers it is given (inputs are donated).

Usage::

    tx = chain(clip_by_global_norm(1.0), adamw(lr=3e-4))
    state = tx.init(params)
    params, state = apply_gradients(tx, grads, state, params)
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple

import torch

from fscale import tree

Params = Any
Updates = Any
OptState = Any


class GradientTransformation(NamedTuple):
    """A pure optimizer: ``init`` and ``update``, plus an optional fused ``update_params``.

    ``update_params(grads, state, params) -> (new_params, new_state)`` must equal
    ``update`` followed by ``apply_updates``; it may write into ``params``,
    ``grads`` and ``state`` in place.

    ``skips_on_device``: inside ``skipping(flag)`` its ``update_params`` changes no
    param and no state tensor when the device flag is set, without reading it on the
    host (it returns the state of a step taken; the caller keeps the old one). The
    step's non-finite guard then needs no host read before the update.

    ``hyperparams``: what the optimizer is, for transforms that must run its maths
    themselves (compressed-communication optimizers need Adam's b1, b2, eps, lr):
    ``{"name": "adamw", "lr": ..., ...}``, or None for optimizers that do not say.
    """

    init: Callable[[Params], OptState]
    update: Callable[..., tuple[Updates, OptState]]
    update_params: Callable[..., tuple[Params, OptState]] | None = None
    skips_on_device: bool = False
    hyperparams: Mapping[str, Any] | None = None


# [Note: skipping on the device]
# The step's non-finite guard decides on every rank whether the step is skipped; the
# verdict is a device tensor. Reading it before the update stalls the host until
# backward is done, which costs the host's run-ahead (+2% on the 1.4B GPT step). An
# optimizer that ``skips_on_device`` instead takes the verdict into its kernel (the
# AdamW kernel returns before touching memory when it is set) and the host reads the
# verdict after the update is queued; on a skip the step returns the old params and
# state objects, whose tensors the masked update left untouched. The flag travels by
# ``skipping``, as the schedules' values travel by ``schedules.reporting``, because
# the optimizer protocol has no context argument; it is None outside the guard.
_SKIP: contextvars.ContextVar[torch.Tensor | None] = contextvars.ContextVar(
    "fscale_skip", default=None
)


@contextlib.contextmanager
def skipping(flag: torch.Tensor | None) -> Iterator[None]:
    """Optimizers that ``skips_on_device`` change nothing inside when ``flag`` (0-d) is set."""
    token = _SKIP.set(flag)
    try:
        yield
    finally:
        _SKIP.reset(token)


def skip_flag() -> torch.Tensor | None:
    """The device flag of the enclosing ``skipping`` block, or None."""
    return _SKIP.get()


@torch.no_grad()
def apply_updates(params: Params, updates: Updates) -> Params:
    """``params + updates`` leaf-wise (``None`` updates leave the param as is)."""
    return tree.map(lambda p, u: p if u is None else p + u.to(p.dtype), params, updates)


def apply_gradients(
    tx: GradientTransformation, grads: Updates, state: OptState, params: Params
) -> tuple[Params, OptState]:
    """One optimizer step: the fused path where the optimizer has one."""
    if tx.update_params is not None:
        return tx.update_params(grads, state, params)
    updates, state = tx.update(grads, state, params)
    return apply_updates(params, updates), state


def identity() -> GradientTransformation:
    """Passes updates through unchanged (stateless)."""
    return GradientTransformation(lambda params: (), lambda u, s, p=None: (u, s))


def chain(*txs: GradientTransformation) -> GradientTransformation:
    """Apply ``txs`` in sequence; the state is a tuple with one entry per transformation.

    The chain is fused when its last link is: earlier links run their
    ``update``, the last its ``update_params``.
    """
    if not txs:
        raise ValueError("chain() needs at least one GradientTransformation, e.g. chain(sgd(0.1)).")
    for i, tx in enumerate(txs):
        if not isinstance(tx, GradientTransformation):
            raise TypeError(
                f"chain() argument {i} is {type(tx).__name__}, not a GradientTransformation; "
                "build optimizers with fscale.optim (e.g. fs.optim.adamw(lr=1e-3))."
            )

    def init(params):
        return tuple(tx.init(params) for tx in txs)

    def update(updates, state, params=None):
        new_state = []
        for tx, s in zip(txs, state, strict=True):
            updates, s = tx.update(updates, s, params)
            new_state.append(s)
        return updates, tuple(new_state)

    update_params = None
    if txs[-1].update_params is not None:

        def update_params(grads, state, params):
            new_state = []
            for tx, s in zip(txs[:-1], state[:-1], strict=True):
                grads, s = tx.update(grads, s, params)
                new_state.append(s)
            params, s = txs[-1].update_params(grads, state[-1], params)
            return params, (*new_state, s)

    # Earlier links run ``update``: only links that skip on the device keep the chain's
    # promise (their state would otherwise move on a skipped step).
    skips = update_params is not None and all(tx.skips_on_device for tx in txs)
    return GradientTransformation(init, update, update_params, skips)


def step_count(opt_state: Any) -> int:
    """The step count of an optimizer's state without reading its tensors: the state's
    ``count`` (Adam's, LAMB's, ...), or ``opt_state.step_count()`` for an object standing
    for a state kept elsewhere (offload's host state, whose ``describe_state`` would
    describe every tensor of it). Usage: ``n = step_count(state["optimizer"])``."""
    counter = getattr(opt_state, "step_count", None)
    count = counter() if callable(counter) else getattr(opt_state, "count", None)
    if not isinstance(count, int):  # a tuple's count is a method
        raise TypeError(
            f"{type(opt_state).__name__} has no step count: give the optimizer state a "
            "`count` field, or the object standing for it a `step_count()` method."
        )
    return count


def zeros_like_tree(params: Params) -> Any:
    """Zero buffers shaped like ``params`` (``None`` leaves stay ``None``)."""
    return tree.map(lambda p: None if p is None else torch.zeros_like(p), params)

"""Auxiliary losses that layers add during the forward: MoE load balancing, router z-loss.

A layer calls ``add(name, value)`` in its forward; the train step's ``loss_and_grad``
stage runs the user's ``loss_fn`` inside ``collecting()`` and differentiates
``loss + sum(added terms)``, so a loss function written for a dense model trains a
model with routers unchanged. Each term is reported as ``metrics["aux/<name>"]``
(summed over the layers that added it; under gradient accumulation, the last
micro-batch's). Outside a ``collecting()`` block ``add`` does nothing: a plain
``model(x)`` still runs.

[Note: recomputed forwards add nothing]
Activation checkpointing re-runs a unit's forward during backward. The stage closes
the collector before it differentiates, so recomputed calls to ``add`` fall outside
it and a term is never counted twice.

Usage::

    fscale.aux_loss.add("load_balance", 0.01 * lb)       # inside a module's forward
    with fscale.aux_loss.collecting() as aux:            # what the step does for you
        loss = loss_fn(params, batch)
    total = loss + aux.total(loss)
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import torch

_ACTIVE: contextvars.ContextVar[Collector | None] = contextvars.ContextVar(
    "fscale_aux_loss", default=None
)


class Collector:
    """The terms added while it was open, by name (values keep their graph)."""

    def __init__(self):
        self.terms: dict[str, list[torch.Tensor]] = {}

    def total(self, like: torch.Tensor) -> torch.Tensor:
        """The sum of every term (a zero like ``like`` when none was added)."""
        values = [v for vs in self.terms.values() for v in vs]
        if not values:
            return torch.zeros((), dtype=like.dtype, device=like.device)
        return torch.stack([v.reshape(()).to(like.dtype) for v in values]).sum()

    def metrics(self) -> dict[str, torch.Tensor]:
        """``{"aux/<name>": detached sum}`` for the step's metrics."""
        return {
            f"aux/{name}": torch.stack([v.detach().reshape(()).float() for v in vs]).sum()
            for name, vs in self.terms.items()
        }


def add(name: str, value: torch.Tensor) -> None:
    """Add ``value`` (a scalar tensor, already weighted) to the loss being collected."""
    collector = _ACTIVE.get()
    if collector is None:
        return
    if not isinstance(value, torch.Tensor) or value.numel() != 1:
        raise ValueError(
            f"aux_loss.add({name!r}, ...) takes a scalar tensor, got "
            f"{tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__}."
        )
    collector.terms.setdefault(name, []).append(value)


@contextlib.contextmanager
def collecting() -> Iterator[Collector]:
    """Collect the terms ``add`` receives inside the block."""
    collector = Collector()
    token = _ACTIVE.set(collector)
    try:
        yield collector
    finally:
        _ACTIVE.reset(token)

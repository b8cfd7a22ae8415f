"""Micro-batch accumulation: one step's grads from ``accumulate`` micro-batches.

``accumulated_loss_and_grad`` runs the ``loss_and_grad`` stage once per micro-batch
and sums the grads, in backward where it can ([Note: accumulating in backward]), in
fp32 under mixed precision ([Note: accumulation dtype]), and hands each grad to
``ctx.grad_ready`` the moment it is final when a transform asks for it ([Note: final
grads in backward]).

Usage::

    loss, grads = accumulated_loss_and_grad(step, ctx, params, batch)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from fscale import tree
from fscale.policies import WANTS_FINAL_GRADS, PrecisionPolicy

if TYPE_CHECKING:
    from fscale.step import Step, StepContext

Params = Any
Batch = Any


def accumulated_loss_and_grad(step: Step, ctx: StepContext, params: Params, batch: Batch):
    """The mean loss and grads over ``step.accumulate`` micro-batches of ``batch``."""
    # A transform that consumes grads as they become final (offload) asks for them
    # with the capability WANTS_FINAL_GRADS ([Note: final grads in backward]).
    final = step.has(WANTS_FINAL_GRADS)
    wide = _accumulation_dtype(step)
    if step.accumulate == 1 and not final:
        return step.stages.loss_and_grad(ctx, params, batch)
    micros = _split_batch(batch, step.accumulate) if step.accumulate > 1 else [batch]
    scale = 1.0 / step.accumulate
    total_loss, total, scaled = None, None, False
    for i, micro in enumerate(micros):
        last = i == len(micros) - 1
        sink = None
        if ctx.grad_sink is None and (total is not None or (last and final)):
            # [Note: accumulating in backward] Later micro-batches add each grad
            # into the running total as backward makes it, so the device never
            # holds a second whole set of grads (2x grad bytes at the peak).
            totals = None if total is None else [g for g in tree.leaves(total) if g is not None]
            sink = _AccumulateInto(
                totals,
                scale=scale if last and step.accumulate > 1 else None,
                ctx=ctx if last and final else None,
                prior_loss=total_loss,
            )
            ctx.grad_sink = sink
        try:
            loss, grads = step.stages.loss_and_grad(ctx, params, micro)
        finally:
            if sink is not None:
                ctx.grad_sink = None
        used = sink is not None and sink.used  # else a stage set its own sink (ZeRO-2)
        scaled = used and sink.scale is not None
        if total is None:
            total_loss, total = loss, _widened(grads, wide) if step.accumulate > 1 else grads
            continue
        total_loss = total_loss + loss
        if not used:
            total = tree.map(lambda a, b: a if a is None else a.add_(b), total, grads)
    if step.accumulate == 1:
        return total_loss, total
    if not scaled:
        total = tree.map(lambda g: g if g is None else g.mul_(scale), total)
    return total_loss * scale, total


# [Note: accumulation dtype]
# Under mixed_precision, ZeRO-1/2 keep the full params in the compute dtype, so their
# micro-batch grads arrive in bf16/fp16. Summing them there loses bits every micro-
# batch (the world of one sums the fp32 grads of its fp32 masters). The first micro-
# batch's grads are widened to fp32 and later ones are added into that total, as
# DeepSpeed's bf16 optimizer accumulates in fp32: every stack then sums in fp32.


def _accumulation_dtype(step: Step) -> torch.dtype | None:
    return torch.float32 if step.policy(PrecisionPolicy) is not None else None


def _widened(grads: Params, dtype: torch.dtype | None) -> Params:
    if dtype is None:
        return grads
    return tree.map(
        lambda g: g.to(dtype) if g is not None and g.element_size() < dtype.itemsize else g, grads
    )


# [Note: final grads in backward]
# In the last micro-batch each leaf's total is complete the moment backward hands
# over its grad: the sink adds it, scales the sum by 1 / accumulate right there (the
# same two roundings, per element, as scaling after the loop) and calls
# ``ctx.grad_ready(index, grad, leaf)`` (index among the non-None leaves; ``leaf``
# aliases the param). Leaves backward never reached get theirs in ``finish``. Only a
# transform that knows nothing after backward changes the grads (no clipping, no
# loss scaling, no reduction left) may act on them early: offload copies them to
# the host and updates there while backward goes on.


class _AccumulateInto:
    """A grad sink (``fscale.stages.backward_into_sink``): each grad added into ``totals``
    (or kept, when ``totals`` is None: the first micro-batch), optionally scaled and
    announced."""

    def __init__(
        self, totals: list | None, *, scale: float | None = None, ctx=None, prior_loss=None
    ):
        self.totals = totals
        self.scale = scale
        self.ctx = ctx
        self.prior_loss = prior_loss  # the earlier micro-batches' summed loss
        self.used = False
        self.wrt: list[torch.Tensor] = []
        self.done: set[int] = set()

    def start(self, wrt: list[torch.Tensor]) -> None:
        self.wrt = wrt
        if self.totals is None:
            self.totals = [None] * len(wrt)

    def before_backward(self, target: torch.Tensor) -> None:
        """The loss this backward differentiates, with the earlier micro-batches', to a
        transform that updates during it ([Note: a loss vote before streamed updates])."""
        hook = None if self.ctx is None else self.ctx.before_final_backward
        if hook is not None:
            loss = target.detach()
            hook(loss if self.prior_loss is None else loss + self.prior_loss.detach())

    def add(self, index: int, grad: torch.Tensor) -> None:
        self.used = True
        if self.totals[index] is None:
            self.totals[index] = grad
        else:
            self.totals[index].add_(grad)
        self._final(index)

    def _final(self, index: int) -> None:
        self.done.add(index)
        if self.scale is not None:
            self.totals[index].mul_(self.scale)
        if self.ctx is not None and self.ctx.grad_ready is not None:
            self.ctx.grad_ready(index, self.totals[index], self.wrt[index])

    def finish(self, n: int) -> list[torch.Tensor]:
        # A leaf whose hook never ran got no grad this micro-batch: its total stands
        # (zeros in a first micro-batch, as autograd.grad's materialize_grads).
        self.used = True
        for i in range(n):
            if i not in self.done:
                if self.totals[i] is None:
                    self.totals[i] = torch.zeros_like(self.wrt[i])
                self._final(i)
        return self.totals[:n]


def _split_batch(batch: Batch, k: int) -> list[Batch]:
    leaves, spec = tree.flatten(batch)
    for path, leaf in zip(tree.paths(batch), leaves, strict=True):
        if isinstance(leaf, torch.Tensor) and (leaf.ndim == 0 or leaf.shape[0] % k):
            raise ValueError(
                f"accumulate={k} splits the batch along dim 0, but batch leaf {path!r} has "
                f"shape {tuple(leaf.shape)}; use a batch size divisible by {k}."
            )
    chunks = [leaf.chunk(k) if isinstance(leaf, torch.Tensor) else [leaf] * k for leaf in leaves]
    return [tree.unflatten(spec, [c[i] for c in chunks]) for i in range(k)]

"""mixed_precision's cast of the params to the compute dtype, a launch per unit.

``t.to(bf16)`` per param is a kernel per param each way: the cast in forward, and in
backward the grad's cast back to fp32, which torch runs on its non-vectorised
dynamic-cast path (7.8 ms a step for the 1.4B GPT's grads on an H200, plus ~300
launches of host time that the GPU waits for at the start of forward). Here the
params of one unit are cast together by one multi-tensor launch (``fscale/casts.py``),
and so are their grads in backward.

[Note: cast groups]
Backward of a group runs once every grad of the group is ready, so grouping decides
when the fp32 grads appear. A transform that takes grads as backward makes them
(``ctx.grad_sink``, ``ctx.grad_ready``: ZeRO-2's reduce-scatter, offload's
streaming) needs them per unit at the latest, as before, or its overlap with
backward is lost; with no such hook every leaf can share one group (the grads are
read after backward). So: a group per unit when the step knows its units; otherwise
one group without grad hooks, a group per leaf with them. The maths is the same as
``.to`` in both directions (round to nearest even; widening is exact): only the
launches change.

Usage::

    casts = CastGroups()
    halves = casts(ctx, params, torch.bfloat16)   # under autograd, inside materialize
"""

from __future__ import annotations

import torch

from fscale import tree
from fscale.casts import cast_all, cast_each


class _CastGroup(torch.autograd.Function):
    """``[t.to(dtype) for t in masters]``, with ``grad.to(t.dtype)`` in backward."""

    @staticmethod
    def forward(dtype, *masters):
        return tuple(cast_all(masters, dtype))

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.set_materialize_grads(False)  # an unused output's grad stays None
        ctx.dtypes = [t.dtype for t in inputs[1:]]

    @staticmethod
    def backward(ctx, *grads):
        wanted = [g if ctx.needs_input_grad[i + 1] else None for i, g in enumerate(grads)]
        return (None, *cast_each(wanted, ctx.dtypes))


class CastGroups:
    """Casts a params tree to a compute dtype, one ``_CastGroup`` per group
    ([Note: cast groups]); the grouping is computed once per tree structure."""

    def __init__(self):
        self._groups: dict[tuple, list[list[int]]] = {}

    def __call__(self, ctx, params, dtype: torch.dtype):
        leaves, spec = tree.flatten(params)
        todo = tuple(
            i
            for i, t in enumerate(leaves)
            if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != dtype
        )
        if not todo:
            return params
        hooked = ctx.grad_sink is not None or ctx.grad_ready is not None
        key = (spec, todo, hooked)
        groups = self._groups.get(key)
        if groups is None:
            groups = self._groups[key] = _group(ctx.step.units, tree.paths(params), todo, hooked)
        out = list(leaves)
        for idx in groups:
            for i, t in zip(idx, _CastGroup.apply(dtype, *(leaves[i] for i in idx)), strict=True):
                out[i] = t
        return tree.unflatten(spec, out)


def _group(units, paths: list[str], todo: tuple[int, ...], hooked: bool) -> list[list[int]]:
    if units is not None and units.names:
        by_unit: dict[str, list[int]] = {}
        for i in todo:
            by_unit.setdefault(units.key_of(paths[i]), []).append(i)
        return list(by_unit.values())
    return [[i] for i in todo] if hooked else [list(todo)]

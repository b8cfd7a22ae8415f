"""What ``fs.explain`` shows for ``zeropp``: ZeRO-3's collectives with ZeRO++'s wire bytes.

Runs after ``shard_zero``'s plan hook, rewriting the collectives it listed:
``"zero.params"`` all-gathers carry int8 codes plus scales (qwZ), and under hpZ the
backward half moves to ``"zero.params.hpz"`` inside groups of k (unquantized slices
of 1/k of a unit); the ``"zero.grads"`` reduce-scatter becomes an all_to_all of int4
codes plus scales for the n-1 peer chunks (qgZ), and HSDP's all-reduce over the
replicas the same exchange plus an int8 all-gather of the reduced piece.

Usage::

    record = Transform(NAME, plan=partial(plan_zeropp, method, mp, world, replicas))
"""

from __future__ import annotations

import dataclasses

from fscale.plan import Collective


def plan_zeropp(method, mp, world: int, replicas: int, plan) -> None:
    """Rewrite ``plan.collectives`` in place (``method``: the ``ZeroPP`` applied)."""
    gather_size = mp.param_dtype.itemsize if mp else 4
    reduce_size = mp.reduce_dtype.itemsize if mp else 4
    scale = method.scale_dtype.itemsize
    int8 = 1 + scale / method.block  # bytes per element on the wire
    int4 = 0.5 + scale / method.grad_block
    out = []
    for c in plan.collectives:
        if c.tag == "zero.params" and c.op == "all_gather":
            numel = c.bytes / gather_size
            per = int8 if method.qwz else gather_size
            if method.hpz is None or c.calls < 2:
                out.append(dataclasses.replace(c, bytes=int(numel * per)))
                continue
            half = c.calls // 2  # forward gathers; backward re-gathers go to the group
            out.append(dataclasses.replace(c, bytes=int(numel * per / 2), calls=half))
            slice_bytes = numel / 2 * world / method.hpz * gather_size
            out.append(Collective("all_gather", int(slice_bytes), c.stage, half, "zero.params.hpz"))
        elif c.tag == "zero.grads" and method.qgz and c.op in ("reduce_scatter", "all_reduce"):
            numel = c.bytes / reduce_size
            n = world if c.op == "reduce_scatter" else replicas
            sent = numel * (n - 1) / n * int4
            out.append(dataclasses.replace(c, op="all_to_all", bytes=int(sent)))
            if c.op == "all_reduce":
                out.append(dataclasses.replace(c, op="all_gather", bytes=int(numel / n * int8)))
        else:
            out.append(c)
    plan.collectives = out
    plan.notes.append(
        f"zeropp: qwZ={method.qwz} (int8, block {method.block}), qgZ={method.qgz} (int4, "
        f"block {method.grad_block}), hpZ={method.hpz}; scales in {method.scale_dtype}."
    )

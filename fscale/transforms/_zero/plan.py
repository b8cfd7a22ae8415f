"""What ``fs.explain`` shows for ``shard_zero``: collectives (with tags) and memory per rank.

Usage::

    record = Transform(NAME, plan=lambda plan: plan_zero(cfg, mp, clips, accumulate, plan))
"""

from __future__ import annotations

import math

from fscale.plan import Collective
from fscale.transforms._zero.config import ZeroConfig


def plan_zero(cfg: ZeroConfig, mp, clips: bool, accumulate: int, plan) -> None:
    n = cfg.world
    full = plan.param_bytes  # fp32 master bytes
    # Under mixed_precision, params travel in the compute dtype, grads in reduce_dtype.
    gather = full * (mp.param_dtype.itemsize / 4 if mp else 1)
    reduce = full * (mp.reduce_dtype.itemsize / 4 if mp else 1)
    plan.memory["optimizer"] = plan.memory["optimizer"] // n
    plan.collectives = [c for c in plan.collectives if c.stage != "reduce_grads"]
    replicas = plan.world // max(n, 1)
    if cfg.others is not None and cfg.others != cfg.replicate_dims:  # model dims: no replicas
        replicas = math.prod(cfg.mesh.size(d) for d in cfg.replicate_dims)
    if n == 1 and replicas == 1:
        plan.notes.append("shard_zero in a world of one: no collectives, nothing saved.")
        return
    grad_stage = "reduce_grads" if cfg.stage == 1 and accumulate > 1 else "loss_and_grad"
    if grad_stage == "reduce_grads":  # DDP's all-reduce of the accumulated grads
        plan.collectives.append(_coll("all_reduce", reduce, grad_stage, "zero.grads"))
    elif n > 1:
        plan.collectives.append(_coll("reduce_scatter", reduce, grad_stage, "zero.grads"))
    if replicas > 1 and grad_stage != "reduce_grads":
        plan.notes.append(
            f"HSDP: shards span {cfg.shard_dim} ({n} ranks), replicated over "
            f"{', '.join(cfg.replicate_dims)} ({replicas} copies)."
        )
        plan.collectives.append(_coll("all_reduce", reduce // n, grad_stage, "zero.grads"))
    plan.memory["grads"] = full // n
    if cfg.stage < 3:
        plan.memory["master"] = full // n
        if n > 1:
            plan.collectives.append(_coll("all_gather", gather // n, "apply", "zero.params"))
    else:
        plan.memory["params"] = full // n
        plan.notes[:] = [x for x in plan.notes if not x.startswith("mixed_precision")]
        if mp:
            plan.notes.append(
                f"mixed_precision under stage 3: shards are cast to {mp.param_dtype} "
                "before the all-gather; no whole-model compute copy exists."
            )
        plan.collectives.append(
            _coll("all_gather", 2 * gather // n, "materialize", "zero.params", calls=2)
        )
        plan.notes.append(
            f"stage 3 materializes one unit at a time, with {cfg.prefetch} more in flight "
            f"(prefetch={cfg.prefetch}), in forward and in backward."
        )
    if clips and n > 1:
        plan.collectives.append(_coll("all_reduce", 4, "grad_norm", "zero.norm"))


def _coll(op, nbytes, stage, tag, calls=1):
    return Collective(op, int(nbytes), stage, calls, tag)

"""``shard_zero(step, stage)``: ZeRO stages 1, 2 and 3 as one transform.

Memory per rank falls as 1/N while the maths stays that of data parallelism:

- stage 1 partitions the optimizer state: each rank updates its shard (an fp32
  master copy of its rows) and the updated shards are all-gathered back into the
  full params; with gradient accumulation, full local grads are kept across
  micro-batches and all-reduced once a step (with one micro-batch the grads take
  stage 2's overlapped path: same bytes, no reason to wait for backward's end);
- stage 2 also partitions gradients: they are reduce-scattered in buckets while
  backward runs (``_zero2.py``), so a rank never holds the whole model's grads;
- stage 3 also partitions the params: ``step.init`` returns shards, and each unit
  (a transformer block) is gathered just before use and freed after it (see
  ``_zero3.py``); backward re-gathers and reduce-scatters.

The shard layout is in ``_sharding.py`` ([Note: shard layout]).

Usage::

    step = shard_zero(fs.train_step(loss_fn, fs.optim.adamw(3e-4)), stage=3)
    params, state = step.init(params)        # stage 3: params are this rank's shards
    params, state, metrics = step(params, state, batch)
    full = fs.gather_params(params)          # unsharded, for export and tests

References: Rajbhandari et al., "ZeRO: Memory Optimizations Toward Training
Trillion Parameter Models", SC 2020.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from functools import partial

import torch

from fscale import tree
from fscale.hw import comm
from fscale.step import Step, StepContext, Transform
from fscale.transforms import _zero3
from fscale.transforms._sharding import (
    ShardSpec,
    build_units,
    copy_out,
    flat_shards,
    split_shards,
)
from fscale.transforms._zero2 import GradBuckets

NAME = "shard_zero"
_DEFAULT_BUCKET_MB = 25


@dataclasses.dataclass(frozen=True)
class ZeroConfig:
    stage: int
    group: object
    unit: Callable[[str], str] | None
    prefetch: int
    bucket_bytes: int
    check_order: bool = False


def shard_zero(
    step: Step,
    stage: int,
    *,
    group=None,
    unit: Callable[[str], str] | None = None,
    prefetch: int = 1,
    bucket_mb: float | None = None,
    world_size: int | None = None,
    check_order: bool = False,
) -> Step:
    """Partition optimizer state (1), gradients (2) and params (3) over the data-parallel group.

    Args:
      step: the step to transform.
      stage: 1, 2 or 3.
      group: the data-parallel process group (default: the step's, i.e. the world).
      unit: stage 3: ``unit(param_name) -> key``; params with one key are gathered
        together. Default: each child of the first ModuleList (``"blocks.3"``), the
        rest in one root unit. Tied params must share a unit.
      prefetch: stage 3: how many units ahead to start gathering.
      bucket_mb: stages 1/2: size of the gradient reduce-scatter / param all-gather buckets.
      world_size: if given, the group must have this many ranks (a guard for launch scripts).
      check_order: stage 3: before every gather, check that all ranks gather the same
        unit (one small blocking all-gather each). Ranks that take different code paths
        (a rank-dependent branch, data-dependent control flow) then fail with an error
        naming each rank's unit instead of hanging. For debugging: it syncs the host.
    """
    if stage not in (1, 2, 3):
        raise ValueError(f"shard_zero stage must be 1, 2 or 3, got {stage!r}.")
    if not isinstance(prefetch, int) or prefetch < 0:
        raise ValueError(f"prefetch must be an int >= 0, got {prefetch!r}.")
    if unit is not None and not callable(unit):
        raise TypeError(f"unit must be a callable param_name -> key, got {type(unit).__name__}.")
    if group is not None and step.group is not None and group is not step.group:
        raise ValueError(
            "shard_zero's group differs from the step's data-parallel group; pass the same "
            "group to train_step(group=...) and shard_zero(group=...), or only one of them."
        )
    group = group if group is not None else step.group
    actual = comm.world_size(group)
    if world_size is not None and world_size != actual:
        raise ValueError(
            f"shard_zero(world_size={world_size}) but the process group has {actual} ranks; "
            "launch with that many processes (torchrun --nproc-per-node) or fix world_size."
        )
    if bucket_mb is not None and not bucket_mb > 0:
        raise ValueError(f"bucket_mb must be > 0, got {bucket_mb!r}.")
    bucket_bytes = int((bucket_mb or _DEFAULT_BUCKET_MB) * 2**20)
    cfg = ZeroConfig(stage, group, unit, prefetch, bucket_bytes, check_order)
    mp = step.applied("mixed_precision")
    record = Transform(
        NAME,
        options={"stage": stage, "prefetch": prefetch, "world": actual},
        plan=lambda plan: _plan(cfg, mp, step.clip_norm is not None, step.accumulate, plan),
    )
    inner = step.stages
    stages = {
        "init": partial(_init, cfg, inner),
        "grad_norm": partial(_sharded_grad_norm, cfg),
        "update": partial(_update, cfg, inner),
    }
    if stage == 1 and step.accumulate > 1:
        # Stage 1 keeps full local grads across micro-batches and reduces once a step.
        stages["reduce_grads"] = partial(_reduce_then_slice, cfg, inner)
    elif stage in (1, 2):
        # Stage 2, and stage 1 with a single micro-batch (where keeping full grads
        # buys nothing): reduce-scatter buckets during backward, overlapped.
        stages["loss_and_grad"] = partial(_overlapped_loss_and_grad, cfg, inner)
        stages["reduce_grads"] = _already_reduced
    else:
        stages["materialize"] = partial(_zero3.materialize, cfg, inner)
        stages["loss_and_grad"] = partial(_zero3.loss_and_grad, cfg, inner)
        stages["reduce_grads"] = _already_reduced
    # Every stage (mixed precision's overflow vote included) uses the same group.
    step = dataclasses.replace(step, group=group)
    return step.with_transform(record, **stages)


def _already_reduced(ctx: StepContext, grads):
    """Stages 2/3 reduce-scatter during backward: the grads are already reduced shards."""
    return grads


def _overlapped_loss_and_grad(cfg: ZeroConfig, inner, ctx: StepContext, params, batch):
    """Stage 2: the inner loss_and_grad with a sink that reduce-scatters buckets in backward."""
    specs = ctx.state[NAME]["specs"]
    names = [
        n for n, t in zip(tree.paths(params), tree.leaves(params), strict=True) if t is not None
    ]
    mp = ctx.step.applied("mixed_precision")
    master = ctx.state[NAME]["master"]
    ctx.grad_sink = GradBuckets(
        [specs[n] for n in names],
        cfg.group,
        cfg.bucket_bytes,
        mp.options["reduce_dtype"] if mp is not None else None,
        out_dtypes=[master[n].dtype for n in names],
    )
    try:
        return inner.loss_and_grad(ctx, params, batch)
    finally:
        ctx.grad_sink = None


# ----------------------------------------------------------------------------- init


def _init(cfg: ZeroConfig, inner, step: Step, params):
    if not isinstance(params, dict):
        raise TypeError(
            f"shard_zero needs the params dict from fs.functional, got {type(params).__name__}."
        )
    world, rank = comm.world_size(cfg.group), comm.rank(cfg.group)
    units = build_units(params, world, cfg.unit)
    _check_tied(params, units)
    specs = {s.name: s for u in units for s in u.specs}
    flats = {}
    if cfg.stage == 3:
        # [Note: flat master shards] each unit's shards are views of one flat buffer:
        # the all-gather reads it directly (one cast kernel under mixed precision).
        shards = {n: None for n in params}
        for u in units:
            flats[u.key] = params[u.specs[0].name].new_empty(u.shard_numel)
            for spec, view in zip(u.specs, split_shards(flats[u.key], u.specs), strict=True):
                view.copy_(spec.shard(params[spec.name].detach(), rank))
                shards[spec.name] = view
    else:
        shards = {
            n: (None if t is None else specs[n].shard(t.detach(), rank)) for n, t in params.items()
        }
    shards, state = inner.init(step, shards)
    mp = step.applied("mixed_precision")
    for n, s in shards.items():
        if s is not None:
            _tag(s, specs[n])
    state[NAME] = {"units": units, "specs": specs, "flats": flats}
    if cfg.stage == 3:
        return shards, state
    # Stages 1/2 keep full params for compute and a master copy of this rank's rows.
    # Under mixed_precision the full params are kept in the compute dtype only (the
    # fp32 master is the shards): DeepSpeed's layout, 2 bytes/param instead of 4 + 2.
    state[NAME]["master"] = shards
    if mp is not None:
        dtype = mp.options["param_dtype"]
        params = {n: None if t is None else t.detach().to(dtype) for n, t in params.items()}
    return params, state


def _check_tied(params: dict, units) -> None:
    unit_of = {s.name: u.key for u in units for s in u.specs}
    seen: dict[int, str] = {}
    for name, t in params.items():
        if t is None:
            continue
        key = t.untyped_storage().data_ptr()
        if key in seen and unit_of[seen[key]] != unit_of[name]:
            raise ValueError(
                f"params {seen[key]!r} and {name!r} share storage (tied weights) but the unit "
                f"policy puts them in units {unit_of[seen[key]]!r} and {unit_of[name]!r}; tied "
                "params must share a unit: change the unit policy (or list the tie once)."
            )
        seen.setdefault(key, name)


def _tag(shard: torch.Tensor, spec: ShardSpec) -> None:
    # fs.gather_params reads this to rebuild full params from shards.
    shard._fscale_shard = spec


# ----------------------------------------------------------------------------- grads


def _bucketed(specs: list[ShardSpec], grads: dict, limit: int) -> list[list[ShardSpec]]:
    buckets: list[list[ShardSpec]] = []
    size = 0
    for s in specs:
        g = grads[s.name]
        nbytes = s.numel * g.element_size()
        if not buckets or size + nbytes > limit or grads[buckets[-1][0].name].dtype != g.dtype:
            buckets.append([])
            size = 0
        buckets[-1].append(s)
        size += nbytes
    return buckets


def _reduce_then_slice(cfg: ZeroConfig, inner, ctx: StepContext, grads):
    """Stage 1: the DDP all-reduce (in the reduce dtype), then keep this rank's rows."""
    mp = ctx.step.applied("mixed_precision")
    if mp is not None:  # compute-dtype grads: reduce, and keep the shard, in reduce_dtype
        dtype = mp.options["reduce_dtype"]
        grads = {n: None if g is None else g.to(dtype) for n, g in grads.items()}
    grads = inner.reduce_grads(ctx, grads)
    specs, master = ctx.state[NAME]["specs"], ctx.state[NAME]["master"]
    rank = comm.rank(cfg.group)
    # Shard grads in the master dtype: clipping and the update then run in fp32.
    return {
        n: None if g is None else specs[n].shard(g, rank).to(master[n].dtype)
        for n, g in grads.items()
    }


def _sharded_grad_norm(cfg: ZeroConfig, ctx: StepContext, grads) -> torch.Tensor:
    """Global 2-norm of sharded grads: sum of squares across ranks (padding rows are 0)."""
    leaves = [g for g in tree.leaves(grads) if g is not None]
    if not leaves:
        return torch.zeros(())
    sq = torch.stack([g.float().pow(2).sum() for g in leaves]).sum()
    comm.all_reduce(sq, op="sum", group=cfg.group)
    return sq.sqrt()


# ----------------------------------------------------------------------------- update


def _update(cfg: ZeroConfig, inner, ctx: StepContext, grads, params):
    specs = ctx.state[NAME]["specs"]
    if cfg.stage == 3:
        new = inner.update(ctx, grads, params)
        new = _zero3.keep_in_flats(ctx.state[NAME], new, updated=True)
        for n, s in new.items():
            if s is not None:
                _tag(s, specs[n])
        return new
    master = inner.update(ctx, grads, ctx.state[NAME]["master"])
    for n, s in master.items():
        if s is not None:
            _tag(s, specs[n])
    ctx.state[NAME] = {**ctx.state[NAME], "master": master}
    _all_gather_into(cfg, master, params, specs)
    return params


@torch.no_grad()
def _all_gather_into(cfg: ZeroConfig, master: dict, params: dict, specs: dict) -> None:
    """Stages 1/2: every rank's updated rows into the full params, bucket by bucket."""
    world = comm.world_size(cfg.group)
    live = [specs[n] for n, p in params.items() if p is not None]
    for bucket in _bucketed(live, params, cfg.bucket_bytes):
        dtype = params[bucket[0].name].dtype
        flat = flat_shards([master[s.name] for s in bucket], dtype)
        gathered = comm.all_gather(flat, group=cfg.group)
        for s, full in zip(bucket, copy_out(gathered, tuple(bucket), world), strict=True):
            params[s.name].copy_(full)


# ----------------------------------------------------------------------------- export


@torch.no_grad()
def gather_params(params: dict, state: dict | None = None, group=None) -> dict:
    """Full, unsharded params in their master precision (for export and tests).

    Stage 3 params are shards: they are all-gathered. Stages 1/2 under mixed precision
    keep full params in the compute dtype; pass ``state`` to get the fp32 masters
    (all-gathered from the shards) instead. Anything else is returned as it is.
    Collective whenever it gathers: every rank of the group must call it.

    Usage::

        full = fs.gather_params(params, state)
    """
    master = (state or {}).get(NAME, {}).get("master")
    if master is not None:
        params = master  # stages 1/2: this rank's fp32 rows, tagged like stage-3 shards
    out = {}
    for name, t in params.items():
        spec = getattr(t, "_fscale_shard", None) if t is not None else None
        if spec is None or tuple(t.shape) != spec.shard_shape:
            out[name] = t
            continue
        shard = t.detach().contiguous()
        if shard.device.type == "cpu" and comm.backend(group) == "nccl":
            # Params offloaded to the host: NCCL moves device tensors only.
            shard = shard.to(torch.device("cuda", torch.cuda.current_device()))
        gathered = comm.all_gather(shard, group=group)
        out[name] = spec.unpad(gathered).to(t.device, copy=True)
    return out


# ----------------------------------------------------------------------------- plan


def _plan(cfg: ZeroConfig, mp, clips: bool, accumulate: int, plan) -> None:
    n = plan.world
    full = plan.param_bytes  # fp32 master bytes
    # Under mixed_precision, params travel in the compute dtype, grads in reduce_dtype.
    gather = full * (mp.options["param_dtype"].itemsize / 4 if mp else 1)
    reduce = full * (mp.options["reduce_dtype"].itemsize / 4 if mp else 1)
    plan.memory["optimizer"] = plan.memory["optimizer"] // n
    plan.collectives = [c for c in plan.collectives if c.stage != "reduce_grads"]
    if n == 1:
        plan.notes.append("shard_zero in a world of one: no collectives, nothing saved.")
        return
    if cfg.stage == 1 and accumulate > 1:
        plan.collectives.append(_coll("all_reduce", reduce, "reduce_grads"))
    elif cfg.stage < 3:
        plan.collectives.append(_coll("reduce_scatter", reduce, "loss_and_grad"))
        plan.memory["grads"] = full // n
    if cfg.stage < 3:
        plan.memory["master"] = full // n
    else:
        plan.memory["grads"] = full // n
    if cfg.stage < 3:
        plan.collectives.append(_coll("all_gather", full // n, "update"))
    else:
        plan.memory["params"] = full // n
        plan.notes[:] = [x for x in plan.notes if not x.startswith("mixed_precision")]
        if mp:
            plan.notes.append(
                f"mixed_precision under stage 3: shards are cast to {mp.options['param_dtype']} "
                "before the all-gather; no whole-model compute copy exists."
            )
        plan.collectives.append(_coll("all_gather", 2 * gather // n, "materialize", calls=2))
        plan.collectives.append(_coll("reduce_scatter", reduce, "loss_and_grad"))
        plan.notes.append(
            f"stage 3 materializes one unit at a time, with {cfg.prefetch} more in flight "
            f"(prefetch={cfg.prefetch}), in forward and in backward."
        )
    if clips:
        plan.collectives.append(_coll("all_reduce", 4, "grad_norm"))


def _coll(op, nbytes, stage, calls=1):
    from fscale.explain import Collective

    return Collective(op, int(nbytes), stage, calls)

"""``shard_zero(step, stage)``: ZeRO stages 1, 2 and 3 as one transform, on a 1-D or 2-D mesh.

Memory per rank falls as 1/N while the maths stays that of data parallelism:

- stage 1 partitions the optimizer state: each rank updates its shard (an fp32
  master copy of its rows) and ``apply`` all-gathers the updated shards back into
  the full params; with gradient accumulation, full local grads are kept (in fp32,
  [Note: accumulation dtype] in ``fscale/_accumulate.py``) across micro-batches and
  reduce-scattered once a step (with one micro-batch the grads take stage 2's
  overlapped path: same bytes, no reason to wait for backward's end);
- stage 2 also partitions gradients: they are reduce-scattered in buckets while
  backward runs (``_zero/buckets.py``), so a rank never holds the whole model's grads;
- stage 3 also partitions the params: ``step.init`` returns shards, and each unit
  (a transformer block) is gathered just before use and freed after it (see
  ``_zero/stage3.py``); backward re-gathers and reduce-scatters. Where the shards
  live between gathers is the step's param source (``fscale/param_source.py``).

On a 2-D mesh ``("replicate", "shard")`` it is HSDP (FSDP2's hybrid sharding):
shards span the ``shard`` dim, every ``replicate`` group holds a full copy, and the
grad reduction is a reduce-scatter inside the shard group followed by an all-reduce
of the shard across replicas. Every laid-out leaf carries its ``Placement``.

The shard layout is in ``_zero/sharding.py`` ([Note: shard layout]). Collectives are
tagged ``"zero.grads"``, ``"zero.params"`` and ``"zero.norm"``.

Usage::

    step = shard_zero(fs.train_step(loss_fn, fs.optim.adamw(3e-4)), stage=3)
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    step = shard_zero(fs.train_step(loss_fn, fs.optim.adamw(3e-4)), 2, mesh=mesh)   # HSDP
    params, state = step.init(params)        # stage 3: params are this rank's shards
    params, state, metrics = step(params, state, batch)
    full = fs.gather_params(params, state)   # unsharded, for export and tests

References: Rajbhandari et al., "ZeRO: Memory Optimizations Toward Training
Trillion Parameter Models", SC 2020; Zhao et al., "PyTorch FSDP", VLDB 2023.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from functools import partial

import torch

from fscale import tree
from fscale.hw import comm
from fscale.hw import mesh as meshes
from fscale.param_source import ParamSource
from fscale.placement import Placement, place
from fscale.policies import (
    CHANGES_GRADS_AFTER_BACKWARD,
    SHARDS_PARAMS,
    SKIP_SAFE_UPDATE,
    ParamSourcePolicy,
    PrecisionPolicy,
    ZeroPolicy,
)
from fscale.step import Step, StepContext, Transform
from fscale.transforms._zero import stage3
from fscale.transforms._zero.config import NAME, ZeroConfig
from fscale.transforms._zero.plan import plan_zero
from fscale.transforms._zero.sharding import (
    ShardSpec,
    build_units,
    split_shards,
)
from fscale.transforms._zero.stage12 import (
    all_gather_updated,
    overlapped_loss_and_grad,
    reduce_then_shard,
)

_DEFAULT_BUCKET_MB = 25


def shard_zero(
    step: Step,
    stage: int,
    *,
    mesh=None,
    shard_dim: str | None = None,
    unit: Callable[[str], str] | None = None,
    prefetch: int = 1,
    bucket_mb: float | None = None,
    world_size: int | None = None,
    check_order: bool | str = "first",
) -> Step:
    """Partition optimizer state (1), gradients (2) and params (3) over a mesh dim.

    Args:
      step: the step to transform.
      stage: 1, 2 or 3.
      mesh: a ``DeviceMesh`` (default: the step's, i.e. the whole world). On a 2-D mesh
        the leaves are sharded over ``shard_dim`` and replicated over the other dims
        (HSDP).
      shard_dim: the mesh dim to shard over (default: the mesh's last dim).
      unit: stage 3: ``unit(param_name) -> key``; params with one key are gathered
        together. Default: the step's units (``train_step(model=...)``), else each
        child of the first ModuleList by name (``"blocks.3"``), the rest in one root
        unit. Tied params must share a unit.
      prefetch: stage 3: how many units ahead to start gathering.
      bucket_mb: stages 1/2: size of the gradient reduce-scatter / param all-gather buckets.
      world_size: if given, the shard dim must have this many ranks (a guard for launch
        scripts).
      check_order: stage 3: before every gather, check that all ranks gather the same
        unit (one small blocking all-gather each). Ranks that take different code paths
        (a rank-dependent branch, data-dependent control flow) then fail with an error
        naming each rank's unit instead of hanging, and ranks running equal-sized units
        in different orders fail instead of silently mixing their weights. ``"first"``
        (the default) checks the first step only (it syncs the host once per unit);
        ``True`` every step (for debugging); ``False`` never.
    """
    if stage not in (1, 2, 3):
        raise ValueError(f"shard_zero stage must be 1, 2 or 3, got {stage!r}.")
    if not isinstance(prefetch, int) or prefetch < 0:
        raise ValueError(f"prefetch must be an int >= 0, got {prefetch!r}.")
    if check_order not in (True, False, "first"):
        raise ValueError(
            f"shard_zero: check_order must be True, False or 'first', got {check_order!r}."
        )
    if unit is not None and not callable(unit):
        raise TypeError(f"unit must be a callable param_name -> key, got {type(unit).__name__}.")
    resolved = step.mesh if mesh is None else meshes.resolve(mesh)
    default_mesh = step.mesh.device_mesh is None and step.mesh.dims == (meshes.WORLD_DIM,)
    # DeviceMesh equality, not identity: mesh["shard"] builds a new object every time.
    if mesh is not None and not default_mesh and resolved.device_mesh != step.mesh.device_mesh:
        raise ValueError(
            "shard_zero's mesh differs from the step's mesh; pass the same mesh to "
            "train_step(mesh=...) and shard_zero(mesh=...), or only one of them."
        )
    dim = meshes.pick(resolved, shard_dim, "shard_zero(shard_dim=...)")
    actual = resolved.size(dim)
    if world_size is not None and world_size != actual:
        raise ValueError(
            f"shard_zero(world_size={world_size}) but the mesh dim {dim!r} has {actual} "
            "ranks; launch with that many processes (torchrun --nproc-per-node) or fix "
            "world_size."
        )
    if bucket_mb is not None and not bucket_mb > 0:
        raise ValueError(f"bucket_mb must be > 0, got {bucket_mb!r}.")
    bucket_bytes = int((bucket_mb or _DEFAULT_BUCKET_MB) * 2**20)
    replicate = tuple(d for d in resolved.dims if d != dim)
    cfg = ZeroConfig(stage, resolved, dim, replicate, unit, prefetch, bucket_bytes, check_order)
    mp = step.policy(PrecisionPolicy)
    options = {"stage": stage, "prefetch": prefetch, "shard": f"{dim}={actual}"}
    if replicate:
        options["replicate"] = ",".join(f"{d}={resolved.size(d)}" for d in replicate)
    record = Transform(
        NAME,
        options=options,
        plan=lambda plan: plan_zero(cfg, mp, step.clip_norm is not None, step.accumulate, plan),
        # Stages 1/2 finish the reduction after backward; stage 3 reduce-scatters each
        # unit in backward, so its grads are final when backward makes them.
        # Its update runs the optimizer through the inner stage and re-tags the result;
        # its apply all-gathers the masters, unchanged on a skip: SKIP_SAFE_UPDATE.
        capabilities=frozenset(
            {SKIP_SAFE_UPDATE, SHARDS_PARAMS if stage == 3 else CHANGES_GRADS_AFTER_BACKWARD}
        ),
        scratch=True,
    )
    inner = step.stages
    stages = {
        "init": partial(_init, cfg, inner),
        "grad_norm": partial(_sharded_grad_norm, cfg),
        "update": partial(_update, cfg, inner),
    }
    if stage == 1 and step.accumulate > 1:
        # Stage 1 keeps full local grads across micro-batches and reduces once a step.
        stages["reduce_grads"] = partial(reduce_then_shard, cfg)
    elif stage in (1, 2):
        # Stage 2, and stage 1 with a single micro-batch (where keeping full grads
        # buys nothing): reduce-scatter buckets during backward, overlapped.
        stages["loss_and_grad"] = partial(overlapped_loss_and_grad, cfg, inner)
        stages["reduce_grads"] = _already_reduced
    else:
        stages["materialize"] = partial(stage3.materialize, cfg, inner)
        stages["loss_and_grad"] = partial(stage3.loss_and_grad, cfg, inner)
        stages["reduce_grads"] = _already_reduced
    if stage in (1, 2):
        stages["apply"] = partial(all_gather_updated, cfg, inner)
    step = dataclasses.replace(step, mesh=resolved)
    policy = ZeroPolicy(stage, dim, replicate)
    return step.with_transform(record, policy=policy, **stages)


def _already_reduced(ctx: StepContext, grads):
    """Stages 2/3 reduce-scatter during backward: the grads are already reduced shards."""
    return grads


# ----------------------------------------------------------------------------- init


def _init(cfg: ZeroConfig, inner, step: Step, params):
    if not isinstance(params, dict):
        raise TypeError(
            f"shard_zero needs the params dict from fs.functional, got {type(params).__name__}."
        )
    world, rank = cfg.world, cfg.mesh.rank(cfg.shard_dim)
    policy = cfg.unit or (step.units.key_of if step.units is not None else None)
    units = build_units(params, world, policy)
    _check_tied(params, units)
    specs = {s.name: s for u in units for s in u.specs}
    mp = step.policy(PrecisionPolicy)
    slot = {"units": units, "specs": specs, "flats": {}}
    if cfg.stage == 3:
        # [Note: flat master shards] each unit's shards are views of one flat buffer:
        # the all-gather reads it directly (one cast kernel under mixed precision).
        flats = {}
        for u in units:
            flats[u.key] = params[u.specs[0].name].new_empty(u.shard_numel)
            for spec, view in zip(u.specs, split_shards(flats[u.key], u.specs), strict=True):
                view.copy_(spec.shard(params[spec.name].detach(), rank))
        device = next((f.device for f in flats.values()), torch.device("cpu"))
        source = _param_source(step, device, mp)
        slot["flats"] = flats = source.place(flats)
        for u in units:  # rank-major: rank r holds elements [r*k, (r+1)*k) of all flats
            if isinstance(flats[u.key], torch.Tensor):
                place(
                    flats[u.key],
                    Placement((cfg.world * u.shard_numel,), (cfg.shard_dim,), cfg.replicate_dims),
                )
        slot["source"] = source
        shards = {n: None for n in params}
        for u in units:
            shards.update(zip(u.names, split_shards(flats[u.key], u.specs), strict=True))
    else:
        shards = {
            n: (None if t is None else specs[n].shard(t.detach(), rank)) for n, t in params.items()
        }
    shards, state = inner.init(step, shards)
    for n, s in shards.items():
        if s is not None:
            _tag(cfg, s, specs[n])
    _place_optimizer_state(cfg, state, specs)
    state[NAME] = slot
    if cfg.stage == 3:
        return shards, state
    # Stages 1/2 keep full params for compute and a master copy of this rank's rows.
    # Under mixed_precision the full params are kept in the compute dtype only (the
    # fp32 master is the shards): DeepSpeed's layout, 2 bytes/param instead of 4 + 2.
    state[NAME]["master"] = shards
    dtype = mp.param_dtype if mp is not None else None
    every = (cfg.shard_dim, *cfg.replicate_dims)
    full = {}
    for n, t in params.items():
        full[n] = None if t is None else t.detach().to(dtype or t.dtype)
        if t is not None:
            place(full[n], Placement(tuple(t.shape), (), every))
    return full, state


def _param_source(step: Step, device: torch.device, mp) -> ParamSource:
    gather_dtype = mp.param_dtype if mp is not None else None
    published = step.policy(ParamSourcePolicy)
    if published is None:
        return ParamSource(device=device, gather_dtype=gather_dtype)
    return published.factory(device=device, gather_dtype=gather_dtype, **dict(published.options))


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


def _place_optimizer_state(cfg: ZeroConfig, state: dict, specs: dict) -> None:
    """Give the optimizer's per-param state (moments: shards like the params) the shards'
    placement, so ``fscale.state.describe`` does not call it replicated."""

    def walk(node) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                spec = specs.get(key) if isinstance(key, str) else None
                is_shard = isinstance(value, torch.Tensor) and spec is not None
                if is_shard and tuple(value.shape) == spec.shard_shape:
                    place(value, cfg.placement(spec))
                else:
                    walk(value)
        elif isinstance(node, (list, tuple)):
            for value in node:
                walk(value)

    walk(state.get("optimizer"))


def _tag(cfg: ZeroConfig, shard: torch.Tensor, spec: ShardSpec) -> None:
    place(shard, cfg.placement(spec))
    # fs.gather_params reads these to rebuild full params from shards.
    shard._fscale_shard = spec
    shard._fscale_group = cfg.shard_group


# ----------------------------------------------------------------------------- grads


def _sharded_grad_norm(cfg: ZeroConfig, ctx: StepContext, grads) -> torch.Tensor:
    """Global 2-norm of sharded grads: sum of squares over the shard dim (padding rows are 0;
    replicas hold the same shard, so they are not summed)."""
    leaves = [g for g in tree.leaves(grads) if g is not None]
    if not leaves:
        return torch.zeros(())
    sq = torch.stack([g.float().pow(2).sum() for g in leaves]).sum()
    if cfg.world > 1:
        ctx.comm.all_reduce("zero.norm", sq, op="sum", group=cfg.shard_group)
    return sq.sqrt()


# ----------------------------------------------------------------------------- update


def _update(cfg: ZeroConfig, inner, ctx: StepContext, grads, params):
    specs = ctx.state[NAME]["specs"]
    if cfg.stage == 3:
        new = inner.update(ctx, grads, params)
        new = stage3.keep_in_flats(ctx.state[NAME], new, updated=True)
        for n, s in new.items():
            if s is not None:
                _tag(cfg, s, specs[n])
        _place_optimizer_state(cfg, ctx.state, specs)
        return new
    master = inner.update(ctx, grads, ctx.state[NAME]["master"])
    for n, s in master.items():
        if s is not None:
            _tag(cfg, s, specs[n])
    _place_optimizer_state(cfg, ctx.state, specs)
    ctx.state[NAME] = {**ctx.state[NAME], "master": master}
    return params  # the full params are refreshed by the apply stage


# ----------------------------------------------------------------------------- export


@torch.no_grad()
def gather_params(params: dict, state: dict | None = None) -> dict:
    """Full, unsharded params in their master precision (for export and tests).

    Stage 3 params are shards: they are all-gathered over their shard dim. Stages 1/2
    under mixed precision keep full params in the compute dtype; pass ``state`` to get
    the fp32 masters (all-gathered from the shards) instead. Anything else is returned
    as it is. Collective whenever it gathers: every rank of the shard group must call it.

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
        group = getattr(t, "_fscale_group", None)
        shard = t.detach().contiguous()
        if shard.device.type == "cpu" and comm.backend(group) == "nccl":
            # Params offloaded to the host: NCCL moves device tensors only.
            shard = shard.to(torch.device("cuda", torch.cuda.current_device()))
        gathered = comm.all_gather(shard, group=group)
        out[name] = spec.unpad(gathered).to(t.device, copy=True)
    return out

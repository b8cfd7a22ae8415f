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
import math
from collections.abc import Callable
from functools import partial

import torch

from fscale import tree
from fscale.hw import comm
from fscale.hw import mesh as meshes
from fscale.optim.sharded import LeafShards, sharded_as
from fscale.param_source import ParamSource
from fscale.placement import Placement, place, placement_of, unsplit
from fscale.policies import (
    CHANGES_GRADS_AFTER_BACKWARD,
    SHARDS_PARAMS,
    SKIP_SAFE_UPDATE,
    LocalGradsPolicy,
    ModelParallelDims,
    ParamSourcePolicy,
    PrecisionPolicy,
    ZeroPolicy,
)
from fscale.step import Step, StepContext, Transform
from fscale.transforms._zero import stage3
from fscale.transforms._zero.config import NAME, ZeroConfig
from fscale.transforms._zero.plan import plan_zero
from fscale.transforms._zero.sharding import (
    Reduction,
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
    mp_dims = step.policy(ModelParallelDims)
    model_dims = tuple(d for d in (mp_dims.dims if mp_dims else ()) if d in resolved.dims)
    data_dims = tuple(d for d in resolved.dims if d not in model_dims)
    if model_dims and not data_dims:
        raise ValueError(
            f"shard_zero: every dim of the mesh {list(resolved.dims)} splits the model "
            f"({list(model_dims)}); ZeRO shards over a data dim. Build the mesh with one, "
            "e.g. init_device_mesh(..., mesh_dim_names=('dp', 'tp'))."
        )
    if shard_dim is None and model_dims:
        shard_dim = data_dims[-1]  # the mesh's last dim is a model dim: the last data dim
    dim = meshes.pick(resolved, shard_dim, "shard_zero(shard_dim=...)")
    if dim in model_dims:
        raise ValueError(
            f"shard_zero(shard_dim={dim!r}) shards over tensor_parallel's dim; shard over a "
            f"data dim: shard_zero(..., shard_dim={data_dims[-1]!r})."
        )
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
    # HSDP's replicas are the other *data* dims; model dims hold copies of a dense leaf
    # too (placements say so), but no grad is averaged over them.
    replicate = tuple(d for d in data_dims if d != dim)
    others = tuple(d for d in resolved.dims if d != dim)
    cfg = ZeroConfig(
        stage, resolved, dim, replicate, unit, prefetch, bucket_bytes, check_order, others
    )
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
        "grad_norm": partial(_grad_norm, cfg, inner),
        "update": partial(_update, cfg, inner),
    }
    if stage == 1 and step.accumulate > 1:
        # Stage 1 keeps full local grads across micro-batches and reduces once a step.
        stages["reduce_grads"] = partial(reduce_then_shard, cfg)
    elif stage in (1, 2):
        # Stage 2, and stage 1 with a single micro-batch (where keeping full grads
        # buys nothing): reduce-scatter buckets during backward, overlapped.
        stages["loss_and_grad"] = partial(_loss_and_grad_12, cfg, inner)
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


def _local_grads(ctx: StepContext) -> bool:
    """An outer transform exchanges the grads itself on this call (``LocalGradsPolicy``)."""
    policy = ctx.step.policy(LocalGradsPolicy)
    return policy is not None and bool(policy.local(ctx))


def _loss_and_grad_12(cfg: ZeroConfig, inner, ctx: StepContext, params, batch):
    if _local_grads(ctx):  # full local grads, unreduced: the outer transform exchanges them
        return inner.loss_and_grad(ctx, params, batch)
    return overlapped_loss_and_grad(cfg, inner, ctx, params, batch)


def _grad_norm(cfg: ZeroConfig, inner, ctx: StepContext, grads) -> torch.Tensor:
    if _local_grads(ctx):  # full local grads: the inner (replicated-leaf) norm
        return inner.grad_norm(ctx, grads)
    return _sharded_grad_norm(cfg, ctx, grads)


def _already_reduced(ctx: StepContext, grads):
    """Stages 2/3 reduce-scatter during backward: the grads are already reduced shards."""
    return grads


# ----------------------------------------------------------------------------- init


def _init(cfg: ZeroConfig, inner, step: Step, params):
    """Shard the leaves the inner stack lays out, and build the state on the shards.

    The inner init runs on the full params: transforms under shard_zero that lay
    params out (expert_parallel, tensor_parallel slice them) do so first. At the
    bottom of the chain the optimizer's ``init`` receives the laid-out leaves; it is
    wrapped here to shard them (``_shard``) and build the optimizer state on the
    shards, so each leaf is sliced once and sharded once.
    """
    if not isinstance(params, dict):
        raise TypeError(
            f"shard_zero needs the params dict from fs.functional, got {type(params).__name__}."
        )
    made: dict = {}
    optimizer = step.optimizer

    def init_on_shards(laid):
        if not isinstance(laid, dict):
            raise TypeError(
                f"shard_zero needs the params dict from fs.functional, got {type(laid).__name__}."
            )
        made["laid"] = laid
        made["shards"], made["slot"] = _shard(cfg, step, laid)
        specs = made["slot"]["specs"]
        for n, s in made["shards"].items():
            if s is not None:  # placed before init: an offloaded optimizer reads them
                _tag(cfg, s, specs[n])
        return optimizer.init(made["shards"])

    probe = dataclasses.replace(step, optimizer=optimizer._replace(init=init_on_shards))
    _, state = inner.init(probe, params)
    if "shards" not in made:
        raise RuntimeError(
            "shard_zero: the inner init never built the optimizer state (optimizer.init); "
            "a transform under shard_zero replaced init without calling its inner init."
        )
    laid, shards, slot = made["laid"], made["shards"], made["slot"]
    specs = slot["specs"]
    _place_optimizer_state(cfg, state, specs)
    state[NAME] = slot
    if cfg.stage == 3:
        return shards, state
    # Stages 1/2 keep full params for compute and a master copy of this rank's rows.
    # Under mixed_precision the full params are kept in the compute dtype only (the
    # fp32 master is the shards): DeepSpeed's layout, 2 bytes/param instead of 4 + 2.
    mp = step.policy(PrecisionPolicy)
    state[NAME]["master"] = shards
    dtype = mp.param_dtype if mp is not None else None
    every = (cfg.shard_dim, *cfg.copies)
    full = {}
    for n, t in laid.items():
        full[n] = None if t is None else t.detach().to(dtype or t.dtype)
        if t is not None:  # a model-parallel slice keeps its placement
            place(full[n], placement_of(t) or Placement(tuple(t.shape), (), every))
    return full, state


def _shard(cfg: ZeroConfig, step: Step, params: dict):
    """The laid-out leaves -> (this rank's shards, shard_zero's state slot)."""
    policy = cfg.unit or (step.units.key_of if step.units is not None else None)
    classes = _classify(cfg, params)
    units = build_units(params, cfg.world, policy, classes)
    _check_tied(params, units)
    specs = {s.name: s for u in units for s in u.specs}
    mp = step.policy(PrecisionPolicy)
    slot = {"units": units, "specs": specs, "flats": {}}
    unsavable = sorted(n for n, s in specs.items() if s.placement is _INEXPRESSIBLE)
    if unsavable:
        slot["unsavable"] = _Unsavable(tuple(unsavable), cfg.shard_dim)
    specs = {
        n: dataclasses.replace(s, placement=_own_placement(cfg, s))
        if s.placement is _INEXPRESSIBLE
        else s
        for n, s in specs.items()
    }
    if unsavable:
        units = [type(u)(u.key, tuple(specs[s.name] for s in u.specs)) for u in units]
        slot["units"], slot["specs"] = units, specs
    if cfg.stage == 3:
        # [Note: flat master shards] each unit's shards are views of one flat buffer:
        # the all-gather reads it directly (one cast kernel under mixed precision).
        flats = {}
        for u in units:
            rank = cfg.rank_of(u.reduction)
            flats[u.key] = params[u.specs[0].name].new_empty(u.shard_numel)
            for spec, view in zip(u.specs, split_shards(flats[u.key], u.specs), strict=True):
                view.copy_(spec.shard(params[spec.name].detach(), rank))
        device = next((f.device for f in flats.values()), torch.device("cpu"))
        source = _param_source(step, device, mp)
        slot["flats"] = flats = source.place(flats)
        for u in units:  # rank-major: rank r holds elements [r*k, (r+1)*k) of all flats
            if isinstance(flats[u.key], torch.Tensor):
                place(flats[u.key], _flat_placement(cfg, u))
        slot["source"] = source
        shards = {n: None for n in params}
        for u in units:
            shards.update(zip(u.names, split_shards(flats[u.key], u.specs), strict=True))
    else:
        shards = {
            n: (None if t is None else specs[n].shard(t.detach(), cfg.rank_of(specs[n].reduction)))
            for n, t in params.items()
        }
    return shards, slot


def _flat_placement(cfg: ZeroConfig, u) -> Placement:
    if u.reduction is None:
        return Placement((cfg.world * u.shard_numel,), (cfg.shard_dim,), cfg.copies)
    if u.reduction.shard_dim is None:
        return Placement((u.shard_numel,), (), ())
    dim = u.reduction.shard_dim
    return Placement((u.world * u.shard_numel,), (dim,), ())


# [Note: ZeRO over model-parallel leaves]
# Transforms under shard_zero may hand it leaves already split over mesh dims
# (expert_parallel: expert banks over "ep" on dim 0; tensor_parallel: weights over
# "tp" along dim 0 or 1, fused blocks in chunks). Each leaf's reduction class comes
# from that placement and the step's data dims ([Note: which dims a grad is averaged
# over] in fscale/policies.py):
# - ZeRO's rows of the leaf are reduce-scattered over the shard dim, unless the leaf is
#   split over it (an expert bank with shard_dim="ep"): then it is kept whole;
# - then averaged over the data dims other than the shard dim it is not split over;
# - then divided by the sizes of the data dims it is split over (its backward summed
#   the tokens every rank of them sent it);
# - never reduced over a model dim (tp): a split leaf holds different slices there, a
#   replicated one already has the same grad on every rank.
# Leaves of different classes never share a flat unit (stage 3: the unit key gets the
# class's suffix; gathered lazily, so a block's experts are one more gather) nor a
# grad bucket (stages 1/2: ClassedBuckets). With no split leaf every leaf is in the
# default class (reduction None): the code paths, buckets and collectives are those
# of plain ZeRO / HSDP. The grad norm adds a split leaf's squares over its split
# dims. A shard's placement composes with the split where Placement can say it (a
# dim-0 split, then ZeRO's dim-0 rows, evenly: shard=(split dims..., shard dim));
# where it cannot (a split along dim 1, fused chunks, uneven rows) the shard keeps
# ZeRO's own placement over the slice, and fs.save refuses the state (_Unsavable).

_INEXPRESSIBLE = object()


def _classify(cfg: ZeroConfig, params: dict) -> dict[str, ShardSpec]:
    """Specs of the leaves split before ZeRO (the others take the default spec)."""
    mesh = cfg.mesh
    data = set(cfg.replicate_dims) | {cfg.shard_dim}
    out = {}
    for name, t in params.items():
        placement = placement_of(t) if t is not None else None
        if placement is None or not placement.sharded:
            continue
        split = tuple(d for d in placement.split_dims if d in mesh.dims and mesh.size(d) > 1)
        if not split:
            continue
        zdim = None if cfg.shard_dim in split else cfg.shard_dim
        average = tuple(d for d in cfg.replicate_dims if d not in split and mesh.size(d) > 1)
        scale = math.prod(mesh.size(d) for d in split if d in data)
        reduction = Reduction(zdim, average, scale)
        world = 1 if zdim is None else mesh.size(zdim)
        spec = ShardSpec(name, tuple(t.shape), world, reduction, None, split)
        out[name] = dataclasses.replace(
            spec, placement=_composed(cfg, spec, placement), before=placement
        )
    return out


def _composed(cfg: ZeroConfig, spec: ShardSpec, split: Placement):
    """The placement of ZeRO's rows of a leaf split by ``split``, or _INEXPRESSIBLE."""
    mesh = cfg.mesh
    zdim = spec.reduction.shard_dim
    if zdim is None:  # kept whole: the slice as the inner transform placed it
        return split
    parts = split.parts(mesh) * mesh.size(zdim)
    uneven = not split.shape or split.shape[0] % parts
    if split.dim != 0 or split.chunks != 1 or split.extra or uneven:
        return _INEXPRESSIBLE
    shard = (*split.shard, zdim)
    return Placement(split.shape, shard, tuple(d for d in mesh.dims if d not in shard), 0)


def _own_placement(cfg: ZeroConfig, spec: ShardSpec) -> Placement:
    """ZeRO's rows of a slice it cannot place on the full tensor: honest about the mesh
    dims (the slice's shape, split over the shard dim, copied over the dims the leaf
    is not split over), and refused by fs.save."""
    zdim = spec.reduction.shard_dim
    keep = tuple(d for d in cfg.mesh.dims if d != zdim and d not in spec.split)
    return Placement(spec.shape, (zdim,), keep)


class _Unsavable:
    """In the state slot when some shard's placement cannot describe the full tensor:
    ``fscale.state.describe`` (what fs.save and fs.load walk) raises, naming them."""

    def __init__(self, names: tuple[str, ...], shard_dim: str):
        self.names, self.shard_dim = names, shard_dim

    def describe_state(self):
        raise ValueError(
            f"fs.save: shard_zero's rows of {len(self.names)} params split by a model-parallel "
            f"transform along another tensor dim than ZeRO's rows (or in fused chunks, or "
            f"unevenly), e.g. {list(self.names[:3])}, have no placement on the full tensor, "
            "so a checkpoint of them would be wrong. Gather them first (fs.gather_params, "
            "then save the slices), or shard_zero only over a step whose split leaves are "
            "split along dim 0 in rows that divide by the shard dim."
        )


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
    placement = cfg.placement(spec)
    place(shard, placement)
    if spec.reduction is not None and spec.reduction.shard_dim is None:
        return  # kept whole: nothing for fs.gather_params to gather
    # fs.gather_params reads these to rebuild full params from shards.
    group = cfg.group_of(spec.reduction)
    shard._fscale_shard = spec
    shard._fscale_zero_group = group
    if placement.shard == (spec.reduction.shard_dim if spec.reduction else cfg.shard_dim,):
        # fs.save takes a shard's coordinates from the group of its placement's dims:
        # only where the placement is ZeRO's dim alone (not composed with a split).
        shard._fscale_group = group


# ----------------------------------------------------------------------------- grads


def _sharded_grad_norm(cfg: ZeroConfig, ctx: StepContext, grads) -> torch.Tensor:
    """Global 2-norm of sharded grads: sum of squares over the shard dim (padding rows are 0;
    replicas hold the same shard, so they are not summed); leaves split before ZeRO
    also over their split dims ([Note: ZeRO over model-parallel leaves])."""
    specs = ctx.state[NAME]["specs"]
    paths = tree.paths(grads)
    groups: dict[tuple[str, ...], list[torch.Tensor]] = {}
    for path, g in zip(paths, tree.leaves(grads), strict=True):
        if g is not None:
            groups.setdefault(_split_dims(cfg, specs.get(path)), []).append(g)
    if not groups:
        return torch.zeros(())
    wide = max(
        (torch.promote_types(g.dtype, torch.float32) for gs in groups.values() for g in gs),
        key=lambda d: d.itemsize,
    )
    total = None
    for dims, leaves in groups.items():
        sq = torch.stack([g.to(wide).pow(2).sum() for g in leaves]).sum()
        for dim in dims:
            ctx.comm.all_reduce("zero.norm", sq, op="sum", group=_group(cfg, dim))
        total = sq if total is None else total + sq
    return total.sqrt()


def _split_dims(cfg: ZeroConfig, spec: ShardSpec | None) -> tuple[str, ...]:
    """The mesh dims a shard's leaf is split over: ZeRO's dim, and for leaves split
    before ZeRO their split dims too ([Note: ZeRO over model-parallel leaves])."""
    if spec is None or spec.reduction is None:
        return (cfg.shard_dim,) if cfg.world > 1 else ()
    zdim = spec.reduction.shard_dim
    return tuple(
        d for d in cfg.mesh.dims if (d == zdim or d in spec.split) and cfg.mesh.size(d) > 1
    )


def _group(cfg: ZeroConfig, dim: str):
    return cfg.shard_group if dim == cfg.shard_dim else cfg.mesh.group(dim)


# ----------------------------------------------------------------------------- update


def _leaf_shards(cfg: ZeroConfig, ctx: StepContext, shards: dict) -> LeafShards:
    """The optimizer sees this rank's rows of every leaf: its norms sum over the
    rows' groups ([Note: norms of sharded leaves] in fscale/optim/sharded.py)."""
    specs = ctx.state[NAME]["specs"]
    positions = {}
    for i, path in enumerate(tree.paths(shards)):
        dims = _split_dims(cfg, specs.get(path))
        if dims:
            positions[i] = tuple(_group(cfg, d) for d in dims)
    return LeafShards(positions, reduce=partial(_sum_norms, ctx.comm), where="shard_zero")


def _sum_norms(comm, squares: torch.Tensor, group) -> None:
    comm.all_reduce("zero.norm", squares, op="sum", group=group)


def _update(cfg: ZeroConfig, inner, ctx: StepContext, grads, params):
    with sharded_as(_leaf_shards(cfg, ctx, grads)):
        return _update_shards(cfg, inner, ctx, grads, params)


def _update_shards(cfg: ZeroConfig, inner, ctx: StepContext, grads, params):
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
def gather_params(params: dict, state: dict | None = None, mesh=None) -> dict:
    """Full, unsharded params in their master precision (for export, eval and tests).

    Stage 3 params are shards: they are all-gathered over their shard dim. Stages 1/2
    under mixed precision keep full params in the compute dtype; pass ``state`` to get
    the fp32 masters (all-gathered from the shards) instead. With ``mesh`` (the step's:
    ``step.mesh``), the slices ``expert_parallel`` / ``tensor_parallel`` made are put
    back together too. Anything else is returned as it is. Collective whenever it
    gathers: every rank of the mesh must call it.

    Usage::

        full = fs.gather_params(params, state, mesh=step.mesh)
    """
    out = _gather_zero(params, state)
    if mesh is None:
        return out
    layout = (state or {}).get("layout")
    placements = dict(zip(layout.paths, layout.placements, strict=True)) if layout else {}
    specs = (state or {}).get(NAME, {}).get("specs", {})
    for name, t in out.items():
        placement = placements.get(name) or placement_of(t)
        if name in specs:  # ZeRO's rows are gathered: what is left is the slice it got
            placement = specs[name].before
        if t is None or placement is None or not placement.split_dims:
            continue
        if tuple(t.shape) == tuple(placement.shape):
            continue  # already whole
        out[name] = unsplit(t.detach(), placement, meshes.resolve(mesh))
    return out


def _gather_zero(params: dict, state: dict | None) -> dict:
    master = (state or {}).get(NAME, {}).get("master")
    if master is not None:
        params = master  # stages 1/2: this rank's fp32 rows, tagged like stage-3 shards
    out = {}
    for name, t in params.items():
        spec = getattr(t, "_fscale_shard", None) if t is not None else None
        if spec is None or tuple(t.shape) != spec.shard_shape:
            out[name] = t
            continue
        group = getattr(t, "_fscale_zero_group", getattr(t, "_fscale_group", None))
        shard = t.detach().contiguous()
        if shard.device.type == "cpu" and comm.backend(group) == "nccl":
            # Params offloaded to the host: NCCL moves device tensors only.
            shard = shard.to(torch.device("cuda", torch.cuda.current_device()))
        gathered = comm.all_gather(shard, group=group)
        out[name] = spec.unpad(gathered).to(t.device, copy=True)
    return out

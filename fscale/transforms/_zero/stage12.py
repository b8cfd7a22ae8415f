"""ZeRO stages 1 and 2: grads reduce-scattered (in backward, or once after accumulation)
and the updated shards all-gathered back into the full params in ``apply``.

Usage::

    stages["loss_and_grad"] = partial(overlapped_loss_and_grad, cfg, inner)   # stage 2
    stages["apply"] = partial(all_gather_updated, cfg, inner)
"""

from __future__ import annotations

from functools import partial

import torch

from fscale import tree
from fscale.policies import PrecisionPolicy
from fscale.step import StepContext
from fscale.transforms._zero.buckets import ClassedBuckets, GradBuckets
from fscale.transforms._zero.config import NAME, ZeroConfig
from fscale.transforms._zero.sharding import ShardSpec, copy_out, flat_shards


def grad_buckets(cfg: ZeroConfig, ctx: StepContext, names: list[str]):
    """The grad sink: one ``GradBuckets``, or one per reduction class (``ClassedBuckets``)."""
    specs = ctx.state[NAME]["specs"]
    master = ctx.state[NAME]["master"]
    mp = ctx.step.policy(PrecisionPolicy)
    aligned = [specs[n] for n in names]
    classes = {s.reduction for s in aligned}

    def sink(reduction) -> GradBuckets:
        return GradBuckets(
            aligned,
            cfg.world_of(reduction),
            partial(cfg.reduce_grads, ctx.comm, reduction=reduction),
            cfg.bucket_bytes,
            mp.reduce_dtype if mp is not None else None,
            out_dtypes=[master[n].dtype for n in names],
        )

    if classes == {None}:
        return sink(None)  # the fast path: one class, today's buckets
    return ClassedBuckets([s.reduction for s in aligned], {r: sink(r) for r in classes})


def overlapped_loss_and_grad(cfg: ZeroConfig, inner, ctx: StepContext, params, batch):
    """Stage 2: the inner loss_and_grad with a sink that reduce-scatters buckets in backward."""
    names = [
        n for n, t in zip(tree.paths(params), tree.leaves(params), strict=True) if t is not None
    ]
    ctx.grad_sink = grad_buckets(cfg, ctx, names)
    try:
        return inner.loss_and_grad(ctx, params, batch)
    finally:
        ctx.grad_sink = None


def _bucketed(specs: list[ShardSpec], grads: dict, limit: int) -> list[list[ShardSpec]]:
    """Runs of specs of one dtype and one reduction class, of at most ``limit`` bytes."""
    buckets: list[list[ShardSpec]] = []
    size = 0
    for s in specs:
        g = grads[s.name]
        nbytes = s.numel * g.element_size()
        if (
            not buckets
            or size + nbytes > limit
            or grads[buckets[-1][0].name].dtype != g.dtype
            or buckets[-1][0].reduction != s.reduction
        ):
            buckets.append([])
            size = 0
        buckets[-1].append(s)
        size += nbytes
    return buckets


def reduce_then_shard(cfg: ZeroConfig, ctx: StepContext, grads):
    """Stage 1 with accumulation: DDP's all-reduce of the accumulated full grads (in the
    reduce dtype) over every mesh dim, once a step, then this rank's rows."""
    mp = ctx.step.policy(PrecisionPolicy)
    specs, master = ctx.state[NAME]["specs"], ctx.state[NAME]["master"]
    live = [n for n, g in grads.items() if g is not None]
    dtype = mp.reduce_dtype if mp is not None else None
    full = {n: grads[n].to(dtype or grads[n].dtype) for n in live}
    every = [d for d in cfg.mesh.dims if cfg.mesh.size(d) > 1]
    for bucket in _bucketed([specs[n] for n in live], full, cfg.bucket_bytes):
        reduction = bucket[0].reduction
        if reduction is None:
            dims, scale = every, 1
        else:  # [Note: ZeRO over model-parallel leaves] in zero.py
            over = {reduction.shard_dim, *reduction.average}
            dims, scale = [d for d in every if d in over], reduction.scale
        flat = torch.cat([full[s.name].reshape(-1) for s in bucket])
        for dim in dims:  # the mean over a product of dims is the mean of means
            ctx.comm.all_reduce("zero.grads", flat, op="avg", group=cfg.mesh.group(dim))
        if scale > 1:
            flat.div_(scale)
        for s, piece in zip(bucket, flat.split([s.numel for s in bucket]), strict=True):
            full[s.name] = piece.view(s.shape)
    # Shard grads in the master dtype: clipping and the update then run in fp32.
    return {
        n: None
        if g is None
        else specs[n].shard(full[n], cfg.rank_of(specs[n].reduction)).to(master[n].dtype)
        for n, g in grads.items()
    }


@torch.no_grad()
def all_gather_updated(cfg: ZeroConfig, inner, ctx: StepContext, params):
    """Stages 1/2 ``apply``: every rank's updated rows into the full params, by bucket."""
    params = inner.apply(ctx, params)
    master, specs = ctx.state[NAME]["master"], ctx.state[NAME]["specs"]
    live = [specs[n] for n, p in params.items() if p is not None]
    for bucket in _bucketed(live, params, cfg.bucket_bytes):
        dtype = params[bucket[0].name].dtype
        reduction = bucket[0].reduction
        if cfg.world_of(reduction) == 1 and reduction is not None:
            for s in bucket:  # kept whole ([Note: ZeRO over model-parallel leaves])
                params[s.name].copy_(master[s.name].view(s.shape))
            continue
        flat = flat_shards([master[s.name] for s in bucket], dtype)
        gathered = ctx.comm.all_gather("zero.params", flat, group=cfg.group_of(reduction))
        world = cfg.world_of(reduction)
        for s, full in zip(bucket, copy_out(gathered, tuple(bucket), world), strict=True):
            params[s.name].copy_(full)
    return params

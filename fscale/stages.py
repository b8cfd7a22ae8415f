"""The named stages of a step and their defaults (see ``fscale/step.py`` for the table).

A transform replaces some of them (``step.with_transform(record, update=...)``); the
defaults are the plain data-parallel step: ``autograd.grad`` of the loss with the
stack's unit hooks installed, the mean all-reduce over the mesh (tag ``"dp.grads"``),
the global grad norm, the optimizer, and an identity ``apply``.

Usage::

    inner = step.stages
    def update(ctx, grads, params):      # a transform's stage, wrapping the inner one
        return inner.update(ctx, grads, params)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import torch

from fscale import aux_loss, tree
from fscale.optim.base import apply_gradients
from fscale.optim.sharded import LeafShards

if TYPE_CHECKING:
    from fscale.step import Step, StepContext

Params = Any
Batch = Any
State = dict


@dataclass(frozen=True)
class Stages:
    """The named stages of a step; transforms replace some of them."""

    init: Callable[[Step, Params], tuple[Params, State]]
    materialize: Callable[[StepContext, Params], Params]
    loss_and_grad: Callable[[StepContext, Params, Batch], tuple[torch.Tensor, Params]]
    reduce_grads: Callable[[StepContext, Params], Params]
    finish_grads: Callable[[StepContext, Params], Params]
    grad_norm: Callable[[StepContext, Params], torch.Tensor]
    update: Callable[[StepContext, Params, Params], Params]
    apply: Callable[[StepContext, Params], Params]


# ----------------------------------------------------------------------------- defaults


def default_init(step: Step, params: Params) -> tuple[Params, State]:
    return params, {"count": 0, "optimizer": step.optimizer.init(params)}


def default_materialize(ctx: StepContext, params: Params) -> Params:
    return params


def default_loss_and_grad(ctx: StepContext, params: Params, batch: Batch):
    """Loss and grads w.r.t. the laid-out params; ``materialize`` runs inside.

    Uses ``torch.autograd.grad`` rather than ``torch.func.grad``: saved-tensor hooks
    (activation checkpointing, offload) are disabled under torch.func transforms.
    """
    step = ctx.step
    leaves, spec = tree.flatten(params)
    inputs = [None if t is None else t.detach().requires_grad_(True) for t in leaves]
    with torch.enable_grad():
        source = step.stages.materialize(ctx, tree.unflatten(spec, inputs))
        with step.hooked_units(), aux_loss.collecting() as extra:
            out = step.loss_fn(source, batch)
        if step.has_aux and not (isinstance(out, tuple) and len(out) == 2):
            raise ValueError(
                f"train_step(has_aux=True): loss_fn must return (loss, metrics_dict), got a "
                f"{type(out).__name__}; return the pair, or drop has_aux."
            )
        loss, aux = out if step.has_aux else (out, None)
        _check_loss(loss)
        if extra.terms:  # routers' load-balancing / z-losses (fscale/aux_loss.py)
            ctx.metrics.update(extra.metrics())
            target = loss + extra.total(loss)
        else:
            target = loss
        target = target if ctx.loss_scale is None else target * ctx.loss_scale
        wrt = [t for t in inputs if t is not None]
        if ctx.grad_sink is None:
            # materialize_grads: a param the loss does not use gets zeros, so every rank
            # reduces the same set of tensors (DeepSpeed's unused-param hangs).
            grads = torch.autograd.grad(target, wrt, allow_unused=True, materialize_grads=True)
        else:
            grads = backward_into_sink(ctx.grad_sink, target, wrt)
    it = iter(grads)
    grad_leaves = [None if t is None else next(it) for t in inputs]
    if aux is not None:
        ctx.metrics.update(aux)
    return loss.detach(), tree.unflatten(spec, grad_leaves)


def backward_into_sink(sink, target: torch.Tensor, wrt: list[torch.Tensor]) -> list:
    """Backward that hands each grad to ``sink.add(index, grad)`` the moment it is ready.

    The leaf's own ``.grad`` is dropped right away, so a sink that reduces and
    frees grads as they arrive (ZeRO-2) never holds the whole model's grads.
    ``sink.start(wrt)`` then ``sink.before_backward(target)`` (if the sink has them) run
    first; ``sink.finish(n)`` returns the n results, aligned with ``wrt``.
    """
    handles = []
    for index, leaf in enumerate(wrt):

        def hook(t: torch.Tensor, index=index) -> None:
            grad, t.grad = t.grad, None
            sink.add(index, grad)

        handles.append(leaf.register_post_accumulate_grad_hook(hook))
    if hasattr(sink, "start"):
        sink.start(wrt)
    if hasattr(sink, "before_backward"):
        sink.before_backward(target)
    try:
        target.backward()
    finally:
        for h in handles:
            h.remove()
    return sink.finish(len(wrt))


def _check_loss(loss: Any) -> None:
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ValueError(
            f"loss_fn must return a scalar tensor, got {shape}. Reduce it (e.g. .mean()), "
            "or pass has_aux=True and return (loss, metrics_dict)."
        )
    if not loss.dtype.is_floating_point:
        raise ValueError(f"loss_fn returned a {loss.dtype} tensor; the loss must be floating.")


_BUCKET_BYTES = 25 * 2**20


def default_reduce_grads(ctx: StepContext, grads: Params) -> Params:
    """DDP semantics: the mean over the step's data dims, in ~25 MiB flat buckets.

    Leaves sharded over a data dim (expert banks) are averaged over the other data
    dims and divided by the sharded dims' size ([Note: which dims a grad is averaged
    over] in ``fscale/policies.py``); model-parallel dims are never reduced over.
    """
    mesh = ctx.step.mesh
    data = [d for d in ctx.step.data_dims() if mesh.size(d) > 1]
    if not data:
        return grads
    leaves, spec = tree.flatten(grads)
    groups: dict[tuple, list[torch.Tensor]] = {}
    for g, placement in zip(leaves, _placements(ctx, len(leaves)), strict=True):
        if g is None:
            continue
        sharded = set(placement.split_dims) if placement is not None else set()
        dims = tuple(d for d in data if d not in sharded)
        scale = math.prod(mesh.size(d) for d in data if d in sharded)
        groups.setdefault((dims, scale), []).append(g)
    for (dims, scale), members in groups.items():
        for bucket in _buckets(members, _BUCKET_BYTES):
            flat = torch.cat([g.reshape(-1) for g in bucket])
            for dim in dims:  # the mean over a product of dims is the mean of means
                ctx.comm.all_reduce("dp.grads", flat, op="avg", group=mesh.group(dim))
            if scale > 1:
                flat.div_(scale)
            offset = 0
            for g in bucket:
                g.copy_(flat[offset : offset + g.numel()].view_as(g))
                offset += g.numel()
    return tree.unflatten(spec, leaves)


def _placements(ctx: StepContext, n: int) -> tuple:
    """The laid-out leaves' placements (aligned with the grads), Nones if unknown."""
    layout = ctx.state.get("layout")
    placements = getattr(layout, "placements", ())
    return tuple(placements) if len(placements) == n else (None,) * n


def _buckets(tensors: list[torch.Tensor], limit: int) -> list[list[torch.Tensor]]:
    """Consecutive runs of same-dtype/device tensors of at most ``limit`` bytes each."""
    out: list[list[torch.Tensor]] = []
    size = 0
    for t in tensors:
        nbytes = t.numel() * t.element_size()
        if (
            not out
            or size + nbytes > limit
            or (out[-1][0].dtype, out[-1][0].device) != (t.dtype, t.device)
        ):
            out.append([])
            size = 0
        out[-1].append(t)
        size += nbytes
    return out


def default_finish_grads(ctx: StepContext, grads: Params) -> Params:
    return grads


def default_grad_norm(ctx: StepContext, grads: Params) -> torch.Tensor:
    """The global 2-norm; leaves sharded over mesh dims add their shards' squares
    across those dims (tag ``"dp.norm"``), replicated ones count once."""
    leaves = tree.leaves(grads)
    mesh = ctx.step.mesh
    # (mesh dims, device, norm dtype) -> grads: one multi-tensor norm launch per group
    # instead of one per leaf ([Note: per-leaf launches]).
    groups: dict[tuple, list[torch.Tensor]] = {}
    for g, placement in zip(leaves, _placements(ctx, len(leaves)), strict=True):
        if g is None:
            continue
        dims = tuple(d for d in placement.split_dims if mesh.size(d) > 1) if placement else ()
        # fp32 at least (bf16 grads), float64 kept (a float64 model clips exactly).
        wide = torch.promote_types(g.dtype, torch.float32)
        groups.setdefault((dims, g.device, wide), []).append(g)
    if not groups:
        return torch.zeros(())
    norms: dict[tuple[str, ...], list[torch.Tensor]] = {}
    for (dims, _, wide), gs in groups.items():
        norms.setdefault(dims, []).extend(torch._foreach_norm(gs, 2, dtype=wide))
    device = next(iter(norms.values()))[0].device
    wide = max((n.dtype for ns in norms.values() for n in ns), key=lambda d: d.itemsize)
    parts = {
        dims: torch.linalg.vector_norm(torch.stack(_on(ns, device, wide)))
        for dims, ns in norms.items()
    }
    if list(parts) == [()]:
        return parts[()]
    total = torch.zeros((), device=device, dtype=wide)
    for dims, part in parts.items():
        square = part.square()
        for dim in dims:
            ctx.comm.all_reduce("dp.norm", square, op="sum", group=mesh.group(dim))
        total = total + square
    return total.sqrt()


def _on(ts: list[torch.Tensor], device, dtype) -> list[torch.Tensor]:
    """``ts`` on ``device`` as ``dtype``; as they are when they all are (no call per leaf)."""
    if all(t.device == device and t.dtype == dtype for t in ts):
        return ts
    return [t.to(device, dtype) for t in ts]


def leaf_shards(ctx: StepContext, params: Params) -> LeafShards | None:
    """Which of the laid-out leaves are split over which groups, for the optimizer's norms
    ([Note: norms of sharded leaves] in ``fscale/optim/sharded.py``); None if none is."""
    mesh = ctx.step.mesh
    n = len(tree.leaves(params))
    positions = {}
    for i, placement in enumerate(_placements(ctx, n)):
        dims = [d for d in placement.split_dims if mesh.size(d) > 1] if placement else []
        if dims:
            positions[i] = tuple(mesh.group(d) for d in dims)
    if not positions:
        return None
    return LeafShards(positions, reduce=partial(_sum_norms, ctx.comm))


def _sum_norms(comm, squares: torch.Tensor, group) -> None:
    comm.all_reduce("opt.norm", squares, op="sum", group=group)


def default_update(ctx: StepContext, grads: Params, params: Params) -> Params:
    params, ctx.state["optimizer"] = apply_gradients(
        ctx.step.optimizer, grads, ctx.state["optimizer"], params
    )
    return params


def default_apply(ctx: StepContext, params: Params) -> Params:
    return params


def clip_(grads: Params, norm: torch.Tensor, max_norm: float) -> None:
    """``torch.nn.utils.clip_grad_norm_`` semantics, without a host sync.

    [Note: per-leaf launches]
    A step touches every leaf a few times outside the optimizer (the norm, the clip);
    a kernel per leaf costs the host ~10 us each, which on a small model (~150
    leaves, ~50 ms steps) adds up to a host-bound step. Leaves are grouped by device
    and dtype and go through ``torch._foreach_*``: one launch per group on CUDA, and
    on the CPU the same per-tensor kernels as before. The clip's multiply is the same
    bits everywhere; the norms are on the CPU, while on CUDA the multi-tensor norm
    kernel may sum in another order than ``vector_norm`` (rounding-level)."""
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    groups: dict[tuple, list[torch.Tensor]] = {}
    for g in tree.leaves(grads):
        if g is not None:
            groups.setdefault((g.device, g.dtype), []).append(g)
    for (device, dtype), gs in groups.items():
        torch._foreach_mul_(gs, coef.to(device, dtype))


DEFAULT_STAGES = Stages(
    init=default_init,
    materialize=default_materialize,
    loss_and_grad=default_loss_and_grad,
    reduce_grads=default_reduce_grads,
    finish_grads=default_finish_grads,
    grad_norm=default_grad_norm,
    update=default_update,
    apply=default_apply,
)

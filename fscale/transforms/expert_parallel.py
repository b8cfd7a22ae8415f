"""``expert_parallel(step, dim="ep")``: experts sharded over a mesh dim, tokens sent to them.

Each expert bank (a module holding every expert's weights stacked on dim 0, such as
``fscale.models.moe.Experts``) keeps only its ``E / ep`` local experts on each rank
of the mesh's ``dim``. A bank's forward takes tokens sorted by (global) expert and
the count per expert; this transform wraps it so that, inside each unit, the
tokens travel to the rank owning their expert (``all_to_all_single`` with uneven
splits, tag ``"ep.dispatch"``), the local bank runs on what it received, and the
results travel back (``"ep.combine"``). Routing, capacity and the combine stay in
the MoE layer, unchanged.

The ``dim`` is a data dim: its ranks hold different samples, so dense grads are
averaged over it as over any data-parallel dim, and an expert's grad, which already
summed the contributions of the tokens every rank sent it, is divided by the dim's
size ([Note: which dims a grad is averaged over] in ``fscale/policies.py``).
Expert params carry ``Placement(shard=(dim,))``, so checkpoints and ``fs.explain``
see them as shards.

Order: ``shard_zero`` and ``mixed_precision`` go over it; it goes over nothing that
lays params out (it slices the full params in ``init``).

Usage::

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "ep"))
    step = fs.train_step(gpt_loss(apply), fs.optim.adamw(3e-4), mesh=mesh, model=model)
    step = fs.expert_parallel(step, dim="ep")
    params, state = step.init(params)            # expert banks: [E / 2, ...] per rank

[Note: a dispatch is captured when the unit is wrapped]
A unit hook runs once per call, in the thread of the step, when the stage installs
the hooks; the collectives of the call (``ctx.comm``) reach it through a context
variable set by this transform's ``loss_and_grad`` wrapper. The dispatcher keeps
them in its closure, so a recompute of the unit (``checkpoint_activations``) and
the backward of the all_to_all, which may run on autograd's threads, use the same
collectives with no context variable.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from fscale.hw import grad_comm
from fscale.hw import mesh as meshes
from fscale.placement import Placement, place, placement_of
from fscale.policies import ModelParallelDims, ZeroPolicy
from fscale.step import Step, Transform
from fscale.units import required, wrapping_submodules

NAME = "expert_parallel"
_CALL: contextvars.ContextVar[_Call] = contextvars.ContextVar("fscale_expert_parallel")


@dataclass(frozen=True)
class _TP:
    """The tensor-parallel group whose ranks hold the same tokens (TED)."""

    group: object
    size: int
    rank: int


@dataclass(frozen=True)
class _Call:
    comm: object  # the call's ctx.comm
    group: object
    size: int
    tp: _TP | None = None


def expert_parallel(step: Step, *, dim: str = "ep", experts=None) -> Step:
    """Shard every expert bank's experts over the mesh dim ``dim`` and dispatch tokens.

    Args:
      step: the step; it must know the model (``train_step(..., model=model)``) and
        its mesh must have the dim ``dim`` (``init_device_mesh(..., mesh_dim_names=
        ("dp", "ep"))``).
      dim: the expert-parallel mesh dim.
      experts: which modules are expert banks: a module class or a predicate
        ``(name, module) -> bool``; default ``fscale.models.moe.Experts``.

    Returns:
      A ``Step`` whose banks hold ``E / size(dim)`` experts per rank.
    """
    if step.policy(ModelParallelDims) is not None:
        raise ValueError(
            "expert_parallel cannot be applied over tensor_parallel: the expert dispatch must "
            "run outside the tensor-parallel bank (TED). Apply tensor_parallel over it: "
            "tensor_parallel(expert_parallel(step), ...)."
        )
    if step.policy(ZeroPolicy) is not None:
        raise ValueError(
            "expert_parallel cannot be applied over shard_zero: it slices the full params "
            "in init, which shard_zero has already flattened. Apply expert_parallel first: "
            "shard_zero(expert_parallel(step), ...)."
        )
    units = required(step.units, "expert_parallel", "dispatches tokens inside the model's units")
    meshes.pick(step.mesh, dim, "expert_parallel(dim=...)")
    size = step.mesh.size(dim)
    banks = _find_banks(units, experts)
    for name, bank in banks.items():
        _check_bank(name, bank, size, dim)
    by_unit: dict[str, list[nn.Module]] = {}
    for name, bank in banks.items():
        by_unit.setdefault(units.key_of(name + "."), []).append(bank)
    outside = by_unit.pop("", None)
    if outside:
        raise ValueError(
            f"expert_parallel: expert banks {[n for n in banks if not units.key_of(n + '.')]} "
            f"lie outside the units {list(units.names)[:4]}...; the dispatch wraps units, so "
            "every bank must sit inside one (pass train_step(..., units=...) covering them)."
        )
    others = tuple(d for d in step.mesh.dims if d != dim)
    names = {
        f"{bank_name}.{p}": bank.get_parameter(p).shape[0]
        for bank_name, bank in banks.items()
        for p, _ in bank.named_parameters()
    }
    rank = step.mesh.rank(dim)
    group = step.mesh.group(dim)
    record = Transform(
        NAME,
        options={"dim": dim, "size": size, "banks": len(banks)},
        plan=lambda plan: _plan(plan, banks, size, dim),
    )
    inner_init = step.stages.init
    inner_loss = step.stages.loss_and_grad

    def init(step_, params):
        missing = sorted(set(names) - set(params))
        if missing:
            raise ValueError(
                f"expert_parallel: params lack the expert weights {missing[:3]}; pass the "
                "params of fs.functional(model) for the model the step was built with."
            )
        params = dict(params)
        for name, experts_total in names.items():
            full = params[name]
            local = experts_total // size
            shard = full.detach().narrow(0, rank * local, local).clone()
            params[name] = place(shard, _expert_placement(name, full, dim, others))
        return inner_init(step_, params)

    def loss_and_grad(ctx, params, batch):
        token = _CALL.set(_Call(ctx.comm, group, size, _tensor_parallel(ctx.step)))
        try:
            return inner_loss(ctx, params, batch)
        finally:
            _CALL.reset(token)

    def hook(unit: str, forward: Callable) -> Callable:
        call = _CALL.get(None)  # [Note: a dispatch is captured when the unit is wrapped]
        if call is None or call.size == 1 or unit not in by_unit:
            return forward
        return _dispatching(forward, by_unit[unit], call)

    return step.with_transform(record, unit_hook=hook, init=init, loss_and_grad=loss_and_grad)


# ----------------------------------------------------------------------------- banks


def _plan(plan, banks: dict[str, nn.Module], size: int, dim: str) -> None:
    """Each rank keeps 1/size of the banks; the dispatch moves activations, not params."""
    plan.split_leaves(
        {
            f"{name}.{pname}": (t.numel() * t.element_size(), size)
            for name, bank in banks.items()
            for pname, t in bank.named_parameters()
        }
    )
    width = next(iter(banks.values())).w_in.shape[1] if banks else 0
    plan.notes.append(
        f"expert_parallel: {len(banks)} expert banks, {size} ranks along {dim!r} hold 1/{size} "
        f"of the experts each; per routed token copy and bank, all_to_all moves its "
        f"{width}-wide activation out and back ('ep.dispatch', 'ep.combine'), (size-1)/size of "
        "them off-rank, and again in backward; metrics['comm_bytes_by_tag'] counts them."
    )


def _expert_placement(name: str, t: torch.Tensor, dim: str, others) -> Placement:
    """Experts over ``dim`` on dim 0; a split an outer transform already made (a
    tensor-parallel bank's hidden dim) is kept as an ``extra`` split of the full shape."""
    before = placement_of(t)
    if before is None or not before.sharded:
        return Placement(tuple(t.shape), (dim,), others, 0)
    if before.chunks != 1 or before.dim == 0 or len(before.shard) != 1:
        raise ValueError(
            f"expert_parallel: {name!r} arrives split as {before}; only a split of one mesh "
            "dim along a dim other than the experts' (a tensor-parallel bank) composes."
        )
    extra = ((before.shard[0], before.dim), *before.extra)
    replicate = tuple(d for d in others if d not in before.split_dims)
    return Placement(before.shape, (dim,), replicate, 0, 1, extra)


def _find_banks(units, experts) -> dict[str, nn.Module]:
    if experts is None:
        from fscale.models.moe import Experts  # the reference bank

        experts = Experts
    if isinstance(experts, type):
        kind = experts
        select = lambda name, module: isinstance(module, kind)
        what = f"modules of type {kind.__name__}"
    elif callable(experts):
        select, what = experts, f"modules for which {experts!r} is true"
    else:
        raise TypeError(
            f"expert_parallel: experts must be a module class or a predicate (name, module) "
            f"-> bool, got {experts!r}."
        )
    banks = {n: m for n, m in units.module.named_modules() if n and select(n, m)}
    if not banks:
        raise ValueError(
            f"expert_parallel found no expert bank in {type(units.module).__name__} ({what}); "
            "build the model with experts (e.g. GPTConfig(experts=8)) or pass experts= naming "
            "the bank class."
        )
    return banks


def _check_bank(name: str, bank: nn.Module, size: int, dim: str) -> None:
    counts = {p: t.shape[0] if t.dim() else 0 for p, t in bank.named_parameters()}
    if not counts or len(set(counts.values())) != 1:
        raise ValueError(
            f"expert_parallel: bank {name!r} must hold its experts on dim 0 of every param "
            f"(found dim-0 sizes {counts}); a bank stacks each expert's weights."
        )
    experts = next(iter(counts.values()))
    if experts % size:
        raise ValueError(
            f"expert_parallel: bank {name!r} has {experts} experts, which do not split over "
            f"the {size} ranks of mesh dim {dim!r}; use an expert count divisible by {size} "
            f"or a mesh whose {dim!r} size divides {experts}."
        )


# ----------------------------------------------------------------------------- dispatch


def _dispatching(forward: Callable, banks: list[nn.Module], call: _Call) -> Callable:
    """The unit's forward with each bank's forward routed through the all_to_all."""
    return wrapping_submodules(
        forward, [(bank, lambda _, inner: _bank_dispatch(inner, call)) for bank in banks]
    )


def _tensor_parallel(step: Step) -> _TP | None:
    """The model-parallel dim over this transform (tensor_parallel), if it splits."""
    policy = step.policy(ModelParallelDims)
    if policy is None:
        return None
    dim = policy.dims[0]
    mesh = step.mesh
    return _TP(mesh.group(dim), mesh.size(dim), mesh.rank(dim)) if mesh.size(dim) > 1 else None


def _bank_dispatch(local_forward: Callable, call: _Call) -> Callable:
    """The bank's forward as seen from the MoE layer: tokens to their experts and back.

    [Note: TED]
    Under tensor_parallel the ranks of a tensor-parallel group hold the same tokens.
    Each sends only its 1/tp of them through the all_to_all (``split_to``), the
    group then gathers what its ranks received (``gather_from``) so that the bank,
    split over the group by hidden units, runs on every token its experts own; its
    summed output is split back to the rank that brought each token, combined, and
    gathered over the group again. Every collective's backward is its transpose
    (``fscale/hw/grad_comm.py``), so grads are those of the replicated dispatch.
    """

    def dispatch(x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        n, comm, tp = call.size, call.comm, call.tp
        counts = counts.to(torch.int64).reshape(-1)
        if counts.numel() % n:
            raise ValueError(
                f"expert_parallel: the MoE layer routed over {counts.numel()} experts, which "
                f"do not split over {n} ranks."
            )
        local = counts.numel() // n
        if tp is not None:  # [Note: TED]: keep this rank's share of the duplicated tokens
            total = x.shape[0]
            sizes = [total // tp.size + (r < total % tp.size) for r in range(tp.size)]
            start = sum(sizes[: tp.rank])
            x = grad_comm.split_to(comm, "ep.ted", tp.group, x, sizes)
            ends = torch.cumsum(counts, 0)
            counts = ends.clamp(max=start + sizes[tp.rank]) - (ends - counts).clamp(min=start)
            counts = counts.clamp(min=0)
        # Row s of `received`: how many tokens rank s sends each of my experts.
        received = comm.all_to_all("ep.counts", counts.contiguous(), group=call.group)
        received = received.view(n, local)
        send = counts.view(n, local).sum(1).tolist()
        recv = received.sum(1).tolist()
        tokens = grad_comm.all_to_all(comm, "ep.dispatch", call.group, x, recv, send)
        order = _expert_major(received)
        mine, mine_counts = tokens[order], received.sum(0)
        if tp is None:
            out = local_forward(mine, mine_counts)
        else:
            every = comm.all_gather("ep.counts", mine_counts, group=tp.group).view(tp.size, local)
            shares = every.sum(1).tolist()
            gathered = grad_comm.gather_from(comm, "ep.ted", tp.group, mine, shares)
            by_expert = _expert_major(every)
            out = local_forward(gathered[by_expert], every.sum(0))[torch.argsort(by_expert)]
            out = grad_comm.split_to(comm, "ep.ted", tp.group, out, shares)
        back = out[torch.argsort(order)]
        y = grad_comm.all_to_all(comm, "ep.combine", call.group, back, send, recv)
        if tp is not None:
            y = grad_comm.gather_from(comm, "ep.ted", tp.group, y, sizes)
        return y

    return dispatch


def _expert_major(received: torch.Tensor) -> torch.Tensor:
    """Row order that turns (source rank, expert) segments into (expert, source) ones."""
    n, local = received.shape
    lengths = received.reshape(-1)
    starts = torch.cumsum(lengths, 0) - lengths  # segment starts in arrival order
    lengths_t = received.t().reshape(-1)
    starts_t = starts.view(n, local).t().reshape(-1)
    offsets_t = torch.cumsum(lengths_t, 0) - lengths_t
    total = int(lengths.sum())
    shift = torch.repeat_interleave(starts_t - offsets_t, lengths_t, output_size=total)
    return torch.arange(total, device=received.device) + shift

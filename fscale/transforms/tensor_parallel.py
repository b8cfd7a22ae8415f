"""``tensor_parallel(step, dim="tp", plan=None)``: Megatron-style column/row-parallel layers.

The ranks along the mesh dim ``dim`` split each planned module's weights: a
column-parallel linear keeps a slice of the outputs, the row-parallel linear after
it a slice of the inputs, and one all-reduce per pair (tag ``"tp.activations"``)
sums the partial outputs in forward (and the input grads in backward). Attention
splits by heads, MLPs by hidden units, expert banks (``fscale.models.moe.Experts``)
by their hidden dim. Everything else (embeddings, norms, the head, routers) stays
whole on every rank.

The ranks along ``dim`` see the *same* batch: the step's data dims are the mesh's
other dims (``ModelParallelDims``), so grads are averaged over those only, and a
loader must hand every rank of a tensor-parallel group the same samples. The split
params carry ``Placement(shard=(dim,), dim=..., chunks=...)``.

``plan`` maps module-name patterns (``fnmatch``, e.g. ``"blocks.*.attn.qkv"``) to
styles (``Colwise``, ``Rowwise``, ``ExpertBank`` in ``fscale.transforms._tensor_parallel.styles``,
exported here). Default: fscale's GPT (fused qkv by heads, MLP fc/proj, expert
banks, MoE residual/shared MLPs) and Hugging Face Llama-family models (q/k/v/o,
gate/up/down). Every pattern must name a module inside the model's units.

Order: ``tensor_parallel(expert_parallel(step))`` (TED: the expert dispatch then
drops the tokens duplicated across the tensor-parallel ranks before its
all_to_all); ``mixed_precision`` and ``shard_zero`` go over it.

Not built: sequence parallelism and a vocabulary-parallel embedding/head (both
replicated here, as in Megatron without ``--sequence-parallel``).

Usage::

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    step = fs.train_step(gpt_loss(apply), fs.optim.adamw(3e-4), mesh=mesh, model=model)
    step = fs.tensor_parallel(step, dim="tp")
    params, state = step.init(params)          # qkv: [3 * d / 2, d] per rank
"""

from __future__ import annotations

import contextvars
import fnmatch
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from fscale.hw import mesh as meshes
from fscale.placement import Placement, place
from fscale.policies import ModelParallelDims, ZeroPolicy
from fscale.step import Step, Transform
from fscale.transforms._tensor_parallel.styles import Colwise, ExpertBank, Rowwise
from fscale.units import required, wrapping_submodules

NAME = "tensor_parallel"
__all__ = ["Colwise", "ExpertBank", "Rowwise", "default_plan", "tensor_parallel"]
_CALL: contextvars.ContextVar[_Call] = contextvars.ContextVar("fscale_tensor_parallel")


@dataclass(frozen=True)
class _Call:
    comm: object
    group: object
    size: int


def tensor_parallel(step: Step, *, dim: str = "tp", plan: Mapping | None = None) -> Step:
    """Split the planned modules' weights over the mesh dim ``dim``.

    Args:
      step: the step; it must know the model (``train_step(..., model=model)``) and
        its mesh must have the dim ``dim``.
      dim: the tensor-parallel mesh dim.
      plan: ``{module-name pattern: style}``; default ``default_plan(model)``.

    Returns:
      A ``Step`` whose planned modules hold ``1/size(dim)`` of their weights.
    """
    if step.policy(ZeroPolicy) is not None:
        raise ValueError(
            "tensor_parallel cannot be applied over shard_zero: it slices the full params in "
            "init, which shard_zero has already flattened. Apply it first: "
            "shard_zero(tensor_parallel(step), ...)."
        )
    units = required(step.units, "tensor_parallel", "splits modules inside the model's units")
    meshes.pick(step.mesh, dim, "tensor_parallel(dim=...)")
    size = step.mesh.size(dim)
    plan = default_plan(units.module) if plan is None else dict(plan)
    planned = _resolve(units, plan)
    shards = {}  # param name -> (dim, chunks)
    for name, (module, style) in planned.items():
        for pname, (axis, chunks, granularity) in style.shards(module).items():
            full = f"{name}.{pname}" if name else pname
            _check_split(full, module.get_parameter(pname), axis, chunks, granularity, size, dim)
            shards[full] = (axis, chunks)
    by_unit: dict[str, list[tuple[nn.Module, object]]] = {}
    for name, (module, style) in planned.items():
        by_unit.setdefault(units.key_of(name + "."), []).append((module, style))
    others = tuple(d for d in step.mesh.dims if d != dim)
    rank, group = step.mesh.rank(dim), step.mesh.group(dim)
    record = Transform(
        NAME,
        options={"dim": dim, "size": size, "modules": len(planned)},
        plan=lambda p: _plan(p, planned, shards, size, dim),
    )
    inner_init = step.stages.init
    inner_loss = step.stages.loss_and_grad

    def init(step_, params):
        missing = sorted(set(shards) - set(params))
        if missing:
            raise ValueError(
                f"tensor_parallel: params lack {missing[:3]}; pass the params of "
                "fs.functional(model) for the model the step was built with."
            )
        params = dict(params)
        for name, (axis, chunks) in shards.items():
            full = params[name]
            local = _slice(full.detach(), axis, chunks, rank, size).clone()
            placement = Placement(tuple(full.shape), (dim,), others, axis, chunks)
            params[name] = place(local, placement)
        return inner_init(step_, params)

    def loss_and_grad(ctx, params, batch):
        token = _CALL.set(_Call(ctx.comm, group, size))
        try:
            return inner_loss(ctx, params, batch)
        finally:
            _CALL.reset(token)

    def hook(unit: str, forward: Callable) -> Callable:
        call = _CALL.get(None)  # captured once per call, as expert_parallel's dispatch
        if call is None or call.size == 1 or unit not in by_unit:
            return forward
        return _wrapping(forward, by_unit[unit], call)

    return step.with_transform(
        record,
        policy=ModelParallelDims((dim,)),
        unit_hook=hook,
        init=init,
        loss_and_grad=loss_and_grad,
    )


# ----------------------------------------------------------------------------- plans


def _plan(plan, planned: dict, shards: dict, size: int, dim: str) -> None:
    leaves = {}
    for name in shards:
        owner, _, pname = name.rpartition(".")
        t = planned[owner][0].get_parameter(pname)
        leaves[name] = (t.numel() * t.element_size(), size)
    plan.split_leaves(leaves)
    plan.notes.append(
        f"tensor_parallel: {len(planned)} modules split over {size} ranks along {dim!r}; one "
        "all-reduce of the block's activations per column/row pair ('tp.activations') in "
        "forward and one in backward; the ranks along it read the same batch."
    )


def default_plan(model: nn.Module) -> dict:
    """The plan for fscale's GPT (dense or MoE) or a Hugging Face Llama-family model."""
    plan: dict = {}
    for name, module in model.named_modules():
        kind = type(module).__name__
        if kind == "CausalSelfAttention" and hasattr(module, "qkv"):
            head = module.qkv.in_features // module.n_head
            plan[f"{name}.qkv"] = Colwise(chunks=3, granularity=head)
            plan[f"{name}.proj"] = Rowwise()
        elif kind in ("MLP", "FFN") and hasattr(module, "fc") and hasattr(module, "proj"):
            plan[f"{name}.fc"] = Colwise()
            if getattr(module, "gate", None) is not None:  # SwiGLU
                plan[f"{name}.gate"] = Colwise()
            plan[f"{name}.proj"] = Rowwise()
        elif kind == "Experts" and hasattr(module, "w_in"):
            plan[name] = ExpertBank()
        elif hasattr(module, "q_proj") and hasattr(module, "o_proj"):
            head = getattr(module, "head_dim", 1)
            for proj in ("q_proj", "k_proj", "v_proj"):
                plan[f"{name}.{proj}"] = Colwise(granularity=head)
            plan[f"{name}.o_proj"] = Rowwise(granularity=head)
        elif all(hasattr(module, p) for p in ("gate_proj", "up_proj", "down_proj")):
            plan[f"{name}.gate_proj"] = Colwise()
            plan[f"{name}.up_proj"] = Colwise()
            plan[f"{name}.down_proj"] = Rowwise()
    if not plan:
        raise ValueError(
            f"tensor_parallel has no default plan for {type(model).__name__} (it knows "
            "fscale's GPT and Llama-family attention/MLP modules); pass plan={pattern: "
            "Colwise() | Rowwise() | ExpertBank()}."
        )
    return plan


def _resolve(units, plan: dict) -> dict[str, tuple[nn.Module, object]]:
    modules = dict(units.module.named_modules())
    out: dict[str, tuple[nn.Module, object]] = {}
    for pattern, style in plan.items():
        if not hasattr(style, "shards") or not hasattr(style, "wrap"):
            raise TypeError(
                f"tensor_parallel: plan[{pattern!r}] is {style!r}; use Colwise(), Rowwise() "
                "or ExpertBank() from fscale.transforms.tensor_parallel."
            )
        hits = [n for n in modules if n and fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            raise ValueError(
                f"tensor_parallel: plan pattern {pattern!r} names no module of "
                f"{type(units.module).__name__}; its modules include "
                f"{[n for n in modules if n][:6]}..."
            )
        for name in hits:
            if not units.key_of(name + "."):
                raise ValueError(
                    f"tensor_parallel: {name!r} lies outside the model's units "
                    f"{list(units.names)[:3]}...; only modules inside units can be split."
                )
            out[name] = (modules[name], style)
    return out


def _check_split(name, t: torch.Tensor, axis: int, chunks: int, granularity, size, dim) -> None:
    if t.dim() <= axis:
        raise ValueError(f"tensor_parallel: {name!r} of shape {tuple(t.shape)} has no dim {axis}.")
    rows = t.shape[axis]
    if rows % chunks or (rows // chunks) % (size * granularity):
        raise ValueError(
            f"tensor_parallel: {name!r} has {rows} rows along dim {axis}"
            + (f" in {chunks} fused blocks" if chunks > 1 else "")
            + f", which do not split over the {size} ranks of {dim!r} in whole units of "
            f"{granularity} (a head); use a {dim!r} size that divides the heads / hidden units."
        )


def _slice(t: torch.Tensor, axis: int, chunks: int, rank: int, size: int) -> torch.Tensor:
    """Rank ``rank``'s part of every one of ``chunks`` blocks along ``axis``."""
    blocks = t.chunk(chunks, dim=axis)
    return torch.cat([b.chunk(size, dim=axis)[rank] for b in blocks], dim=axis)


def _wrapping(forward: Callable, planned, call: _Call) -> Callable:
    """The unit's forward with each planned module's forward wrapped by its style."""
    return wrapping_submodules(
        forward,
        [(m, lambda mod, inner, style=style: style.wrap(mod, inner, call)) for m, style in planned],
    )

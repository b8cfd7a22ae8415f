"""``fs.explain(step, params)``: the lowered plan of a step, as text.

The plan is an analytic estimate built without running the step: the transform
stack, which function implements each stage, the collectives one step issues
(with bytes per rank), the kernel each registered op resolves to for the params'
device and dtype, and the memory per rank for params, grads and optimizer state.
Each transform adjusts it through its ``Transform.plan`` hook (ZeRO divides the
optimizer state by the world size, offload moves it to another tier, ...).

Usage::

    print(fs.explain(step, params))
    print(fs.explain(step, params, bandwidth="1gbit"))      # + comm seconds per step
    plan = fs.plan(step, params); plan.memory["optimizer"]   # bytes per rank
"""

from __future__ import annotations

import dataclasses
import functools

import torch

from fscale import tree
from fscale.hw import comm, cost, dispatch
from fscale.plan import Collective, Plan  # noqa: F401  (Collective: public name)


def _nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def _optimizer_state_bytes(step, params) -> int:
    """Run the optimizer's init on meta tensors: exact state size, no memory used."""
    # torch.empty from metadata only: stand-in tensors (quantized, lazy) are not touched.
    meta = tree.map(
        lambda t: None if t is None else torch.empty(t.shape, dtype=t.dtype, device="meta"),
        params,
    )
    state = step.optimizer.init(meta)
    return sum(_nbytes(t) for t in tree.leaves(state) if isinstance(t, torch.Tensor))


def plan(step, params) -> Plan:
    """The ``Plan`` of ``step`` for ``params`` (the full params given to ``step.init``)."""
    world = step.mesh.size()
    leaves = [t for t in tree.leaves(params) if t is not None]
    p_bytes = sum(_nbytes(t) for t in leaves)
    result = Plan(
        world=world,
        transforms=[str(t) for t in step.transforms],
        stages={
            f.name: _qualname(getattr(step.stages, f.name)) for f in dataclasses.fields(step.stages)
        },
        param_count=sum(t.numel() for t in leaves),
        param_bytes=p_bytes,
        largest_param_bytes=max((_nbytes(t) for t in leaves), default=0),
        mesh=repr(step.mesh),
    )
    result.memory = {
        "params": p_bytes,
        "grads": p_bytes,
        "optimizer": _optimizer_state_bytes(step, params),
    }
    if world > 1:
        result.collectives.append(Collective("all_reduce", p_bytes, "reduce_grads", tag="dp.grads"))
        # The step's non-finite vote, which also averages the loss (fscale/_guard.py).
        result.collectives.append(
            Collective("all_reduce", 4, "finish_grads", tag="guard.nonfinite")
        )
    if leaves:
        for op in sorted(dispatch.known_ops()):
            try:
                result.kernels[op] = dispatch.resolve(op, leaves[0]).name
            except LookupError:
                result.kernels[op] = "(none for this device)"
    for record in step.transforms:
        if record.plan is not None:
            record.plan(result)
    return result


def _qualname(fn) -> str:
    while isinstance(fn, functools.partial):
        fn = fn.func
    module = getattr(fn, "__module__", "") or ""
    return f"{module.removeprefix('fscale.')}.{getattr(fn, '__qualname__', repr(fn))}"


def _gib(n: int) -> str:
    if n >= 2**30:
        return f"{n / 2**30:.2f} GiB"
    if n >= 2**20:
        return f"{n / 2**20:.2f} MiB"
    return f"{n / 2**10:.1f} KiB"


def explain(step, params=None, *, bandwidth=None, latency_s: float | None = None) -> str:
    """A printable report of ``plan(step, params)``.

    ``bandwidth`` (``"1gbit"``, ``"10Gbit/s"``, ``"1.25GB/s"`` or a ``cost.Link``) adds
    the expected communication time per step on such a link per rank, in total and
    per tag, by the cost model of ``fscale/hw/cost.py``; ``latency_s`` per hop.

    ``fs.explain(qparams)`` (params alone) reports quantized weights: bytes before and
    after and the kernel each layer resolves to; with a step, that report is appended
    when the params hold quantized weights.
    """
    if params is None and isinstance(step, dict):
        return "\n".join(_leaf_reports(step)) or "no quantized weights in these params."
    # Parse first: a bad bandwidth string fails before the plan is built.
    link = None
    if bandwidth is not None:
        lat = cost.DEFAULT_LATENCY_S if latency_s is None else latency_s
        link = cost.Link.parse(bandwidth, latency_s=lat)
    p = plan(step, params)
    lines = [
        f"fscale step: world={p.world}, {p.param_count:,} params ({_gib(p.param_bytes)} per "
        f"rank before ZeRO), {p.mesh}",
        "stack: " + (" -> ".join(["train_step", *p.transforms])),
        f"accumulate={step.accumulate}, clip_norm={step.clip_norm}",
        "stages:",
        *(f"  {name:<14} {impl}" for name, impl in p.stages.items()),
        "collectives per step (bytes per rank; bus bytes as nccl-tests count them):",
    ]
    if not p.collectives:
        lines.append("  none (world of one)")
    for c in p.collectives:
        bus = comm.bus_bytes(c.op, c.bytes, p.world)
        tag = f"  [{c.tag}]" if c.tag else ""
        lines.append(
            f"  {c.stage:<14} {c.op:<15} x{c.calls:<3} {_gib(c.bytes):>11}  bus {_gib(int(bus))}"
            f"{tag}"
        )
    if link is not None:
        lines.extend(_comm_time(p, link))
    lines.append("kernels:")
    lines.extend(f"  {op:<14} {name}" for op, name in p.kernels.items())
    lines.append("memory per rank (estimate):")
    lines.extend(f"  {kind:<14} {_gib(n):>11}" for kind, n in p.memory.items())
    # Entries named "kind (tier)" live off the device (offload): total each tier apart.
    tiers: dict[str, int] = {}
    for kind, n in p.memory.items():
        tier = kind[kind.index("(") + 1 : -1] if kind.endswith(")") and "(" in kind else "device"
        tiers[tier] = tiers.get(tier, 0) + n
    for tier, n in tiers.items():
        lines.append(f"  {'total (' + tier + ')':<14} {_gib(n):>11}")
    lines.extend(f"note: {n}" for n in p.notes)
    if isinstance(params, dict):
        lines.extend(_leaf_reports(params))
    return "\n".join(lines)


def _comm_time(p: Plan, link: cost.Link) -> list[str]:
    t = cost.predict(p.collectives, link, p.world)
    lines = [f"expected communication time per step at {link}: {_seconds(t.seconds)}"]
    lines.extend(f"  {tag:<28} {_seconds(s):>10}" for tag, s in t.by_tag.items())
    return lines


def _seconds(s: float) -> str:
    return f"{s * 1e3:.3f} ms" if s < 1 else f"{s:.3f} s"


def _leaf_reports(params: dict) -> list[str]:
    """Sections from leaf types that report themselves (``fscale_report``: quantized weights)."""
    kinds = []
    for t in params.values():
        if hasattr(type(t), "fscale_report") and type(t) not in kinds:
            kinds.append(type(t))
    return [kind.fscale_report(params) for kind in kinds]

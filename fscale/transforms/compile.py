"""``compile_units(step, **options)``: ``torch.compile`` each unit's math, nothing else.

Compiling a whole step would trace ZeRO-3's gathers, offload's copies and the
collectives into graphs (or break the graph at each); compiling only each unit's
``forward`` (a transformer block) fuses what costs time between the GEMMs -- norms,
GELU, residual adds, attention's pointwise ops -- and leaves the rest of the step
eager, where the other transforms do their work. It is a unit transform: the hook
replaces each unit's forward by a compiled one (``torch.compile(module.forward,
**options)``, built once per unit and kept for the life of the step).

[Note: what stays outside the compiled region]
A unit's params may be stand-ins (ZeRO-3's gathered-on-first-use params, whose
first use runs an all-gather through the step's param source): the hook runs the
compiled forward inside ``fscale.units.materialized(module)``, which gathers them
before the region and installs the gathered tensors, so the graph sees plain
tensors and the gathers, their prefetch and their autograd (the reduce-scatter of
the grads in backward) stay ZeRO-3's. Saved-tensor hooks (ZeRO-3's re-gather in
backward, activation checkpointing and offload) apply to what the compiled
function saves, as to eager code. Collectives are never inside a unit.

[Note: innermost]
The hook compiles the unit's own ``forward``; another unit transform's wrapper
(checkpointing's ``torch.utils.checkpoint``, random-LTD's gather and scatter) is
Python that the compiler would trace or break on, so compile_units must be the
first unit transform applied, and the others wrap the compiled forward:
``checkpoint_activations(compile_units(step))``.

[Note: recompiles]
Units of one class share their ``forward``'s code, so Dynamo compiles it once for
all of them (params are graph inputs). A new input shape or dtype compiles it
again: ``metrics["compiled_graphs"]`` reports how many variants exist, and past
``max_graphs`` the step raises (Dynamo would silently run eager past its own
recompile limit, 8): bucket changing lengths (``fs.curriculum`` keeps <= 8) or
pass ``dynamic=True``.

Usage::

    step = fs.train_step(loss_fn, fs.optim.adamw(3e-4), model=apply)
    step = fs.shard_zero(fs.mixed_precision(fs.compile_units(step), "bf16"), 3)
    step = fs.checkpoint_activations(step)       # after compile_units: it wraps the compiled unit
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from fscale.step import Step, StepContext, Transform
from fscale.units import materialized

NAME = "compile_units"
#: Dynamo's own recompile limit is 8; stopping at 7 variants means a forward never
#: falls back to eager unnoticed.
MAX_GRAPHS = 7


def compile_units(step: Step, *, max_graphs: int = MAX_GRAPHS, **options) -> Step:
    """Compile each unit's ``forward`` with ``torch.compile(**options)``.

    Args:
      step: a step that knows its model's units (``fs.train_step(..., model=apply)``),
        with no other unit transform applied yet ([Note: innermost]).
      max_graphs: compiled variants allowed per unit forward before the step raises.
      **options: passed to ``torch.compile`` (``mode``, ``dynamic``, ``fullgraph``,
        ``backend``, ``options``).

    Returns:
      A ``Step`` whose units run compiled; its results equal the eager step's up to
      the compiler's rounding (fused kernels may reorder float sums).
    """
    if step.unit_hooks:
        names = [name for name, _ in step.unit_hooks]
        raise ValueError(
            f"compile_units must be the first unit transform applied, but {names} already "
            "wrap the units (the compiler would trace their Python); apply compile_units "
            f"first, e.g. {names[-1]}(fs.compile_units(step), ...)."
        )
    if isinstance(max_graphs, bool) or not isinstance(max_graphs, int) or max_graphs < 1:
        raise ValueError(f"compile_units: max_graphs must be an int >= 1, got {max_graphs!r}.")
    unknown = sorted(set(options) - _COMPILE_OPTIONS)
    if unknown:
        raise TypeError(
            f"compile_units got {unknown}, which torch.compile does not take; its options "
            f"are {sorted(_COMPILE_OPTIONS)}."
        )
    record = Transform(
        NAME,
        options={"max_graphs": max_graphs, **{k: repr(v) for k, v in options.items()}},
        plan=functools.partial(_plan, max_graphs),
    )
    units = step.units  # with_transform raises, naming this transform, if there are none
    compiled: dict[str, Callable] = {}
    codes: dict[str, object] = {}

    def hook(name: str, forward: Callable) -> Callable:
        module = units.module.get_submodule(name)
        own = type(module).forward
        if getattr(forward, "__func__", None) is not own or forward.__self__ is not module:
            raise RuntimeError(
                f"compile_units: unit {name!r}'s forward is already wrapped; compile_units "
                "must be the first unit transform applied ([Note: innermost])."
            )
        if name not in compiled:
            compiled[name] = torch.compile(forward, **options)
            codes[name] = own.__code__
        fn = compiled[name]

        def run(*args, **kwargs):
            with materialized(module):
                out = fn(*args, **kwargs)
            _check_graphs(name, codes[name], max_graphs)
            return out

        return run

    inner = step.stages

    def loss_and_grad(ctx: StepContext, params, batch):
        out = inner.loss_and_grad(ctx, params, batch)
        ctx.metrics["compiled_graphs"] = max((_graphs(c) for c in codes.values()), default=0)
        return out

    return step.with_transform(record, unit_hook=hook, loss_and_grad=loss_and_grad)


_COMPILE_OPTIONS = frozenset({"fullgraph", "dynamic", "backend", "mode", "options", "disable"})


def _graphs(code) -> int:
    """Compiled variants Dynamo keeps for ``code``."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    return len(_debug_get_cache_entry_list(code))


def _check_graphs(name: str, code, max_graphs: int) -> None:
    n = _graphs(code)
    if n > max_graphs:
        raise RuntimeError(
            f"compile_units: unit {name!r}'s forward was compiled {n} times (max_graphs="
            f"{max_graphs}): its input shapes or dtypes keep changing, and past Dynamo's "
            "recompile limit it would run eager. Bucket the lengths (fs.curriculum keeps "
            "<= 8), pass compile_units(..., dynamic=True), or raise max_graphs."
        )


def _plan(max_graphs: int, plan) -> None:
    plan.notes.append(
        "compile_units: each unit's forward runs torch.compile'd; ZeRO-3 gathers, offload "
        "copies and collectives stay outside the compiled region (stand-in params are "
        f"materialized first). At most {max_graphs} compiled variants per unit forward "
        "(metrics['compiled_graphs'])."
    )

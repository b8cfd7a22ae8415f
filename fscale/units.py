"""Units: the blocks of a model that transforms can wrap (a transformer layer each).

``train_step(..., model=model)`` (or ``model=apply`` from ``fs.functional``, which
knows its module) gives the step its model's structure; by default the units are
the children of the first ``nn.ModuleList`` (torchtitan's and FSDP2's usual wrap
unit). Params stay a dict: the module is only consulted for structure and for the
forwards that unit hooks wrap.

A param installed in a unit may be a stand-in: a tensor with a
``fscale_materialize()`` method (ZeRO-3's gathered-on-first-use params). Plain
eager code never notices; a hook that must see real tensors (a compiler tracing
the unit) runs the unit inside ``materialized(module)``, which replaces every
stand-in by its value for the block, so gathers run before the region, not in it.

A unit hook is ``hook(unit_name, forward) -> forward``. While the step's loss runs,
every unit's ``forward`` is replaced by the composition of the hooks of the
transforms in the stack (the innermost transform's hook wraps the raw forward):
activation checkpointing, per-unit compile, tensor-parallel plans, MoE dispatch.

Usage::

    units = find_units(model)                     # blocks.0, blocks.1, ...
    units = find_units(model, policy=Block)       # every module of a type
    units = find_units(model, policy=["encoder", "decoder"])
    with units.hooked([checkpoint_hook]):
        loss = loss_fn(params, batch)
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from torch import nn

UnitHook = Callable[[str, Callable], Callable]


@dataclass(frozen=True, eq=False)
class Units:
    """The model and the qualified names of its units, in module order."""

    module: nn.Module
    names: tuple[str, ...]

    def key_of(self, param_name: str) -> str:
        """The unit a param belongs to (its longest unit-name prefix), ``""`` for the root."""
        best = ""
        for name in self.names:
            if (param_name == name or param_name.startswith(name + ".")) and len(name) > len(best):
                best = name
        return best

    def modules(self) -> dict[str, nn.Module]:
        return {name: self.module.get_submodule(name) for name in self.names}

    @contextlib.contextmanager
    def hooked(self, hooks: Sequence[UnitHook]) -> Iterator[None]:
        """Each unit's forward wrapped by ``hooks`` (first = innermost) inside the block."""
        if not hooks:
            yield
            return
        saved = []
        try:
            for name, mod in self.modules().items():
                forward = mod.forward
                for hook in hooks:
                    forward = hook(name, forward)
                saved.append((mod, mod.__dict__.get("forward")))
                mod.forward = forward  # an instance attribute: nn.Module.__call__ reads it
            yield
        finally:
            for mod, before in saved:
                if before is None:
                    mod.__dict__.pop("forward", None)
                else:
                    mod.forward = before


@contextlib.contextmanager
def materialized(module: nn.Module) -> Iterator[None]:
    """Inside: ``module``'s stand-in params and buffers replaced by their values."""
    swapped = []
    try:
        for m in module.modules():
            for table in (m._parameters, m._buffers):
                for name, t in list(table.items()):
                    make = getattr(t, "fscale_materialize", None) if t is not None else None
                    if make is not None:
                        swapped.append((table, name, t))
                        table[name] = make()
        yield
    finally:
        for table, name, before in reversed(swapped):
            table[name] = before


def _module_of(model) -> nn.Module:
    module = getattr(model, "module", None) if not isinstance(model, nn.Module) else model
    if not isinstance(module, nn.Module):
        raise TypeError(
            f"model must be an nn.Module or the apply of fs.functional(module), got "
            f"{type(model).__name__}."
        )
    return module


def find_units(model, policy=None) -> Units:
    """The units of ``model`` by ``policy``; raises when the policy names no module.

    Args:
      model: an ``nn.Module``, or ``fs.functional``'s apply (its ``.module``).
      policy: None (children of the first ``ModuleList``), a module class (every
        module of it, outermost only), a sequence of qualified module names, or a
        callable ``(name, module) -> bool``.
    """
    module = _module_of(model)
    named = list(module.named_modules())
    if policy is None:
        first = next(((n, m) for n, m in named if isinstance(m, nn.ModuleList)), None)
        if first is None:
            return Units(module, ())
        prefix = f"{first[0]}." if first[0] else ""
        return Units(module, tuple(f"{prefix}{child}" for child, _ in first[1].named_children()))
    if isinstance(policy, type):
        names = [n for n, m in named if n and isinstance(m, policy)]
        what = f"modules of type {policy.__name__}"
    elif isinstance(policy, str) or not isinstance(policy, (Sequence, Callable)):
        raise TypeError(
            f"unit policy must be a module class, a list of module names or a callable "
            f"(name, module) -> bool, got {policy!r}."
        )
    elif callable(policy) and not isinstance(policy, Sequence):
        names = [n for n, m in named if n and policy(n, m)]
        what = f"modules for which {getattr(policy, '__name__', policy)!r} is true"
    else:
        known = dict(named)
        missing = [n for n in policy if n not in known or not n]
        if missing:
            raise ValueError(
                f"unit policy names {missing}, which {type(module).__name__} does not have; "
                f"its modules include {[n for n, _ in named[1:6]]}..."
            )
        names = list(policy)
        what = f"{list(policy)}"
    # Outermost only: a unit inside another unit would be wrapped twice.
    outer = [n for n in names if not any(n.startswith(o + ".") for o in names if o != n)]
    if not outer:
        raise ValueError(
            f"unit policy selects no module of {type(module).__name__} ({what}); name a module "
            "class it contains, its module names, or leave it out for the first ModuleList's "
            "children."
        )
    return Units(module, tuple(outer))


def required(units: Units | None, who: str, why: str) -> Units:
    """``units`` if the step knows some; else a ValueError naming ``who`` and the fix."""
    if units is None or not units.names:
        raise ValueError(
            f"{who} {why}, but the step does not know the model's units: build it with "
            "fs.train_step(loss_fn, opt, model=model) for a model whose blocks sit in an "
            "nn.ModuleList (or pass units=...)."
        )
    return units


def wrapping_submodules(forward: Callable, wraps: Sequence[tuple[nn.Module, Callable]]):
    """A unit's ``forward`` during which each ``module``'s forward is ``wrap(module,
    its current forward)`` (restored after, innermost last): how a unit hook reaches
    the modules inside its unit (tensor-parallel linears, expert banks).

    Usage: ``return wrapping_submodules(forward, [(bank, dispatching)])`` from a unit hook.
    """

    def run(*args, **kwargs):
        saved = []
        try:
            for module, wrap in wraps:
                saved.append((module, module.__dict__.get("forward")))
                module.forward = wrap(module, module.forward)
            return forward(*args, **kwargs)
        finally:
            for module, before in reversed(saved):
                if before is None:
                    module.__dict__.pop("forward", None)
                else:
                    module.forward = before

    return run

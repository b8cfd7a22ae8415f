"""The kernel table: per-platform lowerings of named ops, resolved once per step build.

Modelled on JAX's ``register_lowering(prim, rule, platform=...)``: every op has a
pure-torch reference registered for ``device="any"``; faster platform rules are
registered beside it with the device type, a minimum compute capability, the
dtypes they take and a priority. ``resolve`` picks the highest-priority rule
that fits and falls back to the reference. ``FSCALE_KERNELS=reference`` forces
the reference everywhere (bisecting a numerical difference, or a broken driver).

Usage::

    register("adamw_update", adamw_triton, device="cuda", min_capability=(8, 0),
             dtypes=(torch.float32, torch.bfloat16), priority=10)
    kernel = resolve("adamw_update", params[0])        # a Lowering; kernel.impl(...)
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from fscale.hw.device import as_device, capability

ANY = "any"


@dataclass(frozen=True)
class Lowering:
    op: str
    impl: Callable
    name: str
    device: str = ANY
    min_capability: tuple[int, int] | None = None
    dtypes: frozenset | None = None
    priority: int = 0

    def fits(self, device: torch.device, dtype: torch.dtype | None) -> bool:
        if self.device != ANY and self.device != device.type:
            return False
        if self.min_capability is not None:
            cap = capability(device)
            if cap is None or tuple(cap) < tuple(self.min_capability):
                return False
        if self.dtypes is not None and dtype is not None and dtype not in self.dtypes:
            return False
        return True

    @property
    def is_reference(self) -> bool:
        return self.device == ANY


_TABLE: dict[str, list[Lowering]] = {}
# op -> name of the lowering most recently resolved, for fs.explain.
_RESOLVED: dict[str, str] = {}


def register(
    op: str,
    impl: Callable,
    *,
    device: str = ANY,
    min_capability: tuple[int, int] | None = None,
    dtypes: Iterable[torch.dtype] | None = None,
    priority: int = 0,
    name: str | None = None,
) -> Lowering:
    """Add a lowering of ``op``; ``device="any"`` marks the torch reference."""
    if device != ANY and device not in ("cuda", "cpu", "xpu", "mps"):
        raise ValueError(
            f"register({op!r}): unknown device {device!r}; use 'cuda', 'cpu' or 'any'."
        )
    lowering = Lowering(
        op=op,
        impl=impl,
        name=name or getattr(impl, "__qualname__", repr(impl)),
        device=device,
        min_capability=tuple(min_capability) if min_capability is not None else None,
        dtypes=frozenset(dtypes) if dtypes is not None else None,
        priority=priority,
    )
    rules = [r for r in _TABLE.get(op, []) if r.name != lowering.name]
    rules.append(lowering)
    _TABLE[op] = rules
    return lowering


def _forced_reference() -> bool:
    mode = os.environ.get("FSCALE_KERNELS", "").strip().lower()
    if mode not in ("", "auto", "reference"):
        raise ValueError(f"FSCALE_KERNELS={mode!r} is not understood; use 'reference' or 'auto'.")
    return mode == "reference"


def resolve(
    op: str, device: torch.device | str | torch.Tensor, dtype: torch.dtype | None = None
) -> Lowering:
    """The best lowering of ``op`` for ``device``/``dtype`` (a tensor gives both)."""
    if isinstance(device, torch.Tensor) and dtype is None:
        dtype = device.dtype
    device = as_device(device)
    if op not in _TABLE:
        raise KeyError(f"no kernel registered for op {op!r}; known ops: {sorted(_TABLE)}.")
    rules = _TABLE[op]
    if _forced_reference():
        rules = [r for r in rules if r.is_reference]
    fitting = [r for r in rules if r.fits(device, dtype)]
    if not fitting:
        raise LookupError(
            f"op {op!r} has no lowering for device={device.type}, dtype={dtype}; "
            f"registered: {[(r.name, r.device, r.min_capability) for r in _TABLE[op]]}. "
            "Register a reference with device='any'."
        )
    best = max(fitting, key=lambda r: (not r.is_reference, r.priority))
    _RESOLVED[op] = best.name
    return best


def lowerings(op: str) -> list[Lowering]:
    """All registered lowerings of ``op`` (for tests and explain)."""
    return list(_TABLE.get(op, []))


def known_ops() -> list[str]:
    """Every op with at least one lowering."""
    return sorted(_TABLE)


def resolved() -> dict[str, str]:
    """``{op: lowering name}`` for every op resolved so far in this process."""
    return dict(_RESOLVED)

"""Hyper-parameter checks shared by the optimizers: fail at construction, name the value.

A schedule (any callable) is accepted wherever a hyper-parameter is documented
as "float or schedule"; its values are not checked (they are only known per count).
"""

from __future__ import annotations

import math
import numbers


def _is_real(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value)


def non_negative(owner: str, name: str, value, *, schedule_ok: bool = True):
    """A float >= 0 (or a schedule when ``schedule_ok``); returned unchanged."""
    if schedule_ok and callable(value):
        return value
    if not _is_real(value) or value < 0:
        kind = (
            "a float >= 0 or a schedule (callable count -> float)"
            if schedule_ok
            else ("a float >= 0")
        )
        raise ValueError(f"{owner}: {name} must be {kind}, got {value!r}.")
    return value


def positive(owner: str, name: str, value) -> float:
    """A finite float > 0."""
    if not _is_real(value) or value <= 0:
        raise ValueError(f"{owner}: {name} must be a float > 0, got {value!r}.")
    return float(value)


def unit_interval(owner: str, name: str, value, *, closed: bool = False) -> float:
    """A float in [0, 1) (or [0, 1] when ``closed``): betas, momentum, dampening."""
    ok = _is_real(value) and 0.0 <= value and (value <= 1.0 if closed else value < 1.0)
    if not ok:
        interval = "[0, 1]" if closed else "[0, 1)"
        raise ValueError(f"{owner}: {name} must be a float in {interval}, got {value!r}.")
    return float(value)


def finite(owner: str, name: str, value) -> float:
    if not _is_real(value):
        raise ValueError(f"{owner}: {name} must be a finite float, got {value!r}.")
    return float(value)

"""Learning-rate (and other hyper-parameter) schedules: pure functions ``count -> float``.

``count`` is the number of updates done so far (0 for the first update), as in
optax: a schedule is evaluated *before* the update it drives, so
``linear_warmup(1.0, 10)`` gives 0.0 to the first update and 1.0 to the 11th.

Every optimizer hyper-parameter documented as "float or schedule" goes through
``value_at``, so a plain number and a schedule are interchangeable.

Usage::

    lr = warmup_cosine(peak=3e-4, warmup_steps=2_000, decay_steps=100_000, end=3e-5)
    tx = adamw(lr=lr, weight_decay=0.1)
    value_at(lr, 0), value_at(lr, 2_000)         # 0.0, 3e-4
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import numbers
from collections.abc import Callable

Schedule = Callable[[int], float]
FloatOrSchedule = float | Schedule


def value_at(hparam: FloatOrSchedule, count: int, name: str | None = None) -> float:
    """The value of a float-or-schedule hyper-parameter for the update after ``count`` updates.

    A schedule's value must be finite and >= 0 (every "float or schedule" hyper-parameter
    is a learning rate or a decay): a negative or NaN learning rate used as is trained
    backwards or poisoned every param. The check is free: the value is a host float
    here (a schedule returning a tensor is read once by ``float()``, as before). Under
    ``reporting()``, the value of ``name`` is recorded (``metrics["lr"]``).
    """
    if callable(hparam):
        value = float(hparam(count))
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(
                f"the schedule of {name or 'a hyper-parameter'} returned {value!r} at count "
                f"{count} (updates done so far); it must be finite and >= 0. Fix the schedule "
                "(e.g. clamp its decay at 0, check its warmup/decay steps)."
            )
    else:
        value = float(hparam)
    seen = _REPORT.get(None)
    if seen is not None and name is not None:
        seen[name] = value
    return value


_REPORT: contextvars.ContextVar[dict | None] = contextvars.ContextVar("fscale_hparams")


@contextlib.contextmanager
def reporting():
    """Collect ``{name: value}`` of the named hyper-parameters ``value_at`` computes inside.

    ``Step.__call__`` reports the learning rate of its update this way (``metrics["lr"]``).
    """
    seen: dict = {}
    token = _REPORT.set(seen)
    try:
        yield seen
    finally:
        _REPORT.reset(token)


def _check_finite(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite float, got {value!r}.")
    return float(value)


def _check_steps(name: str, value: int, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")
    return int(value)


def constant(value: float) -> Schedule:
    """``value`` at every count.

    Args:
      value: the constant.

    Example::

        constant(1e-3)(123)   # 1e-3
    """
    value = _check_finite("constant(value)", value)

    def schedule(count: int) -> float:
        return value

    return schedule


def linear_warmup(peak: float, warmup_steps: int, start: float = 0.0) -> Schedule:
    """Linear ramp from ``start`` (count 0) to ``peak`` (count ``warmup_steps``), then ``peak``.

    Args:
      peak: the value reached at ``warmup_steps`` and held after.
      warmup_steps: length of the ramp; 0 means ``peak`` from the start.
      start: the value at count 0.

    Example::

        s = linear_warmup(1.0, 4)
        [s(i) for i in range(6)]   # [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    """
    peak = _check_finite("linear_warmup(peak)", peak)
    start = _check_finite("linear_warmup(start)", start)
    warmup_steps = _check_steps("linear_warmup(warmup_steps)", warmup_steps, minimum=0)

    def schedule(count: int) -> float:
        if count >= warmup_steps:
            return peak
        return start + (peak - start) * (count / warmup_steps)

    return schedule


def cosine_decay(peak: float, decay_steps: int, alpha: float = 0.0) -> Schedule:
    """Half-cosine from ``peak`` (count 0) to ``alpha * peak`` (count ``decay_steps``), then flat.

    Args:
      peak: the value at count 0.
      decay_steps: length of the decay, > 0.
      alpha: the final value as a fraction of ``peak``, in [0, 1].

    References:
      Loshchilov & Hutter, "SGDR: Stochastic Gradient Descent with Warm Restarts", 2017.

    Example::

        s = cosine_decay(1.0, 100, alpha=0.1)
        s(0), s(50), s(100)   # 1.0, 0.55, 0.1
    """
    peak = _check_finite("cosine_decay(peak)", peak)
    decay_steps = _check_steps("cosine_decay(decay_steps)", decay_steps, minimum=1)
    alpha = _check_finite("cosine_decay(alpha)", alpha)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"cosine_decay(alpha) must be in [0, 1], got {alpha!r}.")

    def schedule(count: int) -> float:
        t = min(max(count, 0), decay_steps) / decay_steps
        cosine = 0.5 * (1.0 + math.cos(math.pi * t))
        return peak * ((1.0 - alpha) * cosine + alpha)

    return schedule


def warmup_cosine(peak: float, warmup_steps: int, decay_steps: int, end: float = 0.0) -> Schedule:
    """Linear warmup from 0 to ``peak``, then half-cosine down to ``end``: the GPT recipe.

    ``decay_steps`` is the total length of the schedule *including* the warmup
    (as in optax's ``warmup_cosine_decay_schedule`` and nanoGPT's
    ``lr_decay_iters``): the value is ``peak`` at ``warmup_steps``, ``end`` at
    ``decay_steps`` and stays ``end`` after.

    Args:
      peak: the value at the end of the warmup.
      warmup_steps: length of the linear warmup (>= 0).
      decay_steps: count at which ``end`` is reached (>= ``warmup_steps``, > 0).
      end: the final value.

    Example::

        s = warmup_cosine(1.0, warmup_steps=10, decay_steps=110, end=0.1)
        s(0), s(5), s(10), s(60), s(110), s(500)   # 0.0, 0.5, 1.0, 0.55, 0.1, 0.1
    """
    peak = _check_finite("warmup_cosine(peak)", peak)
    end = _check_finite("warmup_cosine(end)", end)
    warmup_steps = _check_steps("warmup_cosine(warmup_steps)", warmup_steps, minimum=0)
    decay_steps = _check_steps("warmup_cosine(decay_steps)", decay_steps, minimum=1)
    if decay_steps < warmup_steps:
        raise ValueError(
            f"warmup_cosine(decay_steps={decay_steps}) is shorter than "
            f"warmup_steps={warmup_steps}; "
            "decay_steps is the total schedule length including the warmup."
        )
    warmup = linear_warmup(peak, warmup_steps)
    cosine_steps = decay_steps - warmup_steps

    def schedule(count: int) -> float:
        if count < warmup_steps:
            return warmup(count)
        if cosine_steps == 0:
            return end
        t = min(count - warmup_steps, cosine_steps) / cosine_steps
        return end + (peak - end) * 0.5 * (1.0 + math.cos(math.pi * t))

    return schedule

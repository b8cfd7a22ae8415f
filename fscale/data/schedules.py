"""Curriculum schedules: the step count to a difficulty (a sequence length, a bucket).

DeepSpeed's three fixed schedules, as frozen records so a caller can ask which
values a schedule will ever produce (``values()``) before any step runs:

- ``fixed_linear(start, end, steps)``: from ``start`` to ``end`` linearly over ``steps``;
- ``fixed_root(start, end, steps, degree=2)``: the same along ``(t / steps) ** (1 / degree)``,
  faster early on (Li et al. use degree 2 for sequence-length warm-up);
- ``fixed_discrete(values, boundaries)``: ``values[i]`` while ``t < boundaries[i]``, then
  the last value.

Linear and root values are rounded down to a multiple of ``bucket`` (DeepSpeed's
``difficulty_step``) and kept within ``[start, end]``; ``end`` is reached exactly at
``t = steps`` even when it is not a multiple of ``bucket``.

Usage::

    s = fixed_root(64, 1024, steps=2000, degree=2, bucket=64)
    s(0), s(2000), s.values()      # 64, 1024, (64, 128, ..., 1024)

References: Li et al., "The Stability-Efficiency Dilemma: Investigating Sequence
Length Warmup for Training GPT Models", NeurIPS 2022; DeepSpeed data efficiency.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

KINDS = ("fixed_linear", "fixed_root", "fixed_discrete")


@dataclass(frozen=True)
class Schedule:
    """``schedule(t) -> int`` for a step count ``t >= 0``; build with the functions below."""

    kind: str
    start: int
    end: int
    steps: int = 1
    degree: float = 1.0
    bucket: int = 1
    levels: tuple[int, ...] = ()  # fixed_discrete
    boundaries: tuple[int, ...] = ()  # fixed_discrete

    def __call__(self, t: int) -> int:
        if isinstance(t, bool) or not isinstance(t, int) or t < 0:
            raise ValueError(f"{self.kind}: the step count must be an int >= 0, got {t!r}.")
        if self.kind == "fixed_discrete":
            for level, boundary in zip(self.levels, self.boundaries, strict=False):
                if t < boundary:
                    return level
            return self.levels[-1]
        if t >= self.steps:
            return self.end
        if self.degree == 1:
            raw = self.start + (t * (self.end - self.start)) // self.steps  # exact in ints
        else:
            frac = (t / self.steps) ** (1.0 / self.degree)
            raw = self.start + math.floor(frac * (self.end - self.start))
        return min(self.end, max(self.start, raw - raw % self.bucket))

    @property
    def monotone(self) -> bool:
        """Whether the values never decrease with ``t`` (linear and root always)."""
        if self.kind != "fixed_discrete":
            return True
        return all(a <= b for a, b in zip(self.levels, self.levels[1:], strict=False))

    @property
    def last_change(self) -> int:
        """A step count after which the value never changes."""
        return self.steps

    def values(self) -> tuple[int, ...]:
        """The distinct values over all steps, in the order they first appear."""
        if self.kind == "fixed_discrete":
            return tuple(dict.fromkeys(self.levels))
        out, t = [self(0)], 0
        while t < self.steps:
            # Monotone: binary-search the first step whose value is above the current one.
            lo, hi = t + 1, self.steps
            while lo < hi:
                mid = (lo + hi) // 2
                if self(mid) > out[-1]:
                    hi = mid
                else:
                    lo = mid + 1
            t = lo
            out.append(self(t))
        return tuple(dict.fromkeys(out))


def fixed_linear(start: int, end: int, steps: int, *, bucket: int = 1) -> Schedule:
    """``start`` at step 0, rising linearly to ``end`` at ``steps``, rounded down to ``bucket``.

    Usage::

        fixed_linear(0, 9, steps=1000)(500)   # 4
    """
    _check_ramp("fixed_linear", start, end, steps, bucket)
    return Schedule("fixed_linear", start, end, steps, 1.0, bucket)


def fixed_root(
    start: int, end: int, steps: int, *, degree: float = 2.0, bucket: int = 1
) -> Schedule:
    """Like ``fixed_linear`` along ``(t / steps) ** (1 / degree)``: fast first, slow near ``end``.

    Usage::

        fixed_root(64, 1024, steps=1000, degree=2, bucket=64)(250)   # 64 + 480 -> 512
    """
    _check_ramp("fixed_root", start, end, steps, bucket)
    if isinstance(degree, bool) or not isinstance(degree, (int, float)) or not degree >= 1:
        raise ValueError(
            f"fixed_root: degree must be a number >= 1 (1 is fixed_linear, 2 a square root), "
            f"got {degree!r}."
        )
    return Schedule("fixed_root", start, end, steps, float(degree), bucket)


def fixed_discrete(values, boundaries) -> Schedule:
    """``values[i]`` while the step count is below ``boundaries[i]``; ``values[-1]`` after.

    Usage::

        s = fixed_discrete([128, 512, 1024], [100, 300])   # 128 for t < 100, 512 to 299, ...
    """
    values, boundaries = tuple(values), tuple(boundaries)
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"fixed_discrete: every value must be an int >= 0, got {v!r}.")
    if len(values) != len(boundaries) + 1:
        raise ValueError(
            f"fixed_discrete: {len(values)} values need {len(values) - 1} boundaries (the step "
            f"at which each value after the first begins), got {len(boundaries)}."
        )
    if any(isinstance(b, bool) or not isinstance(b, int) for b in boundaries) or any(
        not a < b for a, b in zip((0, *boundaries), boundaries, strict=False)
    ):
        raise ValueError(
            f"fixed_discrete: boundaries must be strictly increasing ints > 0, got {boundaries!r}."
        )
    return Schedule(
        "fixed_discrete",
        min(values),
        max(values),
        steps=boundaries[-1] if boundaries else 1,
        levels=values,
        boundaries=boundaries,
    )


def _check_ramp(kind: str, start, end, steps, bucket) -> None:
    for name, value, low in (("start", start, 0), ("end", end, 0), ("steps", steps, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{kind}: {name} must be an int >= {low}, got {value!r}.")
    if start > end:
        raise ValueError(
            f"{kind}: start={start} is above end={end}; a warm-up rises (swap them, or use "
            "fixed_discrete for any other shape)."
        )
    if isinstance(bucket, bool) or not isinstance(bucket, int) or bucket < 1:
        raise ValueError(
            f"{kind}: bucket must be an int >= 1 (values are rounded down to a multiple of "
            f"it), got {bucket!r}."
        )

"""fixed_linear / fixed_root / fixed_discrete: DeepSpeed's curves, bucketed, and
``values()`` equal to what the schedule produces over every step."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from fscale.data import fixed_discrete, fixed_linear, fixed_root
from tests.helpers import error_text


@settings(max_examples=200, deadline=None)
@given(
    start=st.integers(0, 300),
    span=st.integers(0, 500),
    steps=st.integers(1, 300),
    degree=st.sampled_from([1, 1.5, 2, 4]),
    bucket=st.integers(1, 64),
)
def test_ramps_are_monotone_bounded_bucketed_and_values_are_exact(
    start, span, steps, degree, bucket
):
    end = start + span
    if degree == 1:
        s = fixed_linear(start, end, steps, bucket=bucket)
    else:
        s = fixed_root(start, end, steps, degree=degree, bucket=bucket)
    trace = [s(t) for t in range(steps + 3)]
    assert trace[0] == start and trace[steps:] == [end] * 3
    assert all(a <= b for a, b in zip(trace, trace[1:], strict=False))
    assert all(v in (start, end) or (start < v < end and v % bucket == 0) for v in trace)
    assert s.values() == tuple(dict.fromkeys(trace))
    for t in range(steps):  # DeepSpeed's curve, floored to the bucket, kept in [start, end]
        if degree == 1:  # exact in integers
            raw = start + t * span // steps
        else:
            raw = start + math.floor((t / steps) ** (1 / degree) * span)
        assert trace[t] == min(end, max(start, raw - raw % bucket)), t


def test_discrete_follows_its_boundaries():
    s = fixed_discrete([2, 0, 5], [3, 10])
    assert [s(t) for t in range(12)] == [2] * 3 + [0] * 7 + [5] * 2
    assert s.values() == (2, 0, 5) and not s.monotone
    assert fixed_discrete([4], [])(10**9) == 4


def test_errors_name_the_fix():
    cases = {
        lambda: fixed_linear(-1, 5, 10): "start must be an int >= 0",
        lambda: fixed_linear(0, 5, 0): "steps must be an int >= 1",
        lambda: fixed_linear(6, 5, 10): "start=6 is above end=5",
        lambda: fixed_root(0, 5, 10, degree=0): "degree must be a number >= 1",
        lambda: fixed_linear(0, 5, 10, bucket=0): "bucket must be an int >= 1",
        lambda: fixed_linear(0, 5, 10)(-1): "step count must be an int >= 0",
        lambda: fixed_discrete([1, 2], [0]): "strictly increasing ints > 0",
        lambda: fixed_discrete([1, -2], [4]): "every value must be an int >= 0",
    }
    for fn, text in cases.items():
        msg = error_text(fn)
        assert text in msg, (text, msg)

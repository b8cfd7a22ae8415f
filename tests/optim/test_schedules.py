"""Schedules: values at the key points, and float-or-schedule evaluation."""

from __future__ import annotations

import math

import pytest

from fscale.optim import constant, cosine_decay, linear_warmup, value_at, warmup_cosine


def test_constant():
    s = constant(3e-4)
    assert s(0) == s(10**6) == 3e-4


def test_linear_warmup():
    s = linear_warmup(1.0, 4)
    assert [s(i) for i in range(6)] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    s = linear_warmup(2.0, 10, start=1.0)
    assert s(0) == 1.0 and s(5) == pytest.approx(1.5) and s(10) == s(99) == 2.0
    assert linear_warmup(0.5, 0)(0) == 0.5


def test_cosine_decay():
    s = cosine_decay(1.0, 100)
    assert s(0) == 1.0
    assert s(50) == pytest.approx(0.5)
    assert s(25) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert s(100) == pytest.approx(0.0, abs=1e-12) and s(1000) == pytest.approx(0.0, abs=1e-12)
    s = cosine_decay(2.0, 100, alpha=0.1)
    assert s(0) == 2.0 and s(50) == pytest.approx(1.1) and s(100) == s(150) == pytest.approx(0.2)


def test_warmup_cosine():
    s = warmup_cosine(1.0, warmup_steps=10, decay_steps=110, end=0.1)
    assert s(0) == 0.0
    assert s(5) == pytest.approx(0.5)
    assert s(10) == pytest.approx(1.0)
    assert s(60) == pytest.approx(0.55)
    assert s(110) == pytest.approx(0.1) and s(500) == pytest.approx(0.1)
    # Monotone: up during the warmup, down after it.
    values = [s(i) for i in range(120)]
    assert values[:11] == sorted(values[:11])
    assert values[10:] == sorted(values[10:], reverse=True)
    # decay_steps == warmup_steps: warmup then straight to end.
    s = warmup_cosine(1.0, 5, 5, end=0.2)
    assert s(4) == pytest.approx(0.8) and s(5) == s(50) == 0.2


def test_value_at_takes_floats_and_schedules():
    assert value_at(0.1, 7) == 0.1
    assert value_at(lambda count: 0.1 * count, 7) == pytest.approx(0.7)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: constant(float("nan")), r"constant\(value\) must be a finite float, got nan"),
        (lambda: linear_warmup(1.0, -1), r"warmup_steps\) must be an integer >= 0, got -1"),
        (lambda: linear_warmup(1.0, 2.5), r"must be an integer >= 0, got 2\.5"),
        (lambda: cosine_decay(1.0, 0), r"decay_steps\) must be an integer >= 1, got 0"),
        (lambda: cosine_decay(1.0, 10, alpha=1.5), r"alpha\) must be in \[0, 1\], got 1\.5"),
        (lambda: warmup_cosine(1.0, 10, 5), r"decay_steps=5\) is shorter than warmup_steps=10"),
        (lambda: warmup_cosine(float("inf"), 1, 5), r"peak\) must be a finite float, got inf"),
    ],
)
def test_bad_arguments_raise(make, match):
    with pytest.raises(ValueError, match=match):
        make()

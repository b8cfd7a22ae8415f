"""``compress_comm(step, method)``: compressed communication as a transform.

A method is an object with ``name`` and ``apply(step) -> Step``: it swaps the step's
tagged collectives for compressed lowerings (``step.with_transform(record,
lowerings={tag: fn})``) and, for the 1-bit optimizers, replaces the stages that
exchange and use the momentum; its error-feedback buffers and phase live in its own
state slot. The methods live in ``fscale/transforms/_compress/``.

Usage::

    step = fs.train_step(loss_fn, fs.optim.adam(1e-3))
    step = fs.compress_comm(step, fs.onebit_adam(freeze_step=100))
"""

from __future__ import annotations

from fscale.step import Step
from fscale.transforms._compress.onebit import onebit_adam, onebit_lamb, zero_one_adam
from fscale.transforms._compress.zeropp import zeropp

__all__ = ["compress_comm", "onebit_adam", "onebit_lamb", "zero_one_adam", "zeropp"]


def compress_comm(step: Step, method) -> Step:
    """Apply compression ``method`` (e.g. ``onebit_adam(freeze_step=...)``) to ``step``."""
    if not isinstance(step, Step):
        raise TypeError(f"compress_comm: step must be an fscale Step, got {type(step).__name__}.")
    apply = getattr(method, "apply", None)
    if not callable(apply) or not isinstance(getattr(method, "name", None), str):
        raise TypeError(
            f"compress_comm: {method!r} is not a compression method; pass one of "
            "fs.onebit_adam(...), fs.zero_one_adam(...), fs.onebit_lamb(...), fs.zeropp(...)."
        )
    return apply(step)

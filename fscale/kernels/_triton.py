"""What every Triton kernel module here shares: interpreter detection, lazy jit, SM count.

``triton.jit`` decides between compiling and interpreting when it *wraps* a
function (triton 3.x reads ``TRITON_INTERPRET`` there, not at launch), so kernels
are wrapped lazily, once per mode: a test can then set the variable after the
module was imported by someone else.

Usage::

    _kernel = LazyJit(_my_kernel)       # at import; the raw function is plain Python
    kernel, interpret = _kernel()       # at launch
"""

from __future__ import annotations

import functools
import os

import torch

try:
    import triton
except ImportError:  # triton is a dependency on Linux x86_64 only
    triton = None


def interpreting() -> bool:
    """Triton will interpret kernels on the CPU (``TRITON_INTERPRET=1``)."""
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on", "y")


class LazyJit:
    """``triton.jit(fn)``, made on first use in each mode (compiled or interpreted)."""

    def __init__(self, fn):
        self.fn = fn
        self._jitted: dict[bool, object] = {}

    def __call__(self):
        interpret = interpreting()
        if interpret not in self._jitted:
            self._jitted[interpret] = triton.jit(self.fn)
        return self._jitted[interpret], interpret


@functools.cache
def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (4 stands in off CUDA, for the interpreter)."""
    if device.type != "cuda":
        return 4
    index = device.index if device.index is not None else torch.cuda.current_device()
    return torch.cuda.get_device_properties(index).multi_processor_count

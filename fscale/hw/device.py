"""Device and capability facts, asked once and cached.

Usage::

    capability(torch.device("cuda"))   # (9, 0) on an H100/H200, None on CPU
"""

from __future__ import annotations

import functools

import torch


def as_device(device: torch.device | str | torch.Tensor) -> torch.device:
    if isinstance(device, torch.Tensor):
        return device.device
    return torch.device(device)


@functools.cache
def _cuda_capability(index: int) -> tuple[int, int]:
    return tuple(torch.cuda.get_device_capability(index))


def capability(device: torch.device | str | torch.Tensor) -> tuple[int, int] | None:
    """Compute capability as a tuple (compare tuples: sm_89 is not "< 9"), None off CUDA."""
    device = as_device(device)
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _cuda_capability(index)


def triton_available() -> bool:
    """Triton can run here: a CUDA GPU, or the CPU interpreter (TRITON_INTERPRET=1)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True

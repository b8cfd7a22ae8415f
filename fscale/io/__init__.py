"""Host I/O for offloading: the NVMe swap engine (``swap.py``).

Usage::

    from fscale.io import SwapEngine
    engine = SwapEngine("/mnt/nvme", rank=0)
"""

from fscale.io.swap import (
    ALIGN,
    SwapCorruptError,
    SwapEngine,
    SwapError,
    SwapLockedError,
    align_up,
    alloc,
    check_path,
)

__all__ = [
    "ALIGN",
    "SwapCorruptError",
    "SwapEngine",
    "SwapError",
    "SwapLockedError",
    "align_up",
    "alloc",
    "check_path",
]

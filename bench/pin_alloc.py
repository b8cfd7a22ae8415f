"""Seconds to allocate page-locked host memory, the way offload's buffers are made.

Offload's host buffers (and the second buffers an async save keeps) come from
``fscale.io.swap.alloc_many``: 1 GiB arenas of ordinary memory registered with
``cudaHostRegister``. This times, for ``--gib`` GiB, in one run:

- ``alloc_many``: as it is (the pages first touched by torch's intra-op threads,
  [Note: pinned memory of an exact size]);
- ``register_cold``: the arenas registered untouched, so that the driver faults in
  (and the kernel zeroes) every page on the calling thread (``alloc_many`` before
  2026-12-05);
- ``cuda_host_alloc``: torch's own pinned allocator (``pin_memory=True``), whose
  power-of-two rounding offload avoids, for reference.

Usage::

    python3 bench/pin_alloc.py --gib 16
"""

from __future__ import annotations

import argparse
import json
import time
import weakref

import torch

from fscale.io import swap


def _timed(fn) -> float:
    t0 = time.perf_counter()
    out = fn()
    took = time.perf_counter() - t0
    del out
    return took


def _cold(sizes: list[int]) -> list[torch.Tensor]:
    cudart = torch.cuda.cudart()
    out = []
    for n in sizes:
        raw = torch.empty(n, dtype=torch.uint8)  # pages untouched: the driver faults them
        assert int(cudart.cudaHostRegister(raw.data_ptr(), n, 0)) == 0
        weakref.finalize(raw, cudart.cudaHostUnregister, raw.data_ptr())
        out.append(raw)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gib", type=float, default=16.0)
    args = ap.parse_args()
    sizes = [swap.ARENA_BYTES] * int(args.gib * 2**30 // swap.ARENA_BYTES)
    total = sum(sizes)
    rows = {}
    for name, fn in (
        ("alloc_many", lambda: swap.alloc_many(sizes, pin=True)),
        ("register_cold", lambda: _cold(sizes)),
        (
            "cuda_host_alloc",
            lambda: [torch.empty(n, dtype=torch.uint8, pin_memory=True) for n in sizes],
        ),
    ):
        took = _timed(fn)
        torch.cuda.empty_cache()
        if hasattr(torch._C, "_host_emptyCache"):  # torch's cached pinned blocks back
            torch._C._host_emptyCache()
        rows[name] = {"s": took, "GBps": total / took / 1e9}
        print(f"{name:16s} {total / 2**30:.0f} GiB in {took:.2f} s ({total / took / 1e9:.1f} GB/s)")
    print(json.dumps({"bench": "pin_alloc", "threads": torch.get_num_threads(), "rows": rows}))


if __name__ == "__main__":
    main()

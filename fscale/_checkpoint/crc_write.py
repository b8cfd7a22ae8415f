"""Sum and write a record's bytes in one call that holds no GIL.

Usage: ``crc = crc_write(fd, view, crc)``: every byte of ``view`` written to ``fd`` at
its position, and the running CRC-32 after them returned; None where the C loop is not
built (the caller then loops in Python).

[Note: one GIL release per record]
A record's data is summed then written a MiB at a time ([Note: summing while the
bytes are in cache] in checksummed.py). Looped in Python, each MiB takes the GIL back twice
(after zlib-ng's CRC, after the write): ~2,000 times a second for a 1 GB/s save. An
async save's writer threads run niced and under SCHED_IDLE beside a training loop
that holds the GIL for its Python, and each time a writer asks for the GIL that loop
drops it at its next switch interval and waits until the writer (scheduled last) has
taken it (CPython's forced switch waits for the taker). Here the same pieces are summed
(zlib-ng's ``zng_crc32``, from the ``zlib_ng`` module already loaded) and written by a
C loop that one ``ctypes`` call runs with the GIL released: one handoff per record.
``bench/gil_handoffs.py`` measures a Python-bound loop beside such writers: on a
16-core H200 host it ran at 0.696x its rate alone beside four of them with this loop,
0.639x with the Python one (the rest of the slowdown is not the GIL's). It did not
shorten an offloaded 3.55B's async-save stall (an H100, 2026-12-06: 2.63 s against
2.30 / 1.86 s with torch's own CRC), so ``SaveIO(torch_crc=True)`` stays the default.
"""

from __future__ import annotations

import ctypes
import os

import numpy as np

from fscale.kernels._cbuild import I32, I64, P, library

PIECE = 1 << 20  # bytes summed then written at a time

_SOURCE = r"""
#include <errno.h>
#include <stdint.h>
#include <unistd.h>

typedef uint32_t (*crc_fn)(uint32_t, const uint8_t *, uint32_t);

/* Sum then write each `piece` bytes of p[0, n) to fd; *crc runs over them. Returns 0,
   or -errno of the write that failed (*crc then covers what was summed). */
int64_t crc_write(int32_t fd, const uint8_t *p, int64_t n, int64_t piece, uint32_t *crc,
                  void *sum) {
    crc_fn f = (crc_fn)sum;
    for (int64_t at = 0; at < n; at += piece) {
        int64_t len = n - at < piece ? n - at : piece;
        *crc = f(*crc, p + at, (uint32_t)len);
        for (int64_t off = 0; off < len;) {
            ssize_t w = write(fd, p + at + off, (size_t)(len - off));
            if (w < 0) {
                if (errno == EINTR) continue;
                return -errno;
            }
            off += w;
        }
    }
    return 0;
}
"""

_SUM = None  # zng_crc32's address, once looked up


def _zng_crc32() -> int | None:
    """The address of zlib-ng's ``zng_crc32`` in the loaded ``zlib_ng`` extension (the
    function its ``crc32`` calls), or None where it does not export it."""
    global _SUM
    if _SUM is None:
        from zlib_ng import zlib_ng

        try:
            fn = ctypes.CDLL(zlib_ng.__file__).zng_crc32
        except (OSError, AttributeError):
            _SUM = 0
        else:
            _SUM = ctypes.cast(fn, ctypes.c_void_p).value
    return _SUM or None


def crc_write(fd: int, view: memoryview, crc: int) -> int | None:
    """Write all of ``view`` (bytes) to ``fd`` and return the CRC-32 running from ``crc``
    over it; None where the C loop or zlib-ng's symbol is missing (nothing written)."""
    lib = library(
        "crc_write",
        _SOURCE,
        {"crc_write": (I32, P, I64, I64, P, P)},
        env="FSCALE_CRC_WRITE",
        restypes={"crc_write": I64},
    )
    sum_fn = _zng_crc32()
    if lib is None or sum_fn is None:
        return None
    n = view.nbytes
    if n == 0:
        return crc
    addr = np.frombuffer(view, dtype=np.uint8).ctypes.data  # read-only views too
    state = ctypes.c_uint32(crc)
    rc = lib.crc_write(fd, addr, n, PIECE, ctypes.byref(state), sum_fn)
    if rc < 0:
        code = -rc
        raise OSError(code, f"{os.strerror(code)} (writing a checkpoint record)")
    return state.value


__all__ = ["PIECE", "crc_write"]

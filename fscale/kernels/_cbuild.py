"""Plain C loops built once per machine with the system compiler and loaded by ``ctypes``.

[Note: C loops on the host]
Some host loops are one pass over memory that torch runs as several ops (a pass
each). They are written in C, built with ``cc`` (which inductor and Triton's
launchers need as well) into a cache directory keyed by the source, the flags, the
compiler's version and the CPU's feature flags, and called through ``ctypes``: a
few microseconds a call, any length, the GIL released. A build that fails, or
``<env>=0``, gives None (with a warning for the failure): callers then run the torch
ops. Sources are built with ``-ffp-contract=off`` and without ``-ffast-math``, so that
each loop computes the IEEE operations its source writes, in that order.

Usage::

    lib = library("onebit", SOURCE, {"unpack": (P, P, P, I64, I64)}, env="FSCALE_ONEBIT_COMPILE")
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import subprocess
import sys
import tempfile
import threading
import warnings
from pathlib import Path

FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-shared", "-fPIC")
P, I64, I32, F32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float

_LOCK = threading.Lock()
_LIBS: dict[str, ctypes.CDLL | None] = {}  # name -> lib, or None once a build failed


def cache_dir() -> Path:
    base = os.environ.get("FSCALE_CACHE_DIR") or os.environ.get("XDG_CACHE_HOME")
    root = Path(base) if base else Path.home() / ".cache"
    if not base or os.environ.get("XDG_CACHE_HOME") == base:
        root = root / "fscale"
    return root / "c_loops"


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return ""


def build(
    name: str, source: str, sigs: dict, flags: tuple[str, ...] = (), restypes: dict | None = None
) -> ctypes.CDLL:
    """Compile ``source`` (cached) and load it, with ``sigs``: function -> argtypes, and
    ``restypes``: function -> return type (others return nothing)."""
    cc = os.environ.get("CC", "cc")
    all_flags = (*FLAGS, *flags)
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, check=True)
    key = hashlib.sha256(
        "\0".join((source, *all_flags, version.stdout, _cpu_flags(), sys.platform)).encode()
    ).hexdigest()[:20]
    out = cache_dir() / f"{name}_{key}.so"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
            src = Path(tmp) / f"{name}.c"
            src.write_text(source)
            so = Path(tmp) / f"{name}.so"
            subprocess.run(
                [cc, *all_flags, "-o", str(so), str(src), "-lm"],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            os.replace(so, out)  # atomic: concurrent builders leave one whole file
    lib = ctypes.CDLL(str(out))
    for fn_name, args in sigs.items():
        fn = getattr(lib, fn_name)
        fn.argtypes, fn.restype = list(args), (restypes or {}).get(fn_name)
    return lib


def library(
    name: str,
    source: str,
    sigs: dict,
    *,
    env: str,
    flags: tuple[str, ...] = (),
    restypes: dict | None = None,
) -> ctypes.CDLL | None:
    """The built library ``name``, or None (``env`` set to 0, or its build failed)."""
    if os.environ.get(env, "1") == "0":
        return None
    if name not in _LIBS:
        with _LOCK:
            if name not in _LIBS:
                try:
                    _LIBS[name] = build(name, source, sigs, flags, restypes)
                except (OSError, subprocess.CalledProcessError) as e:
                    detail = getattr(e, "stderr", "") or ""
                    warnings.warn(
                        f"{name}: could not build the C loops ({e} {detail[-500:]}); using "
                        "the torch ops.",
                        stacklevel=3,
                    )
                    _LIBS[name] = None
    return _LIBS[name]

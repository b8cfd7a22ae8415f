"""Import fscale's kernel modules from this checkout without ``fscale/__init__.py``.

The package's ``__init__`` imports the whole library and optree, which the GPU image
lacks; kernel benchmarks need only ``fscale.kernels.*`` and ``fscale.hw.*``. A bare
package object pointing at the source tree lets those submodules import as usual.

Usage (from a script in bench/, whose folder is on sys.path)::

    from _source import import_kernels
    fpx, intq = import_kernels("fpx", "intq")
"""

from __future__ import annotations

import importlib
import sys
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def import_kernels(*names: str) -> list[types.ModuleType]:
    """``fscale.kernels.<name>`` for each name (importing one registers its lowerings)."""
    if "fscale" not in sys.modules:
        pkg = types.ModuleType("fscale")
        pkg.__path__ = [str(REPO / "fscale")]
        sys.modules["fscale"] = pkg
    return [importlib.import_module(f"fscale.kernels.{name}") for name in names]

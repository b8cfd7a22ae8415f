"""Shared pytest setup: make ``tests`` importable as a package from any import mode.

Spawned ranks (tests/dist.py) inherit ``sys.path``, so this one line is also what lets
them unpickle test functions and import ``tests.*``.
"""

import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

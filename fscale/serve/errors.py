"""Errors the engine raises that a caller (the HTTP server) maps to responses.

Usage::

    try:
        engine.add_request(rid, prompt, params)
    except EngineFull:
        ...  # answer 503 with Retry-After
"""

from __future__ import annotations


class EngineFull(RuntimeError):
    """The waiting queue holds ``max_waiting`` requests; retry later."""

"""Host optimizer kernels writing their results into a second buffer.

[Note: writing the step elsewhere]
Inside ``writing_into(src, dst)`` the CPU lowerings of ``"adamw_update"`` leave every
tensor lying in ``src``'s bytes as it was and write its new value at the same offset
of ``dst`` (a buffer of the same size): the C loop directly ([Note: AdamW on the
host, in place or elsewhere] in ``host_adamw.py``), the others by copying the old
value there first and updating the copy. Each tensor whose new value was written is
recorded, so that the caller (offload's update of a sub-group a save keeps: [Note:
buffers a snapshot keeps] in ``fscale/state.py``) copies only what no kernel wrote
(a skipped step writes nothing). A lowering that ignored the context would write
``src``, which a save is writing: every CPU lowering of the op honours it.

Usage::

    with writing_into(buf, second) as written:
        apply_gradients(adamw, grads, state_views_of_buf, master_views_of_buf)
"""

from __future__ import annotations

import contextlib
import threading

import torch

from fscale.state import byte_range

_LOCAL = threading.local()


@contextlib.contextmanager
def writing_into(src: torch.Tensor, dst: torch.Tensor):
    """Redirect the host optimizer kernels' writes of ``src`` to ``dst`` (see the note);
    yields the set of ``(data_ptr, nbytes)`` of the ``src`` tensors written to ``dst``."""
    if src.nbytes != dst.nbytes:
        raise ValueError(f"writing_into: {src.nbytes} source bytes but {dst.nbytes} target bytes.")
    before = getattr(_LOCAL, "target", None)
    written: set[tuple[int, int]] = set()
    _LOCAL.target = (src, dst, written, *byte_range(src))
    try:
        yield written
    finally:
        _LOCAL.target = before


def target(t: torch.Tensor) -> torch.Tensor | None:
    """Where ``t``'s new value goes: ``t``'s place in the target buffer, or None (in place)."""
    current = getattr(_LOCAL, "target", None)
    if current is None or t.device.type != "cpu":
        return None
    src, dst, _, lo, hi = current
    a, b = byte_range(t)
    if t.untyped_storage().data_ptr() != src.untyped_storage().data_ptr() or a < lo or b > hi:
        return None
    offset = dst.data_ptr() - dst.untyped_storage().data_ptr() + (a - lo)
    out = torch.empty(0, dtype=t.dtype)
    return out.set_(dst.untyped_storage(), offset // t.element_size(), t.shape, t.stride())


def mark(t: torch.Tensor) -> None:
    """Record that ``t``'s new value is in the target buffer."""
    _LOCAL.target[2].add((t.data_ptr(), t.nbytes))


def moved(ts: list) -> list:
    """``ts`` with each redirected tensor replaced by its target, holding its value: an
    in-place kernel then updates the target."""
    out = []
    for t in ts:
        dst = target(t)
        if dst is not None:
            dst.copy_(t)
            mark(t)
        out.append(t if dst is None else dst)
    return out

"""Host optimizer kernels writing their results into a second buffer.

[Note: writing the step elsewhere]
Inside ``writing_into(src, dst)`` the CPU lowerings of ``"adamw_update"`` leave every
tensor lying in ``src``'s bytes as it was and write its new value at the same offset
of ``dst`` (a buffer of the same size): the C loop directly ([Note: AdamW on the
host, in place or elsewhere] in ``host_adamw.py``), the others by copying the old
value there first and updating the copy. Each tensor whose new value was written is
recorded by byte range, so that the caller (offload's update of a sub-group a save
keeps: [Note: buffers a snapshot keeps] in ``fscale/state.py``) copies only the bytes
no kernel wrote (a skipped step writes nothing; a kernel given part of a slot wrote
that part). A lowering that ignored the context would write
``src``, which a save is writing: every CPU lowering of the op honours it.

Usage::

    with writing_into(buf, second) as written:
        apply_gradients(adamw, grads, state_views_of_buf, master_views_of_buf)
    written.carry(slot_view_of_buf, slot_view_of_second)   # each slot: what was not written
"""

from __future__ import annotations

import contextlib
import threading

import torch

from fscale.state import byte_range

_LOCAL = threading.local()


class Written:
    """The byte ranges of the source whose new values the kernels wrote to the target."""

    def __init__(self):
        self.ranges: list[tuple[int, int]] = []

    def add(self, t: torch.Tensor) -> None:
        self.ranges.append(byte_range(t))

    def gaps(self, t: torch.Tensor) -> list[tuple[int, int]]:
        """The parts of ``t``'s byte range no write covered, as offsets into ``t``."""
        lo, hi = byte_range(t)
        out, at = [], lo
        for a, b in sorted(self.ranges):
            if b <= at or a >= hi:
                continue
            if a > at:
                out.append((at - lo, a - lo))
            at = max(at, b)
        if at < hi:
            out.append((at - lo, hi - lo))
        return out

    def carry(self, view: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy into ``dst`` (``view``'s place in the target) what no write covered."""
        gaps = self.gaps(view)
        if not gaps:
            return
        if not (view.is_contiguous() and dst.is_contiguous()):
            dst.copy_(view)  # whole: no byte-wise view of a strided tensor
            return
        src_bytes, dst_bytes = view.reshape(-1).view(torch.uint8), dst.reshape(-1).view(torch.uint8)
        for a, b in gaps:
            dst_bytes[a:b].copy_(src_bytes[a:b])


@contextlib.contextmanager
def writing_into(src: torch.Tensor, dst: torch.Tensor):
    """Redirect the host optimizer kernels' writes of ``src`` to ``dst`` (see the note);
    yields a ``Written``: the parts of ``src`` whose new values are in ``dst``."""
    if src.nbytes != dst.nbytes:
        raise ValueError(f"writing_into: {src.nbytes} source bytes but {dst.nbytes} target bytes.")
    before = getattr(_LOCAL, "target", None)
    written = Written()
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
    _LOCAL.target[2].add(t)


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

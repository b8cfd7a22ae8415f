"""The state protocol: every slot of a step's state describes itself for a checkpoint.

``describe(state)`` walks the state dict (slots keyed by owner) and returns a flat
``{path: entry}`` where an entry is either a ``TensorEntry`` (a tensor that lives in
this process, with its placement) or a ``StoredTensor`` (bytes that live in a file,
such as NVMe swap, with offset, shape, dtype and placement), or plain metadata:
``None``, bools, numbers, strings, dtypes, and lists/dicts of those. Dicts, lists,
tuples and NamedTuples (optimizer states) are walked; an object describes itself
with a ``describe_state()`` method returning any of the above. Anything else (a
closure, a thread pool, an open file) raises naming its path: state must hold no
closures, so that a checkpoint can be written for every stack.

Host buffers an owner rewrites in place (offload's) are announced
(``announce_writes``): an asynchronous save then copies them lazily ([Note: announced
writes]) or keeps them while the owner writes elsewhere ([Note: buffers a snapshot
keeps]).

Usage::

    entries = describe(state)
    entries["optimizer/mu/blocks.0.w"].tensor, entries[...].placement
"""

from __future__ import annotations

import enum
import itertools
import threading
import weakref
from dataclasses import dataclass
from typing import Any

import torch

from fscale.placement import Placement, placement_of, replicated


@dataclass(frozen=True)
class TensorEntry:
    """A tensor of this process and how it maps onto the mesh.

    ``mirrors_param``: the entry is a master (``<slot>/master/<param>``) whose param
    holds exactly its value, dtype included, after every step (the owner copies it
    there): a checkpoint then keeps this copy alone ([Note: mirrored params] in
    ``fscale/checkpoint.py``).
    """

    tensor: torch.Tensor
    placement: Placement
    mirrors_param: bool = False


@dataclass(frozen=True)
class StoredTensor:
    """A tensor held in a file (NVMe swap): ``length`` bytes at ``offset`` of ``path``;
    ``mirrors_param`` as for ``TensorEntry``."""

    path: str
    offset: int
    shape: tuple[int, ...]
    dtype: torch.dtype
    placement: Placement
    mirrors_param: bool = False

    def read(self) -> torch.Tensor:
        """The tensor, read from its file."""
        n = 1
        for s in self.shape:
            n *= s
        nbytes = n * self.dtype.itemsize
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            raw = bytearray(f.read(nbytes))
        if len(raw) != nbytes:
            raise OSError(f"{self.path}: {len(raw)} bytes at offset {self.offset}, want {nbytes}.")
        return torch.frombuffer(raw, dtype=self.dtype).view(self.shape).clone()


_PLAIN = (type(None), bool, int, float, str, torch.dtype, torch.device)


def describe(state: dict) -> dict[str, Any]:
    """The checkpointable description of ``state``: ``{path: entry}`` (see module doc)."""
    if not isinstance(state, dict):
        raise TypeError(f"describe: state must be the dict step.init returns, got {type(state)}.")
    out: dict[str, Any] = {}
    for key, slot in state.items():
        _walk(str(key), slot, out)
    return out


def _walk(path: str, value: Any, out: dict) -> None:
    # detach(): the same data without the Python attributes fscale tags shards with
    # (their process group among them), which a checkpoint writer could not pickle.
    if isinstance(value, TensorEntry):
        out[path] = TensorEntry(value.tensor.detach(), value.placement, value.mirrors_param)
    elif isinstance(value, StoredTensor):
        out[path] = value
    elif isinstance(value, torch.Tensor):
        out[path] = TensorEntry(value.detach(), placement_of(value) or replicated(value))
    elif isinstance(value, _PLAIN) or isinstance(value, enum.Enum):
        out[path] = value
    elif hasattr(value, "describe_state"):
        _walk(path, value.describe_state(), out)
    elif isinstance(value, dict):
        for k, v in value.items():
            _walk(f"{path}/{k}", v, out)
    elif isinstance(value, tuple) and hasattr(value, "_fields"):  # NamedTuple
        for k in value._fields:
            _walk(f"{path}/{k}", getattr(value, k), out)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _walk(f"{path}/{i}", v, out)
    else:
        raise TypeError(
            f"state entry {path!r} is a {type(value).__name__}, which cannot describe itself "
            "for a checkpoint; keep tensors and plain metadata in state, or give the object a "
            "describe_state() method returning them."
        )


# [Note: announced writes]
# An asynchronous save must write the state as it was when ``fs.save`` was called,
# while the next steps update it in place. Copying every tensor in the call is the
# training's stall: milliseconds for device tensors (copied on the device), seconds
# for tens of GB of offloaded host state. A host buffer that its owner writes only
# after calling ``before_write`` on it can be copied lazily instead: the owner
# registers it once with ``announce_writes``; a save then copies the tensors inside
# it in the background ("snapshot" objects registered with ``add_snapshot``), and
# ``before_write`` copies, before returning, whatever part of the buffer a snapshot
# has not copied yet. The owner's promise is what makes the lazy copy exact: every
# in-place write of an announced buffer (the offloaded optimizer's update of a
# sub-group) is preceded by ``before_write`` of the bytes it writes, in the thread
# that writes them. Without a snapshot ``before_write`` costs one check of an empty
# list and one dict store per tensor.
#
# [Note: copying in write order]
# A snapshot copies ahead of the writes only if it copies in the order they come: a
# buffer the next step writes early that the copiers reach late is copied by the
# writing thread, on the step's critical path. The order of announcement need not be
# that order (offload's sub-groups are announced in leaf order and updated in the
# order their grads arrive, the backward's). So ``before_write`` also numbers each
# announced storage's latest write, and ``write_rank`` gives a snapshot that order:
# the last step's, which the next step repeats; never-written buffers come after, in
# announce order.

# [Note: buffers a snapshot keeps]
# Copying a buffer the next step rewrites whole (offload's sub-groups: every byte of
# master and moments, every step) costs the copy's memory traffic on top of the
# update's, in the step after the call. An owner that can write a buffer's new
# contents elsewhere announces it with ``second``: a function giving the buffer's
# second buffer (same size, allocated on the first call with ``allocate=True``, then
# kept by the owner). A snapshot may then keep the announced buffer itself as its
# copy (``hold``): no byte is copied. While it is held the owner checks ``held``
# before each write and writes the new contents into ``second_buffer(buffer)``
# instead, which it uses from then on; the held buffer is the owner's again once the
# snapshot ``release``s it, as the second buffer of the one now in use (the next
# save's target). Nothing else may write a held buffer: ``before_write`` on one waits
# for its release (a load into live state while a save still writes it).

_ANNOUNCED: dict[int, list] = {}  # storage data_ptr -> [(weakref to buffer, order, second)]
_ORDER = 0  # announce order: the next buffer's
_SNAPSHOTS: list = []
_WRITTEN: dict[int, int] = {}  # announced storage data_ptr -> its latest write's number
_WRITES = itertools.count()
_HELD: dict[int, list] = {}  # storage data_ptr -> [(lo, hi, holder)]: held buffers
_RELEASED = threading.Condition()


def announce_writes(buffer: torch.Tensor, *, second=None) -> None:
    """Promise that every in-place write of ``buffer`` (a host tensor) is preceded by
    ``before_write`` on what it writes ([Note: announced writes]). Snapshots copy
    buffers in the order of their latest writes, then unwritten ones in announce order.
    ``second(allocate: bool) -> Tensor | None``: the owner writes elsewhere while a
    snapshot holds ``buffer`` ([Note: buffers a snapshot keeps]).

    Usage::

        buf = torch.empty(n, dtype=torch.uint8); announce_writes(buf)
        before_write(buf); buf.add_(1)
    """
    global _ORDER
    key = buffer.untyped_storage().data_ptr()
    live = [e for e in _ANNOUNCED.get(key, []) if e[0]() is not None]
    if not live:
        _WRITTEN.pop(key, None)  # a freed buffer's address, reused: not its writes
    _ANNOUNCED[key] = [*live, (weakref.ref(buffer), _ORDER, second)]
    _ORDER += 1


def _announced_buffer(t: torch.Tensor):
    """(buffer, order, second) of the live announced buffer holding all of ``t``, or None."""
    if t.device.type != "cpu":
        return None
    lo, hi = byte_range(t)
    for ref, order, second in _ANNOUNCED.get(t.untyped_storage().data_ptr(), ()):
        b = ref()
        if b is not None:
            b_lo, b_hi = byte_range(b)
            if b_lo <= lo and hi <= b_hi:
                return b, order, second
    return None


def keepable(t: torch.Tensor) -> torch.Tensor | None:
    """The announced buffer holding ``t`` whose owner can write elsewhere, or None."""
    found = _announced_buffer(t)
    return found[0] if found is not None and found[2] is not None else None


def second_buffer(buffer: torch.Tensor, *, allocate: bool = True) -> torch.Tensor | None:
    """The owner's second buffer for announced ``buffer`` (None: not allocated yet and
    ``allocate`` is False)."""
    found = _announced_buffer(buffer)
    if found is None or found[2] is None:
        raise ValueError("second_buffer: the buffer was not announced with second=.")
    return found[2](allocate)


def hold(buffer: torch.Tensor, holder) -> None:
    """``holder`` (a snapshot) keeps ``buffer``'s bytes until ``release(holder)``."""
    lo, hi = byte_range(buffer)
    with _RELEASED:
        _HELD.setdefault(buffer.untyped_storage().data_ptr(), []).append((lo, hi, holder))


def release(holder) -> None:
    """Every buffer ``holder`` keeps is its owner's again."""
    with _RELEASED:
        for key in list(_HELD):
            left = [e for e in _HELD[key] if e[2] is not holder]
            if left:
                _HELD[key] = left
            else:
                del _HELD[key]
        _RELEASED.notify_all()


def held(t: torch.Tensor) -> bool:
    """Whether a snapshot keeps bytes of ``t`` ([Note: buffers a snapshot keeps])."""
    if not _HELD:
        return False
    lo, hi = byte_range(t)
    with _RELEASED:
        return any(a < hi and lo < b for a, b, _ in _HELD.get(t.untyped_storage().data_ptr(), ()))


def announced(t: torch.Tensor) -> int | None:
    """The order of the live announced buffer that holds all of ``t``'s bytes, or None."""
    found = _announced_buffer(t)
    return None if found is None else found[1]


def write_rank(t: torch.Tensor) -> tuple[int, int]:
    """Sort key of an announced ``t``'s copy ([Note: copying in write order]): its
    storage's latest write first, then never-written storages."""
    seq = _WRITTEN.get(t.untyped_storage().data_ptr())
    return (0, seq) if seq is not None else (1, 0)


def before_write(*tensors: torch.Tensor) -> None:
    """Called by an announced buffer's owner before writing ``tensors`` in place: every
    pending snapshot first copies what it still needs of them, and a held one is
    waited for until released ([Note: buffers a snapshot keeps])."""
    for t in tensors:
        key = t.untyped_storage().data_ptr()
        if key in _ANNOUNCED:
            _WRITTEN[key] = next(_WRITES)  # [Note: copying in write order]
    if _HELD:
        with _RELEASED:
            for t in tensors:
                _RELEASED.wait_for(lambda t=t: not held(t))
    if not _SNAPSHOTS:
        return
    for snap in list(_SNAPSHOTS):
        for t in tensors:
            snap.preserve(t)


def add_snapshot(snapshot) -> None:
    """Register a snapshot (an object with ``preserve(tensor)``) for ``before_write``."""
    _SNAPSHOTS.append(snapshot)


def remove_snapshot(snapshot) -> None:
    if snapshot in _SNAPSHOTS:
        _SNAPSHOTS.remove(snapshot)


def byte_range(t: torch.Tensor) -> tuple[int, int]:
    """``[first, last + 1)`` addresses of ``t``'s elements (its extent, strides included)."""
    lo = t.data_ptr()
    if t.numel() == 0:
        return lo, lo
    span = 1 + sum((n - 1) * abs(s) for n, s in zip(t.shape, t.stride(), strict=True))
    return lo, lo + span * t.element_size()

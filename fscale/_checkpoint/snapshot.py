"""A lazy copy of announced host tensors for an asynchronous save.

[Note: lazy snapshot]
``fs.save(..., async_save=True)`` must write the state of the call while training goes
on. Host tensors whose owner announces its writes ([Note: announced writes] in
``fscale/state.py``: offload's sub-group buffers) are not copied in the call. A
``LazySnapshot`` holds them as entries, each pending, being copied, or copied, and

- ``copy_threads`` background threads copy the pending entries in the order the last
  step wrote their buffers ([Note: copying in write order] in ``fscale/state.py``:
  offload's sub-groups in update order), each with one
  ``ctypes.memmove``, which runs without the GIL and without
  torch's intra-op pool (the host optimizer's threads keep theirs);
- ``preserve(t)`` (``before_write``: the update of a sub-group is about to write it)
  copies, in the calling thread, the pending entries that overlap ``t`` and waits for
  those a background thread is copying: the update never writes bytes the save
  still needs;
- ``take(entry)`` (the writer thread's lookup of the item) returns the copy, copying
  it then if nothing has yet, and drops the snapshot's reference, so each copy lives
  from its copy to its write.

So the call costs nothing per byte, and the copy runs while the device computes the
next step's forward; the training waits only for bytes the copier has not reached
when their sub-group's update begins.

[Note: a snapshot in device memory]
The copy threads' ``memmove`` reads and writes every byte through the host's memory
(a third pass to zero fresh pages), and the host optimizer's update, memory-bound
itself, runs in the same step: an offloaded 3.55B's first step after the call was
1.1 s slower on one H200. Offload's buffers are pinned, so with ``device`` set
(``SaveIO.snapshot="device"``, or ``"auto"`` where the host has no room for the
copies and the device has, with a margin) one feeder thread queues each entry's
host-to-device copy on a side stream instead, in update order, at most
``FEED_AHEAD`` bytes in flight so that the step's own copies are not queued behind
tens of GB: a DMA that reads each host byte once and takes no CPU. An entry is then
done when its copy's event is; ``preserve`` and ``take`` wait for it; an entry the
update reaches before the feeder is copied on the host as before, and so is the rest
if the device runs out of memory meanwhile. The writer threads move device copies to
the host through their pinned slabs, as they do a GPU state's tensors, and each copy
is freed once written. That moves the writes' device-to-host traffic onto the link
offload's grads use every step: measured on one H200 (offloaded 3.55B, 2 writer
threads), the stall was 3.9 s against 1.5 s for kept host copies, so ``"auto"`` uses
the device only where the host's available memory cannot hold the copies.

[Note: writing after the snapshot]
The writer threads start once every entry is copied (``wait_copied``), not with the
copy: in the step after the call the copy, the host optimizer's update and the
writing all wanted the host's memory bandwidth, and that step grew by twice what
the copy alone costs (an offloaded 3.55B on one H200). The save is written a step
later.

[Note: kept copies]
A copy into fresh memory first faults its pages in, and the kernel zeroes each one:
a third memory pass over tens of GB, in the step after the call. With ``keep=True``
(``SaveIO.keep_copies``) the copies' buffers outlive the save in a module-wide pool
and the next such save copies into them (same sizes: the same state), so only the
first save pays (an offloaded 3.55B on one H200: the first step after the call
+0.8-1.0 s with kept copies, +3.8-4.4 s with fresh ones). The pool holds exactly
the last keeping save's buffers: a save with ``keep=False`` frees them, as does one
whose state changed size, and a save that keeps the owners' buffers (below) frees
those it will not copy into before it allocates the second buffers.

[Note: keeping the owner's buffers]
Copying costs the host's memory bandwidth in the very step the host optimizer needs
it: offload's update of a 3.55B model's 42.7 GB state and the copy of that state
each read it whole. An owner that can write a buffer's next contents elsewhere
announces it so ([Note: buffers a snapshot keeps] in ``fscale/state.py``: offload's
sub-group buffers, whose AdamW writes the step into a second buffer at the cost of
the in-place update: [Note: AdamW on the host, in place or elsewhere]).
``keep_buffers`` then makes each such entry its own copy: no byte is copied, the
writer reads the owner's old buffer, and the owner's first update of it after the
call writes its second buffer and keeps using that one. The second buffers cost as
much host memory as kept copies, once; ``SaveIO(snapshot="auto")`` keeps buffers
where the host has room for the second ones still to allocate.
"""

from __future__ import annotations

import bisect
import ctypes
import itertools
import sys
import threading
import warnings
from typing import Any

import torch

from fscale import state as state_protocol
from fscale._checkpoint.chunks import _Rows

__all__ = ["LazySnapshot"]

_PENDING, _COPYING, _DONE = 0, 1, 2


class _Entry:
    __slots__ = ("src", "copy", "status", "done", "lo", "hi", "order", "event", "buffer", "kept")

    def __init__(self, src: torch.Tensor, order: int):  # order: its buffer's announce order
        self.src = src
        self.copy: torch.Tensor | None = None
        self.event = None  # the device copy's CUDA event ([Note: a snapshot in device memory])
        self.status = _PENDING
        self.done = threading.Event()
        self.lo, self.hi = state_protocol.byte_range(src)
        self.order = order
        # The announced buffer holding src whose owner can write elsewhere, or None
        # ([Note: buffers a snapshot keeps] in fscale/state.py).
        self.buffer = state_protocol.keepable(src)
        self.kept = False  # its copy is the owner's buffer itself

    def finish(self) -> None:
        """Mark done (copied, or failed with the error recorded): waiters go on."""
        self.status = _DONE
        self.done.set()


class _Index:
    """The entries of one storage by start address, to find those overlapping a range."""

    def __init__(self, entries: list[_Entry]):
        self.entries = sorted(entries, key=lambda e: e.lo)
        self.starts = [e.lo for e in self.entries]
        # reach[i]: the furthest end among entries[: i + 1]: an earlier entry may span
        # past a later one's start (nested views), and must be found too.
        self.reach = list(itertools.accumulate((e.hi for e in self.entries), max))

    def overlapping(self, lo: int, hi: int) -> list[_Entry]:
        first = bisect.bisect_left(self.reach, lo + 1)  # the first entry ending after lo
        out = []
        for e in self.entries[first:]:
            if e.lo >= hi:
                break
            if e.hi > lo:
                out.append(e)
        return out


class LazySnapshot:
    """Copies of announced host tensors, taken lazily (see the module note).

    Usage::

        snap = LazySnapshot(copy_threads=4, nice=10)
        rows = snap.defer(rows, announced(rows.local))  # a _Rows whose tensor() is the copy
        snap.start()                        # registers with before_write; copies in the background
        ...                                 # the writer takes each entry
        snap.close()
    """

    def __init__(
        self,
        copy_threads: int = 4,
        nice: int = 0,
        *,
        keep: bool = False,
        device: torch.device | None = None,
    ):
        self.copy_threads = copy_threads
        self.nice = nice
        self.keep = keep  # [Note: kept copies]
        self.device = device  # [Note: a snapshot in device memory]
        self._buffers: list[torch.Tensor] = []  # this save's, for the pool
        self._lock = threading.Lock()
        self._entries: list[_Entry] = []
        self._by_storage: dict[int, _Index] = {}
        self._threads: list[threading.Thread] = []
        self._queue: list[_Entry] = []  # update order, once started
        self._next = 0
        self._stop = False
        self._error: BaseException | None = None

    def __len__(self) -> int:
        return len(self._entries)

    def nbytes(self) -> int:
        """Bytes of the entries to copy (what a device snapshot allocates)."""
        return sum(e.src.nbytes for e in self._entries if not e.kept)

    def keepable(self) -> list[torch.Tensor]:
        """The owners' buffers this snapshot could keep instead of copying their
        entries ([Note: keeping the owner's buffers]), one per buffer."""
        seen, out = set(), []
        for e in self._entries:
            b = e.buffer
            key = None if b is None else (b.data_ptr(), b.nbytes)
            if key is not None and key not in seen:
                seen.add(key)
                out.append(b)
        return out

    def second_bytes(self) -> int:
        """Host bytes the owners must still allocate for ``keep_buffers``."""
        missing = [
            b for b in self.keepable() if state_protocol.second_buffer(b, allocate=False) is None
        ]
        return sum(b.nbytes for b in missing)

    def keep_buffers(self, *, required: bool = False) -> bool:
        """Keep the owners' buffers as the copies of their entries ([Note: keeping the
        owner's buffers]): their second buffers are allocated now, in the call, and
        the entries are done with no byte copied. Where an allocation fails (pinned
        memory refused, say) the entries stay to be copied, with a warning, unless
        ``required``; returns whether the buffers are kept."""
        buffers = self.keepable()
        self._prune_pool()
        try:
            for b in buffers:
                state_protocol.second_buffer(b, allocate=True)
        except (RuntimeError, MemoryError) as e:
            if required:
                raise
            warnings.warn(
                f"fs.save: the owners' second buffers could not be allocated ({e}); this "
                "save copies their state instead (SaveIO(snapshot='host') does so always).",
                stacklevel=3,
            )
            return False
        for b in buffers:
            state_protocol.hold(b, self)
        for e in self._entries:
            if e.buffer is not None and e.status == _PENDING:
                e.copy, e.kept = e.src, True  # the owner writes its next step elsewhere
                e.finish()
        return True

    def kept_bytes(self) -> int:
        """Bytes in the pool of kept copies, which a keeping snapshot reuses where
        sizes match ([Note: kept copies]); 0 for one that does not keep."""
        return pooled_bytes() if self.keep else 0

    def _prune_pool(self) -> None:
        """Free the pooled copies this snapshot will not need once the owners' buffers
        are kept (only entries without a keepable buffer are still copied): a save
        that keeps buffers after saves that copied must not hold both sets. (Should
        the second buffers then be refused, the copies go into fresh memory.)"""
        need: dict[int, int] = {}
        if self.keep:
            for e in self._entries:
                if e.buffer is None and e.status == _PENDING:
                    need[e.src.nbytes] = need.get(e.src.nbytes, 0) + 1
        with _POOL_LOCK:
            for nbytes in list(_POOL):
                del _POOL[nbytes][need.get(nbytes, 0) :]
                if not _POOL[nbytes]:
                    del _POOL[nbytes]

    def pinned(self) -> bool:
        """Whether every entry to copy is in pinned host memory (a DMA source)."""
        return all(e.src.is_pinned() for e in self._entries if not e.kept)

    def defer(self, v: Any, order: int) -> Any:
        """``v`` (a host tensor or ``_Rows`` of one, in the announced buffer of announce
        order ``order``) as a ``_Deferred`` item of this snapshot."""
        if isinstance(v, torch.Tensor):
            t = v.detach()
            entry = self._add(t, order)
            return _Deferred(tuple(t.shape), (0,) * t.dim(), tuple(t.shape), self, entry)
        if not v.write:
            return v  # never written: nothing to keep
        return _Deferred(v.shape, v.offsets, v.sizes, self, self._add(v.local, order))

    def _add(self, t: torch.Tensor, order: int) -> _Entry:
        e = _Entry(t, order)
        self._entries.append(e)
        return e

    def start(self) -> None:
        """Index the entries by storage, register with ``before_write``, start copying."""
        by_storage: dict[int, list[_Entry]] = {}
        for e in self._entries:
            by_storage.setdefault(e.src.untyped_storage().data_ptr(), []).append(e)
        self._by_storage = {k: _Index(v) for k, v in by_storage.items()}
        ranks = {k: state_protocol.write_rank(v[0].src) for k, v in by_storage.items()}
        self._queue = sorted(
            self._entries,
            key=lambda e: (ranks[e.src.untyped_storage().data_ptr()], e.order, e.lo),
        )
        state_protocol.add_snapshot(self)
        if self.device is not None and self._entries:
            th = threading.Thread(target=self._feeder, name="fscale-snapshot-feed", daemon=True)
            th.start()
            self._threads.append(th)
            return
        self._start_copiers()

    def _start_copiers(self) -> None:
        for k in range(min(self.copy_threads, len(self._entries))):
            th = threading.Thread(target=self._copier, name=f"fscale-snapshot-{k}", daemon=True)
            th.start()
            self._threads.append(th)

    def close(self) -> None:
        """Stop copying and unregister (after the save, or its failure: the writers
        are done with the copies); the pool keeps this save's buffers or none."""
        self._stop = True
        state_protocol.remove_snapshot(self)
        state_protocol.release(self)  # kept buffers: their owners' second buffers again
        for th in self._threads:
            th.join()
        self._threads.clear()
        with _POOL_LOCK:
            _POOL.clear()
            for b in self._buffers:
                _POOL.setdefault(b.numel(), []).append(b)
        self._buffers.clear()

    def _buffer(self, nbytes: int) -> torch.Tensor:
        """A uint8 host buffer for one copy: a kept one of that size, else fresh."""
        buf = None
        if self.keep:
            with _POOL_LOCK:
                free = _POOL.get(nbytes)
                buf = free.pop() if free else None
        if buf is None:
            buf = torch.empty(nbytes, dtype=torch.uint8)
            _huge_pages(buf)
        if self.keep:
            with self._lock:
                self._buffers.append(buf)
        return buf

    # -- claiming ------------------------------------------------------------------

    def _claim(self, e: _Entry) -> bool:
        """Mark ``e`` as being copied by the caller; False if another has it."""
        with self._lock:
            if e.status != _PENDING:
                return False
            e.status = _COPYING
            return True

    def _copy(self, e: _Entry, *, memmove: bool) -> None:
        try:
            e.copy = _copy_of(e.src, self._buffer(e.src.nbytes), memmove=memmove)
        except BaseException as err:  # the writer's take raises it
            self._error = err
            raise
        finally:
            e.finish()

    def wait_copied(self) -> None:
        """Until every entry is copied ([Note: writing after the snapshot]); entries no
        thread has claimed are copied by the caller. A failed copy is not raised here
        but by the writer's ``take``, inside the save's collectives, so that every rank
        learns of it (a rank raising before them would leave the others waiting)."""
        for e in self._queue or self._entries:
            try:
                if self._claim(e):
                    self._copy(e, memmove=True)
                self._wait(e)
            except BaseException as err:
                self._error = self._error or err

    @staticmethod
    def _wait(e: _Entry) -> None:
        """Until ``e``'s copy holds its bytes (a device copy: its event)."""
        e.done.wait()
        event = e.event  # take() drops it
        if event is not None:
            event.synchronize()

    def preserve(self, t: torch.Tensor) -> None:
        """Copy (or wait for) every entry overlapping ``t`` before the caller writes it."""
        index = self._by_storage.get(t.untyped_storage().data_ptr())
        if index is None:
            return
        for e in index.overlapping(*state_protocol.byte_range(t)):
            if self._claim(e):
                self._copy(e, memmove=False)  # torch's copy: the caller's own threads
            else:
                self._wait(e)

    def take(self, e: _Entry) -> torch.Tensor:
        """The copy of ``e`` for the writer (copied now if nothing has yet); the snapshot
        lets go of it."""
        if self._claim(e):
            self._copy(e, memmove=True)
        self._wait(e)
        e.event = None
        if e.copy is None:
            raise RuntimeError(f"fs.save: the snapshot copy failed: {self._error!r}")
        out, e.copy, e.src = e.copy, None, None
        return out

    def _feeder(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        _feed(self)

    def _copier(self) -> None:
        if self.nice:
            from fscale._checkpoint.writer import _lower_priority

            _lower_priority(self.nice)
        while not self._stop:
            with self._lock:
                while self._next < len(self._queue) and self._queue[self._next].status != _PENDING:
                    self._next += 1
                if self._next >= len(self._queue):
                    return
                e = self._queue[self._next]
                e.status = _COPYING
                self._next += 1
            try:
                self._copy(e, memmove=True)
            except BaseException:
                return


_POOL: dict[int, list[torch.Tensor]] = {}  # [Note: kept copies]: nbytes -> buffers
_POOL_LOCK = threading.Lock()


def pooled_bytes() -> int:
    """Host bytes held by the pool of kept copies ([Note: kept copies])."""
    with _POOL_LOCK:
        return sum(b.numel() for bs in _POOL.values() for b in bs)


#: Bytes of device copies the feeder keeps queued ([Note: a snapshot in device memory]).
FEED_AHEAD = 1 << 30


def _feed(snap: LazySnapshot) -> None:
    """The feeder thread's loop: each pending entry's copy to ``snap.device`` queued on
    a side stream in update order, at most ``FEED_AHEAD`` bytes in flight. An entry is
    claimed only once there is room for it (a claimed entry is one ``before_write``
    waits for), and whatever happens it ends done: copied, or failed with the error
    recorded for the writer's ``take``; entries left pending are copied by whoever
    needs them first."""
    device = snap.device
    stream = torch.cuda.Stream(device) if device.type == "cuda" else None
    inflight: list[tuple[Any, int]] = []  # (event, bytes), oldest first
    queued = 0
    for e in snap._queue:
        if snap._stop:
            return
        if e.status != _PENDING:
            continue
        size = e.hi - e.lo  # fixed at defer: ``src`` is dropped once written
        try:
            while inflight and queued + size > FEED_AHEAD:
                event, n = inflight.pop(0)
                if event is not None:
                    event.synchronize()
                queued -= n
        except BaseException as err:  # a failed copy: the writer's take raises it too
            snap._error = err
            return
        if not snap._claim(e):
            continue
        try:
            out, event = _copy_to(e.src, device, stream)
        except torch.OutOfMemoryError:
            # The device filled up since the save checked: this entry and the rest
            # are copied on the host, as without a device.
            snap._copy(e, memmove=True)
            snap._start_copiers()
            return
        except BaseException as err:  # the writer's take raises it
            snap._error = err
            e.finish()
            return
        e.copy, e.event = out, event
        e.finish()
        inflight.append((event, size))
        queued += size


def _copy_to(src: torch.Tensor, device: torch.device, stream) -> tuple[torch.Tensor, Any]:
    """A copy of ``src`` on ``device`` and the event of its completion: queued on
    ``stream`` (a DMA from pinned memory) on CUDA; elsewhere (the CPU tests' stand-in
    for a device) made now, no event."""
    if stream is None:
        return src.to(device, copy=True), None
    with torch.cuda.stream(stream):
        out = torch.empty(src.shape, dtype=src.dtype, device=device)
        out.copy_(src, non_blocking=True)
        event = torch.cuda.Event()
        event.record(stream)
    return out, event


def _copy_of(src: torch.Tensor, buf: torch.Tensor, *, memmove: bool) -> torch.Tensor:
    """A contiguous host copy of ``src`` in ``buf`` (uint8, ``src.nbytes``): one
    ``memmove`` (no GIL, no intra-op threads) where ``src`` is contiguous and
    ``memmove``, else torch's copy."""
    out = buf.view(src.dtype).view(src.shape)
    if not (memmove and src.is_contiguous()):
        out.copy_(src)
        return out
    ctypes.memmove(out.data_ptr(), src.data_ptr(), src.numel() * src.element_size())
    return out


HUGE = 2 << 20
_MADV_HUGEPAGE = 14  # Linux
_LIBC = ctypes.CDLL(None) if sys.platform.startswith("linux") else None


def _huge_pages(t: torch.Tensor) -> None:
    """Ask for transparent huge pages under a large fresh host tensor (Linux, where THP
    is in "madvise" mode): the copy into it then takes a page fault per 2 MiB instead
    of per 4 KiB (tens of GB are copied into fresh memory at a save's first step)."""
    nbytes = t.numel() * t.element_size()
    if nbytes < 4 * HUGE or not sys.platform.startswith("linux"):
        return
    lo = -(-t.data_ptr() // HUGE) * HUGE
    hi = (t.data_ptr() + nbytes) // HUGE * HUGE
    if hi > lo:
        _LIBC.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), _MADV_HUGEPAGE)


class _Deferred(_Rows):
    """Rows whose bytes come from a ``LazySnapshot`` when the writer looks them up."""

    def __init__(self, shape, offsets, sizes, snapshot: LazySnapshot, entry: _Entry):
        super().__init__(shape, offsets, sizes, local=entry.src)
        self.snapshot = snapshot
        self.entry = entry
        self._dtype = entry.src.dtype

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    def tensor(self) -> torch.Tensor:
        self.local = None  # the live rows: never read once training went on
        return self.snapshot.take(self.entry)

"""``fs.save``'s writer loop: DCP's file format, written by fscale's own threads.

[Note: how a tensor reaches the disk]
DCP's ``FileSystemWriter`` (torch 2.11-2.13) splits a rank's items into one bucket per
writer thread (largest first, to the least loaded bucket) and each thread writes its
bucket to one file ``__<rank>_<i>.distcp``: per item, ``torch.save`` of the tensor into
the file (a small zip: pickle, then the storage bytes, whose CRC-32 torch computes),
then one ``fsync`` at the end. With more than one thread every item is moved to the host
by a plain ``tensor.cpu()`` (its copy-ahead loader is used only with one thread): a
synchronous copy into fresh pageable memory, on the legacy default stream that every
thread shares, so the threads' device-to-host copies run one at a time, each through the
driver's small pinned staging buffer, and into pages faulted in as they are written.
Measured on one H200 (bench/checkpoint.py) a 1.4B state on the GPU saved at 0.63x
``dd``, the same state resident on the host at 1.18x. And nothing asks the kernel to
write before the final ``fsync``: the page cache takes the bytes as fast as they come and
the drive idles until the dirty pages pass the background threshold (10% of memory by
default), so a slow producer and the drive take turns instead of overlapping.

This loop writes the same files (same buckets, same order, ``torch.save`` of a tensor
with a storage of exactly its bytes, same ``WriteResult``; the CPU tests compare the
files byte for byte with DCP's), but:

- a host tensor that is part of a larger storage (offload's buffers) is written
  through a slice of that storage where DCP writes a clone (``_host``): same bytes;
- device tensors are copied on a side stream into two reused pinned slabs per thread
  (``_Slabs``), item ``k + 1``'s copy running while item ``k`` is written; ``torch.save``
  reads the slab through a storage of exactly the item's bytes. An item larger than a
  slab is copied through both slabs in turn into a host tensor of its own;
- every thread starts the write-out of what it wrote as it goes (``sync_file_range``),
  and waits for it once more than ``SaveIO.writeback`` bytes are in flight, dropping
  the written pages from the cache (``_Writeback``): the drive is busy from the first
  item, and the checkpoint does not fill the host's page cache;
- an asynchronous save's threads run at a lower CPU priority (``SaveIO.background_nice``)
  so that a host optimizer step (offload) keeps its cores;
- with ``SaveIO.direct`` the files are written past the page cache, through a small
  aligned buffer ([Note: uncached writes] in ``uncached.py``);
- an exception in any thread (a full disk) is raised in the caller, not lost.
"""

from __future__ import annotations

import ctypes
import io
import math
import os
import pickle
import threading
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.planner import WriteItem, WriteItemType
from torch.distributed.checkpoint.storage import WriteResult

from fscale._checkpoint.uncached import DEFAULT_BUFFER

__all__ = ["SaveIO", "make_job", "split_items", "write_buckets"]


STAGES = ("auto", "device", "pinned", "pageable")
SNAPSHOTS = ("auto", "device", "host", "second_buffer")


@dataclass(frozen=True)
class SaveIO:
    """How ``fs.save`` moves bytes to the disk ([Note: how a tensor reaches the disk]).

    Args:
      pinned: pinned host bytes per rank for device-to-host copies: two slabs per writer
        thread, each at most ``pinned // (2 * threads)`` and no larger than the thread's
        largest device item. 0 uses DCP's own writer loop (a pageable ``.cpu()`` per
        item, no early write-out, no priority change): the old path.
      writeback: bytes a writer thread may have written but not yet on the disk before it
        waits for the oldest (``sync_file_range``, Linux); 0 leaves write-out to the
        kernel and the final ``fsync``.
      background_nice: added to the niceness of an asynchronous save's writer threads
        (Linux threads have their own); 0 keeps the caller's priority.
      background_idle: an asynchronous save's writer threads run under ``SCHED_IDLE``
        (Linux): on CPUs nothing else wants, so that a host optimizer step (offload)
        that uses every core is slowed less by them (its copy threads stay niced: they
        must keep ahead of the update, [Note: lazy snapshot]). Measured on one H200,
        all steps until the save is written counted: a 1.4B GPU state's stall 0.43 s
        (0.69 s niced only), an offloaded 3.55B's 5.2 s with 2 writer threads (9.9 s
        niced only, 8 threads).
      background_threads: writer threads of an asynchronous save (default: ``threads``
        of the save).
      keep_copies: an asynchronous save's host copies of offloaded state stay
        allocated after it, for the next such save to copy into ([Note: kept copies]
        in fscale/_checkpoint/snapshot.py): its first step does not fault in and zero
        tens of GB of fresh pages (an offloaded 3.55B's stall on one H200: 1.5 s
        against 5.9 s), at the price of that much host memory held between saves (a
        save with ``keep_copies=False`` frees them).
      snapshot: how an asynchronous save keeps offloaded host state as it was:
        ``"second_buffer"`` (no copy: the save writes the owner's buffers, and the
        first update after the call writes a second set, allocated at the first
        such save and kept: [Note: keeping the owner's buffers] in
        fscale/_checkpoint/snapshot.py), copies on the ``"host"`` (``copy_threads``
        threads), copies on the ``"device"`` (a DMA per entry queued by one thread:
        [Note: a snapshot in device memory]), or ``"auto"``: second buffers where
        the owner offers them (offload(cpu) with Adam or AdamW, whose step costs
        the same written elsewhere; other optimizers' state is copied) and the host
        has room for those still to
        allocate, else host copies where its available memory holds them, else the
        device where the state is pinned and the device's free memory holds it.
      copy_threads: threads that copy an asynchronous save's announced host tensors
        (offload's state) in the background ([Note: lazy snapshot] in
        fscale/_checkpoint/snapshot.py); the host optimizer copies what they have not
        reached before it writes it.
      stage: where an asynchronous save copies device tensors before training goes on
        ([Note: async staging] in fscale/checkpoint.py): ``"device"`` (a copy on the
        device, moved to the host by the writer threads; milliseconds), ``"pinned"``
        (pinned host memory on a side stream; torch caches the blocks for the next
        save, the first pins them: seconds per 10 GB), ``"pageable"`` (``.to("cpu")``
        per tensor), or ``"auto"``: the device where its free memory holds the copies
        with a margin, else pinned.
      direct: data files written past the page cache (``O_DIRECT``) through one small
        reused buffer per writer thread ([Note: uncached writes] in ``uncached.py``).
      direct_buffer: that buffer's bytes (a multiple of 4096): small enough to stay in
        the writer's caches until the drive reads it, large enough per write.
      torch_crc: whether each item's ``torch.save`` takes the CRC-32 its zip record
        carries (torch's own loop: 3.7 GB/s per core on the CPU VM). With False the
        record says 0, as ``torch.serialization.set_crc32_options(False)`` makes it
        (``torch.load`` reads it), and the checksum fscale records and checks on
        load is taken by zlib-ng instead (11.9 GB/s there; [Note: the CRC torch
        already took] in ``checksummed.py``), a MiB at a time just before it is
        written, so that the source is read from memory once ([Note: summing while
        the bytes are in cache]): less writer CPU and memory traffic beside a host
        optimizer.
        Only for fscale's writer loop (``pinned > 0``).

    Usage::

        fs.save(path, params, state, io=SaveIO(background_nice=15))
    """

    pinned: int = 1 << 30
    writeback: int = 256 << 20
    background_nice: int = 10
    background_idle: bool = True
    background_threads: int | None = None
    keep_copies: bool = True
    snapshot: str = "auto"
    copy_threads: int = 8
    stage: str = "auto"
    direct: bool = False
    direct_buffer: int = DEFAULT_BUFFER
    torch_crc: bool = True

    def __post_init__(self):
        if self.stage not in STAGES:
            raise ValueError(f"SaveIO(stage={self.stage!r}): one of {', '.join(STAGES)}.")
        if self.snapshot not in SNAPSHOTS:
            raise ValueError(f"SaveIO(snapshot={self.snapshot!r}): one of {', '.join(SNAPSHOTS)}.")
        for name in ("pinned", "writeback", "background_nice"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"SaveIO({name}={v!r}): an int >= 0.")
        for name in ("background_idle", "keep_copies", "direct", "torch_crc"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"SaveIO({name}={getattr(self, name)!r}): a bool.")
        d = self.direct_buffer
        if isinstance(d, bool) or not isinstance(d, int) or d <= 0 or d % 4096:
            raise ValueError(f"SaveIO(direct_buffer={d!r}): a positive multiple of 4096.")
        c = self.copy_threads
        if isinstance(c, bool) or not isinstance(c, int) or c < 1:
            raise ValueError(f"SaveIO(copy_threads={c!r}): an int >= 1.")
        if not self.torch_crc and self.pinned == 0:
            raise ValueError(
                "SaveIO(torch_crc=False, pinned=0): DCP's own loop takes torch's CRCs; give "
                "pinned > 0 (fscale's writer loop) or torch_crc=True."
            )
        if self.direct and self.pinned == 0:
            raise ValueError(
                "SaveIO(direct=True, pinned=0): O_DIRECT writes need fscale's writer loop; "
                "give pinned > 0 or direct=False."
            )
        b = self.background_threads
        if b is not None and (isinstance(b, bool) or not isinstance(b, int) or b < 1):
            raise ValueError(f"SaveIO(background_threads={b!r}): None or an int >= 1.")


def _item_bytes(item: WriteItem) -> int:
    td = item.tensor_data
    return math.prod(td.size) * td.properties.dtype.itemsize


def split_items(items: list[WriteItem], bins: int) -> list[list[WriteItem]]:
    """One bucket per writer thread, as DCP's writer makes them (so the files are the
    same): byte items dealt in turn, then tensors largest first, each to the bucket with
    the fewest bytes so far (the first of equals)."""
    if bins == 1:
        return [list(items)]
    buckets: list[list[WriteItem]] = [[] for _ in range(bins)]
    sizes = [0] * bins
    blobs = [i for i in items if i.type == WriteItemType.BYTE_IO]
    tensors = sorted(
        (i for i in items if i.type != WriteItemType.BYTE_IO), key=_item_bytes, reverse=True
    )
    for k, item in enumerate(blobs):
        buckets[k % bins].append(item)
    for item in tensors:
        k = sizes.index(min(sizes))
        buckets[k].append(item)
        sizes[k] += _item_bytes(item)
    return buckets


def _on_device(t: torch.Tensor) -> bool:
    """Whether ``t`` goes through the slabs (a hook: the CPU tests route host tensors
    through them to run the pipeline without a GPU)."""
    return t.device.type == "cuda"


class _Slabs:
    """Two reused host buffers of one writer thread and its side stream ([Note: how a
    tensor reaches the disk]). ``take`` starts the copy of a device tensor into a free
    slab and returns the host tensor (a storage of exactly its bytes), ``ready`` waits
    for that copy, ``give`` frees the slab once the tensor is written."""

    def __init__(self, nbytes: int, device: torch.device, after=None):
        cuda = device.type == "cuda"
        pin = cuda or torch.cuda.is_available()
        self.free = [torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin) for _ in range(2)]
        self.nbytes = nbytes
        self.stream = torch.cuda.Stream(device) if cuda else None
        if cuda:  # the copies read what the caller's stream wrote
            if after is not None:
                self.stream.wait_event(after)
            self.stream.wait_stream(torch.cuda.current_stream(device))
        self.events: dict[int, Any] = {}  # id(slab) -> the event of its copy
        self.held: dict[int, torch.Tensor] = {}  # id(host tensor) -> its slab

    def fits(self, t: torch.Tensor) -> bool:
        return t.is_contiguous() and 0 < t.nbytes <= self.nbytes

    def _copy(self, dst: torch.Tensor, src: torch.Tensor) -> Any:
        if self.stream is None:
            dst.copy_(src)
            return None
        with torch.cuda.stream(self.stream):
            dst.copy_(src, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.stream)
        return event

    def take(self, t: torch.Tensor) -> torch.Tensor:
        slab = self.free.pop()
        n = t.nbytes
        self.events[id(slab)] = self._copy(slab[:n], t.reshape(-1).view(torch.uint8))
        if self.stream is not None:
            # The caller drops ``t`` before this copy is waited for: its block must not
            # be reused by its own stream (a staging or snapshot copy's) until then.
            t.record_stream(self.stream)
        storage = slab.untyped_storage()[0:n]  # shares the slab: exactly the item's bytes
        host = torch.empty((0,), dtype=t.dtype).set_(storage, 0, t.shape, t.stride())
        # No attribute on ``host``: torch.save would write it with the tensor.
        self.held[id(host)] = slab
        return host

    def ready(self, host: torch.Tensor) -> None:
        event = self.events.pop(id(self.held[id(host)]), None)
        if event is not None:
            event.synchronize()

    def give(self, host: torch.Tensor) -> None:
        self.free.append(self.held.pop(id(host)))

    def through(self, t: torch.Tensor) -> torch.Tensor:
        """A device tensor larger than a slab: copied slab by slab into a host tensor of
        its own, the next piece's copy running while the last one is moved out."""
        out = torch.empty_like(t, device="cpu", memory_format=torch.contiguous_format)
        src, dst = t.reshape(-1).view(torch.uint8), out.view(-1).view(torch.uint8)
        inflight: list = []

        def drain() -> None:
            slab, start, n, event = inflight.pop(0)
            if event is not None:
                event.synchronize()
            dst[start : start + n].copy_(slab[:n])
            self.free.append(slab)

        for start in range(0, src.numel(), self.nbytes):
            n = min(self.nbytes, src.numel() - start)
            if not self.free:
                drain()
            slab = self.free.pop()
            inflight.append((slab, start, n, self._copy(slab[:n], src[start : start + n])))
        while inflight:
            drain()
        return out


# [Note: early write-out] sync_file_range(2) flags.
_WRITE, _WAIT_BEFORE, _WAIT_AFTER = 2, 1, 4
_KICK = 16 << 20  # start write-out every this many bytes


def _sync_file_range():
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (AttributeError, OSError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_SYNC_RANGE = _sync_file_range()


class _Writeback:
    """[Note: early write-out] Starts the kernel's write-out of a file's bytes as they
    are written and keeps at most ``window`` bytes in flight: the drive streams from the
    first item instead of idling until the page cache's background threshold, and the
    pages it has written are dropped from the cache. Durability still comes from the
    final ``fsync``; an error here only turns the early write-out off for the file (the
    ``fsync`` reports a real I/O error)."""

    def __init__(self, fd: int, window: int):
        self.fd = fd
        self.window = window
        self.on = window > 0 and _SYNC_RANGE is not None
        self.started = 0  # write-out started for [0, started)
        self.done = 0  # and waited for [0, done)

    def _call(self, start: int, n: int, flags: int) -> None:
        if _SYNC_RANGE(self.fd, start, n, flags) != 0:
            self.on = False

    def advance(self, end: int) -> None:
        if not self.on or end - self.started < _KICK:
            return
        self._call(self.started, end - self.started, _WRITE)
        self.started = end
        if self.on and end - self.done > self.window:
            upto = end - self.window
            self._call(self.done, upto - self.done, _WAIT_BEFORE | _WRITE | _WAIT_AFTER)
            if self.on and hasattr(os, "posix_fadvise"):
                os.posix_fadvise(self.fd, self.done, upto - self.done, os.POSIX_FADV_DONTNEED)
            self.done = upto


class _NoClose(io.RawIOBase):
    """The file as ``torch.save`` sees it: it writes and flushes, never closes."""

    def __init__(self, raw):
        self.raw = raw

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        return self.raw.write(b)

    def flush(self) -> None:
        self.raw.flush()

    def close(self) -> None:
        self.flush()


def _save_without_crc(data: torch.Tensor, out) -> None:
    """``torch.save(data, out)`` with the record's CRC-32 left at 0 (``SaveIO.torch_crc``):
    torch's zip writer made with ``compute_crc32=False`` for this call alone, leaving
    ``set_crc32_options`` (per thread in torch 2.13; its scope is torch's business)
    as the caller set it."""
    from torch import serialization

    try:
        writer = torch._C.PyTorchFileWriter(out, False, serialization._get_storage_alignment())
    except (AttributeError, TypeError):  # a torch whose writer takes other arguments
        torch.save(data, out)
        return
    serialization._save(data, writer, pickle, serialization.DEFAULT_PROTOCOL, False)
    writer.write_end_of_file()
    out.flush()


def _result(item: WriteItem, key: str, offset: int, end: int) -> WriteResult:
    n = end - offset
    return WriteResult(index=item.index, size_in_bytes=n, storage_data=_StorageInfo(key, offset, n))


def _host(t: torch.Tensor) -> torch.Tensor:
    """A host tensor with a storage of exactly its bytes (``torch.save`` writes the whole
    storage), as DCP makes them: where ``t`` is a contiguous part of a larger storage
    (offload's sub-group buffers, which an async save may keep as its snapshot), a view
    of it through a slice of that storage, not DCP's clone: no copy of the bytes into
    fresh pages beside the step. The caller keeps ``t`` (the slice does not) alive."""
    t = t.detach().cpu()
    if t.untyped_storage().nbytes() == t.nbytes:
        return t
    if not (t.is_contiguous() and t.nbytes):
        return t.clone()
    start = t.storage_offset() * t.element_size()
    storage = t.untyped_storage()[start : start + t.nbytes]
    return torch.empty((0,), dtype=t.dtype).set_(storage, 0, t.shape, t.stride())


@dataclass(frozen=True)
class _Job:
    """What every writer thread of one save shares."""

    planner: Any
    create_stream: Any
    io: SaveIO
    threads: int
    sync: bool  # fsync each file (DCP's sync_files)
    nice: int  # added to the threads' niceness
    idle: bool  # SCHED_IDLE (SaveIO.background_idle)
    after: Any  # a CUDA event on the caller's stream (the copies wait for it), or None


def _lower_priority(nice: int, idle: bool = False) -> None:
    """This thread's niceness raised by ``nice`` (Linux threads have their own), and
    with ``idle`` its policy ``SCHED_IDLE``."""
    tid = threading.get_native_id()
    if nice and hasattr(os, "setpriority"):
        try:
            os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + nice)
        except OSError:
            pass
    if idle and hasattr(os, "SCHED_IDLE"):
        try:
            os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
        except OSError:
            pass


def _write_file(job: _Job, path, key: str, items: list[WriteItem]) -> list[WriteResult]:
    """One writer thread: its bucket's items, in order, into one file."""
    _lower_priority(job.nice, job.idle)
    results: list[WriteResult] = []
    tensors = [i for i in items if i.type != WriteItemType.BYTE_IO]
    slabs: _Slabs | None = None
    # [Note: uncached writes]
    opts = {"direct": True, "buffer": job.io.direct_buffer} if job.io.direct else {}
    if not job.io.torch_crc:  # [Note: summing while the bytes are in cache]
        opts["inline"] = True
    with job.create_stream(path, "wb", **opts) as stream:
        out = _NoClose(stream)
        wb = _Writeback(stream.fileno(), 0 if job.io.direct else job.io.writeback)

        def write(item: WriteItem, data) -> None:
            offset = stream.tell()
            if hasattr(stream, "mark"):  # one checksum per item ([Note: checksums while writing])
                stream.mark()
            if isinstance(data, io.BytesIO):
                stream.write(data.getbuffer())
            elif job.io.torch_crc:
                torch.save(data, out)
            else:
                _save_without_crc(data, out)
            stream.flush()
            results.append(_result(item, key, offset, stream.tell()))
            wb.advance(stream.tell())

        def settle(pending) -> None:
            item, host = pending
            slabs.ready(host)
            write(item, host)
            slabs.give(host)

        for item in items:
            if item.type == WriteItemType.BYTE_IO:
                write(item, job.planner.resolve_data(item))
        pending = None  # (item, host tensor in a slab) whose copy is running
        for item in tensors:
            t = job.planner.resolve_data(item).detach()
            if not (_on_device(t) and t.is_contiguous() and t.nbytes > 0):
                if pending is not None:
                    settle(pending)
                    pending = None
                write(item, _host(t))
                continue
            if slabs is None:
                biggest = max(_item_bytes(i) for i in tensors)
                cap = max(1, job.io.pinned // (2 * job.threads))
                slabs = _Slabs(min(biggest, cap), t.device, job.after)
            if slabs.fits(t):
                host = slabs.take(t)  # this copy runs while ``pending`` is written
                if pending is not None:
                    settle(pending)
                pending = (item, host)
            else:
                if pending is not None:
                    settle(pending)
                    pending = None
                write(item, slabs.through(t))
        if pending is not None:
            settle(pending)
        if job.sync:
            _sync(stream)
    return results


def _sync(stream) -> None:
    """The file durable: the stream's ``sync`` (a direct stream holds its last partial
    block until then), else flush and ``fsync``."""
    if hasattr(stream, "sync"):
        stream.sync()
    else:
        stream.flush()
        os.fsync(stream.fileno())


def write_buckets(
    buckets: list[list[WriteItem]], prefix: str, root, concat_path, job: _Job
) -> list[WriteResult]:
    """Write bucket ``i`` to ``<prefix><i>.distcp`` under ``root``, each in a thread of
    its own (the caller's thread only waits: its priority is never changed); raise the
    first error of any thread."""
    results: list[list[WriteResult]] = [[] for _ in buckets]
    errors: list[BaseException] = []

    def run(i: int) -> None:
        name = f"{prefix}{i}.distcp"
        try:
            results[i] = _write_file(job, concat_path(root, name), name, buckets[i])
        except BaseException as e:  # a crash or a full disk: raised by the caller
            errors.append(e)

    threads = [
        threading.Thread(target=run, args=(i,), name=f"fscale-write-{i}")
        for i in range(len(buckets))
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return [r for rs in results for r in rs]


def make_job(
    planner, create_stream, io_: SaveIO, threads: int, sync: bool, nice: int, idle: bool
) -> _Job:
    """The shared part of one save's writing, made in the caller's thread (whose CUDA
    stream the device copies must follow)."""
    after = None
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        after = torch.cuda.current_stream().record_event()
    return _Job(planner, create_stream, io_, threads, sync, nice, idle, after)

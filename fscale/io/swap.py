"""The NVMe swap engine: checksummed, atomically replaced swap files, read and written by threads.

``offload(tier="nvme")`` keeps each sub-group of optimizer state in one file and
streams it through a small pool of aligned (pinned on CUDA) buffers: read group
i+1 while group i is updated while group i-1 is written ([Note: swap pipeline] in
``fscale/transforms/_offload/update.py``). This module knows nothing of optimizers:
it moves bytes between a buffer and a named file.

[Note: swap files]
- Direct I/O. O_DIRECT bypasses the page cache (NVMe at full speed, no host RAM
  spent caching state that is read once per step), but needs the buffer address,
  the file offset and the length to be multiples of the logical block size; we use
  4096 for all three (``ALIGN``): buffers come from ``alloc`` (over-allocated and
  sliced, torch only aligns to 64 bytes) and files are padded to 4096. Filesystems
  without O_DIRECT (tmpfs, some overlays) refuse the flag with EINVAL; a probe at
  start-up detects that and the engine falls back to buffered I/O (``direct``).
- Threads. ``os.preadv`` / ``os.pwritev`` and ``zlib.crc32`` (on buffers over a
  few KiB) release the GIL, so threads move bytes while the main thread runs the
  optimizer. One reader and one writer thread take whole files, in submission
  order (a write never queues behind a read); each splits its file into
  ``chunk_bytes`` pieces run by ``io_threads`` chunk threads, so the drive has
  several requests in flight and checksums overlap I/O. With one thread doing
  I/O and CRC in turn, a 2 GiB file moved at 57% (write) and 66% (read) of ``dd
  oflag=direct`` on an H200 host's drive.
- Integrity. Every ``chunk_bytes`` block gets a CRC-32 as it is written, kept in
  memory; a read recomputes them and raises ``SwapCorruptError`` on the first
  mismatch, and on a file shorter than what was written. A corrupt file is never
  handed to the optimizer.
- Atomicity. A write goes to ``<name>.tmp`` and is renamed over ``<name>`` only
  when complete, so a crash mid-write leaves the previous version whole. The disk
  therefore needs room for every file plus one extra file per writer
  (``bytes_needed``).
- Lifetime. ``close()`` removes every file the engine wrote (temporaries
  included); a ``weakref.finalize`` does the same if the engine is garbage
  collected or the interpreter exits without ``close()``.

Usage::

    engine = SwapEngine("/mnt/nvme", rank=0)
    buf = engine.alloc(1 << 20)
    engine.write("group0", buf).result()       # Future; raises the worker's error
    engine.read("group0", buf).result()        # verified against the write's checksums
    engine.close()                              # files removed
"""

from __future__ import annotations

import errno
import itertools
import mmap
import os
import threading
import time
import uuid
import weakref
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

ALIGN = 4096
_DEFAULT_CHUNK = 8 * 2**20


class SwapError(RuntimeError):
    """A swap file could not be written or read."""


class SwapCorruptError(SwapError):
    """A swap file is shorter than written or fails its checksum: it is not used."""


def align_up(n: int, align: int = ALIGN) -> int:
    return (n + align - 1) // align * align


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB ({n:,} bytes)"


def check_path(path, nbytes: int | None = None, *, owner: str = "offload(tier='nvme')") -> str:
    """Check ``path`` is an existing, writable directory with ``nbytes`` free; return it absolute.

    Raises ``FileNotFoundError`` / ``NotADirectoryError`` / ``PermissionError`` /
    ``OSError(ENOSPC)`` with the path, and for space the bytes needed and free.
    """
    if path is None:
        raise ValueError(f"{owner} needs path=DIR: a directory on the NVMe drive for swap files.")
    path = os.path.abspath(os.fspath(path))
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{owner}: swap path {path!r} does not exist; create it (mkdir -p) or pass an "
            "existing directory on the NVMe drive."
        )
    if not os.path.isdir(path):
        raise NotADirectoryError(f"{owner}: swap path {path!r} is not a directory.")
    if not os.access(path, os.W_OK | os.X_OK):
        raise PermissionError(
            f"{owner}: swap path {path!r} is not writable by this process (uid {os.getuid()}); "
            "pick a directory you can write to or fix its permissions."
        )
    if nbytes is not None:
        st = os.statvfs(path)
        free = st.f_bavail * st.f_frsize
        if free < nbytes:
            raise OSError(
                errno.ENOSPC,
                f"{owner}: swap path {path!r} has {_gib(free)} free but the swap files need "
                f"{_gib(nbytes)}; free space there, pass a larger drive, or shard the state "
                "over more ranks (shard_zero).",
            )
    return path


def alloc(nbytes: int, *, pin: bool | None = None) -> torch.Tensor:
    """A uint8 host buffer of ``align_up(nbytes)`` bytes whose address is 4096-aligned.

    Pinned (page-locked) when CUDA is available, so host<->device copies from it
    are asynchronous DMA.
    """
    if pin is None:
        pin = torch.cuda.is_available()
    n = align_up(max(nbytes, 1))
    raw = _pinned_exact(n + ALIGN) if pin and n >= _REGISTER_MIN else None
    if raw is None:
        raw = torch.empty(n + ALIGN, dtype=torch.uint8, pin_memory=pin)
    off = (-raw.data_ptr()) % ALIGN
    return raw[off : off + n]  # the view keeps ``raw`` (its ``_base``) alive


# [Note: pinned memory of an exact size]
# torch's pinned-memory allocator rounds every request up to a power of two (for
# reuse) and keeps freed blocks cached: a 1.07 GB sub-group buffer (one 4096 x 16384
# fp32 master with its Adam state and grads) pins 2 GiB, and offload(cpu) on a 3.4B
# model pinned 107 GB for 55 GB of state. Large buffers are therefore ordinary host
# memory of the exact size, page-locked in place with cudaHostRegister and unlocked
# when the tensor goes (a finalizer on the base tensor, which every view returned
# keeps alive through ``_base``).
_REGISTER_MIN = 16 * 2**20


def _pinned_exact(nbytes: int) -> torch.Tensor | None:
    """``nbytes`` of host memory page-locked in place, or None where that is unavailable."""
    try:
        cudart = torch.cuda.cudart()
        raw = torch.empty(nbytes, dtype=torch.uint8)
        ptr = raw.data_ptr()
        ok = int(cudart.cudaHostRegister(ptr, nbytes, 0)) == 0  # cudaSuccess
    except Exception:  # no CUDA runtime (CPU build), or a runtime without the call
        return None
    if not ok:
        return None
    weakref.finalize(raw, cudart.cudaHostUnregister, ptr)
    return raw


#: At most this many bytes of buffers share one ``alloc_many`` allocation.
ARENA_BYTES = 2**30


def alloc_many(sizes: list[int], *, pin: bool | None = None) -> list[torch.Tensor]:
    """4096-aligned uint8 host buffers of ``align_up(size)`` bytes each, from few allocations.

    Thousands of sub-group buffers become a few dozen page-locked allocations: the
    buffers are cut, in order, into runs of at most ``ARENA_BYTES`` (a larger buffer
    is a run of its own), and each run is one allocation of exactly its size (see
    [Note: pinned memory of an exact size]). Fixed-size arenas would waste their
    tails: a GPT block's sub-groups (805 MB, 268 MB, 1.07 GB, ...) left 26 GB of a
    5B model's 81 GB of arenas empty.
    """
    padded = [align_up(max(size, 1)) for size in sizes]
    runs: list[list[int]] = []
    total = 0
    for i, n in enumerate(padded):
        if not runs or total + n > ARENA_BYTES:
            runs.append([])
            total = 0
        runs[-1].append(i)
        total += n
    out: list[torch.Tensor | None] = [None] * len(sizes)
    for run in runs:
        arena = alloc(sum(padded[i] for i in run), pin=pin)
        used = 0
        for i in run:
            out[i] = arena[used : used + padded[i]]
            used += padded[i]
    return out


def map_file(path: str, nbytes: int, *, owner: str = "offload(tier='nvme')") -> torch.Tensor:
    """A uint8 tensor of ``align_up(nbytes)`` bytes backed by a file under ``path``.

    [Note: memory-mapped param shards]
    The pages live in the page cache while host memory allows and are written back
    to the drive and dropped under memory pressure (a container's memory limit
    included), as a swap file's would be. The blocks are reserved up front
    (``posix_fallocate``): a full drive fails here, with the bytes needed, instead of
    killing the process with SIGBUS at a later write. The file is unlinked as soon
    as it is mapped, so nothing is left under ``path`` however the process ends; the
    space returns when the tensor (and its mapping) goes.
    """
    n = align_up(max(nbytes, 1))
    check_path(path, n, owner=owner)
    name = os.path.join(path, f"fscale-params-{os.getpid()}-{uuid.uuid4().hex}.swap")
    fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        try:
            os.posix_fallocate(fd, 0, n)
        except OSError as e:
            raise OSError(
                e.errno,
                f"{owner}: could not reserve {_gib(n)} for param shards under {path!r} "
                f"({os.strerror(e.errno)}); free space there or pass a larger drive.",
            ) from e
        mapping = mmap.mmap(fd, n, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)
        os.unlink(name)
    return torch.frombuffer(mapping, dtype=torch.uint8)  # holds the mapping alive


@dataclass
class _Record:
    path: str
    nbytes: int  # bytes written (a multiple of ALIGN)
    crcs: list[int]


def _probe_direct(path: str) -> bool:
    """Whether files under ``path`` accept O_DIRECT (tmpfs and some overlays refuse it)."""
    if not hasattr(os, "O_DIRECT"):
        return False
    probe = os.path.join(path, f".fscale-probe-{uuid.uuid4().hex}")
    buf = alloc(ALIGN, pin=False)
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o600)
    except OSError:
        return False
    try:
        os.pwritev(fd, [buf.numpy()], 0)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
        try:
            os.unlink(probe)
        except OSError:
            pass


def _write_chunk(fd: int, data, start: int, end: int) -> int:
    """Write ``data[start:end]`` at ``start``; returns its CRC-32 (computed first)."""
    block = data[start:end]
    crc = zlib.crc32(block)
    done = 0
    while done < len(block):
        n = os.pwritev(fd, [block[done:]], start + done)
        if n <= 0:
            raise OSError(errno.EIO, f"pwritev wrote {n} bytes at {start + done}")
        done += n
    return crc


def _read_chunk(fd: int, data, start: int, end: int) -> int | None:
    """Read ``data[start:end]`` from ``start``; its CRC-32, or None on a short read."""
    block = data[start:end]
    done = 0
    while done < len(block):
        n = os.preadv(fd, [block[done:]], start + done)
        if n <= 0:
            return None
        done += n
    return zlib.crc32(block)


def _remove(paths) -> None:
    for p in list(paths):
        for name in (p, p + ".tmp"):
            try:
                os.unlink(name)
            except FileNotFoundError:
                pass
            except OSError:
                pass


class SwapEngine:
    """Reads and writes named swap files under ``path`` on two background threads.

    Args:
      path: an existing writable directory (checked).
      rank: included in every file name, so ranks sharing a disk never collide.
      direct: True forces O_DIRECT (error if the filesystem refuses it), False
        forces buffered I/O, None (default) probes.
      chunk_bytes: I/O and checksum granularity (rounded up to 4096).
      io_threads: chunks in flight at once (the queue depth the drive sees).
      record: keep a log of ``(seq, time, event, key)`` in ``events`` (tests use it
        to check the pipeline's order).
    """

    def __init__(
        self,
        path,
        *,
        rank: int = 0,
        direct: bool | None = None,
        chunk_bytes: int = _DEFAULT_CHUNK,
        io_threads: int = 4,
        record: bool = False,
    ):
        self.path = check_path(path)
        self.rank = rank
        probed = _probe_direct(self.path)
        if direct and not probed:
            raise SwapError(
                f"direct=True but the filesystem of {self.path!r} refuses O_DIRECT; pass "
                "direct=None to fall back to buffered I/O there."
            )
        self.direct = probed if direct is None else bool(direct)
        self.chunk_bytes = align_up(chunk_bytes)
        self.prefix = f"fscale-swap-r{rank}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._files: dict[str, _Record] = {}
        self._paths: set[str] = set()
        self._pending: dict[str, Future] = {}  # key -> the last write submitted for it
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="fscale-swap-read")
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="fscale-swap-write")
        # Chunks of one file go to several threads: the drive sees io_threads requests
        # at once (NVMe needs a queue depth > 1) and CRCs overlap other chunks' I/O.
        self._io = ThreadPoolExecutor(io_threads, thread_name_prefix="fscale-swap-io")
        self._lock = threading.Lock()
        self._seq = itertools.count()
        self.events: list[tuple[int, float, str, str]] | None = [] if record else None
        self.bytes_read = 0
        self.bytes_written = 0
        self._finalizer = weakref.finalize(
            self, _shutdown, self._paths, (self._reader, self._writer, self._io)
        )

    # -- bookkeeping ---------------------------------------------------------------------

    def event(self, kind: str, key: str) -> None:
        """Append to the event log (no-op unless ``record=True``); thread-safe."""
        if self.events is not None:
            with self._lock:
                self.events.append((next(self._seq), time.perf_counter(), kind, key))

    def file_path(self, key: str) -> str:
        return os.path.join(self.path, f"{self.prefix}-{key}.swp")

    def files(self) -> list[str]:
        """Paths of the swap files written so far (existing ones)."""
        return sorted(p for p in self._paths if os.path.exists(p))

    @staticmethod
    def alloc(nbytes: int, *, pin: bool | None = None) -> torch.Tensor:
        return alloc(nbytes, pin=pin)

    def _flags(self, base: int) -> int:
        return base | (os.O_DIRECT if self.direct else 0)

    def _check_buffer(self, buf: torch.Tensor, nbytes: int) -> None:
        if buf.dtype != torch.uint8 or buf.device.type != "cpu" or not buf.is_contiguous():
            raise TypeError("swap buffers must be contiguous CPU uint8 tensors (use engine.alloc).")
        if self.direct and buf.data_ptr() % ALIGN:
            raise ValueError(
                f"O_DIRECT needs {ALIGN}-aligned buffers; this one is at "
                f"{buf.data_ptr():#x}. Allocate it with engine.alloc."
            )
        if nbytes % ALIGN or nbytes > buf.numel():
            raise ValueError(
                f"swap I/O of {nbytes} bytes: must be a multiple of {ALIGN} and fit the buffer "
                f"({buf.numel()} bytes)."
            )

    # -- writing ---------------------------------------------------------------------------

    def write(self, key: str, buf: torch.Tensor, nbytes: int | None = None) -> Future:
        """Write ``buf[:nbytes]`` to ``key``'s file (atomically); returns a Future.

        The buffer must not change until the Future is done.
        """
        nbytes = buf.numel() if nbytes is None else nbytes
        self._check_buffer(buf, nbytes)
        final = self.file_path(key)
        self._paths.add(final)
        self.event("write_submit", key)
        fut = self._writer.submit(self._write, key, final, buf, nbytes)
        self._pending[key] = fut
        return fut

    def _write(self, key: str, final: str, buf: torch.Tensor, nbytes: int) -> None:
        self.event("write_start", key)
        tmp = final + ".tmp"
        data = buf.numpy()
        fd = os.open(tmp, self._flags(os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 0o600)
        step = self.chunk_bytes
        chunks = []
        try:
            for a in range(0, nbytes, step):
                chunks.append(self._io.submit(_write_chunk, fd, data, a, min(a + step, nbytes)))
            crcs = [c.result() for c in chunks]
        except OSError as e:
            raise SwapError(f"writing swap file {tmp!r} failed: {e}") from e
        finally:
            for c in chunks:
                c.exception()  # never close the fd under a chunk still writing
            os.close(fd)
        os.replace(tmp, final)
        self._files[key] = _Record(final, nbytes, crcs)
        self.bytes_written += nbytes
        self.event("write_end", key)

    # -- reading ---------------------------------------------------------------------------

    def read(self, key: str, buf: torch.Tensor) -> Future:
        """Read ``key``'s file into ``buf`` and verify it; returns a Future.

        Waits for a write of the same key still in flight first.
        """
        self.event("read_submit", key)
        pending = self._pending.get(key)
        return self._reader.submit(self._read, key, buf, pending)

    def _read(self, key: str, buf: torch.Tensor, pending: Future | None) -> None:
        if pending is not None:
            pending.result()
        self.event("read_start", key)
        rec = self._files.get(key)
        if rec is None:
            raise SwapError(f"no swap file was written for {key!r} (under {self.path!r}).")
        self._check_buffer(buf, rec.nbytes)
        try:
            fd = os.open(rec.path, self._flags(os.O_RDONLY))
        except FileNotFoundError as e:
            raise SwapCorruptError(
                f"swap file {rec.path!r} has disappeared (was it deleted while training ran?)."
            ) from e
        data = buf.numpy()
        chunks = []
        try:
            size = os.fstat(fd).st_size
            if size < rec.nbytes:
                raise SwapCorruptError(
                    f"swap file {rec.path!r} is {size:,} bytes but {rec.nbytes:,} were written: "
                    "it was truncated (disk full, or modified outside fscale); refusing to use it."
                )
            starts = range(0, rec.nbytes, self.chunk_bytes)
            chunks = [
                self._io.submit(_read_chunk, fd, data, a, min(a + self.chunk_bytes, rec.nbytes))
                for a in starts
            ]
            for start, chunk, want in zip(starts, chunks, rec.crcs, strict=True):
                got = chunk.result()
                if got is None:
                    raise SwapCorruptError(
                        f"swap file {rec.path!r}: short read at byte {start:,} of "
                        f"{rec.nbytes:,} (truncated while in use?); refusing to use it."
                    )
                if got != want:
                    end = min(start + self.chunk_bytes, rec.nbytes)
                    raise SwapCorruptError(
                        f"swap file {rec.path!r} is corrupt: bytes {start:,}..{end:,} have "
                        f"CRC-32 {got:#010x}, {want:#010x} was written; refusing to use "
                        "it (modified outside fscale, or a failing disk)."
                    )
        finally:
            for c in chunks:
                c.exception()  # never close the fd under a chunk still reading
            os.close(fd)
        self.bytes_read += rec.nbytes
        self.event("read_end", key)

    # -- lifetime --------------------------------------------------------------------------

    def flush(self) -> None:
        """Wait for every write submitted so far (raises the first failure)."""
        for fut in list(self._pending.values()):
            fut.result()

    def close(self) -> None:
        """Wait for the threads, then remove every swap file. Idempotent."""
        self._finalizer()

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive


def _shutdown(paths: set, pools: tuple) -> None:
    for pool in pools:  # the job threads first: they wait on the chunk threads
        pool.shutdown(wait=True, cancel_futures=True)
    _remove(paths)

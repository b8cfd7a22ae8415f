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
- Threads. ``os.preadv`` / ``os.pwritev`` and zlib-ng's ``crc32`` (on buffers over
  a few KiB; about 3x zlib's speed) release the GIL, so threads move bytes while the
  main thread runs the optimizer. One reader and one writer thread take whole files, in submission
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
- Failed writes. A write that fails (ENOSPC, EIO) removes its temporary and leaves
  the key's previous version in place; its error is raised by its Future and by the
  next ``flush()`` -- once: a later write of the key that succeeds clears it (a
  failure is never re-raised forever). Until then a read of the key raises
  ``SwapError`` naming the failure instead of silently returning the old version.
  Keeping every group's state consistent across a failure is the caller's job
  ([Note: a failed NVMe step] in ``fscale/transforms/_offload/update.py``).
- Temporaries are created with O_CREAT|O_EXCL|O_NOFOLLOW and mode 0600: in a
  shared directory a symlink (or any file) planted at ``<name>.tmp`` makes the write
  fail with ``SwapError`` naming it; it is never followed or truncated.
- Lifetime. ``close()`` removes every file the engine wrote (temporaries
  included); a ``weakref.finalize`` does the same if the engine is garbage
  collected or the interpreter exits without ``close()``. SIGTERM and SIGINT
  are covered by [Note: swap signals]; SIGKILL by the lock ([Note: swap lock]).

[Note: swap lock]
Each rank holds ``fscale-swap-rank{r}.lock`` in the swap directory: created with
O_EXCL|O_NOFOLLOW (0600), holding JSON ``{pid, host, started, prefix}``, and
``flock``-ed for the engine's life (the kernel drops an flock when its process
dies, SIGKILL included, so liveness does not trust a pid that may be reused).
Engines of one process share their rank's lock. At start-up:
- our rank's lock held by a live process (flock taken; or, where the filesystem
  has no flock, its pid alive on this host or another host named) is a refusal
  (``SwapLockedError``) naming its pid, host and start time;
- a lock nobody holds is a dead run's: it is taken over, and every swap file no
  live lock covers -- this rank's of other runs, and any rank's whose lock is free
  or gone -- is REMOVED with a ``RuntimeWarning`` naming the files. Removing, not
  refusing: a dead run's swap files cannot be read by anyone (their checksums
  lived in its memory), they only hold the disk (a killed 3.4B run: ~40 GB), and a
  refusal would make every SIGKILL a manual clean-up.
Whoever unlinks a lock file (its owner closing, a probe removing a dead run's) holds
the flock of the inode the path names at that moment, and a taker re-checks after its
flock that the path still names its inode; so a lock cannot be removed under its owner.

[Note: swap signals]
SIGKILL cannot be caught; SIGTERM (the scheduler's or torchrun's kill) and SIGINT
can. While an engine is open, fscale's handler is installed for both (from the
main thread only; the previous handler is restored when the last engine closes)
and chains: a Python handler that was there before (``KeyboardInterrupt``'s
included) is called as it was -- it may save a checkpoint, which needs the swap
files, and if it ends the process the exit-time finalizers remove them; with the
default action the handler removes every live engine's files and lock, then
re-raises the signal with the default action so the exit status stays "killed by
SIGTERM". It only unlinks (no thread joins: a worker may be waiting for a lock
the interrupted main thread holds); writers see ``closing`` and stop.

Usage::

    engine = SwapEngine("/mnt/nvme", rank=0)
    buf = engine.alloc(1 << 20)
    engine.write("group0", buf).result()       # Future; raises the worker's error
    engine.read("group0", buf).result()        # verified against the write's checksums
    engine.close()                              # files removed
"""

from __future__ import annotations

import errno
import fcntl
import itertools
import json
import mmap
import os
import re
import signal
import socket
import threading
import time
import uuid
import warnings
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch
from zlib_ng.zlib_ng import crc32

ALIGN = 4096
_DEFAULT_CHUNK = 8 * 2**20


class SwapError(RuntimeError):
    """A swap file could not be written or read."""


class SwapCorruptError(SwapError):
    """A swap file is shorter than written or fails its checksum: it is not used."""


class SwapLockedError(SwapError):
    """Another live run holds this rank's lock on the swap directory ([Note: swap lock])."""


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
# keeps alive through ``_base``). cudaHostRegister faults fresh pages in on the
# calling thread alone (2.4 GB/s on an H100 machine's host), so the pages are first
# touched by torch's intra-op threads (``zero_``; the same 8 GiB 4.2x faster, 10.1
# GB/s: bench/results/pin-alloc-nvidia-h100.json): offload's init and the first save
# that keeps its buffers allocate tens of GB this way.
_REGISTER_MIN = 16 * 2**20


def _pinned_exact(nbytes: int) -> torch.Tensor | None:
    """``nbytes`` of host memory page-locked in place, or None where that is unavailable."""
    try:
        cudart = torch.cuda.cudart()
        raw = torch.empty(nbytes, dtype=torch.uint8)
        raw.zero_()  # pages faulted in by every intra-op thread, not by the driver's one
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
    fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
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
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_DIRECT
        fd = os.open(probe, flags, 0o600)
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
    crc = crc32(block)
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
    return crc32(block)


def _unlink(name: str) -> bool:
    try:
        os.unlink(name)
        return True
    except OSError:
        return False


def _remove(paths) -> None:
    for p in list(paths):
        _unlink(p)
        _unlink(p + ".tmp")


def _planted(tmp: str) -> str:
    try:
        what = f"a symlink to {os.readlink(tmp)!r}" if os.path.islink(tmp) else "a file"
    except OSError:
        what = "a file"
    return (
        f"swap temp file {tmp!r} already exists ({what}), but fscale creates it fresh for each "
        "write and removes it after: someone else put it there. Refusing to write through it "
        "(it is never followed). Remove it, and keep swap files in a directory only you can "
        "write to (chmod 700)."
    )


# ----------------------------------------------------------------------------- lock and signals

_HOST = socket.gethostname()
_LOCK_RE = re.compile(r"^fscale-swap-rank(\d+)\.lock$")
_FILE_RE = re.compile(r"^fscale-swap-r(\d+)-(\d+)-([0-9a-f]{8})-.+\.swp(\.tmp)?$")
_OPEN_LOCK = os.O_NOFOLLOW | os.O_CLOEXEC


def lock_name(rank: int) -> str:
    """The name of rank ``rank``'s lock file in a swap directory ([Note: swap lock])."""
    return f"fscale-swap-rank{rank}.lock"


@dataclass
class _HeldLock:
    path: str
    fd: int
    pid: int  # the process holding it (an inherited copy after fork is not held)
    users: int = 1


@dataclass
class _Cleanup:
    """What a signal or the finalizer removes for one engine; holds no engine reference."""

    paths: set
    lock: _HeldLock
    pid: int
    closing: bool = False


_state = threading.RLock()  # re-entrant: a finalizer may run under it (gc)
_held: dict[str, _HeldLock] = {}  # lock path -> this process's lock
_live: dict[int, _Cleanup] = {}  # id -> each open engine's files
_previous: dict[int, object] = {}  # signal -> the handler before ours


def _read_info(fd: int) -> dict:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def _pid_alive(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def _alive_by_pid(info: dict) -> bool:
    """Liveness where the filesystem has no flock: a pid alive on this host, or any other host."""
    if info.get("host", _HOST) != _HOST:
        return True  # cannot tell from here
    return _pid_alive(info.get("pid")) and info.get("pid") != os.getpid()


def _describe(path: str, info: dict) -> str:
    started = info.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if started else "?"
    return f"pid {info.get('pid', '?')} on host {info.get('host', '?')!r} since {when} ({path})"


def _acquire(directory: str, rank: int, prefix: str) -> tuple[_HeldLock, bool]:
    """This rank's lock on ``directory``: (lock, newly taken) ([Note: swap lock])."""
    path = os.path.join(directory, lock_name(rank))
    with _state:
        held = _held.get(path)
        if held is not None and held.pid == os.getpid():
            held.users += 1
            return held, False
    attempts = 50
    for attempt in range(attempts):
        created = True
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | _OPEN_LOCK, 0o600)
        except FileExistsError:
            created = False
            try:
                fd = os.open(path, os.O_RDWR | _OPEN_LOCK)
            except FileNotFoundError:
                continue  # released meanwhile: create it
            except OSError as e:
                raise SwapError(
                    f"swap lock {path!r} cannot be opened ({e}); fscale did not make it (a "
                    "symlink or another user's file). Remove it, and keep swap files in a "
                    "directory only you can write to."
                ) from e
        try:
            info = {} if created else _read_info(fd)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                # Held. By a live run (refuse now), or for a moment by another rank's
                # start-up probing it ([Note: swap lock]; the pid is then a dead run's, or
                # none yet): try again, and refuse if it stays held.
                if attempt + 1 < attempts and (created or not _alive_by_pid(info)):
                    os.close(fd)
                    time.sleep(0.02)
                    continue
                raise SwapLockedError(
                    f"swap directory {directory!r} is in use by another run for rank {rank}: "
                    f"{_describe(path, info)}. Use another directory (or rank), or stop that "
                    "run; if it is dead but a child process of it still runs, end that child."
                ) from None
            except OSError:  # no flock on this filesystem: judge by the pid
                if not created and _alive_by_pid(info):
                    raise SwapLockedError(
                        f"swap directory {directory!r} is in use by another run for rank "
                        f"{rank}: {_describe(path, info)} (this filesystem has no flock, so "
                        "a lock of another host, or of a live pid, counts as live). Use another "
                        "directory, or remove the lock file if that run is gone."
                    ) from None
            try:
                same = os.stat(path, follow_symlinks=False)
            except FileNotFoundError:
                same = None
            mine = os.fstat(fd)
            if same is None or (same.st_dev, same.st_ino) != (mine.st_dev, mine.st_ino):
                os.close(fd)  # removed as stale between our open and flock: start again
                continue
            if not created:  # a dead run's lock, taken over
                try:
                    os.fchmod(fd, 0o600)
                except OSError:
                    pass
            payload = {"pid": os.getpid(), "host": _HOST, "started": time.time(), "prefix": prefix}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(payload).encode(), 0)
        except BaseException:
            try:
                os.close(fd)
            except OSError:
                pass
            raise
        held = _HeldLock(path, fd, os.getpid())
        with _state:
            _held[path] = held
        return held, True
    raise SwapError(f"could not take the swap lock {path!r}: it kept changing; try again.")


def _release(lock: _HeldLock) -> None:
    if lock.pid != os.getpid():
        return  # an inherited copy (fork): the parent's
    with _state:
        lock.users -= 1
        if lock.users > 0:
            return
        if _held.get(lock.path) is lock:
            del _held[lock.path]
    _unlink(lock.path)  # while still flock-ed: no one takes it between
    try:
        os.close(lock.fd)
    except OSError:
        pass


def _probe_lock(path: str, tries: int = 8) -> tuple[bool, dict]:
    """(live, info) of another process's lock; a dead one is removed (under its flock).

    The path is unlinked only while it still names the inode this probe flock-ed. Every
    unlinker of a lock holds the flock of the inode it removes, so the path cannot change
    between that check and the unlink. Without the check, two probes racing on a dead
    run's lock could remove a lock that its new owner had just created and taken: the
    first probe unlinks the dead file, the owner creates and flocks a new one, and the
    second probe, flock-ing the dead inode it opened before, unlinks the path.
    """
    for _ in range(tries):
        try:
            fd = os.open(path, os.O_RDONLY | _OPEN_LOCK)
        except FileNotFoundError:
            return False, {}
        except OSError:
            return True, {}  # not a file fscale made: leave it and what it might cover
        try:
            info = _read_info(fd)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True, info
            except OSError:
                return _alive_by_pid(info), info
            try:
                now = os.stat(path, follow_symlinks=False)
            except FileNotFoundError:
                return False, info  # removed by another probe meanwhile
            mine = os.fstat(fd)
            if (now.st_dev, now.st_ino) == (mine.st_dev, mine.st_ino):
                _unlink(path)  # a starting owner re-checks the inode after its flock
                return False, info
            # The path names a newer lock by now: probe that one.
        finally:
            os.close(fd)
    return True, {}  # it kept changing: someone is starting; leave it


def _remove_stale(directory: str, rank: int) -> list[str]:
    """Remove the swap files (and locks) of dead runs under ``directory`` ([Note: swap lock]).

    Called with this rank's lock just taken: this rank's files of other engines are a
    dead run's; another rank's are when no live lock of their pid covers them.
    """
    with _state:
        own = {os.path.basename(p) for c in _live.values() for p in c.paths}
        ours = {p for p, h in _held.items() if h.pid == os.getpid()}
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    locks: dict[int, tuple[bool, object]] = {}
    for name in names:
        m = _LOCK_RE.match(name)
        path = os.path.join(directory, name)
        if m and int(m.group(1)) != rank and path not in ours:
            live, info = _probe_lock(path)
            locks[int(m.group(1))] = (live, info.get("pid"))  # a dead one is gone now
    removed = []
    for name in names:
        m = _FILE_RE.match(name)
        if m is None or name in own or name.removesuffix(".tmp") in own:
            continue
        r, pid = int(m.group(1)), int(m.group(2))
        if r != rank:
            live, owner = locks.get(r, (False, None))
            if os.path.join(directory, lock_name(r)) in ours or (live and owner == pid):
                continue
        path = os.path.join(directory, name)
        if _unlink(path):
            removed.append(path)
    return removed


def _cleanup_all() -> None:
    """Unlink every open engine's files and locks (a fatal signal; no joins, no locks)."""
    for c in list(_live.values()):
        if c.pid != os.getpid():
            continue
        c.closing = True
        _remove(c.paths)
        _unlink(c.lock.path)


def _on_signal(signum, frame):
    """[Note: swap signals]: chain to a Python handler; on the default action clean, then die."""
    previous = _previous.get(signum, signal.SIG_DFL)
    if callable(previous):
        return previous(signum, frame)
    if previous == signal.SIG_IGN:
        return None
    _cleanup_all()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)
    return None


_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _install_handlers() -> None:
    if threading.current_thread() is not threading.main_thread():
        return  # signal handlers are the main thread's; the lock covers the rest
    for sig in _SIGNALS:
        current = signal.getsignal(sig)
        if current is _on_signal or current is None:
            continue
        try:
            signal.signal(sig, _on_signal)
        except (ValueError, OSError):
            continue
        _previous[sig] = current


def _restore_handlers() -> None:
    if threading.current_thread() is not threading.main_thread():
        return  # ours stays installed; with no engine it only chains
    for sig, previous in list(_previous.items()):
        if signal.getsignal(sig) is _on_signal:
            try:
                signal.signal(sig, previous)
            except (ValueError, OSError, TypeError):
                continue
            del _previous[sig]
        # else: another handler went on top of ours and may chain to it: keep ours working


class SwapEngine:
    """Reads and writes named swap files under ``path`` on two background threads.

    Args:
      path: an existing writable directory (checked). This rank's lock is taken there,
        and dead runs' swap files are removed with a warning ([Note: swap lock]).
      rank: included in every file name, so ranks sharing a disk never collide.
      direct: True forces O_DIRECT (error if the filesystem refuses it), False
        forces buffered I/O, None (default) probes.
      chunk_bytes: I/O and checksum granularity (rounded up to 4096).
      io_threads: chunks in flight at once (the queue depth the drive sees).
      record: keep a log of ``(seq, time, event, key)`` in ``events`` (tests use it
        to check the pipeline's order).

    Raises:
      SwapLockedError: another live run holds this rank's lock on ``path``.
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
        self._failed: dict[str, BaseException] = {}  # key -> why its last write failed
        lock, taken = _acquire(self.path, rank, self.prefix)
        self._cleanup = _Cleanup(self._paths, lock, os.getpid())
        try:
            stale = _remove_stale(self.path, rank) if taken else []
        except BaseException:
            _release(lock)
            raise
        if stale:
            shown = ", ".join(os.path.basename(p) for p in stale[:8])
            more = f" and {len(stale) - 8} more" if len(stale) > 8 else ""
            warnings.warn(
                f"fscale swap: removed {len(stale)} stale file(s) of dead run(s) under "
                f"{self.path!r}: {shown}{more} (a run that was killed, e.g. by SIGKILL; "
                "nothing can read them back).",
                RuntimeWarning,
                stacklevel=2,
            )
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
        with _state:
            _live[id(self._cleanup)] = self._cleanup
            _install_handlers()
        self._finalizer = weakref.finalize(
            self, _shutdown, self._cleanup, (self._reader, self._writer, self._io)
        )

    # -- bookkeeping ---------------------------------------------------------------------

    def event(self, kind: str, key: str) -> None:
        """Append to the event log (no-op unless ``record=True``); thread-safe."""
        if self.events is not None:
            with self._lock:
                self.events.append((next(self._seq), time.perf_counter(), kind, key))

    def file_path(self, key: str) -> str:
        return os.path.join(self.path, f"{self.prefix}-{key}.swp")

    @property
    def lock_path(self) -> str:
        """This rank's lock file ([Note: swap lock])."""
        return self._cleanup.lock.path

    def files(self) -> list[str]:
        """Paths of the swap files written so far (existing ones)."""
        return sorted(p for p in self._paths if os.path.exists(p))

    @staticmethod
    def alloc(nbytes: int, *, pin: bool | None = None) -> torch.Tensor:
        return alloc(nbytes, pin=pin)

    def _flags(self, base: int) -> int:
        return base | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_DIRECT if self.direct else 0)

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

        The buffer must not change until the Future is done. On failure the key keeps
        its previous version, and reads of it raise until a write of it succeeds.
        """
        if self.closed:
            raise SwapError(f"this swap engine (under {self.path!r}) is closed.")
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
        try:
            if self._cleanup.closing:
                raise SwapError(f"swap engine under {self.path!r} is closing; {key!r} not written.")
            # O_EXCL: never open what another user planted at this name ([Note: swap files]).
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
            try:
                fd = os.open(tmp, self._flags(flags), 0o600)
            except FileExistsError as e:
                raise SwapError(_planted(tmp)) from e
            try:
                data = buf.numpy()
                step = self.chunk_bytes
                chunks = []
                try:
                    for a in range(0, nbytes, step):
                        end = min(a + step, nbytes)
                        chunks.append(self._io.submit(_write_chunk, fd, data, a, end))
                    crcs = [c.result() for c in chunks]
                finally:
                    for c in chunks:
                        c.exception()  # never close the fd under a chunk still writing
                    os.close(fd)
                os.replace(tmp, final)
            except BaseException:
                _unlink(tmp)  # ours (O_EXCL): a failed write leaves no temporary
                raise
        except BaseException as e:
            err = e
            if isinstance(e, OSError):
                err = SwapError(f"writing swap file {tmp!r} failed: {e}")
                err.errno = e.errno
            self._failed[key] = err
            if err is e:
                raise
            raise err from e
        self._failed.pop(key, None)
        self._files[key] = _Record(final, nbytes, crcs)
        self.bytes_written += nbytes
        self.event("write_end", key)

    # -- reading ---------------------------------------------------------------------------

    def read(self, key: str, buf: torch.Tensor) -> Future:
        """Read ``key``'s file into ``buf`` and verify it; returns a Future.

        Waits for a write of the same key still in flight first; raises ``SwapError``
        if that write (the key's last) failed.
        """
        if self.closed:
            raise SwapError(f"this swap engine (under {self.path!r}) is closed.")
        self.event("read_submit", key)
        pending = self._pending.get(key)
        return self._reader.submit(self._read, key, buf, pending)

    def _read(self, key: str, buf: torch.Tensor, pending: Future | None) -> None:
        if pending is not None:
            pending.exception()  # wait; its failure is in _failed
        failed = self._failed.get(key)
        if failed is not None:
            raise SwapError(
                f"the last write of swap file {key!r} failed ({failed}); its file holds the "
                "version before it, which is not what was meant to be read. Write it again."
            ) from failed
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
        except OSError as e:  # ELOOP: replaced by a symlink
            raise SwapCorruptError(
                f"swap file {rec.path!r} cannot be opened ({e}); it is not the file fscale "
                "wrote (replaced by a symlink?); refusing to use it."
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

    def rechecksum(self, key: str) -> None:
        """Take ``key``'s file as it is now as written: recompute its checksums.

        For a writer that changes a swap file in place on purpose (``fs.load`` filling
        a fresh state's files from a checkpoint); anything else that changes it is
        still refused at the next read. Waits for a write of the key in flight.
        """
        pending = self._pending.get(key)
        if pending is not None:
            pending.exception()
        rec = self._files.get(key)
        if rec is None or key in self._failed:
            raise SwapError(f"no swap file was written for {key!r} (under {self.path!r}).")
        crcs = []
        with open(rec.path, "rb") as f:
            for start in range(0, rec.nbytes, self.chunk_bytes):
                block = f.read(min(self.chunk_bytes, rec.nbytes - start))
                if len(block) != min(self.chunk_bytes, rec.nbytes - start):
                    raise SwapCorruptError(
                        f"swap file {rec.path!r} is shorter than the {rec.nbytes:,} bytes "
                        "written; refusing to use it."
                    )
                crcs.append(crc32(block))
        rec.crcs = crcs

    # -- lifetime --------------------------------------------------------------------------

    def flush(self) -> None:
        """Wait for every write submitted so far; raise the first failure among them.

        A failure is reported here once: the writes waited for are forgotten, so a
        later flush (after the space was freed, say) does not raise it again.
        """
        first = None
        for key, fut in list(self._pending.items()):
            exc = fut.exception()
            if self._pending.get(key) is fut:
                del self._pending[key]
            if exc is not None and first is None:
                first = exc
        if first is not None:
            raise first

    def close(self) -> None:
        """Wait for the threads, then remove every swap file and the lock. Idempotent."""
        self._finalizer()

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive


def _shutdown(cleanup: _Cleanup, pools: tuple) -> None:
    if cleanup.pid != os.getpid():
        return  # a forked child's copy: the files are the parent's
    cleanup.closing = True
    for pool in pools:  # the job threads first: they wait on the chunk threads
        pool.shutdown(wait=True, cancel_futures=True)
    _remove(cleanup.paths)
    with _state:
        _live.pop(id(cleanup), None)
        last = not _live
    _release(cleanup.lock)
    if last:
        _restore_handlers()

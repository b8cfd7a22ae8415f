"""A write-only file that bypasses the page cache (``O_DIRECT``) through an aligned buffer.

[Note: uncached writes]
A buffered write of a checkpoint costs the host's memory three passes over every byte
beyond reading the source: the copy into fresh page-cache pages (a read for ownership
and the write), then the drive's DMA reading them back at write-out; and the pages
must be found, faulted and later dropped ([Note: early write-out] in ``writer.py``).
An offloaded state's asynchronous save does that to tens of GB while the host
optimizer streams the same memory. With ``O_DIRECT`` the drive reads the process's own
buffer: each write is copied into one small reused buffer (a few MiB: it stays in the
CPU's caches), whole buffers go to the file unbuffered, the source is read once.

``O_DIRECT`` wants the memory address, the file offset and the length of each write
aligned (to the device's logical block; 4 KiB covers every common one). DCP's files are
a run of small zips whose records are not aligned, so nothing is written from the
source in place: every byte goes through the buffer, and only the last partial block
is written without ``O_DIRECT`` (the flag dropped with ``fcntl``), at ``sync``/``close``.
The large copies into the buffer are one ``memmove`` each in the writing thread, the
GIL released (the training thread of an asynchronous save keeps running). Where
``O_DIRECT`` is refused (tmpfs, some network file systems: ``EINVAL`` at open or at a
write) the same buffer feeds plain buffered writes: the same bytes.

Usage::

    with UncachedFile.open(path) as f:   # a raw binary stream: write, tell, flush, fileno
        f.write(b"...")
        f.sync()                         # everything on the disk (fsync), tail included
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import mmap
import os
import warnings
from collections.abc import Iterator

import torch

__all__ = ["ALIGN", "DEFAULT_BUFFER", "UncachedFile"]

ALIGN = 4096  # bytes: address, offset and length of every O_DIRECT write
#: Bytes of the reused aligned buffer when the caller names none (``SaveIO.direct_buffer``).
DEFAULT_BUFFER = 8 << 20
_SMALL = 1 << 16  # writes below this are copied by memoryview (no ctypes call)


class UncachedFile:
    """``O_DIRECT`` writes of a new file through a ``buffer``-byte aligned buffer
    ([Note: uncached writes]). ``direct`` tells whether the page cache is bypassed."""

    def __init__(self, fd: int, buffer: int):
        if buffer <= 0 or buffer % ALIGN:
            raise ValueError(f"UncachedFile(buffer={buffer}): a positive multiple of {ALIGN}.")
        self.fd = fd
        self.direct = bool(fcntl.fcntl(fd, fcntl.F_GETFL) & getattr(os, "O_DIRECT", 0))
        self._map = mmap.mmap(-1, buffer)  # page-aligned, so O_DIRECT accepts its address
        self._view = memoryview(self._map)
        self._tensor = torch.frombuffer(self._map, dtype=torch.uint8)  # holds the mapping
        self._base = self._tensor.data_ptr()
        self._fill = 0  # bytes in the buffer, not yet in the file
        self._size = 0  # bytes written by the caller
        self._failed = False  # a write raised: close writes nothing more
        self.closed = False

    @classmethod
    @contextlib.contextmanager
    def open(cls, path, buffer: int = DEFAULT_BUFFER) -> Iterator[UncachedFile]:
        """Create (or truncate) ``path`` for writing, ``O_DIRECT`` where allowed."""
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
        try:
            fd = os.open(path, flags | getattr(os, "O_DIRECT", 0), 0o644)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            fd = os.open(path, flags, 0o644)  # the file system refuses O_DIRECT
        f = cls(fd, buffer)
        try:
            yield f
        finally:
            f.close()

    # -- the raw stream DCP and torch.save write to

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def fileno(self) -> int:
        return self.fd

    def tell(self) -> int:
        return self._size

    def write(self, b) -> int:
        src = memoryview(b).cast("B")
        n, done = src.nbytes, 0
        cap = len(self._map)
        while done < n:
            k = min(n - done, cap - self._fill)
            self._copy(src[done : done + k], self._fill)
            self._fill += k
            done += k
            if self._fill == cap:
                self._drain(cap)
        self._size += n
        return n

    def flush(self) -> None:
        """Nothing: bytes short of a whole buffer wait for ``sync`` or ``close`` (a flush
        of a buffered file does not reach the disk either)."""

    def sync(self) -> None:
        """Write what the buffer holds and ``fsync``: every byte written is on the disk."""
        self._finish()
        os.fsync(self.fd)

    def close(self) -> None:
        if self.closed:
            return
        try:
            if not self._failed:  # after a failed write the file is abandoned
                self._finish()
        finally:
            self.closed = True
            os.close(self.fd)
            del self._tensor
            try:
                self._view.release()
                self._map.close()
            except BufferError:  # a failed write's traceback still holds a slice: the
                pass  # mapping goes when that does

    # -- internals

    def _copy(self, src: memoryview, at: int) -> None:
        if src.nbytes < _SMALL:
            self._view[at : at + src.nbytes] = src
            return
        # One memmove in this thread, the GIL released (a ctypes call): not torch's
        # copy, which would spread it over the intra-op threads the host optimizer uses.
        with warnings.catch_warnings():  # a read-only source is only read
            warnings.simplefilter("ignore", UserWarning)
            source = torch.frombuffer(src, dtype=torch.uint8)
        ctypes.memmove(self._base + at, source.data_ptr(), src.nbytes)

    def _finish(self) -> None:
        """The buffer's whole blocks unbuffered, its last partial block buffered (O_DIRECT
        dropped from here on: the file is at its end)."""
        whole = self._fill // ALIGN * ALIGN
        self._drain(whole)
        if self._fill:  # the tail: shorter than a block
            self._buffered()
            self._drain(self._fill)

    def _buffered(self) -> None:
        if self.direct:
            flags = fcntl.fcntl(self.fd, fcntl.F_GETFL)
            fcntl.fcntl(self.fd, fcntl.F_SETFL, flags & ~os.O_DIRECT)
            self.direct = False

    def _drain(self, n: int) -> None:
        """Write the buffer's first ``n`` bytes (a multiple of ``ALIGN`` while direct) and
        keep the rest at its front."""
        if not n:
            return
        done = 0
        while done < n:
            try:
                done += os.write(self.fd, self._view[done:n])
            except OSError as e:  # a device whose blocks O_DIRECT will not take this way
                if e.errno != errno.EINVAL or not self.direct:
                    self._failed = True
                    raise
                self._buffered()
        rest = self._fill - n
        if rest:
            self._view[:rest] = self._view[n : self._fill]
        self._fill = rest

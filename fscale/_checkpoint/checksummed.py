"""DCP's file system with the CRC-32s of every data file taken as it is written.

[Note: checksums while writing]
The record of [Note: data-file checksums] (``files.py``) used to be taken by reading
every data file back after it was fsynced: a second pass over the whole checkpoint
(on a 2-core box, more time than the write itself). ``ChecksummingFileSystem`` hands
DCP's writer threads a stream that folds each buffer into a running CRC-32 on its way
to the file (zlib-ng's ``crc32``, which drops the GIL, so writer threads still run in
parallel), and keeps ``{file name: (pieces, size)}`` when the stream closes,
``pieces`` a list of ``(offset, length, crc32)`` that tile the file: a writer that
calls ``mark()`` before each item (fscale's loop does) gets one piece per item, so that
``load`` verifies each item's bytes as it reads them ([Note: data-file checksums] in
``files.py``); else the file is one piece.

[Note: the CRC torch already took]
An item is a ``torch.save`` of one tensor, and torch's zip writer has already read
every byte of the tensor once to take its CRC-32, which it writes in the record's
data descriptor right after the data. Summing the data again doubled the writer's
CPU work per byte (an offloaded state's save competes for the host's cores and
memory bandwidth with the host optimizer). So the stream recognises the record as
torch writes it -- one write of a 30-byte local header with bit 3 set (sizes and
CRC in a data descriptor), writes of exactly its name and extra field, one of the data
-- and does not sum a large data write; when the next write is the descriptor
(``PK\x07\x08``, CRC-32 and sizes, zip64 or not) and its size equals the data's,
its CRC is combined into the running one (``crc32_combine``: the same value as
summing the data); a CRC of 0 (torch told not to take them) is not trusted.
Anything else next (another write, ``tell``, ``flush``, ``mark``, ``close``) sums
the data then, while torch still holds it: the result is the same CRC either way,
and a corrupt descriptor can only make ``load`` refuse the item, never accept a
wrong one.

[Note: summing while the bytes are in cache]
Where torch is told not to take CRCs (``SaveIO(torch_crc=False)``) a stream made with
``inline=True`` sums a record's data as it writes it, a MiB at a time: each piece is
summed, then written, while it is still in the CPU's caches. Summed after the whole
write (as above), a record of hundreds of MB was read from memory twice, once by the
copy into the page cache or ``UncachedFile``'s buffer and once by the CRC; beside a
host optimizer that streams the same memory, each pass slows its steps.

Usage::

    fs_ = ChecksummingFileSystem()
    writer = dcp.FileSystemWriter(path, ...); writer.fs = fs_
    ...                                 # dcp.save(..., storage_writer=writer)
    fs_.sums["__0_0.distcp"]            # -> ([(offset, length, crc32), ...], size)
"""

from __future__ import annotations

import contextlib
import io
import os
import struct
import threading
from collections.abc import Iterator

from torch.distributed.checkpoint.filesystem import FileSystem
from zlib_ng.zlib_ng import crc32, crc32_combine

from fscale._checkpoint.crc_write import PIECE, crc_write
from fscale._checkpoint.uncached import DEFAULT_BUFFER, UncachedFile

__all__ = ["ChecksummingFileSystem", "crc32"]

_LOCAL_HEADER = b"PK\x03\x04"
_DESCRIPTOR = b"PK\x07\x08"
_DEFER = 1 << 16  # data writes at least this large use torch's CRC


class _SummingStream:
    """A binary write stream that CRCs what passes through it (DCP needs write, tell,
    flush, fileno and close of it); ``inline``: sums a record's data piece by piece as
    it writes it ([Note: summing while the bytes are in cache])."""

    def __init__(self, raw, inline: bool = False):
        self.raw = raw
        self.inline = inline
        self.crc = 0  # of the bytes since the last mark
        self.size = 0
        self.start = 0  # where the current piece began
        self.pieces: list[tuple[int, int, int]] = []
        # [Note: the CRC torch already took]: the bytes of a local header's name and
        # extra field still to come, then whether the next write is a record's data.
        self._header_left = 0
        self._at_data = False
        self._pending = None  # (data view, CRC before it): data not yet summed

    def mark(self) -> None:
        """End the current piece here (a new item starts)."""
        self._settle()
        if self.size > self.start:
            self.pieces.append((self.start, self.size - self.start, self.crc))
        self.crc, self.start = 0, self.size

    def _settle(self, descriptor: memoryview | None = None) -> None:
        """Fold the pending data's CRC in: the descriptor's when it is the record's,
        else summed now."""
        if self._pending is None:
            return
        view, before = self._pending
        self._pending = None
        n = view.nbytes
        got = _descriptor_crc(descriptor, n) if descriptor is not None else None
        data_crc = crc32(view) if got is None else got
        self.crc = crc32_combine(before, data_crc, n)

    def write(self, b) -> int:
        view = memoryview(b).cast("B")
        n = view.nbytes
        self._settle(view if view[:4] == _DESCRIPTOR else None)
        if self._at_data and n >= _DEFER and self.inline:
            self._track(view)
            crc = None
            if isinstance(self.raw, (io.BufferedWriter, io.FileIO)):
                # [Note: one GIL release per record] (crc_write.py): the raw file's
                # buffer flushed, its descriptor takes the bytes where it stands.
                self.raw.flush()
                crc = crc_write(self.raw.fileno(), view, self.crc)
            if crc is None:  # no C loop here, or a stream of another kind
                crc = self.crc
                for at in range(0, n, PIECE):
                    piece = view[at : at + PIECE]
                    crc = crc32(piece, crc)
                    self._write_all(piece)
            self.crc = crc
            self.size += n
            return n
        if self._at_data and n >= _DEFER:
            self._pending = (view, self.crc)
        else:
            self.crc = crc32(view, self.crc)
        self._track(view)
        self.size += n
        return self.raw.write(view)

    def _write_all(self, view: memoryview) -> None:
        """``view`` into the raw stream (a raw file may take part of a write)."""
        while view.nbytes:
            view = view[self.raw.write(view) :]

    def _track(self, view: memoryview) -> None:
        """Follow torch's writes of a local header, then its name and extra field (in
        one or more writes): the write after them is the record's data."""
        self._at_data = False
        if self._header_left:
            if view.nbytes > self._header_left:
                self._header_left = 0  # not torch's record: sum everything
                return
            self._header_left -= view.nbytes
            self._at_data = not self._header_left
            return
        if view.nbytes == 30 and view[:4] == _LOCAL_HEADER:
            flags = struct.unpack_from("<H", view, 6)[0]
            if flags & 0x8:  # sizes and CRC in a data descriptor after the data
                name, extra = struct.unpack_from("<HH", view, 26)
                self._header_left = name + extra
                self._at_data = not self._header_left

    def tell(self) -> int:
        self._settle()
        return self.raw.tell()

    def flush(self) -> None:
        self._settle()
        self.raw.flush()

    def fileno(self) -> int:
        return self.raw.fileno()

    def sync(self) -> None:
        """Every byte written on the disk: the raw stream's own ``sync`` where it has one
        (an ``UncachedFile`` still holds its tail), else flush and ``fsync``."""
        self._settle()
        sync = getattr(self.raw, "sync", None)
        if sync is not None:
            sync()
        else:
            self.raw.flush()
            os.fsync(self.raw.fileno())

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False  # a seek would make the running CRC wrong

    def close(self) -> None:
        self._settle()
        self.raw.close()

    @property
    def closed(self) -> bool:
        return self.raw.closed


def _descriptor_crc(view: memoryview, n: int) -> int | None:
    """The CRC-32 a data descriptor gives for a record of ``n`` bytes, or None when it
    is not one for ``n`` bytes (zip64: 8-byte sizes)."""
    if view.nbytes == 16:
        crc, comp, size = struct.unpack_from("<III", view, 4)
    elif view.nbytes == 24:
        crc, comp, size = struct.unpack_from("<IQQ", view, 4)
    else:
        return None
    # 0 is what torch writes when told not to take CRCs (``set_crc32_options(False)``):
    # the data is summed then (a real CRC of 0 too, once in 2**32 items).
    return crc if comp == size == n and crc else None


class ChecksummingFileSystem(FileSystem):
    """DCP's local file system; files opened for writing are summed
    ([Note: checksums while writing])."""

    def __init__(self):
        super().__init__()
        self.sums: dict[str, tuple[list, int]] = {}
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def create_stream(
        self,
        path,
        mode: str,
        *,
        direct: bool = False,
        buffer: int = DEFAULT_BUFFER,
        inline: bool = False,
    ) -> Iterator:
        """DCP's stream of ``path``; for writing, summed, and with ``direct`` written
        past the page cache through a ``buffer``-byte buffer ([Note: uncached writes] in
        ``uncached.py``: then only ``sync()`` makes it durable, not ``fsync`` of its
        descriptor); ``inline``: for records torch takes no CRC of ([Note: summing while
        the bytes are in cache])."""
        if mode != "wb":
            with super().create_stream(path, mode) as stream:
                yield stream
            return
        opened = UncachedFile.open(path, buffer) if direct else super().create_stream(path, mode)
        with opened as raw:
            stream = _SummingStream(raw, inline)
            yield stream
        stream.mark()
        with self._lock:
            self.sums[os.path.basename(os.fspath(path))] = (stream.pieces, stream.size)

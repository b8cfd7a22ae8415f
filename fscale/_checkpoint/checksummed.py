"""DCP's file system with the CRC-32s of every data file taken as it is written.

[Note: checksums while writing]
The record of [Note: data-file checksums] (``files.py``) used to be taken by reading
every data file back after it was fsynced: a second pass over the whole checkpoint
(on a 2-core box, more time than the write itself). ``ChecksummingFileSystem`` hands
DCP's writer threads a stream that folds each buffer into a running CRC-32 on its way
to the file (``zlib.crc32`` drops the GIL on large buffers, so writer threads still
run in parallel), and keeps ``{file name: (pieces, size)}`` when the stream closes,
``pieces`` a list of ``(offset, length, crc32)`` that tile the file: a writer that
calls ``mark()`` before each item (fscale's loop does) gets one piece per item, so that
``load`` verifies each item's bytes as it reads them ([Note: data-file checksums] in
``files.py``); else the file is one piece.

Usage::

    fs_ = ChecksummingFileSystem()
    writer = dcp.FileSystemWriter(path, ...); writer.fs = fs_
    ...                                 # dcp.save(..., storage_writer=writer)
    fs_.sums["__0_0.distcp"]            # -> ([(offset, length, crc32), ...], size)
"""

from __future__ import annotations

import contextlib
import os
import threading
import zlib
from collections.abc import Iterator

from torch.distributed.checkpoint.filesystem import FileSystem


class _SummingStream:
    """A binary write stream that CRCs what passes through it (DCP needs write, tell,
    flush, fileno and close of it)."""

    def __init__(self, raw):
        self.raw = raw
        self.crc = 0  # of the bytes since the last mark
        self.size = 0
        self.start = 0  # where the current piece began
        self.pieces: list[tuple[int, int, int]] = []

    def mark(self) -> None:
        """End the current piece here (a new item starts)."""
        if self.size > self.start:
            self.pieces.append((self.start, self.size - self.start, self.crc))
        self.crc, self.start = 0, self.size

    def write(self, b) -> int:
        view = memoryview(b).cast("B")
        self.crc = zlib.crc32(view, self.crc)
        self.size += view.nbytes
        return self.raw.write(view)

    def tell(self) -> int:
        return self.raw.tell()

    def flush(self) -> None:
        self.raw.flush()

    def fileno(self) -> int:
        return self.raw.fileno()

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False  # a seek would make the running CRC wrong

    def close(self) -> None:
        self.raw.close()

    @property
    def closed(self) -> bool:
        return self.raw.closed


class ChecksummingFileSystem(FileSystem):
    """DCP's local file system; files opened for writing are summed
    ([Note: checksums while writing])."""

    def __init__(self):
        super().__init__()
        self.sums: dict[str, tuple[list, int]] = {}
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def create_stream(self, path, mode: str) -> Iterator:
        if mode != "wb":
            with super().create_stream(path, mode) as stream:
                yield stream
            return
        with super().create_stream(path, mode) as raw:
            stream = _SummingStream(raw)
            yield stream
        stream.mark()
        with self._lock:
            self.sums[os.path.basename(os.fspath(path))] = (stream.pieces, stream.size)

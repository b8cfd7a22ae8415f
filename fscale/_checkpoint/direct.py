"""Reading one checkpoint item straight into the buffer it is copied from.

[Note: a tensor item read in place]
An item of a DCP data file is a ``torch.save`` of one tensor: a small zip whose one
storage record holds the tensor's bytes, stored (uncompressed, 64-byte aligned).
``torch.load`` of it from memory copies those bytes into a new storage, holding the
GIL (its reader calls back into Python), so eight reader threads took turns: a
1.4B state loaded at 0.45x ``dd``'s read on one H200. Here the item is read
(``preadv``) into a host buffer -- pinned when the target is on a device -- its
CRC-32 checked there, the storage record found from the zip's directory (a few
hundred bytes parsed by ``zipfile``), and the tensor is a view of the buffer: one
copy from the page cache, then the device copy. An item that is not that (several
storages, another byte order, a size that disagrees with the index) is read with
``torch.load``, as DCP does.

Usage::

    host = read_item(fd, offset, length, pinned=True)   # uint8 host tensor
    tensor = tensor_view(host, shape, dtype)            # None: use torch.load
"""

from __future__ import annotations

import ctypes
import io
import os
import re
import struct
import sys
import zipfile

import torch

__all__ = ["as_buffer", "read_item", "tensor_view"]

_STORAGE = re.compile(r"[^/]+/data/\d+")
_LOCAL_HEADER = 30  # bytes of a zip local file header before its name and extra field


def read_item(fd: int, offset: int, length: int, *, pinned: bool) -> torch.Tensor:
    """``length`` bytes of ``fd`` at ``offset`` in a fresh uint8 host tensor."""
    out = torch.empty(length, dtype=torch.uint8, pin_memory=pinned)
    view = as_buffer(out)
    got = 0
    while got < length:
        n = os.preadv(fd, [view[got:]], offset + got)
        if n <= 0:
            raise OSError(f"short read: {got} of {length} bytes at offset {offset}")
        got += n
    return out


def as_buffer(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous uint8 host tensor, without a copy."""
    return memoryview((ctypes.c_ubyte * t.numel()).from_address(t.data_ptr())).cast("B")


class _Bytes(io.RawIOBase):
    """A read-only, seekable file over a memoryview (``zipfile`` reads only the
    directory and headers through it: no copy of the data)."""

    def __init__(self, data: memoryview):
        self.data, self.pos = data, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = min(len(b), len(self.data) - self.pos)
        b[:n] = self.data[self.pos : self.pos + n]
        self.pos += n
        return n

    def seek(self, offset: int, whence: int = 0) -> int:
        base = (0, self.pos, len(self.data))[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def tell(self) -> int:
        return self.pos


def tensor_view(blob: torch.Tensor, shape, dtype: torch.dtype) -> torch.Tensor | None:
    """The tensor a ``torch.save`` blob (a uint8 host tensor) holds, as a view of it, or
    None when it is not one little-endian storage of exactly ``shape`` x ``dtype``."""
    if sys.byteorder != "little":
        return None
    data = as_buffer(blob)
    try:
        archive = zipfile.ZipFile(_Bytes(data))
        names = archive.namelist()
        storages = [i for i in archive.infolist() if _STORAGE.fullmatch(i.filename)]
        order = [n for n in names if n.endswith("/byteorder")]
        if order and archive.read(order[0]) != b"little":
            return None
    except (zipfile.BadZipFile, OSError, ValueError):
        return None
    nbytes = dtype.itemsize
    for s in shape:
        nbytes *= s
    if len(storages) != 1 or storages[0].compress_type != zipfile.ZIP_STORED:
        return None
    info = storages[0]
    if info.file_size != nbytes:
        return None
    name_len, extra_len = struct.unpack_from("<HH", data, info.header_offset + 26)
    start = info.header_offset + _LOCAL_HEADER + name_len + extra_len
    if start + nbytes > blob.numel():
        return None
    return blob[start : start + nbytes].view(dtype).view(tuple(shape))

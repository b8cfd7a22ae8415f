"""[Note: uncached writes] (``fscale/_checkpoint/uncached.py``): ``O_DIRECT`` writes through
an aligned buffer give the file exactly the bytes written, past the page cache, durable at
``sync``; refused ``O_DIRECT`` falls back to buffered writes; ``SaveIO(direct=True)``
saves DCP's files byte for byte."""

from __future__ import annotations

import ctypes
import errno
import mmap
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fscale as fs
from fscale._checkpoint import uncached
from fscale._checkpoint.uncached import ALIGN, UncachedFile
from fscale._checkpoint.writer import SaveIO
from tests.test_checkpoint import _build, _close
from tests.test_checkpoint_writer import OLD, _files, _index, _state


def _direct_here(where) -> bool:
    """Whether the file system under ``where`` takes O_DIRECT (tmpfs does not)."""
    try:
        fd = os.open(os.path.join(where, ".probe"), os.O_WRONLY | os.O_CREAT | os.O_DIRECT)
    except OSError:
        return False
    os.close(fd)
    os.unlink(os.path.join(where, ".probe"))
    return True


def _resident_pages(path) -> int:
    """Pages of ``path`` in the page cache (mincore(2) over a mapping of the file)."""
    size = os.path.getsize(path)
    pages = -(-size // mmap.PAGESIZE)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int]
    libc.mmap.argtypes += [ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        vec = ctypes.create_string_buffer(pages)
        assert libc.mincore(addr, size, vec) == 0, ctypes.get_errno()
        libc.munmap(addr, size)
    finally:
        os.close(fd)
    return sum(b & 1 for b in vec.raw)


_writes = st.lists(
    st.one_of(st.integers(0, 300), st.integers(ALIGN - 2, ALIGN + 2), st.integers(1, 70_000)),
    min_size=1,
    max_size=12,
)


_FIXTURE_OK = [HealthCheck.function_scoped_fixture]


@settings(max_examples=40, deadline=None, suppress_health_check=_FIXTURE_OK)
@given(sizes=_writes, buffer_blocks=st.integers(1, 4), sync_at=st.integers(0, 12))
def test_the_file_holds_exactly_the_bytes_written(tmp_path, sizes, buffer_blocks, sync_at):
    # Writes of any size across buffer boundaries (and the >= 64 KiB copies through
    # torch), a sync in the middle (O_DIRECT dropped from there on), tell after each.
    path = tmp_path / "f"
    chunks = [os.urandom(n) for n in sizes]
    with UncachedFile.open(path, buffer=buffer_blocks * ALIGN) as f:
        assert f.direct == _direct_here(tmp_path)
        for k, chunk in enumerate(chunks):
            if k == sync_at:
                f.sync()
            assert f.write(memoryview(chunk)) == len(chunk)
            assert f.tell() == sum(map(len, chunks[: k + 1]))
    assert path.read_bytes() == b"".join(chunks)


def test_direct_writes_leave_the_page_cache_alone_and_sync_includes_the_tail(tmp_path):
    if not _direct_here(tmp_path):
        pytest.skip("O_DIRECT refused by this file system")
    data = os.urandom((8 << 20) + 123)  # 2048 pages and a tail
    direct, buffered = tmp_path / "direct", tmp_path / "buffered"
    with UncachedFile.open(direct, buffer=1 << 20) as f:
        f.write(data)
        f.sync()
        assert os.fstat(f.fileno()).st_size == len(data)  # the tail went out before fsync
    with open(buffered, "wb") as f:
        f.write(data)
    # Before reading it back: the direct file has at most its tail's page cached.
    assert _resident_pages(direct) <= 1
    # The check can fail: the same bytes written buffered stay cached.
    assert _resident_pages(buffered) > 1000
    assert direct.read_bytes() == data


def test_a_file_system_that_refuses_o_direct_gets_buffered_writes(tmp_path, monkeypatch):
    real_open = os.open

    def refusing(path, flags, *a):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *a)

    monkeypatch.setattr(uncached.os, "open", refusing)
    data = os.urandom(3 * ALIGN + 5)
    with UncachedFile.open(tmp_path / "f", buffer=ALIGN) as f:
        assert not f.direct
        f.write(data)
    assert (tmp_path / "f").read_bytes() == data


def test_a_write_refused_while_direct_goes_on_buffered(tmp_path, monkeypatch):
    if not _direct_here(tmp_path):
        pytest.skip("O_DIRECT refused by this file system")
    real_write, calls = os.write, []

    def once_refused(fd, buf):
        calls.append(len(buf))
        if len(calls) == 2:  # a device with larger blocks than ALIGN, say
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, buf)

    monkeypatch.setattr(uncached.os, "write", once_refused)
    data = os.urandom(5 * ALIGN + 17)
    with UncachedFile.open(tmp_path / "f", buffer=ALIGN) as f:
        f.write(data)
        assert not f.direct and len(calls) > 2
    assert (tmp_path / "f").read_bytes() == data


def test_a_full_disk_is_raised_and_the_descriptor_closed(tmp_path, monkeypatch):
    def full(fd, buf):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(uncached.os, "write", full)
    opened = []
    with pytest.raises(OSError, match="No space left"):
        with UncachedFile.open(tmp_path / "f", buffer=ALIGN) as f:
            opened.append(f)
            f.write(os.urandom(3 * ALIGN))
    assert opened[0].closed
    with pytest.raises(OSError):
        os.fstat(opened[0].fd)


@pytest.mark.parametrize("name", ["plain", "offload nvme"])
def test_save_direct_writes_dcps_files_and_loads(tmp_path, monkeypatch, name):
    step, params, state = _state(name, tmp_path)
    fs.save(tmp_path / "old", params, state, threads=3, io=OLD)
    opened, real_open = [], UncachedFile.open.__func__

    def spying(cls, path, buffer):
        opened.append((os.path.basename(path), buffer))
        return real_open(cls, path, buffer)

    monkeypatch.setattr(UncachedFile, "open", classmethod(spying))
    fs.save(tmp_path / "new", params, state, threads=3, io=SaveIO(direct=True))
    # a buffer of one block: every write of the record's data drains it
    io = SaveIO(direct=True, direct_buffer=4096, torch_crc=False)
    handle = fs.save(tmp_path / "async", params, state, threads=3, async_save=True, io=io)
    handle.wait()
    # Only the data files go through it: one per writer thread of each save.
    names = [f"__0_{i}.distcp" for i in range(3)]
    assert sorted(opened) == sorted([(n, 8 << 20) for n in names] + [(n, 4096) for n in names])
    old, new = _files(tmp_path / "old"), _files(tmp_path / "new")
    assert sorted(old) == sorted(new) and [n for n in new if n.endswith(".distcp")]
    assert all(old[n] == new[n] for n in old)
    assert _index(tmp_path / "old") == _index(tmp_path / "new")
    if name == "plain":
        fresh, full = _build(())
        for where in ("new", "async"):
            loaded, _ = fs.load(tmp_path / where, fresh, full)
            assert all(torch.equal(loaded[k], params[k]) for k in params)
    _close(state)


def test_direct_needs_fscales_writer_loop():
    with pytest.raises(ValueError, match="direct=True, pinned=0.*pinned > 0"):
        SaveIO(direct=True, pinned=0)
    with pytest.raises(ValueError, match="direct"):
        SaveIO(direct=1)
    for bad in (0, 1000, True, 4096.0):
        with pytest.raises(ValueError, match="direct_buffer=.*multiple of 4096"):
            SaveIO(direct=True, direct_buffer=bad)

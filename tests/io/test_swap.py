"""The swap engine: round trips, checksums, truncation, path checks, cleanup."""

from __future__ import annotations

import errno
import gc
import os

import pytest
import torch

from fscale.io import ALIGN, SwapCorruptError, SwapEngine, SwapError, alloc, check_path, swap


def _filled(engine, nbytes, seed=0):
    g = torch.Generator().manual_seed(seed)
    buf = engine.alloc(nbytes)
    buf.copy_(torch.randint(0, 256, (buf.numel(),), dtype=torch.uint8, generator=g))
    return buf


@pytest.mark.parametrize("direct", [None, False])
def test_round_trip_and_files_removed_at_close(tmp_path, direct):
    engine = SwapEngine(tmp_path, rank=3, direct=direct, chunk_bytes=ALIGN, record=True)
    a = _filled(engine, 5 * ALIGN + 7)
    assert a.data_ptr() % ALIGN == 0 and a.numel() % ALIGN == 0
    engine.write("a", a).result()
    out = engine.alloc(a.numel())
    engine.read("a", out).result()
    assert torch.equal(out, a)
    [path] = engine.files()
    assert "-r3-" in os.path.basename(path)  # ranks sharing a drive never collide
    assert not any(p.endswith(".tmp") for p in os.listdir(tmp_path))  # renamed into place
    kinds = [e[2] for e in engine.events]
    assert kinds.index("write_end") < kinds.index("read_start")
    engine.close()
    engine.close()  # idempotent
    assert os.listdir(tmp_path) == []


def test_rewrite_replaces_and_read_waits_for_pending_write(tmp_path):
    engine = SwapEngine(tmp_path)
    a, b = _filled(engine, 4 * ALIGN, 1), _filled(engine, 4 * ALIGN, 2)
    engine.write("k", a).result()
    engine.write("k", b)  # not waited: the read must see b
    out = engine.alloc(b.numel())
    engine.read("k", out).result()
    assert torch.equal(out, b)
    engine.close()


def test_files_removed_when_engine_is_collected(tmp_path):
    engine = SwapEngine(tmp_path)
    engine.write("x", _filled(engine, ALIGN)).result()
    assert len(os.listdir(tmp_path)) == 1
    del engine
    gc.collect()
    assert os.listdir(tmp_path) == []


def test_corrupted_file_is_refused(tmp_path):
    engine = SwapEngine(tmp_path, chunk_bytes=ALIGN)
    engine.write("g", _filled(engine, 3 * ALIGN)).result()
    [path] = engine.files()
    with open(path, "r+b") as f:
        f.seek(2 * ALIGN + 10)
        byte = f.read(1)
        f.seek(2 * ALIGN + 10)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(SwapCorruptError, match=r"corrupt.*CRC-32"):
        engine.read("g", engine.alloc(3 * ALIGN)).result()
    engine.close()


def test_truncated_and_missing_files_are_refused(tmp_path):
    engine = SwapEngine(tmp_path)
    engine.write("g", _filled(engine, 3 * ALIGN)).result()
    [path] = engine.files()
    os.truncate(path, ALIGN)
    with pytest.raises(SwapCorruptError, match="truncated"):
        engine.read("g", engine.alloc(3 * ALIGN)).result()
    os.unlink(path)
    with pytest.raises(SwapCorruptError, match="disappeared"):
        engine.read("g", engine.alloc(3 * ALIGN)).result()
    with pytest.raises(SwapError, match="no swap file"):
        engine.read("never", engine.alloc(ALIGN)).result()
    engine.close()


def test_buffers_must_be_aligned_for_direct_io(tmp_path):
    engine = SwapEngine(tmp_path)
    with pytest.raises(ValueError, match="multiple of 4096"):
        engine.write("g", engine.alloc(2 * ALIGN), nbytes=100)
    if engine.direct:
        misaligned = alloc(2 * ALIGN)[64 : 64 + ALIGN]
        with pytest.raises(ValueError, match="aligned"):
            engine.write("g", misaligned)
    engine.close()


def test_check_path_errors(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="needs path"):
        check_path(None)
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope.*does not exist"):
        check_path(missing)
    regular = tmp_path / "file"
    regular.write_text("x")
    with pytest.raises(NotADirectoryError, match="not a directory"):
        check_path(regular)
    with pytest.raises(FileNotFoundError):  # a path under a regular file cannot exist
        check_path(regular / "sub")
    assert check_path(tmp_path, 1) == str(tmp_path)

    real_access = os.access

    # Tests may run as root, which ignores permission bits: fake the answer instead.
    def no_write(p, mode):
        return False if str(p) == str(tmp_path) else real_access(p, mode)

    monkeypatch.setattr(os, "access", no_write)
    with pytest.raises(PermissionError, match="not writable"):
        check_path(tmp_path)
    monkeypatch.setattr(os, "access", real_access)

    class _Full:
        f_bavail, f_frsize = 10, 4096

    monkeypatch.setattr(os, "statvfs", lambda p: _Full())
    with pytest.raises(OSError, match=r"40,960 bytes\) free.*1,000,000 bytes") as info:
        check_path(tmp_path, 1_000_000)
    assert info.value.errno == errno.ENOSPC and str(tmp_path) in str(info.value)


def test_alloc_many_cuts_exact_size_runs_of_at_most_arena_bytes(monkeypatch):
    """Buffers are aligned and disjoint, in runs of <= ARENA_BYTES each allocated exactly."""
    monkeypatch.setattr(swap, "ARENA_BYTES", 64 * 1024)
    sizes = [5000, 4096, 20000, 30000, 70000, 1, 40000, 30000]
    bufs = swap.alloc_many(sizes)
    assert [b.numel() for b in bufs] == [swap.align_up(s) for s in sizes]
    assert all(b.data_ptr() % swap.ALIGN == 0 for b in bufs)
    spans = sorted((b.data_ptr(), b.data_ptr() + b.numel()) for b in bufs)
    assert all(end <= nxt for (_, end), (nxt, _) in zip(spans, spans[1:], strict=False))
    # Runs: 8+4+20+32 KiB | 72 KiB (alone, larger than an arena) | 4+40 KiB | 32 KiB;
    # each allocation is its run plus the ALIGN bytes alloc adds to align it.
    storages = {b.untyped_storage().data_ptr(): b.untyped_storage().nbytes() for b in bufs}
    kib = 1024
    assert sorted(storages.values()) == sorted(
        n + swap.ALIGN for n in (64 * kib, 72 * kib, 44 * kib, 32 * kib)
    )
    for i, b in enumerate(bufs):  # writable, independent
        b.fill_(i)
    assert all(int(b[0]) == i and int(b[-1]) == i for i, b in enumerate(bufs))


def test_map_file_is_an_unlinked_reserved_shared_mapping(tmp_path):
    """[Note: memory-mapped param shards]: aligned, writable, nothing left under the path,
    and the bytes are the file's (a second mapping of the same file would see them)."""
    t = swap.map_file(tmp_path, 10_000)
    assert t.numel() == swap.align_up(10_000) and t.data_ptr() % swap.ALIGN == 0
    assert os.listdir(tmp_path) == []
    t.copy_(torch.arange(t.numel()) % 251)
    with open("/proc/self/maps") as f:
        line = next(x for x in f if str(tmp_path) in x)
    assert "rw-s" in line and line.rstrip().endswith("(deleted)")  # shared: written back
    assert torch.equal(t, torch.arange(t.numel()) % 251)
    with pytest.raises(FileNotFoundError):
        swap.map_file(tmp_path / "missing", 10)

"""The swap engine: round trips, checksums, truncation, path checks, cleanup."""

from __future__ import annotations

import errno
import gc
import json
import os
import signal
import socket
import subprocess
import sys

import pytest
import torch

from fscale.io import (
    ALIGN,
    SwapCorruptError,
    SwapEngine,
    SwapError,
    SwapLockedError,
    alloc,
    check_path,
    swap,
)


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
    names = {os.path.basename(engine.file_path("x")), swap.lock_name(0)}
    assert set(os.listdir(tmp_path)) == names  # the file and the rank's lock
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


def test_rechecksum_accepts_a_file_changed_in_place_on_purpose(tmp_path):
    engine = SwapEngine(tmp_path, chunk_bytes=ALIGN)
    engine.write("g", _filled(engine, 3 * ALIGN)).result()
    [path] = engine.files()
    with open(path, "r+b") as f:  # as fs.load fills a fresh state's files
        f.seek(ALIGN + 1)
        f.write(b"loaded")
    out = engine.alloc(3 * ALIGN)
    with pytest.raises(SwapCorruptError, match="corrupt"):
        engine.read("g", out).result()
    engine.rechecksum("g")
    engine.read("g", out).result()
    assert bytes(out[ALIGN + 1 : ALIGN + 7].tolist()) == b"loaded"
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


# ----------------------------------------------------------------------------- failures


def _enospc_for(monkeypatch, pattern):
    """os.pwritev raises ENOSPC for files whose name contains ``pattern``."""
    real = os.pwritev

    def pwritev(fd, buffers, offset):
        if pattern in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, buffers, offset)

    monkeypatch.setattr(os, "pwritev", pwritev)
    return real


def test_failed_write_keeps_the_previous_version_and_is_reported_once(tmp_path, monkeypatch):
    engine = SwapEngine(tmp_path, chunk_bytes=ALIGN)
    old, new = _filled(engine, 3 * ALIGN, 1), _filled(engine, 3 * ALIGN, 2)
    engine.write("k", old).result()
    real = _enospc_for(monkeypatch, "-k.swp")
    fut = engine.write("k", new)
    with pytest.raises(SwapError, match="No space left") as info:
        fut.result()
    assert info.value.errno == errno.ENOSPC
    assert engine.files() == [engine.file_path("k")]  # no temporary left behind
    assert not any(n.endswith(".tmp") for n in os.listdir(tmp_path))
    # A read does not silently hand out the version before the failed write.
    with pytest.raises(SwapError, match="last write of swap file 'k' failed"):
        engine.read("k", engine.alloc(3 * ALIGN)).result()
    with pytest.raises(SwapError, match="No space left"):
        engine.flush()
    engine.flush()  # reported once: never the stale error again
    monkeypatch.setattr(os, "pwritev", real)  # space freed
    engine.write("k", new).result()
    out = engine.alloc(3 * ALIGN)
    engine.read("k", out).result()
    assert torch.equal(out, new)
    engine.close()
    assert os.listdir(tmp_path) == []


def test_planted_symlink_at_the_temp_name_is_never_followed(tmp_path):
    """[Note: swap files]: O_CREAT|O_EXCL|O_NOFOLLOW, mode 0600."""
    swap_dir, outside = tmp_path / "swap", tmp_path / "victim"
    swap_dir.mkdir()
    outside.write_bytes(b"precious")
    engine = SwapEngine(swap_dir, chunk_bytes=ALIGN)
    a = _filled(engine, 2 * ALIGN, 1)
    engine.write("k", a).result()
    assert os.stat(engine.file_path("k")).st_mode & 0o777 == 0o600
    tmp = engine.file_path("k") + ".tmp"
    os.symlink(outside, tmp)
    with pytest.raises(SwapError, match=r"already exists \(a symlink to .*victim.*never followed"):
        engine.write("k", _filled(engine, 2 * ALIGN, 2)).result()
    assert outside.read_bytes() == b"precious"
    assert os.path.islink(tmp)  # not ours: left for its owner to see
    os.symlink(outside, engine.file_path("fresh") + ".tmp")  # before a key's first write
    with pytest.raises(SwapError, match="never followed"):
        engine.write("fresh", a).result()
    assert outside.read_bytes() == b"precious"
    os.unlink(tmp)
    engine.write("k", a).result()  # works again once it is gone
    engine.close()


# ----------------------------------------------------------------------------- lock


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_lock_names_its_owner_and_dead_runs_files_are_removed(tmp_path):
    """[Note: swap lock]: a lock nobody holds is a dead run's; its files go, with a warning."""
    dead = _dead_pid()
    lock = tmp_path / swap.lock_name(0)
    lock.write_text(json.dumps({"pid": dead, "host": socket.gethostname(), "started": 0}))
    stale = [
        f"fscale-swap-r0-{dead}-0badc0de-g00000.swp",
        f"fscale-swap-r0-{dead}-0badc0de-g00001.swp.tmp",
        f"fscale-swap-r5-{dead}-0badc0de-g00000.swp",  # another rank, no lock: dead too
    ]
    for name in [*stale, "unrelated.swp"]:
        (tmp_path / name).write_bytes(b"x")
    with pytest.warns(RuntimeWarning, match=r"removed 3 stale file\(s\) of dead run") as record:
        engine = SwapEngine(tmp_path)
    assert all(name in str(record[0].message) for name in stale)
    assert sorted(os.listdir(tmp_path)) == sorted([swap.lock_name(0), "unrelated.swp"])
    info = json.loads(lock.read_text())
    assert info["pid"] == os.getpid() and info["host"] == socket.gethostname()
    assert info["prefix"] == engine.prefix and os.stat(lock).st_mode & 0o777 == 0o600
    second = SwapEngine(tmp_path)  # the same process shares its lock
    second.write("a", _filled(second, ALIGN)).result()
    engine.close()
    assert lock.exists()  # still used by ``second``
    second.close()
    assert os.listdir(tmp_path) == ["unrelated.swp"]


@pytest.mark.filterwarnings("ignore:fscale swap. removed:RuntimeWarning")
def test_ranks_restarting_together_after_a_kill_all_start(tmp_path):
    """Each rank probes the others' locks while they take them over: a probe holds a
    lock for a moment, which must not read as a live run."""
    from concurrent.futures import ThreadPoolExecutor

    dead = _dead_pid()
    for _ in range(5):
        for r in range(4):
            info = {"pid": dead, "host": socket.gethostname(), "started": 0}
            (tmp_path / swap.lock_name(r)).write_text(json.dumps(info))
            (tmp_path / f"fscale-swap-r{r}-{dead}-0badc0de-g00000.swp").write_bytes(b"x")
        with ThreadPoolExecutor(4) as pool:
            engines = list(pool.map(lambda r: SwapEngine(tmp_path, rank=r), range(4)))
        assert sorted(os.listdir(tmp_path)) == sorted(swap.lock_name(r) for r in range(4))
        for e in engines:
            e.close()
        assert os.listdir(tmp_path) == []


def test_a_late_probe_of_a_dead_lock_leaves_its_new_owners_lock(tmp_path, monkeypatch):
    """The race behind a rare failure of the test above, made deterministic: probe B
    opens the dead lock; probe A removes it; the rank's new owner creates and takes a new
    lock at the path; then B's flock of the dead inode succeeds. B must not unlink the
    path (the new lock): it probes the new lock instead and finds it live."""
    path = str(tmp_path / swap.lock_name(3))
    (tmp_path / swap.lock_name(3)).write_text(
        json.dumps({"pid": _dead_pid(), "host": socket.gethostname(), "started": 0})
    )
    read_info, owner = swap._read_info, []

    def between_open_and_flock(fd):
        info = read_info(fd)
        if not owner:  # the first read is probe B's, of the dead inode
            owner.append(None)
            assert swap._probe_lock(path) == (False, info)  # probe A removes it
            owner[0] = swap._acquire(str(tmp_path), 3, "x")[0]  # the new owner takes the rank
        return info

    monkeypatch.setattr(swap, "_read_info", between_open_and_flock)
    live, _ = swap._probe_lock(path)
    assert live and os.path.exists(path)
    assert os.fstat(owner[0].fd).st_ino == os.stat(path).st_ino
    swap._release(owner[0])
    assert not os.path.exists(path)


# ----------------------------------------------------------------------------- signals

# swap.py alone (torch and the standard library): importing fscale takes seconds more.
# SIGINT raises KeyboardInterrupt as in a foreground Python: a job started in the
# background (``nohup ... &``) inherits SIGINT ignored, and Python keeps it so.
_CHILD = """
import importlib.util, signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)
spec = importlib.util.spec_from_file_location("fscale_swap", sys.argv[2])
swap = sys.modules["fscale_swap"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(swap)
engine = swap.SwapEngine(sys.argv[1], rank=0)
engine.write("a", engine.alloc(4096)).result()
print("ready", flush=True)
time.sleep(120)
"""


def _start_child(path):
    return subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(path), swap.__file__], stdout=subprocess.PIPE, text=True
    )


def test_sigterm_and_sigint_remove_the_files_and_sigkill_is_detected(tmp_path):
    """[Note: swap signals] and [Note: swap lock], on three real processes."""
    dirs = {sig: tmp_path / sig.name for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGKILL)}
    for d in dirs.values():
        d.mkdir()
    children = {sig: _start_child(d) for sig, d in dirs.items()}  # in parallel: imports
    try:
        for proc in children.values():
            assert proc.stdout.readline().strip() == "ready"
        for d in dirs.values():
            assert len(os.listdir(d)) == 2  # the file and the lock
        proc = children[signal.SIGTERM]
        with pytest.raises(SwapLockedError, match=rf"in use by another run.*pid {proc.pid}"):
            SwapEngine(dirs[signal.SIGTERM])
        for sig, proc in children.items():
            proc.send_signal(sig)
        codes = {sig: proc.wait(timeout=60) for sig, proc in children.items()}
    finally:
        for proc in children.values():
            proc.kill()
            proc.wait()
    assert codes[signal.SIGTERM] == -signal.SIGTERM  # still "killed by SIGTERM"
    assert os.listdir(dirs[signal.SIGTERM]) == []
    assert os.listdir(dirs[signal.SIGINT]) == []  # KeyboardInterrupt, then the exit finalizer
    assert codes[signal.SIGKILL] == -signal.SIGKILL
    left = sorted(os.listdir(dirs[signal.SIGKILL]))
    assert len(left) == 2 and swap.lock_name(0) in left  # SIGKILL cannot be caught...
    with pytest.warns(RuntimeWarning, match="stale file"):
        engine = SwapEngine(dirs[signal.SIGKILL])  # ...so the next run cleans up
    assert os.listdir(dirs[signal.SIGKILL]) == [swap.lock_name(0)]
    engine.close()
    assert os.listdir(dirs[signal.SIGKILL]) == []


def test_signal_handlers_chain_to_the_previous_one_and_are_restored(tmp_path):
    seen = []

    def mine(signum, frame):
        seen.append(signum)

    gc.collect()  # engines of earlier tests: the handler is restored when the last closes
    if swap._live:
        pytest.skip("swap engines of other tests in this process are still open")
    before = signal.signal(signal.SIGTERM, mine)
    try:
        engine = SwapEngine(tmp_path)
        engine.write("a", _filled(engine, ALIGN)).result()
        assert signal.getsignal(signal.SIGTERM) is swap._on_signal
        os.kill(os.getpid(), signal.SIGTERM)
        assert seen == [signal.SIGTERM]  # the program's handler decides; files kept for it
        assert engine.files()
        engine.close()
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, before)

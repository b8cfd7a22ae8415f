"""[Note: how a tensor reaches the disk] (``fscale/_checkpoint/writer.py``): fscale's
writer loop writes the files DCP's own loop writes, byte for byte, whichever way a tensor
travels (through a slab, slab by slab, or as it is on the host); early write-out,
niceness of an asynchronous save's threads, errors raised from writer threads."""

from __future__ import annotations

import os
import threading

import pytest
import torch
import torch.distributed.checkpoint as dcp
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.distributed.checkpoint.filesystem import _split_by_size_and_type

import fscale as fs
from fscale import tree
from fscale._checkpoint import checksummed, writer
from fscale._checkpoint.writer import SaveIO, _Writeback, split_items
from tests.helpers import CPU_AND_CUDA
from tests.test_checkpoint import _batches, _build, _close, _train

OLD = SaveIO(pinned=0)  # DCP's own writer loop


def _state(name: str, tmp):
    layers = {"plain": (), "bf16 zero1": (("mp", "bf16"), ("zero", 1))}.get(name)
    if layers is None:  # "offload nvme": stored tensors, read from their files at the save
        os.makedirs(tmp / "swap", exist_ok=True)
        step, params = _build((("offload", "nvme"),), swap=str(tmp / "swap"))
    else:
        step, params = _build(layers)
    params, state = step.init(params)
    params, state = _train(step, params, state, _batches(0, 1, 2, seed=1))
    return step, params, state


def _files(where) -> dict[str, bytes]:
    """The data files: not ``.metadata`` (it holds the save's id and path) nor the
    checksum records (DCP's loop records a piece per file, fscale's one per item)."""
    out = {}
    for n in sorted(os.listdir(where)):
        if n != ".metadata" and not n.startswith("__checksums_"):
            with open(os.path.join(where, n), "rb") as f:
                out[n] = f.read()
    return out


def _index(where) -> dict:
    md = dcp.FileSystemReader(str(where)).read_metadata()
    return {k: (v.relative_path, v.offset, v.length) for k, v in md.storage_data.items()}


@pytest.mark.parametrize("name", ["plain", "bf16 zero1", "offload nvme"])
@pytest.mark.parametrize("route", ["host", "slabs", "pieces"])
def test_files_are_dcps_byte_for_byte(tmp_path, monkeypatch, name, route):
    # "slabs": every tensor goes through the pipeline of two slabs as a device tensor
    # would (the copies are plain host copies here); "pieces": slabs of 64 bytes, so
    # most tensors are copied slab by slab into a tensor of their own.
    step, params, state = _state(name, tmp_path)
    threads = 3
    fs.save(tmp_path / "old", params, state, threads=threads, io=OLD)
    io = SaveIO()
    if route != "host":
        monkeypatch.setattr(writer, "_on_device", lambda t: True)
        if route == "pieces":
            io = SaveIO(pinned=2 * threads * 64)
    fs.save(tmp_path / "new", params, state, threads=threads, io=io)
    old, new = _files(tmp_path / "old"), _files(tmp_path / "new")
    assert sorted(old) == sorted(new)
    assert [n for n in new if n.endswith(".distcp")], new.keys()
    for n in old:
        assert old[n] == new[n], n
    assert _index(tmp_path / "old") == _index(tmp_path / "new")
    fresh, full = _build(()) if name == "plain" else (None, None)
    if fresh is not None:
        loaded, _ = fs.load(tmp_path / "new", fresh, full)
        assert all(torch.equal(loaded[k], params[k]) for k in params)
    _close(state)


@pytest.mark.parametrize(
    "t",
    [torch.arange(10.0), torch.randn(257, 33).to(torch.bfloat16), torch.zeros(0),
     torch.randint(0, 9, (5, 7), dtype=torch.int64)[1:4]],
)  # fmt: skip
def test_a_record_without_torchs_crc_is_what_torch_writes_with_it_off(t):
    """``SaveIO(torch_crc=False)``'s per-item save: the bytes ``torch.save`` writes under
    ``set_crc32_options(False)`` (every record's CRC field 0), without touching that
    option, which other threads' saves read."""
    import io as io_

    got = io_.BytesIO()
    writer._save_without_crc(t, got)
    assert torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)
    try:
        want = io_.BytesIO()
        torch.save(t, want)
    finally:
        torch.serialization.set_crc32_options(True)
    assert got.getvalue() == want.getvalue()
    with_crc = io_.BytesIO()
    torch.save(t, with_crc)
    assert got.getvalue() != with_crc.getvalue()
    got.seek(0)
    assert torch.equal(torch.load(got), t)


@pytest.mark.parametrize("name,direct", [("plain", False), ("bf16 zero1", False), ("plain", True)])
def test_a_checkpoint_without_torchs_crc_loads_with_its_checksums_checked(
    tmp_path, monkeypatch, name, direct
):
    """``SaveIO(torch_crc=False)``: the files of the default save in size and record,
    only the CRC fields differ; the checkpoint loads equal with its recorded checksums
    (zlib-ng's, taken as the data is written: [Note: summing while the bytes are in
    cache]; through ``O_DIRECT`` writes too) checked: a flipped byte is refused."""
    # These records are small: sum all of them inline, in pieces of 4 KiB.
    monkeypatch.setattr(checksummed, "_DEFER", 64)
    monkeypatch.setattr(checksummed, "PIECE", 4096)
    step, params, state = _state(name, tmp_path)
    io = SaveIO(torch_crc=False, direct=direct)
    fs.save(tmp_path / "new", params, state, threads=3, io=io)
    fs.save(tmp_path / "crc", params, state, threads=3, io=SaveIO())
    new, crc = _files(tmp_path / "new"), _files(tmp_path / "crc")
    assert {n: len(b) for n, b in new.items()} == {n: len(b) for n, b in crc.items()}
    assert any(new[n] != crc[n] for n in new)
    assert _index(tmp_path / "new") == _index(tmp_path / "crc")
    _close(state)
    fresh, full = _build({"plain": (), "bf16 zero1": (("mp", "bf16"), ("zero", 1))}[name])
    loaded, _ = fs.load(tmp_path / "new", fresh, full)
    pairs = zip(tree.leaves(loaded), tree.leaves(params), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)
    data = tmp_path / "new" / "__0_0.distcp"
    with open(data, "r+b") as f:
        f.seek(data.stat().st_size // 2)
        f.write(b"\x00\xff" * 4)
    with pytest.raises(ValueError, match="'__0_0.distcp' does not match its checksum"):
        fs.load(tmp_path / "new", fresh, full)


def test_torch_crc_off_needs_fscales_loop():
    with pytest.raises(ValueError, match="torch_crc=False, pinned=0.*pinned > 0"):
        SaveIO(torch_crc=False, pinned=0)
    with pytest.raises(ValueError, match="torch_crc=1.*a bool"):
        SaveIO(torch_crc=1)


def test_a_view_of_a_larger_storage_is_written_without_a_copy():
    """``_host``: a contiguous view into a larger buffer (offload's sub-group buffers)
    goes to ``torch.save`` through a slice of its storage: the same bytes as DCP's clone,
    no copy; other views are cloned, whole storages passed as they are."""
    import io as io_

    arena = torch.arange(1000, dtype=torch.float32)
    for t in (arena[10:310].view(20, 15), arena[1:2], arena.view(10, 100)[:, 3:5], arena):
        got = writer._host(t)
        assert torch.equal(got, t) and got.untyped_storage().nbytes() == t.nbytes
        shared = got.data_ptr() == t.data_ptr()
        assert shared == (t.is_contiguous()), t.shape
        a, b = io_.BytesIO(), io_.BytesIO()
        torch.save(got, a)
        torch.save(t.clone(), b)
        assert a.getvalue() == b.getvalue()


def test_buckets_are_dcps():
    g = torch.Generator().manual_seed(0)
    state = {f"t{i}": torch.randn(int(torch.randint(1, 500, (), generator=g))) for i in range(23)}
    state["blob"], state["blob2"] = {"a": 1}, [2]
    planner = dcp.DefaultSavePlanner()
    planner.set_up_planner(state, is_coordinator=True)
    items = planner.create_local_plan().items
    for bins in (1, 2, 3, 8):
        assert split_items(items, bins) == _split_by_size_and_type(bins, items)


def test_writeback_starts_write_out_and_waits_beyond_its_window(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(
        writer, "_SYNC_RANGE", lambda fd, start, n, flags: calls.append((start, n, flags)) or 0
    )
    monkeypatch.setattr(writer, "_KICK", 10)
    wb = _Writeback(-1, window=100)
    monkeypatch.setattr(os, "posix_fadvise", lambda *a: None, raising=False)
    wb.advance(5)  # below the kick size: nothing yet
    assert calls == []
    wb.advance(60)
    wb.advance(130)
    assert calls[0] == (0, 60, writer._WRITE)
    assert calls[1] == (60, 70, writer._WRITE)
    # 130 bytes started, window 100: the first 30 are waited for
    assert calls[2] == (0, 30, writer._WAIT_BEFORE | writer._WRITE | writer._WAIT_AFTER)
    assert (wb.started, wb.done) == (130, 30)
    # a failing call turns early write-out off for the file
    monkeypatch.setattr(writer, "_SYNC_RANGE", lambda *a: -1)
    wb.advance(200)
    assert not wb.on


@pytest.mark.skipif(writer._SYNC_RANGE is None, reason="no sync_file_range (not Linux)")
def test_writeback_on_a_real_file(tmp_path, monkeypatch):
    monkeypatch.setattr(writer, "_KICK", 1 << 10)
    with open(tmp_path / "f", "wb") as f:
        wb = _Writeback(f.fileno(), window=4 << 10)
        for _ in range(16):
            f.write(os.urandom(1 << 10))
            f.flush()
            wb.advance(f.tell())
        assert wb.on and wb.started == 16 << 10 and wb.done == 12 << 10


def test_async_save_threads_run_niced_and_the_callers_priority_is_kept(tmp_path, monkeypatch):
    step, params, state = _state("plain", tmp_path)
    seen = {}
    save = torch.save

    def spying(obj, f, *a, **k):
        tid = threading.get_native_id()
        seen[threading.current_thread().name] = os.getpriority(os.PRIO_PROCESS, tid)
        return save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", spying)
    me = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    fs.save(tmp_path / "sync", params, state, threads=2)
    assert seen and set(seen.values()) == {me}, seen
    seen.clear()
    io = SaveIO(background_nice=5, background_threads=3)
    fs.save(tmp_path / "async", params, state, threads=2, async_save=True, io=io).wait()
    writers = {n: p for n, p in seen.items() if n.startswith("fscale-write-")}
    assert len(writers) == 3 and set(writers.values()) == {min(19, me + 5)}, seen
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == me
    # background_idle: the writer threads' policy is SCHED_IDLE, the caller's untouched.
    policies = {}

    def spying_policy(obj, f, *a, **k):
        tid = threading.get_native_id()
        policies[threading.current_thread().name] = os.sched_getscheduler(tid)
        return save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", spying_policy)
    io = SaveIO(background_idle=True, background_threads=2)
    fs.save(tmp_path / "idle", params, state, async_save=True, io=io).wait()
    writers = {n: p for n, p in policies.items() if n.startswith("fscale-write-")}
    assert len(writers) == 2 and set(writers.values()) == {os.SCHED_IDLE}, policies
    assert os.sched_getscheduler(threading.get_native_id()) == os.SCHED_OTHER


def test_an_error_in_a_writer_thread_fails_the_save(tmp_path, monkeypatch):
    step, params, state = _state("plain", tmp_path)
    fs.save(tmp_path, params, state, at=1)
    save, n = torch.save, {"k": 0}

    def full(obj, f, *a, **k):
        n["k"] += 1
        if n["k"] == 3:
            raise OSError(28, "No space left on device")
        return save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(BaseException, match="No space left"):
        fs.save(tmp_path, params, state, at=2, threads=4)
    assert fs.latest(tmp_path) == str(tmp_path / "step-1")


def test_bad_save_io_raises():
    with pytest.raises(ValueError, match="pinned"):
        SaveIO(pinned=-1)
    with pytest.raises(ValueError, match="background_threads"):
        SaveIO(background_threads=0)
    with pytest.raises(ValueError, match="stage='host'.*auto, device, pinned, pageable"):
        SaveIO(stage="host")
    with pytest.raises(ValueError, match="SaveIO"):
        fs.checkpoint.save("/nonexistent", {}, {"layout": None}, io={"pinned": 0})


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("pinned", [SaveIO().pinned, 2 * 8 * 4096])
def test_device_tensors_through_pinned_slabs_write_dcps_files(tmp_path, pinned):
    # On the GPU: slabs in pinned memory on a side stream (and, with small slabs, large
    # tensors slab by slab), written while the default stream still has work queued.
    dev = torch.device("cuda", torch.cuda.current_device())
    g = torch.Generator(device=dev).manual_seed(0)
    sizes = [1, 7, 1000, 4096, 65536, 300_001, 1 << 20]
    state = {f"t{i}": torch.randn(n, generator=g, device=dev) for i, n in enumerate(sizes)}
    state["bf16"] = torch.randn(513, 77, generator=g, device=dev).to(torch.bfloat16)
    state["rows"] = torch.randn(64, 100, generator=g, device=dev)[3:40]  # a view
    for v in state.values():  # queued work the copies must wait for
        v.mul_(2)
    ios = (("old", OLD), ("new", SaveIO(pinned=pinned)), ("direct", SaveIO(pinned, direct=True)))
    for name, io in ios:
        w = fs.checkpoint._Writing(threads=3, io=io, nice=0)
        out = tmp_path / name
        with fs.checkpoint._quiet():
            dcp.save(state, storage_writer=fs.checkpoint._Writer(str(out), writing=w), no_dist=True)
    assert _files(tmp_path / "old") == _files(tmp_path / "new") == _files(tmp_path / "direct")
    for name in ("new", "direct"):
        back = {k: torch.empty_like(v) for k, v in state.items()}
        dcp.load(back, checkpoint_id=str(tmp_path / name), no_dist=True)
        assert all(torch.equal(back[k], state[k]) for k in state)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_async_staging_copies_device_tensors_where_saveio_says():
    x = torch.randn(1000, 33, device="cuda")
    x.mul_(3)  # queued on the caller's stream
    want = x.cpu()
    pinned = fs.checkpoint._stage({"x": x, "meta": {"a": 1}}, "pinned")
    assert pinned["x"].is_pinned() and torch.equal(pinned["x"], want)
    plain = fs.checkpoint._stage({"x": x}, "pageable")
    assert plain["x"].device.type == "cpu" and not plain["x"].is_pinned()
    assert torch.equal(plain["x"], want)
    on_device = fs.checkpoint._stage({"x": x}, "device")
    assert on_device["x"].is_cuda and on_device["x"].data_ptr() != x.data_ptr()
    x.add_(1)  # the step after the save's call: the staged copy keeps the saved values
    assert torch.equal(on_device["x"].cpu(), want)
    # "auto" stages a small state on the device; a state larger than the free memory
    # is staged in pinned host memory.
    assert fs.checkpoint._staging_place({"x": x}, "auto") == "device"
    free, _ = torch.cuda.mem_get_info()
    huge = torch.empty(1, device="cuda", dtype=torch.uint8).expand(free)  # no memory of its own
    assert fs.checkpoint._staging_place({"x": huge}, "auto") == "pinned"


@pytest.mark.parametrize("device", CPU_AND_CUDA)
def test_parallel_reader_loads_what_dcps_reader_loads(tmp_path, device):
    from fscale._checkpoint.reader import ParallelReader

    g = torch.Generator().manual_seed(0)
    state = {f"t{i}": torch.randn(257, 33, generator=g).to(device) for i in range(12)}
    state["blob"] = {"step": 7}
    writer = dcp.FileSystemWriter(tmp_path, thread_count=4)  # four data files
    dcp.save(state, storage_writer=writer, no_dist=True)
    assert len([n for n in os.listdir(tmp_path) if n.endswith(".distcp")]) == 4
    for reader in (ParallelReader(tmp_path, threads=4), dcp.FileSystemReader(tmp_path)):
        back = {k: torch.zeros_like(v) for k, v in state.items() if k != "blob"}
        back["blob"] = {"step": 0}
        dcp.load(back, storage_reader=reader, no_dist=True)
        assert all(torch.equal(back[k], state[k]) for k in back if k != "blob")
        assert back["blob"] == {"step": 7}


# ----------------------------------------------------------------------------- lazy snapshot


def test_lazy_snapshot_keeps_the_bytes_of_its_start_whoever_copies_them():
    """[Note: lazy snapshot]: an entry is copied by ``before_write`` (the owner is about
    to write it), by the writer's ``take``, or by a copy thread; each way the copy holds
    the bytes the buffer had when the snapshot started, and an unannounced tensor is
    never deferred."""
    from fscale._checkpoint.snapshot import LazySnapshot
    from fscale.state import announce_writes, announced, before_write

    buf = torch.arange(64, dtype=torch.float32)
    announce_writes(buf)
    parts = [buf[0:16], buf[16:40], buf[40:64]]
    assert all(announced(p) is not None for p in parts)
    assert announced(torch.zeros(3)) is None
    before = buf.clone()
    snap = LazySnapshot(copy_threads=0)  # no copy threads: only before_write and take
    items = [snap.defer(p, announced(p)) for p in parts]
    snap.start()
    try:
        before_write(buf[10:20])  # overlaps the first two entries
        buf[10:20] = -1.0
        assert torch.equal(items[0].tensor(), before[0:16])
        assert torch.equal(items[1].tensor(), before[16:40])
        assert torch.equal(items[2].tensor(), before[40:64])  # copied by take, untouched
    finally:
        snap.close()
    before_write(buf)  # no snapshot registered: a no-op
    threaded = LazySnapshot(copy_threads=2)
    items = [threaded.defer(p, announced(p)) for p in parts]
    now = buf.clone()
    threaded.start()
    try:
        before_write(buf)
        buf.fill_(7.0)
        got = torch.cat([i.tensor() for i in items])
    finally:
        threaded.close()
    assert torch.equal(got, now)


def test_a_snapshot_copies_in_the_order_the_last_step_wrote_its_buffers():
    """[Note: copying in write order]: buffers announced in one order and written in
    another (offload: leaf order vs the backward's update order) are queued in the order
    of their latest writes, never-written ones last in announce order; a freed buffer's
    reused address does not inherit the old buffer's place."""
    from fscale._checkpoint.snapshot import LazySnapshot
    from fscale.state import announce_writes, announced, before_write, write_rank

    bufs = [torch.full((8,), float(i)) for i in range(5)]
    for b in bufs:
        announce_writes(b)
    for i in (3, 1, 0, 3):  # 3's latest write is after 0's; 2 and 4 are never written
        before_write(bufs[i])
    snap = LazySnapshot(copy_threads=0)
    for b in bufs:
        snap.defer(b, announced(b))
    snap.start()
    try:
        ptrs = [e.src.data_ptr() for e in snap._queue]
        assert ptrs == [bufs[i].data_ptr() for i in (1, 0, 3, 2, 4)]
    finally:
        snap.close()
    memory = bytearray(64)
    old = torch.frombuffer(memory, dtype=torch.uint8)
    announce_writes(old)
    before_write(old)
    assert write_rank(old)[0] == 0
    del old  # freed; a new buffer at the same address has no writes yet
    new = torch.frombuffer(memory, dtype=torch.uint8)
    announce_writes(new)
    assert write_rank(new) == (1, 0)


def test_kept_copies_are_reused_by_the_next_keeping_snapshot_and_freed_by_others():
    """[Note: kept copies]: a keeping snapshot's buffers go to the pool when it closes,
    the next keeping one copies into the same memory (and gets the new bytes), and a
    snapshot that does not keep empties the pool."""
    from fscale._checkpoint import snapshot as sn
    from fscale.state import announce_writes, announced

    buf = torch.arange(48, dtype=torch.float32)
    announce_writes(buf)
    parts = [buf[0:16], buf[16:48], buf[16:48].view(torch.int32)]

    def save(keep: bool):
        snap = sn.LazySnapshot(copy_threads=1, keep=keep)
        items = [snap.defer(p, announced(p)) for p in parts]
        snap.start()
        try:
            copies = [i.tensor() for i in items]
        finally:
            snap.close()
        return copies

    first = save(keep=True)
    assert sorted(b.numel() for bs in sn._POOL.values() for b in bs) == [64, 128, 128]
    ptrs = {c.data_ptr() for c in first}
    buf.add_(100.0)
    second = save(keep=True)
    assert {c.data_ptr() for c in second} == ptrs  # the same buffers, new bytes
    assert torch.equal(second[0], buf[0:16]) and torch.equal(second[1], buf[16:48])
    assert torch.equal(second[2], buf[16:48].view(torch.int32))
    save(keep=False)
    assert sn._POOL == {}


def _announced_parts(n: int, piece: int):
    """An announced float buffer of ``n`` elements and its views of ``piece`` each."""
    from fscale.state import announce_writes

    buf = torch.arange(n, dtype=torch.float32)
    announce_writes(buf)
    return buf, [buf[i : i + piece] for i in range(0, n, piece)]


def _through(snap, parts, during) -> torch.Tensor:
    """``parts`` deferred to ``snap``, started, ``during(snap)`` run (the training goes
    on), then every copy taken as the writer would, concatenated."""
    from fscale.state import announced

    items = [snap.defer(p, announced(p)) for p in parts]
    snap.start()
    try:
        during(snap)
        return torch.cat([i.tensor() for i in items])
    finally:
        snap.close()


@pytest.mark.parametrize("ahead", [1, 1 << 30])
def test_a_fed_snapshot_keeps_the_bytes_of_its_start(monkeypatch, ahead):
    """[Note: a snapshot in device memory]: with a device set, one feeder thread copies
    the entries in update order (here to a CPU stand-in, at most ``ahead`` bytes in
    flight); entries the owner or the writer reaches first are copied by them; every
    copy holds the bytes of the start."""
    from fscale._checkpoint import snapshot as sn
    from fscale.state import before_write

    monkeypatch.setattr(sn, "FEED_AHEAD", ahead)
    buf, parts = _announced_parts(4096, 256)
    before = buf.clone()
    snap = sn.LazySnapshot(device=torch.device("cpu"))

    def update(snap):
        assert snap.nbytes() == buf.nbytes and not snap.pinned()
        before_write(buf[1000:3000])  # the owner's update races the feeder
        buf[1000:3000] = -1.0

    assert torch.equal(_through(snap, parts, update), before)
    assert [t.name for t in threading.enumerate() if t.name.startswith("fscale-snap")] == []


def test_a_fed_snapshot_that_runs_out_of_device_memory_copies_the_rest_on_the_host(
    monkeypatch,
):
    from fscale._checkpoint import snapshot as sn

    fed = []

    def to_device(src, device, stream):
        if len(fed) == 3:
            raise torch.OutOfMemoryError("out of memory")
        fed.append(src)
        return src.to(device, copy=True), None

    monkeypatch.setattr(sn, "_copy_to", to_device)
    buf, parts = _announced_parts(1024, 64)
    before = buf.clone()

    def update(snap):
        for t in snap._threads:
            t.join()  # the feeder, then the copy threads it started
        buf.fill_(-1.0)

    snap = sn.LazySnapshot(copy_threads=2, device=torch.device("cpu"))
    assert torch.equal(_through(snap, parts, update), before) and len(fed) == 3


def test_a_failed_device_copy_fails_the_save_naming_the_error(monkeypatch):
    """Any other error of the feeder's copy is the writer's: its ``take`` raises it, the
    entries after it are still copied (on the host) and the snapshot closes."""
    from fscale._checkpoint import snapshot as sn

    def broken(src, device, stream):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(sn, "_copy_to", broken)
    _, parts = _announced_parts(256, 64)
    snap = sn.LazySnapshot(copy_threads=1, device=torch.device("cpu"))
    with pytest.raises(RuntimeError, match="snapshot copy failed.*illegal memory access"):
        _through(snap, parts, lambda snap: snap.wait_copied())
    assert all(e.done.is_set() for e in snap._entries)


def test_a_feeder_whose_earlier_copy_failed_leaves_no_entry_claimed(monkeypatch):
    """An error while the feeder waits for room (an earlier copy's event) ends it with
    no entry left claimed: the owner's ``before_write`` and ``wait_copied`` copy the
    rest themselves instead of waiting forever, and the save fails naming the error."""
    from fscale._checkpoint import snapshot as sn
    from fscale.state import before_write

    class Failing:
        def synchronize(self):
            raise RuntimeError("CUDA error: unspecified launch failure")

    monkeypatch.setattr(sn, "FEED_AHEAD", 1)  # wait for each copy before the next
    monkeypatch.setattr(sn, "_copy_to", lambda src, device, stream: (src.clone(), Failing()))
    buf, parts = _announced_parts(256, 64)
    before = buf.clone()

    def update(snap):
        snap._threads[0].join(5)
        assert not snap._threads[0].is_alive()
        assert [e.status for e in snap._queue].count(sn._COPYING) == 0
        before_write(buf[64:])  # copies the pending entries itself, does not hang
        buf[64:] = -1.0
        snap.wait_copied()  # the first entry's failed event: recorded, not raised here
        for i, e in enumerate(snap._queue[1:], start=1):
            assert torch.equal(e.copy, before[64 * i : 64 * (i + 1)])

    snap = sn.LazySnapshot(device=torch.device("cpu"))
    with pytest.raises(RuntimeError, match="launch failure"):
        _through(snap, parts, update)


@pytest.mark.parametrize("device", [None, torch.device("cpu")])
def test_wait_copied_returns_once_every_entry_holds_the_start(device):
    """[Note: writing after the snapshot]: ``wait_copied`` returns with every entry
    copied (by the caller where no thread has claimed it); later writes of the buffer
    change no copy."""
    from fscale._checkpoint.snapshot import _DONE, LazySnapshot
    from fscale.state import before_write

    buf, parts = _announced_parts(512, 64)
    before = buf.clone()

    def update(snap):
        snap.wait_copied()
        assert all(e.status == _DONE and e.copy is not None for e in snap._entries)
        before_write(buf)
        buf.fill_(3.0)

    snap = LazySnapshot(copy_threads=0 if device is None else 1, device=device)
    assert torch.equal(_through(snap, parts, update), before)


def test_snapshot_place_resolves_saveio_snapshot():
    from fscale._checkpoint.snapshot import LazySnapshot
    from fscale.checkpoint import _snapshot_place
    from fscale.state import announce_writes, announced

    buf = torch.zeros(8)
    announce_writes(buf)
    snap = LazySnapshot()
    assert _snapshot_place(snap, "auto") is None  # nothing deferred
    snap.defer(buf, announced(buf))
    assert _snapshot_place(snap, "host") is None
    if not torch.cuda.is_initialized():
        assert _snapshot_place(snap, "auto") is None  # unpinned, no CUDA: the host
        with pytest.raises(ValueError, match="snapshot='device'.*'auto' or 'host'"):
            _snapshot_place(snap, "device")
    with pytest.raises(ValueError, match="snapshot='gpu'.*auto, device, host"):
        SaveIO(snapshot="gpu")


@settings(max_examples=200, deadline=None)
@given(
    spans=st.lists(st.tuples(st.integers(0, 60), st.integers(1, 40)), max_size=10),
    probe=st.tuples(st.integers(0, 100), st.integers(1, 30)),
)
def test_lazy_snapshot_finds_every_entry_a_write_overlaps(spans, probe):
    """``before_write`` of a byte range copies exactly the entries it overlaps, nested
    and repeated views included (an entry that starts earlier but reaches past)."""
    from types import SimpleNamespace

    from fscale._checkpoint.snapshot import _Index

    entries = [SimpleNamespace(lo=lo, hi=lo + n) for lo, n in spans]
    lo, hi = probe[0], probe[0] + probe[1]
    got = _Index(entries).overlapping(lo, hi)
    assert sorted(map(id, got)) == sorted(id(e) for e in entries if e.lo < hi and e.hi > lo)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("where", ["device", "host"])
def test_an_offloaded_async_save_holds_its_calls_state_from_either_snapshot(
    tmp_path, monkeypatch, where
):
    """[Note: a snapshot in device memory]: the pinned offloaded state is copied to the
    device by DMA (many copies in flight), the next step updates it in place while the
    save is written, and the checkpoint equals a synchronous save of the same call."""
    from fscale._checkpoint import snapshot as sn
    from fscale.models.gpt import GPT, GPTConfig
    from fscale.state import TensorEntry, describe
    from tests.helpers import lm_batches, lm_loss

    monkeypatch.setattr(sn, "FEED_AHEAD", 1 << 14)
    places = []
    start = sn.LazySnapshot.start
    monkeypatch.setattr(sn.LazySnapshot, "start", lambda s: places.append(s.device) or start(s))
    torch.manual_seed(0)
    cfg = GPTConfig.tiny()

    def build():
        params, apply = fs.functional(GPT(cfg).cuda())
        opt = fs.optim.adamw(1e-3)
        step = fs.offload(fs.train_step(lm_loss(apply), opt), "cpu", subgroup_mb=2e-3)
        return step, params

    step, params = build()
    params, state = step.init(params)
    batches = [
        {k: v.cuda() for k, v in b.items()}
        for b in lm_batches(2, 2, cfg.seq_len, vocab=cfg.vocab_size, seed=0)
    ]
    params, state, _ = step(params, state, batches[0])
    fs.save(tmp_path / "sync", params, state)
    handle = fs.save(tmp_path / "async", params, state, async_save=True, io=SaveIO(snapshot=where))
    params, state, _ = step(params, state, batches[1])  # updates the host state in place
    handle.wait()
    assert places == [
        torch.device("cuda", torch.cuda.current_device()) if where == "device" else None
    ]

    def tensors(path):
        fresh_step, fresh = build()
        p, s = fs.load(path, fresh_step, fresh)
        out = {f"p/{k}": v.cpu() for k, v in p.items()}
        out |= {k: e.tensor.cpu() for k, e in describe(s).items() if isinstance(e, TensorEntry)}
        s["offload"].close()
        return out

    want, got = tensors(tmp_path / "sync"), tensors(tmp_path / "async")
    assert want.keys() == got.keys() and all(torch.equal(got[k], want[k]) for k in want)
    state["offload"].close()


def test_host_available_is_capped_by_a_cgroup_limit(monkeypatch, tmp_path):
    """``"auto"`` counts the host memory the process can get: ``MemAvailable``, or less
    under a container's cgroup v2 limit."""
    import builtins

    from fscale import checkpoint

    files = {
        "/proc/meminfo": "MemTotal: 100 kB\nMemAvailable:   4000 kB\n",
        "/sys/fs/cgroup/memory.max": "3000000\n",
        "/sys/fs/cgroup/memory.current": "1000000\n",
    }
    real_open = builtins.open

    def fake_open(path, *a, **k):
        if str(path) in files:
            (tmp_path / "f").write_text(files[str(path)])
            return real_open(tmp_path / "f", *a, **k)
        return real_open(path, *a, **k)

    monkeypatch.setattr(builtins, "open", fake_open)
    assert checkpoint._host_available() == 2_000_000  # min(4,096,000, 3e6 - 1e6)
    files["/sys/fs/cgroup/memory.max"] = "max\n"
    assert checkpoint._host_available() == 4000 * 1024

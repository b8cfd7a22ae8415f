"""[Note: checksums while writing]: the CRC-32 taken on the way to each file equals the
file's CRC read back, through DCP's real writer, with several writer threads; [Note:
the CRC torch already took]: a tensor's data is summed once, by torch."""

from __future__ import annotations

import errno
import io
import os
import struct
import zlib

import pytest
import torch
import torch.distributed.checkpoint as dcp

from fscale._checkpoint import checksummed
from fscale._checkpoint.checksummed import ChecksummingFileSystem


def _crc_of(path: str) -> int:
    with open(path, "rb") as f:
        return zlib.crc32(f.read())


def test_sums_taken_while_writing_equal_the_files_read_back(tmp_path):
    g = torch.Generator().manual_seed(0)
    state = {f"t{i}": torch.randn(1000 + 37 * i, generator=g) for i in range(9)}
    state["bf16"] = torch.randn(64, 33, generator=g).to(torch.bfloat16)
    state["meta"] = {"step": 7, "name": "x"}  # a non-tensor entry (DCP's byte items)
    writer = dcp.FileSystemWriter(tmp_path, sync_files=False, thread_count=3)
    summer = ChecksummingFileSystem()
    writer.fs = summer
    dcp.save(state, storage_writer=writer, no_dist=True)
    data = sorted(n for n in os.listdir(tmp_path) if n.endswith(".distcp"))
    assert len(data) == 3 and set(data) <= set(summer.sums)
    for name in data:
        # DCP's own loop marks no items: one piece, the whole file.
        pieces, size = summer.sums[name]
        path = os.path.join(tmp_path, name)
        assert pieces == [(0, size, _crc_of(path))], name
        assert size == os.path.getsize(path), name
    # What was written loads back (the wrapper hands DCP the same bytes).
    back = {k: torch.empty_like(v) for k, v in state.items() if isinstance(v, torch.Tensor)}
    back["meta"] = {}
    dcp.load(back, checkpoint_id=tmp_path, no_dist=True)
    assert all(torch.equal(back[k], state[k]) for k in back if k != "meta")


def test_fscale_writer_records_a_piece_per_item_and_load_verifies_each(tmp_path):
    """fscale's writer marks every item: the recorded pieces tile each file, one per
    item of the index, each with the CRC-32 of its bytes ([Note: data-file checksums])."""
    import json

    import fscale as fs
    from fscale.models.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    params, apply = fs.functional(GPT(GPTConfig.tiny()))
    step = fs.train_step(lambda p, b: apply(p, b).float().mean(), fs.optim.adamw(1e-3))
    params, state = step.init(params)
    fs.save(tmp_path / "ck", params, state, threads=2)
    record = json.loads((tmp_path / "ck" / "__checksums_0.json").read_text())
    md = dcp.FileSystemReader(tmp_path / "ck").read_metadata()
    for name, rec in record.items():
        path = tmp_path / "ck" / name
        blob = path.read_bytes()
        pieces = sorted(rec["pieces"])
        assert [o for o, _, _ in pieces] == [0] + [o + n for o, n, _ in pieces[:-1]]
        assert sum(n for _, n, _ in pieces) == rec["size"] == len(blob)
        items = {(i.offset, i.length) for i in md.storage_data.values() if i.relative_path == name}
        assert {(o, n) for o, n, _ in pieces} == items
        for o, n, crc in pieces:
            assert zlib.crc32(blob[o : o + n]) == crc


def test_reader_asks_for_the_next_items_up_to_its_read_ahead(monkeypatch):
    """[Note: reading ahead]: before item k is read, every item after it is asked for
    until READ_AHEAD bytes beyond it are, each once."""
    from types import SimpleNamespace

    from fscale._checkpoint import reader

    asked = []
    monkeypatch.setattr(reader.os, "posix_fadvise", lambda fd, off, n, how: asked.append(off))
    monkeypatch.setattr(reader, "READ_AHEAD", 100)
    infos = [SimpleNamespace(offset=10 * i, length=n) for i, n in enumerate([40, 60, 30, 50, 5])]
    ahead = reader._ReadAhead(3, infos)
    ahead.through(0)
    assert asked == [0, 10, 20, 30]  # item 0, then 60 + 30 < 100 bytes: item 3 passes it
    ahead.through(1)
    assert asked == [0, 10, 20, 30, 40]  # beyond item 1: 30 + 50 < 100: item 4 too
    ahead.through(2)
    ahead.through(4)
    assert asked == [0, 10, 20, 30, 40]  # each once


def test_a_saved_tensor_is_found_in_place_or_refused():
    """[Note: a tensor item read in place]: the view equals what torch.save wrote, for
    any dtype and shape (0-d and empty too); a blob that is not exactly one storage of
    that shape and dtype gives None (the reader then uses torch.load)."""
    import io as io_

    from fscale._checkpoint.direct import tensor_view

    def blob(obj) -> torch.Tensor:
        b = io_.BytesIO()
        torch.save(obj, b)
        return torch.frombuffer(bytearray(b.getvalue()), dtype=torch.uint8)

    g = torch.Generator().manual_seed(0)
    for t in (
        torch.randn(3, 5, generator=g),
        torch.randn(7, generator=g).to(torch.bfloat16),
        torch.randint(0, 9, (2, 2, 3), generator=g),
        torch.zeros(0, 4),
        torch.tensor(2.5),
    ):
        view = tensor_view(blob(t), t.shape, t.dtype)
        assert view is not None and view.dtype == t.dtype and torch.equal(view, t)
    t = torch.randn(10, generator=g)
    assert tensor_view(blob(t[2:5]), (3,), torch.float32) is None  # saves all 10
    assert tensor_view(blob(t), (5,), torch.float32) is None  # another size
    assert tensor_view(blob({"a": t, "b": t + 1}), (10,), torch.float32) is None
    assert tensor_view(torch.zeros(64, dtype=torch.uint8), (4,), torch.float32) is None


class _Sink(io.RawIOBase):
    def __init__(self):
        self.data = bytearray()

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        self.data += bytes(b)
        return memoryview(b).nbytes

    def tell(self) -> int:
        return len(self.data)


def _summed_bytes(monkeypatch) -> list[int]:
    """Bytes the stream sums itself (not those whose CRC torch gave)."""
    seen = []
    real = checksummed.crc32

    def spy(view, value=0):
        seen.append(memoryview(view).nbytes)
        return real(view, value)

    monkeypatch.setattr(checksummed, "crc32", spy)
    return seen


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.uint8])
def test_torchs_crc_of_a_record_replaces_summing_its_data(monkeypatch, dtype):
    """[Note: the CRC torch already took]: a tensor item's data is not summed again;
    its piece's CRC is still that of every byte written."""
    seen = _summed_bytes(monkeypatch)
    sink = _Sink()
    stream = checksummed._SummingStream(sink)
    tensors = [
        torch.randn(300_000).to(dtype),
        torch.randn(7).to(dtype),
        torch.empty(0, dtype=dtype),
    ]
    for t in tensors:
        stream.mark()
        torch.save(t, stream)
        stream.flush()
    stream.mark()
    assert sum(n for _, n, _ in stream.pieces) == len(sink.data) == stream.size
    for o, n, crc in stream.pieces:
        assert crc == zlib.crc32(sink.data[o : o + n])
    big = tensors[0].nbytes
    assert max(seen) < checksummed._DEFER <= big  # the large data was never summed here
    assert sum(seen) < len(sink.data) - big + 1


@pytest.mark.parametrize("after", ["other write", "wrong size", "no crc", "flush", "mark", "tell"])
def test_data_without_its_descriptor_is_summed(after):
    """When what follows a record's data is not its descriptor, the stream sums the
    data itself: the CRC is right whatever comes next."""
    data = os.urandom(checksummed._DEFER + 5)
    header = bytearray(30)
    header[:4] = b"PK\x03\x04"
    struct.pack_into("<H", header, 6, 0x808)
    struct.pack_into("<HH", header, 26, 3, 4)
    sink = _Sink()
    stream = checksummed._SummingStream(sink)
    for b in (bytes(header), b"abc", b"FB\x00\x00", data):
        stream.write(b)
    if after == "other write":
        stream.write(b"next")
    elif after == "wrong size":  # a descriptor of another length: its CRC is not used
        stream.write(b"PK\x07\x08" + struct.pack("<III", 1234, len(data) - 1, len(data) - 1))
    elif after == "no crc":  # what torch writes with set_crc32_options(False)
        stream.write(b"PK\x07\x08" + struct.pack("<III", 0, len(data), len(data)))
    else:
        getattr(stream, after)()
    stream.mark()
    ((o, n, crc),) = stream.pieces
    assert (o, n) == (0, len(sink.data)) and crc == zlib.crc32(sink.data)


class _ShortSink(_Sink):
    """Takes at most 100,000 bytes of a write (as a raw file may)."""

    def write(self, b) -> int:
        return super().write(memoryview(b)[:100_000])


@pytest.mark.parametrize("sink_type", [_Sink, _ShortSink])
def test_inline_summing_sums_each_piece_just_before_writing_it(monkeypatch, sink_type):
    """[Note: summing while the bytes are in cache]: with torch's CRCs off, a record's
    data is summed and written a piece at a time, alternately (each piece is summed
    while the write of it is still to come); pieces' CRCs are those of the file's bytes,
    whatever the raw stream takes per write."""
    from fscale._checkpoint.writer import _save_without_crc

    events = []
    real = checksummed.crc32

    def spy(view, value=0):
        events.append(("sum", memoryview(view).nbytes))
        return real(view, value)

    monkeypatch.setattr(checksummed, "crc32", spy)
    monkeypatch.setattr(checksummed, "PIECE", 1 << 18)
    sink = sink_type()
    raw_write = sink.write

    def logged(b):
        n = raw_write(b)
        events.append(("write", n))
        return n

    sink.write = logged
    stream = checksummed._SummingStream(sink, inline=True)
    tensors = [torch.randn(300_000), torch.randn(7), torch.arange(70_000, dtype=torch.int16)]
    for t in tensors:
        stream.mark()
        _save_without_crc(t, stream)
        stream.flush()
    stream.mark()
    assert sum(n for _, n, _ in stream.pieces) == len(sink.data) == stream.size
    for o, n, crc in stream.pieces:
        assert crc == zlib.crc32(sink.data[o : o + n])
    assert stream._pending is None  # nothing was left to sum after the write
    big = tensors[0].nbytes  # 1.2 MB: 5 pieces of 256 KiB, each summed then written
    sums = [i for i, (kind, n) in enumerate(events) if kind == "sum" and n == 1 << 18]
    assert len(sums) == big // (1 << 18)
    for i in sums:
        assert events[i + 1][0] == "write"  # its write comes next, nothing read between
    assert max(n for kind, n in events if kind == "sum") <= 1 << 18
    o, n, _ = stream.pieces[0]
    loaded = torch.load(io.BytesIO(sink.data[o : o + n]))
    assert torch.equal(loaded, tensors[0])


def _crc_loop_built() -> bool:
    from fscale._checkpoint import crc_write

    fd = os.open(os.devnull, os.O_WRONLY)
    try:
        return crc_write.crc_write(fd, memoryview(b"x"), 0) is not None
    finally:
        os.close(fd)


@pytest.mark.parametrize("n", [0, 1, (1 << 20) - 1, 3 * (1 << 20) + 12345])
def test_the_c_record_loop_writes_every_byte_and_returns_the_running_crc(tmp_path, n):
    """[Note: one GIL release per record]: ``crc_write`` writes all of a read-only view
    (pieces and a tail) at the descriptor's position and returns zlib's CRC-32 running
    on from the one it was given."""
    from fscale._checkpoint.crc_write import crc_write

    if not _crc_loop_built():
        pytest.skip("no C compiler, or zlib-ng without zng_crc32")
    data = os.urandom(n)
    path = tmp_path / "f"
    with open(path, "wb") as f:
        f.write(b"head")
        f.flush()
        crc = crc_write(f.fileno(), memoryview(data).toreadonly(), zlib.crc32(b"head"))
        f.write(b"tail")
    assert path.read_bytes() == b"head" + data + b"tail"
    assert crc == zlib.crc32(data, zlib.crc32(b"head"))


def test_the_c_record_loop_raises_the_write_error():
    """A full disk (``/dev/full``: every write is ENOSPC) is an ``OSError`` with its errno
    from the C loop, never a short file that passes."""
    from fscale._checkpoint.crc_write import crc_write

    if not _crc_loop_built() or not os.path.exists("/dev/full"):
        pytest.skip("no C loop, or no /dev/full")
    fd = os.open("/dev/full", os.O_WRONLY)
    try:
        with pytest.raises(OSError) as info:
            crc_write(fd, memoryview(b"x" * 5000), 0)
        assert info.value.errno == errno.ENOSPC
    finally:
        os.close(fd)


def test_a_file_stream_takes_the_c_loop_and_its_sums_are_the_files(tmp_path, monkeypatch):
    """Through DCP's file stream (a buffered file) the records of a ``torch_crc=False``
    save go through the C loop, once per record, and the pieces' CRCs are the file's;
    with ``FSCALE_CRC_WRITE=0`` the Python loop writes the same bytes."""
    from fscale._checkpoint import crc_write as cw
    from fscale._checkpoint.writer import _save_without_crc

    if not _crc_loop_built():
        pytest.skip("no C compiler, or zlib-ng without zng_crc32")
    calls = []
    real = cw.crc_write

    def spy(fd, view, crc):
        out = real(fd, view, crc)
        calls.append((view.nbytes, out is not None))
        return out

    monkeypatch.setattr(checksummed, "crc_write", spy)
    tensors = [torch.randn(300_000), torch.arange(70_000, dtype=torch.int16)]
    files = {}
    for env in ("1", "0"):
        monkeypatch.setenv("FSCALE_CRC_WRITE", env)
        fs_ = checksummed.ChecksummingFileSystem()
        with fs_.create_stream(tmp_path / f"f{env}", "wb", inline=True) as stream:
            for t in tensors:
                stream.mark()
                _save_without_crc(t, stream)
                stream.flush()
        data = (tmp_path / f"f{env}").read_bytes()
        pieces, size = fs_.sums[f"f{env}"]
        assert size == len(data)
        for o, n, crc in pieces:
            assert crc == zlib.crc32(data[o : o + n])
        files[env] = data
    assert calls[:2] == [(tensors[0].nbytes, True), (tensors[1].nbytes, True)]
    assert all(not took for _, took in calls[2:])  # FSCALE_CRC_WRITE=0: Python's loop
    assert files["1"] == files["0"]

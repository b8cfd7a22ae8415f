"""[Note: checksums while writing]: the CRC-32 taken on the way to each file equals the
file's CRC read back, through DCP's real writer, with several writer threads."""

from __future__ import annotations

import os
import zlib

import torch
import torch.distributed.checkpoint as dcp

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
        crc, size = summer.sums[name]
        path = os.path.join(tmp_path, name)
        assert (crc, size) == (_crc_of(path), os.path.getsize(path)), name
    # What was written loads back (the wrapper hands DCP the same bytes).
    back = {k: torch.empty_like(v) for k, v in state.items() if isinstance(v, torch.Tensor)}
    back["meta"] = {}
    dcp.load(back, checkpoint_id=tmp_path, no_dist=True)
    assert all(torch.equal(back[k], state[k]) for k in back if k != "meta")

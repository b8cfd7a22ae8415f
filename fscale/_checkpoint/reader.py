"""``fs.load``'s reader: DCP's ``FileSystemReader`` with its files read in parallel and
device targets filled through pinned memory.

Usage::

    dcp.load(state_dict, storage_reader=ParallelReader(where, threads=8), planner=planner)
"""

from __future__ import annotations

import io
import os
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.planner import LoadItemType
from torch.distributed.checkpoint.utils import _create_file_view
from torch.futures import Future

from fscale._checkpoint.direct import as_buffer, read_item, tensor_view

# [Note: how a tensor comes back from the disk]
# DCP's reader takes one file after another, one item after another, each a
# ``torch.load`` into pageable memory and a ``copy_`` into the target: one request in
# flight at the disk, and a pageable host-to-device copy (a fraction of the link's
# speed, as on save: [Note: how a tensor reaches the disk] in fscale/checkpoint.py).
# Here each file (one per writer thread of the save) is read by a thread of its own,
# items in file order, and a device target is filled from a pinned copy on the
# thread's side stream (torch's pinned-memory cache keeps the blocks, and records the
# copy's use, so a block is reused only once its copy is done). An item whose bytes
# have a checksum of their own is read whole into that pinned (or, for a host target,
# pageable) buffer, verified there, and used in place ([Note: a tensor item read in
# place] in ``direct.py``). Every stream is
# joined before ``read_data`` returns: the load is whole when ``dcp.load`` does.
# What each item becomes is DCP's: the same slices, transforms, ``torch.load``,
# narrowing and planner calls (``resolve_tensor`` / ``commit_tensor`` /
# ``load_bytes``, which fscale's planner makes safe from threads: distinct keys).


class ParallelReader(dcp.FileSystemReader):
    """DCP's reader, one thread per file (at most ``threads``), each item's bytes
    verified against ``checksums`` as they are read ([Note: data-file checksums] in
    ``files.py``)."""

    def __init__(self, path, *, threads: int = 8, checksums=None):
        super().__init__(path)
        self.threads = max(1, int(threads))
        self.checksums = checksums
        self.stored: dict = {}  # storage index -> (chunk sizes, dtype) as saved

    def set_up_storage_reader(self, metadata, is_coordinator: bool, *args, **kwargs) -> None:
        super().set_up_storage_reader(metadata, is_coordinator, *args, **kwargs)
        for fqn, md in metadata.state_dict_metadata.items():
            for chunk in getattr(md, "chunks", ()):
                self.stored[(fqn, tuple(chunk.offsets))] = (tuple(chunk.sizes), md.properties.dtype)

    def read_data(self, plan, planner) -> Future:
        per_file: dict[str, list] = {}
        for item in plan.items:
            per_file.setdefault(self.storage_data[item.storage_index].relative_path, []).append(
                item
            )
        jobs = [
            (path, sorted(items, key=lambda i: self.storage_data[i.storage_index].offset))
            for path, items in per_file.items()
        ]
        if len(jobs) <= 1 or self.threads == 1:
            for path, items in jobs:
                self._read_file(path, items, planner)
        else:
            with ThreadPoolExecutor(min(self.threads, len(jobs)), "fscale-load") as pool:
                for done in [pool.submit(self._read_file, p, items, planner) for p, items in jobs]:
                    done.result()  # the first error is the load's
        fut: Future = Future()
        fut.set_result(None)
        return fut

    def _stored(self, item) -> tuple:
        """The shape and dtype of the chunk ``item`` reads from, as saved."""
        return self.stored[(item.storage_index.fqn, tuple(item.storage_index.offset))]

    def _read_file(self, relative_path: str, items: list, planner) -> None:
        streams: dict[torch.device, torch.cuda.Stream] = {}
        sums = self.checksums
        infos = [self.storage_data[item.storage_index] for item in items]
        pieces = sums is not None and all(
            sums.piece(relative_path, i.offset, i.length) is not None for i in infos
        )
        if sums is not None and not pieces:
            sums.verify_file(relative_path)  # items are not pieces: the whole file first
        with self.fs.create_stream(self.fs.concat_path(self.path, relative_path), "rb") as f:
            ahead = _ReadAhead(f.fileno(), infos)
            for k, (item, info) in enumerate(zip(items, infos, strict=True)):
                tensor = target = None
                if pieces:  # read whole, verified before use
                    ahead.through(k)
                    direct = item.type != LoadItemType.BYTE_IO and not info.transform_descriptors
                    if direct:  # [Note: a tensor item read in place]
                        target = planner.resolve_tensor(item).detach()
                    pinned = direct and target.is_cuda
                    blob = read_item(f.fileno(), info.offset, info.length, pinned=pinned)
                    sums.verify(relative_path, info.offset, as_buffer(blob))
                    if direct:
                        tensor = tensor_view(blob, *self._stored(item))
                    view = None if tensor is not None else io.BytesIO(as_buffer(blob))
                else:
                    view = _create_file_view(f, info.offset, info.length)
                if tensor is None:
                    raw = self.transforms.transform_load_stream(
                        item, info.transform_descriptors or (), view
                    )
                    if item.type == LoadItemType.BYTE_IO:
                        planner.load_bytes(item, io.BytesIO(raw.read(-1)))
                        continue
                    seekable = raw if raw.seekable() else io.BytesIO(raw.read(-1))
                    tensor = torch.load(seekable, map_location="cpu", weights_only=True)
                for dim, (start, length) in enumerate(
                    zip(item.storage_offsets, item.lengths, strict=True)
                ):
                    tensor = tensor.narrow(dim, start, length)
                if target is None:
                    target = planner.resolve_tensor(item).detach()
                if target.size() != tensor.size():
                    raise AssertionError(
                        f"req {item.storage_index} mismatch sizes {target.size()} vs "
                        f"{tensor.size()}"
                    )
                if target.device.type == "cuda" and tensor.is_pinned():
                    _copy_pinned(target, tensor, streams)  # a view of a pinned blob
                elif target.device.type == "cuda":
                    _copy_through_pinned(target, tensor, streams)
                else:
                    target.copy_(tensor)
                planner.commit_tensor(item, target)
        for stream in streams.values():
            stream.synchronize()


#: Bytes of a file's next items a reader thread asks the kernel to read ahead while it
#: verifies, parses and copies the current one.
READ_AHEAD = 256 << 20


class _ReadAhead:
    """[Note: reading ahead] A reader thread works through an item in turns: read it
    whole, CRC it, find its tensor, copy it to its target. While it does the rest the
    drive would idle; ``through(k)`` asks the kernel (``POSIX_FADV_WILLNEED``) for the
    items after ``k`` up to ``READ_AHEAD`` bytes, so the next read finds them cached."""

    def __init__(self, fd: int, infos: list):
        self.fd, self.infos, self.next = fd, infos, 0

    def through(self, k: int) -> None:
        if not hasattr(os, "posix_fadvise"):
            return
        pending = sum(i.length for i in self.infos[k + 1 : self.next])
        self.next = max(self.next, k)
        while self.next < len(self.infos) and (self.next <= k or pending < READ_AHEAD):
            info = self.infos[self.next]
            os.posix_fadvise(self.fd, info.offset, info.length, os.POSIX_FADV_WILLNEED)
            if self.next > k:
                pending += info.length
            self.next += 1


def _copy_through_pinned(target: torch.Tensor, tensor: torch.Tensor, streams: dict) -> None:
    """``target.copy_(tensor)`` for a device target, from a pinned copy on a side stream
    that waits for the target's last use on the current stream."""
    pinned = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    pinned.copy_(tensor)
    _copy_pinned(target, pinned, streams)


def _copy_pinned(target: torch.Tensor, pinned: torch.Tensor, streams: dict) -> None:
    """``target.copy_(pinned)`` on the side stream (the host allocator keeps the pinned
    block until the copy is done)."""
    stream = streams.get(target.device)
    if stream is None:
        stream = streams[target.device] = torch.cuda.Stream(target.device)
        stream.wait_stream(torch.cuda.current_stream(target.device))
    with torch.cuda.stream(stream):
        target.copy_(pinned, non_blocking=True)

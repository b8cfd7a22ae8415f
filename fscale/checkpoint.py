"""``fs.save`` / ``fs.load``: sharded, reshardable, atomic checkpoints on torch DCP.

A checkpoint is a ``torch.distributed.checkpoint`` directory: every rank writes the
rows it holds (``__<rank>_0.distcp``) and rank 0 the ``.metadata`` that says where
each chunk of each *logical* (full, unpadded) tensor lives. What is written is the
state protocol (``fscale.state.describe``): ``params/<name>`` and every state entry
by its path (``optimizer/exp_avg/<name>``, ``shard_zero/master/<name>``,
``mixed_precision/scale`` ...), plus the plain metadata (counts, the loss-scale
window) and each rank's ``extra``.

[Note: padded shards in DCP]
fscale's shards are padded row blocks ([Note: shard layout] in
``fscale/transforms/_zero/sharding.py``): with ``n`` parts each rank holds
``ceil(d0 / n)`` rows, the last ones zero padding. A rank writes only its *real*
rows, as one chunk at global row offset ``index * ceil(d0 / n)`` of the unpadded
tensor (DCP's ``ChunkStorageMetadata``, through its ``__create_write_items__``
protocol; ``_Rows`` in ``fscale/_checkpoint/chunks.py``), so the saved tensor is
the logical one, independent of the world size. Replicas (HSDP's replicate dim,
whole tensors on every rank) write the same chunk and DCP keeps one of them.
Loading asks DCP for the target rank's real rows at their offset, whatever chunks
the checkpoint holds: that is the resharding (ZeRO-3 world 4 -> stage 1 world 2 ->
plain world 1, HSDP -> plain). The padding rows of the target stay as
``step.init`` made them (zeros).

[Note: model-parallel placements in DCP]
tensor_parallel and expert_parallel slices are written the same way, as regions of
the full tensor ([Note: model-parallel pieces] in ``fscale/_checkpoint/chunks.py``):
a fused qkv (``chunks=3``) is one region per block, an expert bank split over "ep"
and "tp" (``extra``) one region with offsets along both dims. A rank's coordinates
come from the placement and the step's mesh: ``load`` has the step, ``save`` reads
the mesh ``step.init`` recorded in the state's layout (those slices carry no process
group; [Note: the mesh in the layout] in ``fscale/placement.py``), and checks a
``mesh=`` passed against it. Optimizer moments of a split param take the param's
placement ([Note: per-param state of split params]). So a (tp=2, ep=2) run resumes exactly,
loads into the world of one, and a world of one's checkpoint loads into it.

[Note: what load fills]
``load`` builds the target with ``step.init(params)`` and fills it in place:

- a tensor entry takes the checkpoint's entry of the same path (its logical shape
  must match: else a ``ValueError`` naming both shapes);
- a copy of a param (``params/<name>`` or any slot's ``.../master/<name>``) takes
  the checkpoint's most precise copy of that param (an fp32 master before a bf16
  param), cast, when the same path is missing or has another dtype: a bf16
  ZeRO-1 checkpoint restores fp32 masters into a plain step, and back;
- an entry that shares storage with the params (ZeRO-3's flat shard buffers) is
  filled through the params, never read whole: its layout depends on the world;
- an entry of a slot the checkpoint does not have (a transform added since) keeps
  its initial value; an entry missing from a slot the checkpoint has is an error;
- plain metadata (``count``, the optimizer's ``count``, the loss-scale window)
  is restored at the paths both have; objects that describe themselves restore
  theirs with ``load_state(values)`` when they have it (offload's sub-groups),
  else their metadata is derived from the stack and kept;
- tensors a slot makes lazily, after ``init`` (qgZ's error-feedback buffers, made
  at the first exchange: their shapes are known only then), are made by the slot:
  before DCP reads, an object that describes itself and has ``make_entries(saved)``
  is called with the checkpoint's tensor entries under its path (``{relative path:
  (shape, dtype)}``) and creates, in itself, the tensors it will describe, of the
  saved logical shape and with their placement; they are then filled like any entry.
  It raises (a ``ValueError`` naming why) for entries it cannot hold, e.g. per-rank
  buffers saved by another world size, and ignores those it does not need.

[Note: mirrored params]
An fp32 param can be stored twice with equal bytes: offload's host master and the
tensor offload updates from it (ZeRO-3's flat shards, saved as ``params/<name>``, or
ZeRO-1/2's ``shard_zero/master/<name>``); an offloaded 3.55B wrote 16 bytes per param
where 12 hold the state. A master whose owner copies it into that tensor after every
update describes itself with ``mirrors_param`` (offload, unless the update is delayed
or casts); ``save`` then keeps it alone and leaves out the other copies of its param
with its dtype: a quarter fewer bytes, and an async save clones no device params.
``load`` fills those from it as from any most precise copy (above), and a param with
no ``params/<name>`` entry has its shape checked against its master's.

[Note: atomic save]
Ranks write into ``<path>.tmp-<id>`` (DCP fsyncs every file and renames its
``.metadata`` into place last); rank 0 then fsyncs the directory, renames it to
``path`` and fsyncs the parent. In a run directory (``at=``) the checkpoint is
``<dir>/step-<at>``; the ``latest`` pointer is written (temp file, fsync, rename)
after it, and only then are checkpoints beyond ``keep`` removed: the new one stays
(even below older steps, after a rollback) with the newest ``keep - 1`` others by
step, and so does whatever ``latest`` names when a removal comes. A kill at any
moment leaves the run loadable: ``latest`` names the old checkpoint or the new one,
whole, plus at most a ``.tmp-`` directory that ``load`` never reads (tested by a
crash injected at every file operation of a save). Saving again over an
existing ``path`` swaps the two directories in one ``renameat2(RENAME_EXCHANGE)``
([Note: replacing a checkpoint in one step] in ``_checkpoint/files.py``); where the
file system refuses it the old one is renamed aside first, and a kill between the two
renames leaves it as ``<path>.old-<id>``, which ``load`` names. A save removes the
temp directories killed saves left (of its checkpoint; in a run directory, of any step).

``extra`` is kept per rank (``extra/<rank>``) and read back with ``fs.load_extra``
(not collective); it is not an argument of ``load``, which returns only
``(params, state)``.

Usage::

    fs.save(run_dir, params, state, at=step_no, keep=3, extra={"loader": pos})
    params, state = fs.load(run_dir, step, full_params)      # reads run_dir/latest
    extra = fs.load_extra(run_dir)                           # this rank's extra
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import uuid
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.futures import Future

from fscale import _guard, tree
from fscale._checkpoint.checksummed import ChecksummingFileSystem
from fscale._checkpoint.chunks import (
    _Coords,
    _LoadPlanner,
    _Many,
    _mesh_coords,
    _pieces,
    _Rows,
    _SavePlanner,
)
from fscale._checkpoint.files import (
    _check_files,
    _publish,
    _read_metadata,
    _resolve,
    _rotate,
    _unreadable,
    _write_latest,
    latest,
    remove_stale_temps,
    write_checksums,
)
from fscale._checkpoint.reader import ParallelReader
from fscale._checkpoint.restore import (
    _check_model,
    _make_lazy,
    _param_of,
    _restore_plain,
    _source_key,
)
from fscale._checkpoint.snapshot import LazySnapshot, pooled_bytes
from fscale._checkpoint.writer import SaveIO, make_job, split_items, write_buckets
from fscale.hw import comm
from fscale.hw import mesh as meshes
from fscale.placement import MeshLayout, Placement, placement_of, replicated
from fscale.state import StoredTensor, TensorEntry, announced, describe

__all__ = ["SaveHandle", "SaveIO", "latest", "load", "load_extra", "save", "wait_pending"]

FORMAT = 2  # 2: data-file checksums ([Note: data-file checksums])
#: Default writer threads per rank (``fs.save(threads=...)``), each with its own file.
WRITE_THREADS = min(8, os.cpu_count() or 1)
_META = "fscale/meta"


# ----------------------------------------------------------------------------- save


def save(
    path: str | os.PathLike,
    params: Any,
    state: dict,
    *,
    extra: Any = None,
    at: int | None = None,
    keep: int | None = None,
    mesh: Any = None,
    async_save: bool = False,
    threads: int | None = None,
    io: SaveIO | None = None,
) -> str | SaveHandle:
    """Write ``params`` and ``state`` as a sharded DCP checkpoint; every rank calls it.

    Args:
      path: the checkpoint directory; with ``at``, a run directory holding
        ``step-<at>`` checkpoints and a ``latest`` pointer.
      params, state: what ``step.init`` / the last step call returned.
      extra: anything picklable, kept per rank (the data loader's position, RNG
        states); read back with ``fs.load_extra``.
      at: the step number: write ``<path>/step-<at>`` and point ``<path>/latest`` at it.
      keep: with ``at``: keep only ``keep`` checkpoints of the run directory: this one
        and the newest ``keep - 1`` others by step (this one stays after a rollback).
      mesh: not needed: ``step.init`` records its mesh in the state ([Note: the mesh
        in the layout] in ``fscale/placement.py``), which places tensor_parallel and
        expert_parallel slices. Passed (``step.mesh`` or a ``DeviceMesh``), it must be
        that mesh: dims, sizes and this rank's coordinates (else a ``ValueError``).
      async_save: copy what this rank writes ([Note: async staging]) and write it in
        a background thread while training goes on; returns a ``SaveHandle`` to
        ``wait()`` on. At most one save is in flight: the next ``save`` (and ``load``)
        waits for it first.
      threads: writer threads per rank, each writing its own file (default
        ``WRITE_THREADS``): one thread serialises, copies and writes one tensor at a
        time, far below what a drive takes.
      io: how bytes move to the disk (a ``SaveIO``: pinned bounce buffers for device
        tensors, early write-out, the priority and threads of an asynchronous save;
        [Note: how a tensor reaches the disk] in ``fscale/_checkpoint/writer.py``).

    Returns:
      The checkpoint directory written (a ``SaveHandle`` with ``async_save``).
    """
    if not isinstance(state, dict) or "layout" not in state:
        raise ValueError(
            "fs.save: state was not produced by step.init; pass the (params, state) that "
            "step.init or the last step call returned."
        )
    if keep is not None and (at is None or not isinstance(keep, int) or keep < 1):
        raise ValueError(
            f"fs.save(keep={keep!r}) needs at=<step number> and keep >= 1: rotation works "
            "on a run directory of step-<n> checkpoints."
        )
    if at is not None and (not isinstance(at, int) or at < 0):
        raise ValueError(f"fs.save(at={at!r}): at is the step number, an int >= 0.")
    threads = WRITE_THREADS if threads is None else threads
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"fs.save(threads={threads!r}): the writer threads, an int >= 1.")
    io = SaveIO() if io is None else io
    if not isinstance(io, SaveIO):
        raise ValueError(f"fs.save(io={io!r}): pass a fs.checkpoint.SaveIO(...) or None.")
    root = os.fspath(path)
    final = os.path.join(root, f"step-{at}") if at is not None else root
    rank = comm.rank()
    wait_pending()  # at most one save in flight
    # A step whose non-finite verdict is still unread ([Note: reading the verdict a
    # step late] in fscale/_guard.py) is settled first: a checkpoint holds none.
    _guard.settle(state, raise_at_limit=False)
    state_dict = _save_state_dict(params, state, _save_mesh(state, mesh))
    state_dict[f"extra/{rank}"] = extra
    tmp = f"{final}.tmp-{_shared_id()}"
    if rank == 0:
        os.makedirs(os.path.dirname(os.path.abspath(final)), exist_ok=True)
        remove_stale_temps(final, run_dir=at is not None)  # what killed saves left
    _barrier()
    if not async_save:
        return _write(state_dict, tmp, final, root, at, keep, None, _Writing(threads, io, 0))
    global _PENDING
    snapshot = LazySnapshot(io.copy_threads, io.background_nice, keep=io.keep_copies)
    staged = _stage(state_dict, io.stage, snapshot)
    try:
        if _keeps_buffers(snapshot, io.snapshot):
            snapshot.keep_buffers(required=io.snapshot == "second_buffer")
        snapshot.device = _snapshot_place(snapshot, io.snapshot)
        group = _async_group()
        writing = _Writing(
            io.background_threads or threads, io, io.background_nice, io.background_idle
        )
        snapshot.start()
        future = _executor().submit(
            _write_closing, snapshot, staged, tmp, final, root, at, keep, group, writing
        )
    except BaseException:
        snapshot.close()  # nothing will write it: stop copying, release, unregister
        raise
    _PENDING = SaveHandle(final, future)
    return _PENDING


class SaveHandle:
    """An asynchronous save in flight: ``wait()`` returns its directory once it is
    published (renamed into place, ``latest`` updated) on every rank."""

    def __init__(self, path: str, future):
        self.path = path
        self._future = future

    def done(self) -> bool:
        return self._future.done()

    def wait(self) -> str:
        return self._future.result()


_PENDING: SaveHandle | None = None
_EXECUTOR = None
_GROUP = None


def wait_pending() -> None:
    """Wait for the asynchronous save in flight, if any (raises its error)."""
    global _PENDING
    pending, _PENDING = _PENDING, None
    if pending is not None:
        pending.wait()


def _executor():
    global _EXECUTOR
    if _EXECUTOR is None:
        from concurrent.futures import ThreadPoolExecutor

        _EXECUTOR = ThreadPoolExecutor(1, thread_name_prefix="fscale-save")
    return _EXECUTOR


def _async_group():
    """A process group of its own for saves in the background: their collectives
    never interleave with the training's on the default group."""
    global _GROUP
    if comm.world_size() > 1 and _GROUP is None:
        _GROUP = comm.new_group(list(range(comm.world_size())))
    return _GROUP


def _write_closing(snapshot: LazySnapshot, *args) -> str:
    try:
        snapshot.wait_copied()  # [Note: writing after the snapshot]
        return _write(*args)
    finally:
        snapshot.close()


def _stage(state_dict: dict, where: str = "auto", snapshot: LazySnapshot | None = None) -> dict:
    """[Note: async staging] A copy of every tensor this rank writes, taken before
    training goes on (steps update params and state in place). NVMe entries are not
    copied: their files are opened now, and the swap engine replaces a file whole
    (a new inode) when it writes, so the open descriptor keeps reading the bytes of
    this step. Device tensors are copied where ``SaveIO.stage`` says: on the device
    (a copy at the device's memory bandwidth, milliseconds for a 1.4B model's state;
    the writer threads move it to the host through their pinned slabs, as a
    synchronous save does, and the copy is freed when written), or into pinned host
    memory on a side stream (the first save pins the blocks, seconds per 10 GB; torch
    caches them for the next), or pageable (``.to("cpu")``, a fraction of the link's
    speed: [Note: how a tensor reaches the disk]). ``"auto"`` stages on the device
    where its free memory holds the copies with a margin. One wait at the end.
    Other host tensors are copied on the host, in the call, except those whose owner
    announces its writes (offload's sub-group buffers): ``snapshot`` copies them lazily
    ([Note: lazy snapshot] in ``fscale/_checkpoint/snapshot.py``)."""
    copier = _Copier(_staging_place(state_dict, where), snapshot)
    out = {}
    for key, v in state_dict.items():
        if isinstance(v, torch.Tensor):
            out[key] = copier(v)
        elif isinstance(v, _Many):
            out[key] = _Many([_staged(p, copier) for p in v.parts])
        elif isinstance(v, _Rows):
            out[key] = _staged(v, copier)
        else:
            out[key] = copy.deepcopy(v)
    copier.wait()
    return out


#: Free device memory "auto" staging leaves beyond the copies (the allocator's
#: fragmentation and the next step's peaks).
STAGING_MARGIN = 2 << 30


def _staging_place(state_dict: dict, where: str) -> str:
    """``SaveIO.stage`` resolved: "auto" is "device" where each device's free memory
    (the driver's, plus what torch's allocator holds unused) fits its copies and
    ``STAGING_MARGIN``, else "pinned"."""
    if where != "auto":
        return where
    need: dict[torch.device, int] = {}
    for t in _device_tensors(state_dict):
        need[t.device] = need.get(t.device, 0) + t.numel() * t.element_size()
    for device, nbytes in need.items():
        free, _ = torch.cuda.mem_get_info(device)
        stats = torch.cuda.memory_stats(device)
        cached = stats.get("reserved_bytes.all.current", 0) - stats.get(
            "allocated_bytes.all.current", 0
        )
        if free + cached < nbytes + STAGING_MARGIN:
            return "pinned"
    return "device"


def _keeps_buffers(snapshot: LazySnapshot, where: str) -> bool:
    """``SaveIO.snapshot`` resolved for the owners' buffers a snapshot could keep
    ([Note: keeping the owner's buffers] in _checkpoint/snapshot.py): "auto" keeps them
    where the host's available memory, with the pooled copies keeping buffers frees,
    holds the second buffers still to allocate."""
    if where in ("host", "device") or not snapshot.keepable():
        return False
    return where == "second_buffer" or (
        _host_available() + pooled_bytes() >= snapshot.second_bytes() + STAGING_MARGIN
    )


def _snapshot_place(snapshot: LazySnapshot, where: str) -> torch.device | None:
    """``SaveIO.snapshot`` resolved to the device a lazy snapshot copies into, or None
    for host memory ([Note: a snapshot in device memory] in _checkpoint/snapshot.py):
    "auto" is the host where its available memory (or the kept copies) holds the
    entries and ``STAGING_MARGIN``, else the current CUDA device where the entries are
    pinned and its free memory (after the staging above, not counting the allocator's
    cache) holds them, else the host."""
    if where in ("host", "second_buffer") or not snapshot.nbytes():
        return None
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    if where == "device":
        if not cuda:
            raise ValueError(
                "fs.save: SaveIO(snapshot='device') needs CUDA in use; use 'auto' or 'host'."
            )
        return torch.device("cuda", torch.cuda.current_device())
    nbytes = snapshot.nbytes()
    if snapshot.kept_bytes() + _host_available() >= nbytes + STAGING_MARGIN:
        return None
    if not cuda or not snapshot.pinned():
        return None
    # Only the driver's free memory: what torch's allocator holds unused now is the
    # next step's activations, and the copies are made while that step runs.
    device = torch.device("cuda", torch.cuda.current_device())
    free, _ = torch.cuda.mem_get_info(device)
    return device if free >= nbytes + STAGING_MARGIN else None


def _host_available() -> int:
    """The host memory this process can still get without swapping: the kernel's
    ``MemAvailable``, capped by a cgroup v2 memory limit where one is set (a
    container's), or a very large number where neither says (not Linux)."""
    out = 1 << 62
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    out = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        if limit != "max":
            with open("/sys/fs/cgroup/memory.current") as f:
                out = min(out, int(limit) - int(f.read()))
    except (OSError, ValueError):
        pass
    return out


def _device_tensors(state_dict: dict):
    for v in state_dict.values():
        parts = v.parts if isinstance(v, _Many) else [v]
        for p in parts:
            t = p.local if isinstance(p, _Rows) else p
            if isinstance(t, torch.Tensor) and t.device.type == "cuda":
                yield t


def _staged(v: _Rows, copier) -> _Rows:
    if v.stored is not None:
        stored = _Pinned(v.stored) if v.write else v.stored
        return _Rows(v.shape, v.offsets, v.sizes, stored=stored, write=v.write)
    order = copier.order(v.local)
    if order is not None:
        return copier.snapshot.defer(v, order)
    return _Rows(v.shape, v.offsets, v.sizes, local=copier.copy(v.local), write=v.write)


class _Copier:
    """Copies of tensors for [Note: async staging]: device tensors on the device or
    into pinned host memory, on a side stream (after the caller's stream), waited for
    once; host tensors on the host, or lazily by ``snapshot`` where announced."""

    def __init__(self, where: str, snapshot: LazySnapshot | None = None):
        self.where = where
        self.streams: dict = {}
        self.snapshot = snapshot

    def order(self, t: torch.Tensor) -> int | None:
        """Where ``t`` is copied lazily ([Note: lazy snapshot]): its announce order, else None."""
        return None if self.snapshot is None else announced(t)

    def __call__(self, t: torch.Tensor):
        """``t`` deferred to the snapshot where announced, else ``copy(t)``."""
        order = self.order(t)
        if order is not None:
            return self.snapshot.defer(t, order)
        return self.copy(t)

    def copy(self, t: torch.Tensor):
        """A copy of ``t`` now (queued on a side stream for a device tensor)."""
        t = t.detach()
        if t.device.type != "cuda" or self.where == "pageable":
            return t.to("cpu", copy=True)
        stream = self.streams.get(t.device)
        if stream is None:
            stream = self.streams[t.device] = torch.cuda.Stream(t.device)
            stream.wait_stream(torch.cuda.current_stream(t.device))
        with torch.cuda.stream(stream):
            if self.where == "device":
                return t.clone()  # allocated on this stream, freed once written
            out = torch.empty_like(t, device="cpu", pin_memory=True)
            out.copy_(t, non_blocking=True)
        return out

    def wait(self) -> None:
        for stream in self.streams.values():
            stream.synchronize()


class _Pinned:
    """A stored tensor read through a descriptor opened at staging ([Note: async staging])."""

    def __init__(self, stored: StoredTensor):
        self.stored = stored
        self.dtype = stored.dtype
        self.fd = os.open(stored.path, os.O_RDONLY)

    def read(self) -> torch.Tensor:
        t = self.stored
        nbytes = math.prod(t.shape) * t.dtype.itemsize
        try:
            raw = bytearray(os.pread(self.fd, nbytes, t.offset))
        finally:
            os.close(self.fd)
        if len(raw) != nbytes:
            raise OSError(f"{t.path}: {len(raw)} bytes at offset {t.offset}, want {nbytes}.")
        return torch.frombuffer(raw, dtype=t.dtype).view(t.shape).clone()


class _Writer(dcp.FileSystemWriter):
    """DCP's file writer, with a failed writer thread made an error.

    [Note: writer threads] With ``thread_count > 1`` DCP writes from extra threads
    whose exceptions (a full disk, an I/O error) end only that thread: its items
    simply have no write result, and the save would go on to publish a checkpoint
    without them. Every planned item must have a result, or the save raises (and,
    raising before ``_publish``, leaves the previous checkpoint in place).
    """

    def __init__(self, *args, writing: _Writing, **kwargs):
        super().__init__(*args, thread_count=writing.threads, **kwargs)
        self.fs = ChecksummingFileSystem()  # [Note: checksums while writing]
        self.writing = writing

    def write_data(self, plan, planner):
        w = self.writing
        if w.io.pinned == 0:  # DCP's own loop: the old path
            results = super().write_data(plan, planner).value()
        else:  # [Note: how a tensor reaches the disk]
            job = make_job(
                planner, self.fs.create_stream, w.io, w.threads, self.sync_files, w.nice, w.idle
            )
            buckets = split_items(plan.items, w.threads)
            prefix = plan.storage_data.prefix
            results = write_buckets(buckets, prefix, self.path, self.fs.concat_path, job)
        future = Future()
        future.set_result(results)
        written = {r.index for r in results}
        missing = [item.index.fqn for item in plan.items if item.index not in written]
        if missing:
            raise OSError(
                f"fs.save: {len(missing)} of {len(plan.items)} items were not written to "
                f"{self.path} (a writer thread failed; its error is printed above, e.g. a "
                f"full disk), first {missing[0]!r}; the previous checkpoint is untouched."
            )
        # [Note: data-file checksums] in fscale/_checkpoint/files.py
        names = [r.storage_data.relative_path for r in results]
        write_checksums(str(self.path), comm.rank(), names, self.fs.sums)
        return future


@dataclass(frozen=True)
class _Writing:
    """How one save writes: its threads, its ``SaveIO`` and the niceness added to its
    writer threads (an asynchronous save's ``background_nice``)."""

    threads: int
    io: SaveIO
    nice: int
    idle: bool = False  # SCHED_IDLE writer threads (SaveIO.background_idle)


def _write(state_dict, tmp, final, root, at, keep, group, writing: _Writing) -> str:
    with _quiet():
        dcp.save(
            state_dict,
            storage_writer=_Writer(tmp, sync_files=True, writing=writing),
            planner=_SavePlanner(),
            process_group=group,
            no_dist=not comm.is_initialized(),
        )
    if comm.rank() == 0:
        _publish(tmp, final)
        if at is not None:
            _write_latest(root, os.path.basename(final))
            if keep is not None:
                _rotate(root, keep, os.path.basename(final))
    _barrier(group)
    return final


def _save_state_dict(params, state: dict, mesh) -> dict:
    entries = describe(state)
    layout = state["layout"]
    leaves = tree.leaves(params)
    groups = _groups_by_dims(params, state)
    split = _split_leaves(layout, leaves)
    out: dict[str, Any] = {}
    plain: dict[str, Any] = {}
    param_storages = set()
    skip = _mirrored_copies(entries, layout, leaves)
    for path, leaf, placement in zip(layout.paths, leaves, layout.placements, strict=True):
        if leaf is None:
            continue
        t = leaf.detach()
        param_storages.add(t.untyped_storage().data_ptr())
        if f"params/{path}" not in skip:
            out[f"params/{path}"] = _saved(f"params/{path}", t, placement, groups, mesh)
    for path, e in entries.items():
        if path.startswith("layout/") or path in skip:
            continue
        if isinstance(e, TensorEntry):
            if e.tensor.untyped_storage().data_ptr() in param_storages:
                continue  # the params' own storage (ZeRO-3 flats): saved as the params
            placement = _entry_placement(path, e.tensor, e.placement, split)
            out[path] = _saved(path, e.tensor, placement, groups, mesh)
        elif isinstance(e, StoredTensor):
            out[path] = _saved(path, e, e.placement, groups, mesh)
        else:
            plain[path] = e
    out[_META] = {
        "format": FORMAT,
        "world": comm.world_size(),
        # The saving mesh's dims and sizes, for readers (load reads none of it).
        "mesh": None if mesh is None else {d: mesh.size(d) for d in mesh.dims},
        "params": {
            p: list(pl.shape)
            for p, pl, leaf in zip(layout.paths, layout.placements, leaves, strict=True)
            if leaf is not None
        },
        "plain": plain,
    }
    return out


def _mirrored_copies(entries: dict, layout, leaves: list) -> set[str]:
    """Keys of param copies that a mirroring master stands for ([Note: mirrored
    params]): ``params/<p>`` and other slots' ``master/<p>`` of the master's dtype."""
    tensors = {k: e for k, e in entries.items() if isinstance(e, (TensorEntry, StoredTensor))}
    dtype = {
        k: e.dtype if isinstance(e, StoredTensor) else e.tensor.dtype for k, e in tensors.items()
    }
    dtype_of = {_param_of(k): dtype[k] for k, e in tensors.items() if e.mirrors_param}
    dtype_of.pop(None, None)
    if not dtype_of:
        return set()
    skip = {
        f"params/{path}"
        for path, leaf in zip(layout.paths, leaves, strict=True)
        if leaf is not None and dtype_of.get(path) == leaf.dtype
    }
    for k, e in tensors.items():
        p = _param_of(k)
        if p in dtype_of and not e.mirrors_param and dtype[k] == dtype_of[p]:
            skip.add(k)
    return skip


def _saved(path: str, t, placement: Placement, groups: dict, mesh) -> Any:
    """What DCP is given for one entry: a whole tensor (replicated: DCP keeps one
    copy), or this rank's real rows at their offset ([Note: padded shards in DCP])."""
    if not placement.sharded:
        if isinstance(t, StoredTensor):
            return _Rows(tuple(t.shape), (0,) * len(t.shape), t.shape, stored=t)
        return t
    return _pieces(placement, _shard_coords(path, placement, groups, mesh), local=t)


def _split_leaves(layout, leaves) -> dict[str, tuple[Placement, tuple[int, ...]]]:
    """``{param: (placement, local shape)}`` of the params split over mesh dims."""
    return {
        path: (placement, tuple(leaf.shape))
        for path, leaf, placement in zip(layout.paths, leaves, layout.placements, strict=True)
        if leaf is not None and placement is not None and placement.sharded
    }


def _entry_placement(path: str, t: torch.Tensor, placement: Placement, split: dict) -> Placement:
    """[Note: per-param state of split params]
    An optimizer (or precision) slot keeps one tensor per param, made like the param
    (``zeros_like``, ``.float()``) and so without its placement: ``describe`` calls it
    whole (``replicated``), which for the slice of a tensor_parallel / expert_parallel
    param would save every rank's different slice under one key (DCP keeps one). An
    entry placed as nothing but its own shape, whose path ends in the name of a split
    param and which has that param's local shape, is that param's slice: it takes the
    param's placement. Entries placed by their transform (ZeRO's shards) keep theirs.
    """
    if placement.sharded or placement.replicate or tuple(placement.shape) != tuple(t.shape):
        return placement
    hit = split.get(path.rsplit("/", 1)[-1])
    if hit is not None and tuple(t.shape) == hit[1]:
        return hit[0]
    return placement


def _groups_by_dims(params, state: dict) -> dict:
    """``{shard dims: process group}`` from the tensors that carry their group
    (shard_zero tags its shards with ``_fscale_group``)."""
    found: dict[tuple, Any] = {}

    def visit(x) -> None:
        if isinstance(x, torch.Tensor):
            p = placement_of(x)
            if p is not None and p.sharded and hasattr(x, "_fscale_group"):
                found.setdefault(p.shard, x._fscale_group)
        elif isinstance(x, dict):
            for v in x.values():
                visit(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                visit(v)

    visit(params)
    visit({k: v for k, v in state.items() if k != "layout"})
    return found


def _save_mesh(state: dict, mesh) -> Any:
    """The mesh ``save`` places split leaves on: the one ``step.init`` recorded in the
    layout ([Note: the mesh in the layout] in ``fscale/placement.py``), or ``mesh=``
    checked against it."""
    recorded = getattr(state["layout"], "mesh", None)
    if mesh is None:
        return recorded
    given = meshes.resolve(mesh)
    if recorded is not None:
        _check_mesh(recorded, given)
    return given


def _check_mesh(recorded: MeshLayout, given) -> None:
    """``mesh=`` must be the mesh the state was laid out on. Every rank votes, so that
    all raise together (a rank whose coordinates alone differ would otherwise leave
    the others waiting in DCP's collectives)."""
    got = MeshLayout.of(given)
    bad = torch.tensor([float(got != recorded)])
    if comm.world_size() > 1:
        comm.all_reduce(bad, op="max")
    if bad.item():

        def at(m: MeshLayout) -> dict:
            return dict(zip(m.dims, m.coords, strict=True))

        here = (
            f"the mesh passed puts it at {at(got)} of {got}"
            if got != recorded
            else "the mesh passed agrees on this rank but not on another (other ranks in it)"
        )
        raise ValueError(
            f"fs.save(mesh={got}): the state was laid out by step.init on {recorded}, this "
            f"rank at {at(recorded)}; {here}. Leave mesh= out (the state records its mesh) "
            "or pass the mesh of the step that made the state (step.mesh)."
        )


def _shard_coords(path: str, placement: Placement, groups: dict, mesh) -> _Coords:
    """This rank's coordinates in ``placement``: from the process group a shard_zero
    shard carries (the group it was cut over), else from the mesh (the one the state
    records, or ``mesh=``)."""
    if placement.shard in groups and not placement.extra:
        group = groups[placement.shard]
        return _Coords(comm.rank(group), comm.world_size(group))
    if mesh is not None and all(d in mesh.dims for d in placement.split_dims):
        return _mesh_coords(placement, mesh)
    if comm.world_size() == 1:
        return _Coords(0, 1, tuple((0, 1) for _ in placement.extra))
    if mesh is not None:
        return _mesh_coords(placement, mesh)  # raises naming the dim the mesh lacks
    raise ValueError(
        f"fs.save: {path!r} is split over mesh dims {list(placement.split_dims)} (a "
        "tensor_parallel / expert_parallel slice, or a shard that carries no process "
        "group), and its state records no mesh to find this rank's piece on (it was not "
        "made by step.init). Save the (params, state) that step.init or the last step call "
        "returned, or pass the step's mesh: fs.save(path, params, state, mesh=step.mesh)."
    )


# ----------------------------------------------------------------------------- load


def load(path: str | os.PathLike, step, params: Any) -> tuple[Any, dict]:
    """Lay ``params`` out with ``step.init`` and fill params and state from a checkpoint.

    Every rank calls it. The checkpoint may come from another world size, mesh or
    stack ([Note: what load fills]): each rank reads its own rows.

    Args:
      path: a checkpoint directory, or a run directory (its ``latest`` is read).
      step: the ``Step`` to resume.
      params: full params of the same model (e.g. ``fs.functional(model)[0]``); their
        values are replaced.

    Returns:
      ``(params, state)`` as ``step.init`` lays them out, holding the checkpoint's values.

    Raises:
      FileNotFoundError: no checkpoint at ``path``.
      ValueError: the checkpoint is of another model or optimizer (names the params
        or entries, and both shapes).
    """
    wait_pending()
    where = _resolve(path)
    md = _read_metadata(where)
    checksums = _check_files(where, md)
    saved = md.state_dict_metadata
    new_params, state = step.init(params)
    layout = state["layout"]
    mesh = step.mesh
    _check_model(where, saved, layout)
    _make_lazy("", state, saved)  # [Note: what load fills], lazily made tensors
    targets: dict[str, Any] = {}
    param_storages = {}
    for p, leaf, placement in zip(
        layout.paths, tree.leaves(new_params), layout.placements, strict=True
    ):
        if leaf is not None:
            targets[f"params/{p}"] = (leaf.detach(), placement or replicated(leaf))
            param_storages[leaf.untyped_storage().data_ptr()] = p
    entries = describe(state)
    split = _split_leaves(layout, tree.leaves(new_params))
    plain = {}
    for path_, e in entries.items():
        if path_.startswith("layout/"):
            continue
        if isinstance(e, TensorEntry):
            if e.tensor.untyped_storage().data_ptr() in param_storages:
                continue  # filled through the params
            targets[path_] = (e.tensor, _entry_placement(path_, e.tensor, e.placement, split))
        elif isinstance(e, StoredTensor):
            targets[path_] = (e, e.placement)
        else:
            plain[path_] = e
    slots = {k.split("/", 1)[0] for k in saved}
    reads: dict[str, list[_Rows]] = {}
    for key, (t, placement) in targets.items():
        source = _source_key(key, t, saved, slots, where)
        if source is None:
            continue  # a slot the checkpoint does not have: keeps its initial value
        want = tuple(saved[source].size)
        if tuple(placement.shape) != want:
            raise ValueError(
                f"checkpoint {where}: {source!r} has shape {want}, but the step lays "
                f"{key!r} out as {tuple(placement.shape)}; load into a step built for the "
                "model and optimizer that saved it."
            )
        if placement.sharded:
            rows = _pieces(placement, _mesh_coords(placement, mesh), local=t)
        elif isinstance(t, StoredTensor):
            rows = _Rows(t.shape, (0,) * len(t.shape), t.shape, stored=t)
        else:
            rows = _Rows(t.shape, (0,) * t.dim(), t.shape, local=t)
        reads.setdefault(source, []).append(rows)  # a param and its master: one source
    state_dict: dict[str, Any] = {k: v[0] if len(v) == 1 else _Many(v) for k, v in reads.items()}
    state_dict[_META] = None
    planner = _LoadPlanner()
    try:
        with _quiet():
            dcp.load(
                state_dict,
                storage_reader=ParallelReader(where, threads=WRITE_THREADS, checksums=checksums),
                planner=planner,
                no_dist=not comm.is_initialized(),
            )
    except CheckpointException as e:  # a BaseException: DCP's, with each rank's error
        raise _unreadable(where, e) from e
    meta = planner.loaded.get(_META) or {}
    if meta.get("format") != FORMAT:
        raise ValueError(
            f"checkpoint {where} has format {meta.get('format')!r}; this fscale reads "
            f"format {FORMAT}. Save it again with this version."
        )
    state = _restore_plain(state, meta.get("plain", {}))
    return new_params, state


# ----------------------------------------------------------------------------- extra


def load_extra(path: str | os.PathLike, *, rank: int | None = None) -> Any:
    """The ``extra`` that rank ``rank`` (default: this one) saved with the checkpoint.

    Not collective: any process may call it. Raises ``KeyError`` naming the saved
    ranks when the checkpoint has no extra of that rank (another world size).
    """
    where = _resolve(path)
    md = _read_metadata(where)
    r = comm.rank() if rank is None else rank
    key = f"extra/{r}"
    if key not in md.state_dict_metadata:
        ranks = sorted(
            int(k.split("/")[1]) for k in md.state_dict_metadata if k.startswith("extra/")
        )
        raise KeyError(
            f"checkpoint {where} has extra for ranks {ranks}, not rank {r} (saved by a world "
            f"of {len(ranks)}); pass fs.load_extra(path, rank=...) to read another rank's."
        )
    planner = _LoadPlanner()
    with _quiet():
        reader = dcp.FileSystemReader(where)
        dcp.load({key: None}, storage_reader=reader, planner=planner, no_dist=True)
    return planner.loaded[key]


def _shared_id() -> str:
    """A random id every rank agrees on (rank 0's)."""
    t = torch.tensor([uuid.uuid4().int & (2**62 - 1) if comm.rank() == 0 else 0])
    if comm.world_size() > 1:
        comm.broadcast(t, src=0)
    return f"{int(t.item()):x}"


@contextlib.contextmanager
def _quiet():
    """DCP warns that a world of one is "assuming the intent is to save in a single
    process": it is the embedded default here, not a mistake."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _barrier(group=None) -> None:
    if comm.world_size() > 1:
        comm.all_reduce(torch.zeros(1), op="sum", group=group)

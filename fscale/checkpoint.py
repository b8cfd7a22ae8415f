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
protocol; ``_Rows`` below), so the saved tensor is the logical one, independent of
the world size. Replicas (HSDP's replicate dim, whole tensors on every rank) write
the same chunk and DCP keeps one of them. Loading asks DCP for the target rank's
real rows at their offset, whatever chunks the checkpoint holds: that is the
resharding (ZeRO-3 world 4 -> stage 1 world 2 -> plain world 1, HSDP -> plain). The
padding rows of the target stay as ``step.init`` made them (zeros).

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
  else their metadata is derived from the stack and kept.

[Note: atomic save]
Ranks write into ``<path>.tmp-<id>`` (DCP fsyncs every file and renames its
``.metadata`` into place last); rank 0 then fsyncs the directory, renames it to
``path`` and fsyncs the parent. A kill at any moment leaves either the old
checkpoint or the new one under ``path``, plus at most a ``.tmp-`` directory that
``load`` never reads. In a run directory (``at=``) the checkpoint is
``<dir>/step-<at>``; the ``latest`` pointer is written (temp file, fsync, rename)
after it, and only then are checkpoints beyond the newest ``keep`` removed.

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
import re
import shutil
import uuid
import warnings
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

from fscale import tree
from fscale.hw import comm
from fscale.hw import mesh as meshes
from fscale.placement import Placement, placement_of, replicated
from fscale.state import StoredTensor, TensorEntry, describe

__all__ = ["SaveHandle", "latest", "load", "load_extra", "save", "wait_pending"]

FORMAT = 1
_META = "fscale/meta"
_LATEST = "latest"
_STEP_DIR = re.compile(r"^step-(\d+)$")


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
) -> str | SaveHandle:
    """Write ``params`` and ``state`` as a sharded DCP checkpoint; every rank calls it.

    Args:
      path: the checkpoint directory; with ``at``, a run directory holding
        ``step-<at>`` checkpoints and a ``latest`` pointer.
      params, state: what ``step.init`` / the last step call returned.
      extra: anything picklable, kept per rank (the data loader's position, RNG
        states); read back with ``fs.load_extra``.
      at: the step number: write ``<path>/step-<at>`` and point ``<path>/latest`` at it.
      keep: with ``at``: keep only the newest ``keep`` checkpoints of the run directory.
      mesh: the step's mesh (``step.mesh`` or a ``DeviceMesh``); only needed when a
        sharded tensor does not carry its process group (shard_zero's do).
      async_save: copy what this rank writes ([Note: async staging]) and write it in
        a background thread while training goes on; returns a ``SaveHandle`` to
        ``wait()`` on. At most one save is in flight: the next ``save`` (and ``load``)
        waits for it first.

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
    root = os.fspath(path)
    final = os.path.join(root, f"step-{at}") if at is not None else root
    rank = comm.rank()
    wait_pending()  # at most one save in flight
    resolved = None if mesh is None else meshes.resolve(mesh)
    state_dict = _save_state_dict(params, state, resolved)
    state_dict[f"extra/{rank}"] = extra
    tmp = f"{final}.tmp-{_shared_id()}"
    if rank == 0:
        os.makedirs(os.path.dirname(os.path.abspath(final)), exist_ok=True)
    _barrier()
    if not async_save:
        return _write(state_dict, tmp, final, root, at, keep, None)
    global _PENDING
    staged = _stage(state_dict)
    group = _async_group()
    future = _executor().submit(_write, staged, tmp, final, root, at, keep, group)
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


def _stage(state_dict: dict) -> dict:
    """[Note: async staging] A copy of every tensor this rank writes, taken before
    training goes on (steps update params and state in place). NVMe entries are not
    copied: their files are opened now, and the swap engine replaces a file whole
    (a new inode) when it writes, so the open descriptor keeps reading the bytes of
    this step."""
    out = {}
    for key, v in state_dict.items():
        if isinstance(v, torch.Tensor):
            out[key] = v.detach().to("cpu", copy=True)
        elif isinstance(v, _Rows):
            if v.stored is not None:
                stored = _Pinned(v.stored) if v.write else v.stored
                out[key] = _Rows(v.shape, v.offsets, v.sizes, stored=stored, write=v.write)
            else:
                local = v.local.detach().to("cpu", copy=True)
                out[key] = _Rows(v.shape, v.offsets, v.sizes, local=local, write=v.write)
        else:
            out[key] = copy.deepcopy(v)
    return out


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


def _write(state_dict, tmp, final, root, at, keep, group) -> str:
    with _quiet():
        dcp.save(
            state_dict,
            storage_writer=dcp.FileSystemWriter(tmp, sync_files=True),
            planner=_SavePlanner(),
            process_group=group,
            no_dist=not comm.is_initialized(),
        )
    if comm.rank() == 0:
        _publish(tmp, final)
        if at is not None:
            _write_latest(root, os.path.basename(final))
            if keep is not None:
                _rotate(root, keep)
    _barrier(group)
    return final


def _save_state_dict(params, state: dict, mesh) -> dict:
    entries = describe(state)
    layout = state["layout"]
    leaves = tree.leaves(params)
    groups = _groups_by_dims(params, state)
    out: dict[str, Any] = {}
    plain: dict[str, Any] = {}
    param_storages = set()
    for path, leaf, placement in zip(layout.paths, leaves, layout.placements, strict=True):
        if leaf is None:
            continue
        t = leaf.detach()
        param_storages.add(t.untyped_storage().data_ptr())
        out[f"params/{path}"] = _saved(f"params/{path}", t, placement, groups, mesh)
    for path, e in entries.items():
        if path.startswith("layout/"):
            continue
        if isinstance(e, TensorEntry):
            if e.tensor.untyped_storage().data_ptr() in param_storages:
                continue  # the params' own storage (ZeRO-3 flats): saved as the params
            out[path] = _saved(path, e.tensor, e.placement, groups, mesh)
        elif isinstance(e, StoredTensor):
            out[path] = _saved(path, e, e.placement, groups, mesh)
        else:
            plain[path] = e
    out[_META] = {
        "format": FORMAT,
        "world": comm.world_size(),
        "params": {
            p: list(pl.shape)
            for p, pl, leaf in zip(layout.paths, layout.placements, leaves, strict=True)
            if leaf is not None
        },
        "plain": plain,
    }
    return out


def _saved(path: str, t, placement: Placement, groups: dict, mesh) -> Any:
    """What DCP is given for one entry: a whole tensor (replicated: DCP keeps one
    copy), or this rank's real rows at their offset ([Note: padded shards in DCP])."""
    if not placement.sharded:
        if isinstance(t, StoredTensor):
            return _Rows(tuple(t.shape), (0,) * len(t.shape), t.shape, stored=t)
        return t
    index, parts = _shard_coords(path, placement, groups, mesh)
    return _Rows.of(placement, index, parts, local=t)


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


def _shard_coords(path: str, placement: Placement, groups: dict, mesh) -> tuple[int, int]:
    if mesh is not None:
        return _mesh_coords(placement, mesh)
    if placement.shard in groups:
        group = groups[placement.shard]
        return comm.rank(group), comm.world_size(group)
    if comm.world_size() == 1:
        return 0, 1
    raise ValueError(
        f"fs.save: {path!r} is sharded over mesh dims {list(placement.shard)}, but no tensor "
        "of the state carries that dim's process group; pass the step's mesh: "
        "fs.save(path, params, state, mesh=step.mesh)."
    )


def _mesh_coords(placement: Placement, mesh: meshes.Mesh) -> tuple[int, int]:
    """This rank's shard index (rank-major over the shard dims) and the number of parts."""
    index = 0
    for d in placement.shard:
        index = index * mesh.size(d) + mesh.rank(d)
    return index, placement.parts(mesh)


class _Rows:
    """One rank's real rows of a logical tensor, at their global offset, for DCP.

    It speaks DCP's checkpointable protocol (``__create_write_items__``,
    ``__create_chunk_list__``, ``__get_tensor_shard__``, as DTensor does), so the
    default planners plan it; ``stored`` is an NVMe ``StoredTensor`` read (save) or
    written (load) one chunk at a time, never whole.
    """

    def __init__(self, shape, offsets, sizes, *, local=None, stored=None, write=True):
        self.shape = tuple(shape)
        self.offsets = tuple(offsets)
        self.sizes = tuple(sizes)
        self.local = local
        self.stored = stored
        self.write = write

    @classmethod
    def of(cls, placement: Placement, index: int, parts: int, *, local, write=True) -> _Rows:
        shape = placement.shape
        if not shape:  # a 0-d leaf is sharded as one row: index 0 holds it
            view = None if isinstance(local, StoredTensor) else local.reshape(-1)[:1].view(())
            return cls((), (), (), local=view, stored=_sub(local, 0, 1, ()), write=index == 0)
        dim = placement.dim
        rows = math.ceil(shape[dim] / parts)
        start = min(index * rows, shape[dim])
        real = min(rows, shape[dim] - start)
        sizes = (*shape[:dim], real, *shape[dim + 1 :])
        offsets = tuple(start if i == dim else 0 for i in range(len(shape)))
        if isinstance(local, StoredTensor):
            if dim != 0:
                raise NotImplementedError("fs.save: stored tensors sharded along dim != 0.")
            return cls(shape, offsets, sizes, stored=_sub(local, 0, real, sizes), write=write)
        # An empty tensor is still written once, so that its key exists.
        write = write and (real > 0 or index == 0)
        return cls(shape, offsets, sizes, local=local.narrow(dim, 0, real), write=write)

    @property
    def dtype(self) -> torch.dtype:
        return self.stored.dtype if self.stored is not None else self.local.dtype

    def chunk(self) -> ChunkStorageMetadata:
        return ChunkStorageMetadata(offsets=torch.Size(self.offsets), sizes=torch.Size(self.sizes))

    def __create_write_items__(self, fqn: str, obj) -> list[WriteItem]:
        if not self.write:
            return []
        props = TensorProperties(dtype=self.dtype)
        data = TensorWriteData(chunk=self.chunk(), properties=props, size=torch.Size(self.shape))
        index = MetadataIndex(fqn, torch.Size(self.offsets))
        return [WriteItem(index=index, type=WriteItemType.SHARD, tensor_data=data)]

    def __create_chunk_list__(self) -> list[ChunkStorageMetadata]:
        return [self.chunk()]

    def tensor(self) -> torch.Tensor:
        """The rows (read from the file for a stored tensor)."""
        if self.stored is not None:
            return self.stored.read()
        return self.local

    def __get_tensor_shard__(self, index) -> torch.Tensor:
        return self.tensor()


def _sub(t, first: int, count: int, shape) -> StoredTensor | None:
    """Rows ``[first, first + count)`` of a stored tensor, as a stored tensor."""
    if not isinstance(t, StoredTensor):
        return None
    row = math.prod(t.shape[1:]) * t.dtype.itemsize if t.shape else t.dtype.itemsize
    return StoredTensor(t.path, t.offset + first * row, tuple(shape), t.dtype, t.placement)


class _SavePlanner(DefaultSavePlanner):
    def __init__(self):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)

    def lookup_object(self, index: MetadataIndex) -> Any:
        obj = self.state_dict[index.fqn]
        return obj.tensor() if isinstance(obj, _Rows) else super().lookup_object(index)


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
    _check_files(where, md)
    saved = md.state_dict_metadata
    new_params, state = step.init(params)
    layout = state["layout"]
    mesh = step.mesh
    _check_model(where, saved, layout)
    targets: dict[str, Any] = {}
    param_storages = {}
    for p, leaf, placement in zip(
        layout.paths, tree.leaves(new_params), layout.placements, strict=True
    ):
        if leaf is not None:
            targets[f"params/{p}"] = (leaf.detach(), placement or replicated(leaf))
            param_storages[leaf.untyped_storage().data_ptr()] = p
    entries = describe(state)
    plain = {}
    for path_, e in entries.items():
        if path_.startswith("layout/"):
            continue
        if isinstance(e, TensorEntry):
            if e.tensor.untyped_storage().data_ptr() in param_storages:
                continue  # filled through the params
            targets[path_] = (e.tensor, e.placement)
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
            index, parts = _mesh_coords(placement, mesh)
            rows = _Rows.of(placement, index, parts, local=t)
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
                storage_reader=dcp.FileSystemReader(where),
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


class _Many(_Rows):
    """Several targets read from one checkpoint entry (a param and its master)."""

    def __init__(self, parts: list[_Rows]):
        first = parts[0]
        super().__init__(first.shape, first.offsets, first.sizes, local=first.local)
        self.parts = parts

    def __create_chunk_list__(self) -> list[ChunkStorageMetadata]:
        return [p.chunk() for p in self.parts]


class _LoadPlanner(DefaultLoadPlanner):
    def __init__(self):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self.loaded: dict[str, Any] = {}
        self._pending: dict[int, tuple[_Rows, torch.Tensor]] = {}

    def set_up_planner(self, state_dict, metadata=None, is_coordinator=False) -> None:
        # DefaultLoadPlanner's would pass the dict through _init_state_dict, which
        # replaces objects it does not know (our _Rows) with None.
        self.original_state_dict = self.state_dict = state_dict
        self.metadata = metadata
        self.is_coordinator = is_coordinator

    def _target(self, read_item) -> _Rows:
        obj = self.state_dict[read_item.dest_index.fqn]
        if isinstance(obj, _Many):
            return obj.parts[read_item.dest_index.index]
        return obj

    def resolve_tensor(self, read_item):
        rows = self._target(read_item)
        if rows.stored is not None:  # read into a buffer of this chunk, written at commit
            buf = torch.empty(rows.sizes, dtype=rows.stored.dtype)
            self._pending[id(read_item)] = (rows, buf)
            dest = buf
        else:
            dest = rows.local
        return self.transform_tensor(read_item, dest)

    def commit_tensor(self, read_item, tensor) -> None:
        pending = self._pending.pop(id(read_item), None)
        if pending is None:
            return
        rows, buf = pending
        _write_stored(rows.stored, buf, read_item.dest_offsets, read_item.lengths)

    def load_bytes(self, read_item, value) -> None:
        self.loaded[read_item.dest_index.fqn] = torch.load(value, weights_only=False)


def _write_stored(stored: StoredTensor, buf: torch.Tensor, offsets, lengths) -> None:
    """Write the region ``offsets/lengths`` of ``buf`` (the chunk) into the stored tensor."""
    region = buf
    for d, (o, n) in enumerate(zip(offsets, lengths, strict=True)):
        region = region.narrow(d, o, n)
    if region.dim() == 0 or all(
        o == 0 and n == s for o, n, s in zip(offsets[1:], lengths[1:], buf.shape[1:], strict=True)
    ):
        row = math.prod(buf.shape[1:]) * buf.dtype.itemsize if buf.dim() else buf.dtype.itemsize
        start = stored.offset + (offsets[0] * row if buf.dim() else 0)
        data = region.contiguous().view(torch.uint8).numpy().tobytes()
        with open(stored.path, "r+b") as f:
            f.seek(start)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return
    raise NotImplementedError("fs.load: stored tensors are read back in whole rows only.")


def _source_key(key: str, t, saved: dict, slots: set, where: str) -> str | None:
    dtype = t.dtype
    param = _param_of(key)
    same = saved.get(key)
    if isinstance(same, TensorStorageMetadata) and (
        param is None or same.properties.dtype == dtype
    ):
        return key
    if param is not None:
        copies = [
            k
            for k, m in saved.items()
            if isinstance(m, TensorStorageMetadata) and _param_of(k) == param
        ]
        if copies:
            # The most precise copy; a master before the param itself.
            return max(
                copies, key=lambda k: (saved[k].properties.dtype.itemsize, k != f"params/{param}")
            )
    slot = key.split("/", 1)[0]
    if slot not in slots:
        return None
    raise ValueError(
        f"checkpoint {where} has no entry {key!r} although it has the slot {slot!r}; it was "
        "saved by another optimizer or transform configuration: build the step as the run "
        "that saved it did."
    )


def _param_of(key: str) -> str | None:
    """The param a copy entry holds: ``params/<name>`` or ``<slot>/master/<name>``."""
    if key.startswith("params/"):
        return key[len("params/") :]
    m = re.match(r"^[^/]+/master/(.+)$", key)
    return m.group(1) if m else None


def _check_model(where: str, saved: dict, layout) -> None:
    saved_params = {
        k[len("params/") :]: tuple(m.size) for k, m in saved.items() if k.startswith("params/")
    }
    mine = {p: tuple(pl.shape) for p, pl in zip(layout.paths, layout.placements, strict=True) if pl}
    missing = sorted(set(mine) - set(saved_params))
    unexpected = sorted(set(saved_params) - set(mine))
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {where} is of another model: params missing from it "
            f"{missing[:5]}{' ...' if len(missing) > 5 else ''}, params it has that the "
            f"model lacks {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}. Load it "
            "into the model that saved it."
        )
    for p, shape in mine.items():
        if saved_params[p] != shape:
            raise ValueError(
                f"checkpoint {where}: param {p!r} has shape {saved_params[p]} in the "
                f"checkpoint but {shape} in the model; build the model with the config "
                "that saved it."
            )


def _restore_plain(state: dict, values: dict) -> dict:
    return {k: _restore(str(k), v, values) for k, v in state.items()}


def _restore(path: str, value: Any, values: dict) -> Any:
    """``value`` with its plain metadata replaced by ``values[path]`` where saved."""
    if isinstance(value, (torch.Tensor, TensorEntry, StoredTensor)):
        return value
    if hasattr(value, "describe_state"):
        if hasattr(value, "load_state"):
            prefix = path + "/"
            value.load_state(
                {k[len(prefix) :]: v for k, v in values.items() if k.startswith(prefix)}
            )
        return value  # else: metadata derived from the stack (layout, shard specs)
    if isinstance(value, dict):
        return {k: _restore(f"{path}/{k}", v, values) for k, v in value.items()}
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return type(value)(
            *(_restore(f"{path}/{k}", getattr(value, k), values) for k in value._fields)
        )
    if isinstance(value, (list, tuple)):
        return type(value)(_restore(f"{path}/{i}", v, values) for i, v in enumerate(value))
    return values.get(path, value)


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


# ----------------------------------------------------------------------------- files


def latest(path: str | os.PathLike) -> str | None:
    """The checkpoint ``load`` reads from ``path``: itself if it is one, else the run
    directory's ``latest``; when that pointer is missing or names a checkpoint that is
    gone (a crash before the first pointer was written, a deleted directory), the
    newest complete ``step-<n>`` (with a warning). None when there is none."""
    root = os.fspath(path)
    if _complete(root):
        return root
    pointer = os.path.join(root, _LATEST)
    named = None
    if os.path.isfile(pointer):
        with open(pointer) as f:
            named = os.path.join(root, f.read().strip())
        if _complete(named):
            return named
    steps = sorted(
        (int(m.group(1)), name)
        for name in (os.listdir(root) if os.path.isdir(root) else [])
        if (m := _STEP_DIR.match(name)) and _complete(os.path.join(root, name))
    )
    if steps:
        found = os.path.join(root, steps[-1][1])
        if named is not None:
            warnings.warn(
                f"{pointer} names {named}, which is gone or incomplete; using {found}, the "
                "newest complete checkpoint of the run.",
                stacklevel=2,
            )
        return found
    return named


def _complete(where: str) -> bool:
    return os.path.isfile(os.path.join(where, ".metadata"))


def _resolve(path) -> str:
    root = os.fspath(path)
    if not os.path.isdir(root):
        raise FileNotFoundError(
            f"no checkpoint at {root!r} (no such directory); pass the directory fs.save wrote."
        )
    where = latest(root)
    if where is None:
        raise FileNotFoundError(
            f"{root!r} holds no checkpoint: no .metadata (DCP's index, written last) and no "
            "'latest' pointer; the save did not finish. Pass an earlier checkpoint."
        )
    if not os.path.isfile(os.path.join(where, ".metadata")):
        raise FileNotFoundError(
            f"{root!r}/latest points at {where!r}, which has no .metadata; the checkpoint is "
            "gone or incomplete. Load another step-<n> directory of the run."
        )
    return where


def _unreadable(where: str, e: CheckpointException) -> ValueError:
    first = next(iter(e.failures.values()), e)
    first = first[0] if isinstance(first, tuple) else first
    return ValueError(
        f"checkpoint {where}: cannot read its data ({type(first).__name__}: {first}); the "
        "checkpoint is incomplete or corrupt. Load an earlier one."
    )


def _check_files(where: str, md) -> None:
    """Every data file the index names exists and holds the bytes it points at."""
    need: dict[str, int] = {}
    for info in (md.storage_data or {}).values():
        end = info.offset + info.length
        need[info.relative_path] = max(need.get(info.relative_path, 0), end)
    for name, end in sorted(need.items()):
        full = os.path.join(where, name)
        if not os.path.isfile(full):
            raise ValueError(
                f"checkpoint {where}: its data file {name!r} is missing; the checkpoint is "
                "incomplete. Load an earlier one."
            )
        size = os.path.getsize(full)
        if size < end:
            raise ValueError(
                f"checkpoint {where}: its data file {name!r} has {size} bytes, the index "
                f"needs {end}; the file is truncated. Load an earlier one."
            )


def _read_metadata(where: str):
    try:
        return dcp.FileSystemReader(where).read_metadata()
    except Exception as e:
        raise ValueError(
            f"checkpoint {where}: cannot read its .metadata ({type(e).__name__}: {e}); the file "
            "is corrupt. Load an earlier checkpoint."
        ) from e


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


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _publish(tmp: str, final: str) -> None:
    """Rename the finished temp directory to ``final`` (replacing an old one)."""
    _fsync_dir(tmp)
    parent = os.path.dirname(os.path.abspath(final))
    old = None
    if os.path.exists(final):
        old = f"{final}.old-{uuid.uuid4().hex[:8]}"
        os.rename(final, old)
    os.rename(tmp, final)
    _fsync_dir(parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _write_latest(root: str, name: str) -> None:
    tmp = os.path.join(root, f".{_LATEST}.tmp-{uuid.uuid4().hex[:8]}")
    with open(tmp, "w") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(root, _LATEST))
    _fsync_dir(root)


def _rotate(root: str, keep: int) -> None:
    steps = sorted(
        (int(m.group(1)), name)
        for name in os.listdir(root)
        if (m := _STEP_DIR.match(name)) and os.path.isdir(os.path.join(root, name))
    )
    for _, name in steps[:-keep]:
        shutil.rmtree(os.path.join(root, name), ignore_errors=True)

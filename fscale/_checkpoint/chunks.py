"""DCP's view of fscale tensors: one rank's real rows at their global offset.

``Rows`` speaks DCP's checkpointable protocol (as DTensor does) so that the default
planners plan it ([Note: padded shards in DCP] in ``fscale/checkpoint.py``); the
planners here resolve it to the tensor to write or to fill, and read or write NVMe
swap entries a chunk at a time.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    MetadataIndex,
    TensorProperties,
)
from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

from fscale.hw import mesh as meshes
from fscale.placement import Placement
from fscale.state import StoredTensor


def _mesh_coords(placement: Placement, mesh: meshes.Mesh) -> _Coords:
    """This rank's coordinates in ``placement`` on ``mesh``: its shard index (rank-major
    over the shard dims), the number of parts, and its (index, size) along each
    ``extra`` split."""
    for d in placement.split_dims:
        if d not in mesh.dims:
            raise ValueError(
                f"a tensor is split over mesh dim {d!r}, which the mesh {mesh} lacks; pass "
                "the mesh of the step that laid it out (step.mesh)."
            )
    index = 0
    for d in placement.shard:
        index = index * mesh.size(d) + mesh.rank(d)
    extra = tuple((mesh.rank(d), mesh.size(d)) for d, _ in placement.extra)
    return _Coords(index, placement.parts(mesh), extra)


@dataclass(frozen=True)
class _Coords:
    """Where one rank's piece of a placed tensor sits: ``index`` of ``parts`` along the
    shard dims, and ``(index, size)`` along each of the placement's ``extra`` splits."""

    index: int
    parts: int
    extra: tuple[tuple[int, int], ...] = ()


def _pieces(placement: Placement, coords: _Coords, *, local, write=True) -> _Rows:
    """[Note: model-parallel pieces] One rank's real data of a placed tensor, for DCP.

    A plain row block (ZeRO, expert_parallel's experts) is one region: ``_Rows.of``.
    A placement with ``chunks`` fused blocks (tensor_parallel's qkv) gives the rank
    one region per block: block ``k``'s rows ``[k * B + index * r, ... + r)`` of the
    full dim (``B = shape[dim] / chunks``, ``r = B / parts``), held at local rows
    ``[k * r, (k + 1) * r)``. Each ``extra`` split ``(mesh dim, axis)`` (a bank's
    hidden dim over "tp") moves every region to offset ``coord * n`` along ``axis``,
    ``n = shape[axis] / size``, which the local tensor holds whole. Several regions
    are a ``_Many``, one DCP write/read item each.
    """
    simple = placement.chunks == 1 and not placement.extra
    if isinstance(local, StoredTensor) and not (simple and placement.dim == 0):
        raise ValueError(
            f"fs.save/fs.load: an NVMe stored tensor is placed as {placement}; stored "
            "tensors are read and written in whole dim-0 row blocks only (offload's state "
            "of plain or ZeRO leaves), not in fused chunks, extra splits or along other "
            "dims. Offload to 'cpu' instead of 'nvme' for model-parallel leaves."
        )
    if simple or not placement.shape:
        return _Rows.of(placement, coords.index, coords.parts, local=local, write=write)
    shape = placement.shape
    axes = [placement.dim] + [axis for _, axis in placement.extra]
    if len(set(axes)) != len(axes) or any(not 0 <= a < len(shape) for a in axes):
        raise ValueError(
            f"fs.save/fs.load: placement {placement} splits a tensor dim twice or a dim "
            "it lacks; each split (dim and every extra) must name its own tensor dim."
        )
    offsets = [0] * len(shape)
    sizes = list(shape)
    for (_, axis), (coord, size) in zip(placement.extra, coords.extra, strict=True):
        if shape[axis] % size:
            raise ValueError(
                f"fs.save/fs.load: placement {placement} splits dim {axis} ({shape[axis]}) "
                f"over {size} ranks unevenly; extra splits must be even."
            )
        sizes[axis] = shape[axis] // size
        offsets[axis] = coord * sizes[axis]
    if placement.chunks == 1 and placement.shard:
        rows = math.ceil(shape[placement.dim] / coords.parts)
        start = min(coords.index * rows, shape[placement.dim])
        real = min(rows, shape[placement.dim] - start)
        offsets[placement.dim], sizes[placement.dim] = start, real
        view = local.narrow(placement.dim, 0, real)
        w = write and (real > 0 or coords.index == 0)
        return _Rows(shape, offsets, sizes, local=view, write=w)
    if placement.chunks == 1:  # extra splits only
        return _Rows(shape, offsets, sizes, local=local, write=write)
    dim, chunks = placement.dim, placement.chunks
    if shape[dim] % (chunks * coords.parts):
        raise ValueError(
            f"fs.save/fs.load: placement {placement} has {chunks} fused blocks of dim {dim} "
            f"({shape[dim]}) that do not split evenly over {coords.parts} parts."
        )
    block = shape[dim] // chunks
    rows = block // coords.parts
    parts = []
    for k in range(chunks):
        o, n = list(offsets), list(sizes)
        o[dim], n[dim] = k * block + coords.index * rows, rows
        view = local.narrow(dim, k * rows, rows)
        parts.append(_Rows(shape, o, n, local=view, write=write))
    return _Many(parts)


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
        if isinstance(obj, _Many):
            return obj.part_at(index.offset).tensor()
        return obj.tensor() if isinstance(obj, _Rows) else super().lookup_object(index)


class _Many(_Rows):
    """Several regions of one checkpoint entry: a rank's fused blocks of one tensor
    ([Note: model-parallel pieces]), written or read one item each; or, on load, the
    regions of several targets read from one entry (a param and its master)."""

    def __init__(self, parts: list[_Rows]):
        flat = [q for p in parts for q in (p.parts if isinstance(p, _Many) else [p])]
        first = flat[0]
        super().__init__(first.shape, first.offsets, first.sizes, local=first.local)
        self.parts = flat

    def __create_write_items__(self, fqn: str, obj) -> list[WriteItem]:
        return [item for p in self.parts for item in p.__create_write_items__(fqn, obj)]

    def __create_chunk_list__(self) -> list[ChunkStorageMetadata]:
        return [p.chunk() for p in self.parts]

    def part_at(self, offsets) -> _Rows:
        """The region written at ``offsets`` (save)."""
        offsets = tuple(offsets)
        return next(p for p in self.parts if p.offsets == offsets)


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

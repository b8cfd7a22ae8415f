"""Placements: how one laid-out leaf maps onto the mesh.

A ``Placement`` says which mesh dims split a tensor (and along which tensor dim),
which replicate it, and the full (logical) shape. Shards are padded row blocks
([Note: shard layout] in ``fscale/transforms/_zero/sharding.py``): with ``n`` ranks
along the shard dims each holds ``ceil(shape[dim] / n)`` rows, the last ones padded
with zeros. ``step.init`` records every leaf's placement in ``state["layout"]`` and
on the tensor itself (``placement_of``), so collectives, ``fs.gather_params`` and
checkpoints read it instead of guessing from shapes.

Usage::

    p = Placement(shape=(10, 4), shard=("shard",), replicate=("replicate",))
    p.local_shape(mesh)          # (5, 4) on a mesh with shard=2
    place(t, p); placement_of(t) is p
    MeshLayout.of(step.mesh)     # the mesh the placements name, as plain metadata
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Placement:
    """``shape``: the full shape. ``shard``: mesh dims splitting tensor dim ``dim``
    (outer to inner: rank-major over them). ``replicate``: mesh dims holding copies.
    A leaf with no ``shard`` is whole on every rank."""

    shape: tuple[int, ...]
    shard: tuple[str, ...] = ()
    replicate: tuple[str, ...] = ()
    dim: int = 0
    #: The sharded dim is ``chunks`` equal blocks (a fused projection: qkv), each split
    #: over the shard dims; a rank holds its part of every block, in block order.
    chunks: int = 1
    #: Further even splits, ``((mesh dim, tensor dim), ...)``, each on another tensor dim
    #: (an expert bank split over "ep" on dim 0 and over "tp" on its hidden dim).
    extra: tuple[tuple[str, int], ...] = ()

    def __post_init__(self):
        if set(self.shard) & set(self.replicate):
            raise ValueError(
                f"placement shards and replicates over the same mesh dims "
                f"{sorted(set(self.shard) & set(self.replicate))}; a dim does one or the other."
            )
        if self.shard and self.shape and not 0 <= self.dim < len(self.shape):
            raise ValueError(f"placement dim {self.dim} is outside a tensor of shape {self.shape}.")

    @property
    def sharded(self) -> bool:
        return bool(self.shard) or bool(self.extra)

    @property
    def split_dims(self) -> tuple[str, ...]:
        """Every mesh dim that splits the leaf (``shard`` and ``extra``)."""
        return (*self.shard, *(d for d, _ in self.extra))

    def parts(self, mesh) -> int:
        """Into how many shards the mesh splits the leaf."""
        return math.prod(mesh.size(d) for d in self.shard)

    def local_shape(self, mesh) -> tuple[int, ...]:
        """The shape each rank holds (padded rows; a 0-d leaf counts as ``(1,)``)."""
        shape = list(self._main_shape(mesh))
        for dim, axis in self.extra:
            shape[axis] //= mesh.size(dim)
        return tuple(shape)

    def _main_shape(self, mesh) -> tuple[int, ...]:
        if not self.shard:
            return self.shape
        shape = self.shape or (1,)
        if self.chunks > 1:  # tensor_parallel checks that the blocks split evenly
            rows = shape[self.dim] // self.parts(mesh)
            return (*shape[: self.dim], rows, *shape[self.dim + 1 :])
        rows = math.ceil(shape[self.dim] / self.parts(mesh))
        return (*shape[: self.dim], rows, *shape[self.dim + 1 :])

    def describe(self) -> dict:
        """Plain metadata (for checkpoints): no tensors, no groups."""
        return {
            "shape": list(self.shape),
            "shard": list(self.shard),
            "replicate": list(self.replicate),
            "dim": self.dim,
            "chunks": self.chunks,
            "extra": [list(e) for e in self.extra],
        }


@dataclass(frozen=True)
class MeshLayout:
    """The mesh a step laid its leaves out on, as plain metadata: its dim names, their
    sizes and this rank's coordinate along each (no process groups, nothing to pickle).

    [Note: the mesh in the layout]
    Placements name mesh dims; where a rank's piece of a split leaf sits also takes
    the dims' sizes and the rank's coordinates. ``step.init`` records them with the
    placements (``state["layout"].mesh``), so ``fs.save`` finds every rank's piece of
    a tensor_parallel / expert_parallel slice without being handed the mesh, as DCP
    saves DTensors that know theirs. It speaks the part of ``hw.mesh.Mesh`` that
    placements read (``dims``, ``size``, ``rank``); collectives still need the mesh.
    """

    dims: tuple[str, ...]
    sizes: tuple[int, ...]
    coords: tuple[int, ...]

    @classmethod
    def of(cls, mesh) -> MeshLayout:
        """The record of a resolved mesh (``step.mesh``)."""
        dims = tuple(mesh.dims)
        return cls(dims, tuple(mesh.size(d) for d in dims), tuple(mesh.rank(d) for d in dims))

    def _index(self, dim: str) -> int:
        if dim not in self.dims:
            raise ValueError(f"the mesh {self} has no dim {dim!r}; its dims are {list(self.dims)}.")
        return self.dims.index(dim)

    def size(self, dim: str | None = None) -> int:
        """Ranks along ``dim``, or in the whole mesh when ``dim`` is None."""
        return math.prod(self.sizes) if dim is None else self.sizes[self._index(dim)]

    def rank(self, dim: str) -> int:
        """This rank's coordinate along ``dim``."""
        return self.coords[self._index(dim)]

    def describe(self) -> dict:
        """Plain metadata (for checkpoints)."""
        return {"dims": list(self.dims), "sizes": list(self.sizes), "coords": list(self.coords)}

    def __repr__(self) -> str:
        inner = ", ".join(f"{d}={n}" for d, n in zip(self.dims, self.sizes, strict=True))
        return f"Mesh({inner})"


def replicated(t: torch.Tensor, dims: tuple[str, ...] = ()) -> Placement:
    """The placement of a whole tensor, replicated over ``dims``."""
    return Placement(tuple(t.shape), (), tuple(dims))


def place(t: torch.Tensor, placement: Placement) -> torch.Tensor:
    """Record ``placement`` on ``t`` (returns ``t``)."""
    t._fscale_placement = placement
    return t


def placement_of(t: torch.Tensor | None) -> Placement | None:
    """The placement ``place`` recorded on ``t``, or None."""
    return None if t is None else getattr(t, "_fscale_placement", None)


def unsplit(t: torch.Tensor, placement: Placement, mesh) -> torch.Tensor:
    """The full tensor from every rank's piece of it: all-gathers over the leaf's split
    dims (a collective: every rank of those dims calls it). Padded rows are dropped.

    Usage: ``full = unsplit(local, placement_of(local), step.mesh)``.
    """
    for dim, axis in reversed(placement.extra):
        t = _gather_along(t, axis, mesh, dim, 1)
    for dim in reversed(placement.shard):  # rank-major: the innermost dim first
        t = _gather_along(t, placement.dim, mesh, dim, placement.chunks)
    if placement.shard and placement.chunks == 1 and placement.shape:
        t = t.narrow(placement.dim, 0, placement.shape[placement.dim])
    return t


def _gather_along(t: torch.Tensor, axis: int, mesh, dim: str, chunks: int) -> torch.Tensor:
    from fscale.hw import comm

    n = mesh.size(dim)
    if n == 1:
        return t
    moved = t.movedim(axis, 0).contiguous()
    pieces = comm.all_gather(moved, group=mesh.group(dim)).chunk(n)
    # Each piece holds its part of every fused block: block k is the concatenation of
    # every rank's k-th part.
    parts = [p.chunk(chunks) for p in pieces]
    full = torch.cat([parts[r][k] for k in range(chunks) for r in range(n)])
    return full.movedim(0, axis)

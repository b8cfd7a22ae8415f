"""The mesh: torch's ``DeviceMesh`` as the one description of process groups.

Every transform that communicates takes ``mesh=``: a ``DeviceMesh`` (1-D or N-D, with
named dims), a sub-mesh (``mesh["shard"]``), or None for the whole world as one
data-parallel dim. ``resolve`` turns it into a ``Mesh``: named dims, their sizes, this
rank's coordinate and one process group per dim. Placements (``fscale.placement``)
name mesh dims; collectives take their group from ``Mesh.group(dim)``.

A world of one needs no ``init_process_group``: ``resolve(None)`` is a 1-D mesh of
size 1 whose group is None (the comm table's ``"single"`` backend), the embedded
default.

Usage::

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    m = resolve(mesh)
    m.size("shard"), m.rank("shard"), m.group("shard")   # 2, this rank's index, its group
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fscale.hw import comm

#: The dim name of the default mesh (the whole world, data parallel).
WORLD_DIM = "dp"


@dataclass(frozen=True, eq=False)
class Mesh:
    """Named mesh dims with a process group each (None: the world, or a world of one)."""

    dims: tuple[str, ...]
    sizes: tuple[int, ...]
    groups: tuple[object, ...]
    device_mesh: object = None

    def _index(self, dim: str) -> int:
        if dim not in self.dims:
            raise ValueError(
                f"the mesh has no dim {dim!r}; its dims are {list(self.dims)}. Name one of "
                "them, or build the mesh with init_device_mesh(..., mesh_dim_names=(...))."
            )
        return self.dims.index(dim)

    def group(self, dim: str):
        """The process group along ``dim`` (None: the default world group)."""
        return self.groups[self._index(dim)]

    def size(self, dim: str | None = None) -> int:
        """Ranks along ``dim``, or in the whole mesh when ``dim`` is None."""
        return math.prod(self.sizes) if dim is None else self.sizes[self._index(dim)]

    def rank(self, dim: str) -> int:
        """This rank's coordinate along ``dim``."""
        return comm.rank(self.group(dim)) if self.size(dim) > 1 else 0

    def __repr__(self) -> str:
        inner = ", ".join(f"{d}={n}" for d, n in zip(self.dims, self.sizes, strict=True))
        return f"Mesh({inner})"


def resolve(mesh=None) -> Mesh:
    """``mesh=`` as a transform takes it -> a ``Mesh``; raises naming the fix on bad input."""
    if isinstance(mesh, Mesh):
        return mesh
    if mesh is None:
        return Mesh((WORLD_DIM,), (comm.world_size(),), (None,))
    try:
        from torch.distributed.device_mesh import DeviceMesh
    except ImportError:  # pragma: no cover - torch without distributed
        DeviceMesh = ()  # noqa: N806
    if not isinstance(mesh, DeviceMesh):
        raise TypeError(
            f"mesh must be a torch DeviceMesh (init_device_mesh(...)), a sub-mesh such as "
            f"mesh['shard'], or None for the whole world; got {type(mesh).__name__}."
        )
    names = mesh.mesh_dim_names
    if names is None:
        if mesh.ndim > 1:
            raise ValueError(
                f"a {mesh.ndim}-D mesh needs dim names; build it with "
                "init_device_mesh(..., mesh_dim_names=('replicate', 'shard'))."
            )
        names = (WORLD_DIM,)
    world = comm.world_size()
    ranks = mesh.mesh.flatten().tolist()
    if max(ranks) >= world or len(set(ranks)) != len(ranks):
        raise ValueError(
            f"the mesh {tuple(mesh.mesh.shape)} holds ranks {sorted(ranks)}, but the world has "
            f"{world} ranks; build it with init_device_mesh over this world (dims whose "
            f"product is {world}, or a sub-mesh of such a mesh)."
        )
    if comm.rank() not in ranks:
        raise ValueError(
            f"rank {comm.rank()} is not in the mesh (ranks {sorted(ranks)}); every rank that "
            "runs the step must be in its mesh."
        )
    sizes = tuple(int(s) for s in mesh.mesh.shape)
    if world == 1:
        groups = (None,) * len(sizes)
    else:
        groups = tuple(mesh.get_group(i) for i in range(mesh.ndim))
    return Mesh(tuple(names), sizes, groups, mesh)


def pick(mesh: Mesh, dim: str | None, what: str) -> str:
    """The dim ``what`` uses: ``dim`` if given (checked), else the mesh's last dim."""
    if dim is None:
        return mesh.dims[-1]
    if dim not in mesh.dims:
        raise ValueError(
            f"{what}: the mesh has no dim {dim!r}; its dims are {list(mesh.dims)}. Pass one "
            "of them, or name the mesh's dims with init_device_mesh(..., mesh_dim_names=...)."
        )
    return dim

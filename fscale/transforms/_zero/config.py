"""shard_zero's configuration: the stage, the mesh dim it shards over, and the grad reduction.

Usage::

    cfg.world, cfg.shard_group               # ranks a leaf is sharded over, their group
    handle = cfg.reduce_grads(ctx.comm, flat)  # reduce-scatter (+ HSDP's replica mean)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from fscale.hw import comm
from fscale.hw import mesh as meshes
from fscale.placement import Placement
from fscale.transforms._zero.sharding import Reduction, ShardSpec

NAME = "shard_zero"


@dataclasses.dataclass(frozen=True)
class ZeroConfig:
    stage: int
    mesh: meshes.Mesh
    shard_dim: str
    replicate_dims: tuple[str, ...]
    unit: Callable[[str], str] | None
    prefetch: int
    bucket_bytes: int
    check_order: bool | str = "first"  # True, False or "first" (the first step only)
    #: Every mesh dim but the shard dim, data or model (where a dense leaf is copied).
    others: tuple[str, ...] | None = None

    @property
    def world(self) -> int:
        """Ranks a leaf is sharded over (the shard dim's size)."""
        return self.mesh.size(self.shard_dim)

    @property
    def shard_group(self):
        return self.mesh.group(self.shard_dim)

    @property
    def copies(self) -> tuple[str, ...]:
        """The mesh dims a dense leaf's shard is copied over (data and model dims)."""
        return self.replicate_dims if self.others is None else self.others

    def placement(self, spec: ShardSpec) -> Placement:
        if spec.placement is not None:
            return spec.placement
        return Placement(spec.shape, (self.shard_dim,), self.copies)

    # -- reduction classes ([Note: ZeRO over model-parallel leaves] in zero.py) -------

    def world_of(self, reduction: Reduction | None) -> int:
        if reduction is None:
            return self.world
        return 1 if reduction.shard_dim is None else self.mesh.size(reduction.shard_dim)

    def group_of(self, reduction: Reduction | None):
        if reduction is None:
            return self.shard_group
        return None if reduction.shard_dim is None else self.mesh.group(reduction.shard_dim)

    def rank_of(self, reduction: Reduction | None) -> int:
        if reduction is None:
            return self.mesh.rank(self.shard_dim)
        return 0 if reduction.shard_dim is None else self.mesh.rank(reduction.shard_dim)

    def reduce_grads(
        self, collectives, flat: torch.Tensor, reduction: Reduction | None = None
    ) -> comm.Handle:
        """One rank-major bucket of grads -> this rank's averaged piece (async).

        A reduce-scatter inside the shard group; under HSDP the piece is then
        averaged over the replicas (the mean over a product of dims is the mean of
        the per-dim means). A leaf of another ``reduction`` class is averaged over its
        class's dims and divided by its scale instead. ``flat`` is given up: the
        result may be ``flat`` itself (a world of one).
        """
        if reduction is None:
            replicas = [d for d in self.replicate_dims if self.mesh.size(d) > 1]
            scale = 1
        else:
            replicas = [d for d in reduction.average if self.mesh.size(d) > 1]
            scale = reduction.scale
        if reduction is not None and reduction.shard_dim is None:
            handle = comm.Handle(flat)  # kept whole: nothing to scatter
        else:
            # ``flat`` is the caller's fresh bucket ([Note: donated inputs] in comm.py).
            handle = collectives.reduce_scatter(
                "zero.grads", flat, op="avg", group=self.group_of(reduction), async_op=True,
                donate=True,
            )  # fmt: skip
        if not replicas and scale == 1:
            return handle

        def across_replicas(mine: torch.Tensor) -> torch.Tensor:
            for dim in replicas:
                collectives.all_reduce("zero.grads", mine, op="avg", group=self.mesh.group(dim))
            if scale > 1:
                mine.div_(scale)
            return mine

        return handle.then(across_replicas)

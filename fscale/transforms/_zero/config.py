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
from fscale.transforms._zero.sharding import ShardSpec

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

    @property
    def world(self) -> int:
        """Ranks a leaf is sharded over (the shard dim's size)."""
        return self.mesh.size(self.shard_dim)

    @property
    def shard_group(self):
        return self.mesh.group(self.shard_dim)

    def placement(self, spec: ShardSpec) -> Placement:
        return Placement(spec.shape, (self.shard_dim,), self.replicate_dims)

    def reduce_grads(self, collectives, flat: torch.Tensor) -> comm.Handle:
        """One rank-major bucket of grads -> this rank's averaged piece (async).

        A reduce-scatter inside the shard group; under HSDP the piece is then
        averaged over the replicas (the mean over a product of dims is the mean of
        the per-dim means).
        """
        handle = collectives.reduce_scatter(
            "zero.grads", flat, op="avg", group=self.shard_group, async_op=True
        )
        replicas = [d for d in self.replicate_dims if self.mesh.size(d) > 1]
        if not replicas:
            return handle

        def across_replicas(mine: torch.Tensor) -> torch.Tensor:
            for dim in replicas:
                collectives.all_reduce("zero.grads", mine, op="avg", group=self.mesh.group(dim))
            return mine

        return handle.then(across_replicas)

"""ZeRO-2's gradient path: reduce-scatter buckets while backward is still running.

[Note: ZeRO-2 buckets]
Backward hands each grad to ``GradBuckets.add`` as soon as autograd has it (see
``fscale.stages.backward_into_sink``); the leaf's ``.grad`` is dropped at once. Grads
are packed in arrival order into buckets of ``bucket_bytes``; a full bucket is
copied into rank-major order (``copy_in``) in the reduce dtype and its
reduce-scatter is issued asynchronously, so communication overlaps the rest of
backward and the full-size grads of a bucket die with it. At most
``_MAX_IN_FLIGHT`` buckets are in flight (NCCL holds each input until waited on).
The arrival order is autograd's execution order: the same on every rank for the
same graph, so every rank forms the same buckets. A param the loss does not use
never arrives; ``finish`` gives it a zero grad without communication (like DDP,
this assumes every rank uses the same params).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from fscale.hw import comm
from fscale.transforms._zero.sharding import ShardSpec, copy_in, split_shards

_MAX_IN_FLIGHT = 2


class GradBuckets:
    """A grad sink for ``StepContext.grad_sink``: grads in, reduced shards out.

    ``reduce(flat) -> comm.Handle`` issues the (tagged, async) reduction of one
    rank-major bucket and yields this rank's averaged piece.
    """

    def __init__(
        self,
        specs: list[ShardSpec],
        world: int,
        reduce: Callable[[torch.Tensor], comm.Handle],
        bucket_bytes: int,
        reduce_dtype=None,
        out_dtypes=None,
    ):
        self.specs = specs  # aligned with the step's differentiated leaves
        self.out_dtypes = out_dtypes  # per leaf: the master shard's dtype
        self.reduce = reduce
        self.world = world
        self.bucket_bytes = bucket_bytes
        self.reduce_dtype = reduce_dtype
        self.bucket: list[tuple[int, torch.Tensor]] = []
        self.size = 0
        self.in_flight: list[tuple[list[int], list[torch.dtype], comm.Handle]] = []
        self.out: dict[int, torch.Tensor] = {}

    def add(self, index: int, grad: torch.Tensor) -> None:
        if self.bucket and self.bucket[0][1].dtype != grad.dtype:
            self._flush()
        self.bucket.append((index, grad))
        self.size += grad.numel() * grad.element_size()
        if self.size >= self.bucket_bytes:
            self._flush()

    def _flush(self) -> None:
        if not self.bucket:
            return
        indices = [i for i, _ in self.bucket]
        grads = [g for _, g in self.bucket]
        specs = tuple(self.specs[i] for i in indices)
        flat = copy_in(grads, specs, self.world, self.reduce_dtype or grads[0].dtype)
        # Reduced shards come out in the master shards' dtype (fp32 under mixed
        # precision), so clipping and the update never run in 16 bits.
        dtypes = [self.out_dtypes[i] if self.out_dtypes else g.dtype for i, g in self.bucket]
        self.bucket, self.size = [], 0
        del grads
        handle = self.reduce(flat)
        self.in_flight.append((indices, dtypes, handle))
        while len(self.in_flight) > _MAX_IN_FLIGHT:
            self._complete(self.in_flight.pop(0))

    def _complete(self, item) -> None:
        indices, dtypes, handle = item
        mine = handle.wait()
        specs = tuple(self.specs[i] for i in indices)
        for i, piece, dt in zip(indices, split_shards(mine, specs), dtypes, strict=True):
            self.out[i] = piece.to(dt)

    def finish(self, n: int) -> list[torch.Tensor]:
        self._flush()
        while self.in_flight:
            self._complete(self.in_flight.pop(0))
        missing = [i for i in range(n) if i not in self.out]
        if missing:
            like = next(iter(self.out.values()), None)
            for i in missing:
                self.out[i] = torch.zeros(
                    self.specs[i].shard_shape,
                    dtype=self.out_dtypes[i] if self.out_dtypes else torch.float32,
                    device=like.device if like is not None else None,
                )
        return [self.out[i] for i in range(n)]


class ClassedBuckets:
    """A grad sink routing each leaf to the ``GradBuckets`` of its reduction class, so
    leaves reduced differently never share a flat bucket ([Note: ZeRO over
    model-parallel leaves] in ``fscale/transforms/zero.py``)."""

    def __init__(self, classes: list, sinks: dict):
        self.classes = classes  # per leaf index: its class (a key of sinks)
        self.sinks = sinks

    def add(self, index: int, grad: torch.Tensor) -> None:
        self.sinks[self.classes[index]].add(index, grad)

    def finish(self, n: int) -> list[torch.Tensor]:
        out: dict[int, torch.Tensor] = {}
        for sink in self.sinks.values():
            sink._flush()
            while sink.in_flight:
                sink._complete(sink.in_flight.pop(0))
            out.update(sink.out)
        if len(out) < n:  # unused params: zeros, as GradBuckets.finish gives them
            some = next(iter(self.sinks.values()))
            some.out = out
            return some.finish(n)
        return [out[i] for i in range(n)]

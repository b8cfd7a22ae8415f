"""Param sources: where ZeRO-3 keeps each unit's flat shard between gathers.

``shard_zero(3)`` owns the gather (the all-gather, copy-out, prefetch and free) but
not the storage of the shards it gathers from. At ``init`` it hands every unit's
flat master shard to the step's source (``place``); at each gather it asks the
source for a device tensor to all-gather (``fetch``) and tells it when the gather
is done (``release``); after the update it says which flats changed (``refresh``).
The default source keeps the flats on the device as they are. ``offload`` publishes
another (``ParamSourcePolicy``): pinned host memory or a memory-mapped NVMe file,
with host->device copies on a side stream. A quantized source (ZeRO++'s qwZ) fits
the same protocol.

Usage::

    class MySource(ParamSource):
        def fetch(self, key, flat):
            return flat.to(self.device, self.gather_dtype), None
"""

from __future__ import annotations

import contextlib

import torch


class ParamSource:
    """The default source: flats stay where ``init`` made them (the compute device)."""

    kind = "device"

    def __init__(self, *, device: torch.device, gather_dtype: torch.dtype | None = None):
        self.device = device
        self.gather_dtype = gather_dtype  # the compute dtype (mixed precision), or None

    def place(self, flats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Relocate the flat master shards (unit key -> tensor); returns the flats kept.
        The step's params are views of what this returns."""
        return flats

    def fetch(self, key: str, flat: torch.Tensor):
        """``(tensor, launch)``: a device tensor to all-gather for unit ``key`` in the
        gather dtype, and a context manager to issue the all-gather in (a side stream),
        or None for the current stream. The tensor is ``flat`` itself or one made for
        this gather, which the gather takes over (a world of one uses it as the
        gathered params: [Note: donated inputs] in ``fscale/hw/comm.py``)."""
        if self.gather_dtype is not None and flat.dtype != self.gather_dtype:
            flat = flat.to(self.gather_dtype)
        return flat, None

    def release(self, key: str, gathered: torch.Tensor | None) -> None:
        """The all-gather of ``key`` was waited on: staging for it may go."""

    def refresh(self, flats: dict[str, torch.Tensor], changed: bool) -> None:
        """The update ran (``changed``: it wrote the flats): refresh any derived copies."""

    def finish(self) -> None:
        """End of the step's backward: no copy may still read the flats after this."""

    def resident(self, flat: torch.Tensor) -> bool:
        """Whether ``flat`` lives in this source's storage (not the device's)."""
        return False

    def metrics(self) -> tuple[dict[str, int], dict[str, int]]:
        """``(counters, levels)`` for the step's metrics: counters since the last call
        (summed over micro-batches, then reset), levels as they are now."""
        return {}, {}

    def describe_state(self) -> dict:
        """The state protocol: plain metadata (the flats are described by their owner)."""
        return {"kind": self.kind}

    @staticmethod
    def launch_context(launch) -> contextlib.AbstractContextManager:
        return launch if launch is not None else contextlib.nullcontext()

"""ZeRO-Infinity's param offload as a ``ParamSource``: shards in host memory or a mapped file.

[Note: param offload]
``offload(shard_zero(step, 3), tier, what=("optimizer", "params"))`` (ZeRO-Infinity's
param offload, DeepSpeed's ``offload_param``) publishes ``HostParamSource``; at init
``shard_zero(3)`` hands it every unit's flat shard, and it moves them all into one
host buffer (pinned on CUDA; for ``tier="nvme"`` a memory-mapped file under ``path``,
[Note: memory-mapped param shards] in ``fscale/io/swap.py``), dropping the device
copies: the step's params are views of that buffer, and the device holds no
persistent param bytes. A gather copies the unit's host shard into a device staging
buffer on a side stream and launches the all-gather from that stream, so NCCL waits
for the copy and compute does not; a prefetch issues both for the next unit, so the
copy overlaps the current unit's compute too. Device param memory is then the
gathered units in flight plus one staging shard per unit being fetched
(``zero3_peak_h2d_staging_bytes``). Staging and all-gather buffers are allocated on
the side stream and read on the compute stream: ``record_stream`` keeps the
allocator from reusing them early, and ``finish`` syncs the side stream before the
host update writes the shards.

The host keeps the flats in the master dtype (the params ``step.init`` returns and
``fs.gather_params`` reads) and, under ``mixed_precision``, a second copy in the
compute dtype, refreshed after each update: 2 more host bytes per param / N, so the
H2D moves half the bytes and no cast runs per gather (each unit is gathered twice a
step). DeepSpeed keeps only the 16-bit copy beside its optimizer's fp32 partition;
here the fp32 shards (fscale's step contract: the params) are the optimizer's
masters too on tier="cpu" -- it updates them in place ([Note: shared masters] in
``_offload/init.py``) -- while on NVMe (and with delayed_update) the optimizer keeps its
own masters and copies them into these views: a host->host copy, never to the device.
"""

from __future__ import annotations

import torch

from fscale.io import swap
from fscale.param_source import ParamSource


class _Launch:
    """The context an all-gather is issued in: the side stream; records when it is queued."""

    def __init__(self, source: HostParamSource, key: str, staged: torch.Tensor):
        self.source, self.key, self.staged = source, key, staged
        self._ctx = torch.cuda.stream(source.h2d_stream)

    def __enter__(self):
        return self._ctx.__enter__()

    def __exit__(self, *exc):
        done = torch.cuda.Event()
        done.record(self.source.h2d_stream)
        self.source.staging[self.key] = (self.staged, done)
        return self._ctx.__exit__(*exc)


class HostParamSource(ParamSource):
    """Flat shards in one host buffer; each gather starts with a host->device copy."""

    kind = "host"

    def __init__(self, *, device, gather_dtype=None, tier: str = "cpu", path=None):
        super().__init__(device=device, gather_dtype=gather_dtype)
        self.tier, self.path = tier, path
        self.buffer: torch.Tensor | None = None
        self.gather_copies: dict[str, torch.Tensor] = {}  # compute-dtype host copies
        cuda = self.device.type == "cuda"
        self.h2d_stream = torch.cuda.Stream(self.device) if cuda else None
        self.staging: dict[str, tuple] = {}  # key -> (device copy, event) until gathered
        self.h2d_bytes = 0
        self.placed_bytes = 0

    @torch.no_grad()
    def place(self, flats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        offsets, size = {}, 0
        for key, f in flats.items():
            copy_dtype = self.gather_dtype if self.gather_dtype not in (None, f.dtype) else None
            for part, dtype in (("flat", f.dtype), ("gather", copy_dtype)):
                if dtype is None:
                    continue
                offsets[key, part] = (size, dtype)
                size += swap.align_up(f.numel() * dtype.itemsize, 64)  # vector loads
        if self.tier == "nvme":
            self.buffer = swap.map_file(self.path, size)
        else:
            self.buffer = swap.alloc(size)

        def view(key, part):
            offset, dtype = offsets[key, part]
            n = flats[key].numel()
            return self.buffer[offset : offset + n * dtype.itemsize].view(dtype)

        host = {}
        for key, f in flats.items():
            host[key] = view(key, "flat").copy_(f)
            if (key, "gather") in offsets:
                self.gather_copies[key] = view(key, "gather").copy_(host[key])
        self.placed_bytes = sum(h.numel() * h.element_size() for h in host.values())
        return host

    def fetch(self, key: str, flat: torch.Tensor):
        src = self.gather_copies.get(key, flat)
        self.h2d_bytes += src.numel() * src.element_size()
        dtype = self.gather_dtype or src.dtype
        if self.h2d_stream is None:
            # One memory for host and device (CPU tests): a plain copy, so the staging
            # buffer and its accounting are those of a real accelerator.
            return src.to(dtype, copy=True), None
        with torch.cuda.stream(self.h2d_stream):
            staged = torch.empty(src.shape, dtype=src.dtype, device=self.device)
            staged.copy_(src, non_blocking=True)  # pinned source: an async DMA
            if staged.dtype != dtype:
                staged = staged.to(dtype)
        # Launched from the side stream, NCCL waits for the copy, not for compute.
        return staged, _Launch(self, key, staged)

    def release(self, key: str, gathered: torch.Tensor | None) -> None:
        staged, done = self.staging.pop(key, (None, None))
        if done is None:
            return
        current = torch.cuda.current_stream(self.device)
        current.wait_event(done)  # the world-of-one "gather" is a copy on the side stream
        # Both were allocated on the side stream and are read on the current one (or by
        # NCCL, which the current stream waited for): no reuse before that work is done.
        staged.record_stream(current)
        if gathered is not None:
            gathered.record_stream(current)

    @torch.no_grad()
    def refresh(self, flats: dict[str, torch.Tensor], changed: bool) -> None:
        if changed:
            for key, copy in self.gather_copies.items():
                copy.copy_(flats[key])

    def finish(self) -> None:
        if self.h2d_stream is not None:
            self.h2d_stream.synchronize()  # the update writes the host shards next

    def resident(self, flat: torch.Tensor) -> bool:
        if self.buffer is None:
            return False
        return flat.untyped_storage().data_ptr() == self.buffer.untyped_storage().data_ptr()

    def metrics(self):
        counters = {"zero3_h2d_bytes": self.h2d_bytes}
        self.h2d_bytes = 0
        copies = sum(c.numel() * c.element_size() for c in self.gather_copies.values())
        return counters, {"zero3_host_shard_bytes": self.placed_bytes + copies}

    def describe_state(self) -> dict:
        return {"kind": self.kind, "tier": self.tier}

"""ZeRO-Inference weight streaming: layer weights live in (pinned) host memory and are
copied to the device one layer ahead of use.

Usage::

    stream = LayerStream(layers_on_host, torch.device("cuda"))
    for p in stream:            # p: layer i's weights on the device; i + 1's copy in flight
        ...

[Note: one layer ahead]
On CUDA the copy of layer i + 1 is issued on a side stream when layer i is handed out,
so it overlaps layer i's compute; the compute stream waits for it (``wait_stream``)
before using it, and ``record_stream`` keeps the caching allocator from reusing a
layer's buffers while the compute stream may still read them. At most two layers'
weights are on the device at once. Off CUDA the "copy" is a clone on the same device:
the same code path, tested for equality with the resident weights.
"""

from __future__ import annotations

import torch


class LayerStream:
    """Iterate over layers' weights, each copied to ``device`` just ahead of use."""

    def __init__(self, layers: list[dict[str, torch.Tensor]], device: torch.device):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        # Host copies (pinned on CUDA so the copies are asynchronous).
        self.host = [{k: self._to_host(v) for k, v in layer.items()} for layer in layers]
        self.side = torch.cuda.Stream(self.device) if self.cuda else None

    def _to_host(self, t: torch.Tensor) -> torch.Tensor:
        t = t.to("cpu")
        if self.cuda and type(t) is torch.Tensor:
            t = t.pin_memory()
        return t

    def _fetch(self, i: int) -> dict[str, torch.Tensor]:
        if not self.cuda:
            return {k: v.clone() for k, v in self.host[i].items()}
        with torch.cuda.stream(self.side):
            return {k: v.to(self.device, non_blocking=True) for k, v in self.host[i].items()}

    def __iter__(self):
        nxt = self._fetch(0) if self.host else None
        for i in range(len(self.host)):
            cur = nxt
            if self.cuda:
                torch.cuda.current_stream(self.device).wait_stream(self.side)
                for v in cur.values():
                    if type(v) is torch.Tensor:
                        v.record_stream(torch.cuda.current_stream(self.device))
            nxt = self._fetch(i + 1) if i + 1 < len(self.host) else None
            yield cur

    def __len__(self) -> int:
        return len(self.host)

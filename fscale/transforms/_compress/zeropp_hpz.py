"""hpZ: a secondary param partition inside groups of k ranks, so that ZeRO-3's backward
re-gathers stay inside the group (ZeRO++'s intra-node weight partition).

[Note: hpZ through the param source]
ZeRO-3 gathers each unit twice: in forward, and again in backward for the saved
tensors it freed. hpZ keeps, after the forward gather, this rank's 1/k slice of the
gathered unit (the output of an all-gather is the ranks' pieces in rank order, so
rank ``j`` of a group keeps rows ``j`` of the output cut in k) and serves the
backward gather with an all-gather of those slices over the k ranks of its group:
the same values as forward (qwZ's dequantized ones included), bit for bit.

The lowering of ``"zero.params"`` gets a tensor and a group, not the unit. It learns
the unit through the core's param-source protocol: ``zeropp(hpz=k)`` publishes a
``ParamSourcePolicy`` whose source records, in ``fetch``, the tensor it hands out for
unit ``key``; ZeRO-3 all-gathers exactly that tensor next, so the lowering matches
it by identity (anything else -- another gather -- takes the plain path). The
phase is autograd's: a gather inside a backward pass (``_current_graph_task_id``)
reads the secondary slices. Slices live on the source until ``finish`` (the end of
backward), as DeepSpeed frees its secondary partition after backward. Backward
gathers are counted under their own tag, ``"zero.params.hpz"``.

Usage::

    channel = HpzChannel(k, group_of_k, rank_in_group)
    policy = ParamSourcePolicy(HpzSource, (("channel", channel),))
    lowering = partial(hpz_all_gather, channel, inner_forward_gather)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fscale.hw import comm
from fscale.param_source import ParamSource

TAG = "zero.params.hpz"


@dataclass(eq=False)
class HpzChannel:
    """What the source tells the lowering: the last tensor handed out, and for which unit."""

    k: int
    group: object  # the process group of this rank's k ranks (None: the world of one)
    index: int  # this rank's index in it
    pending: tuple | None = field(default=None, repr=False)  # (source, key, tensor)

    def describe_state(self) -> dict:
        return {"k": self.k}


class HpzSource(ParamSource):
    """The default device source, plus hpZ's secondary slices between forward and backward."""

    def __init__(self, *, device, gather_dtype=None, channel: HpzChannel):
        super().__init__(device=device, gather_dtype=gather_dtype)
        self.channel = channel
        self.slices: dict[str, torch.Tensor] = {}

    def fetch(self, key: str, flat: torch.Tensor):
        local, launch = super().fetch(key, flat)
        self.channel.pending = (self, key, local)
        return local, launch

    def finish(self) -> None:
        self.slices.clear()  # backward is over: the next forward gathers afresh

    def describe_state(self) -> dict:
        return {"kind": self.kind, "hpz": self.channel.k}


def hpz_all_gather(channel: HpzChannel, forward, call, t: torch.Tensor, *, group=None, **kw):
    """Lowering of ``"zero.params"`` ([Note: hpZ through the param source]).

    ``forward(call, t, group=, async_op=)`` is the full gather (qwZ's or the default).
    """
    pending, channel.pending = channel.pending, None
    if pending is None or pending[2] is not t or call.op != "all_gather":
        return forward(call, t, group=group, **kw)
    source, key, _ = pending
    async_op = kw.get("async_op", False)
    in_backward = torch._C._current_graph_task_id() != -1
    if in_backward and key in source.slices:
        return comm.all_gather(source.slices[key], group=channel.group, async_op=async_op, tag=TAG)
    handle = forward(call, t, group=group, async_op=True)

    def keep_slice(full: torch.Tensor) -> torch.Tensor:
        # clone: a view would keep the whole gathered unit alive until backward.
        source.slices[key] = full.view(channel.k, -1)[channel.index].clone()
        return full

    handle = handle.then(keep_slice)
    return handle if async_op else handle.wait()

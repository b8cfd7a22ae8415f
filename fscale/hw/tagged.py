"""Tagged collectives: the step's comm policy, scoped to one step.

Stages never call ``fscale.hw.comm`` directly; they call ``ctx.comm.<op>(tag, ...)``
where ``tag`` names *what* is communicated (``"dp.grads"``, ``"zero.grads"``,
``"zero.params"``, ``"ep.dispatch"``, ...). By default a tagged call runs the comm
table's lowering for the group's backend. A transform may replace the lowering of
one tag for its own step only (``step.with_transform(record, lowerings={tag: fn})``,
JAX's ``register_lowering`` keyed by tag instead of by platform): another step in the
same process, and every other tag, is unaffected. The replacement may keep state
(error-feedback buffers) in its owner's state slot through ``call.state``.

A lowering is ``fn(call, t, **kwargs)`` where ``kwargs`` are the op's own
(``op=``, ``group=``, ``async_op=``, ...). It returns what the op returns: the
result, or a ``comm.Handle`` when ``async_op``; returning a plain tensor for an
async call is allowed (it is wrapped as a completed handle). ``all_reduce`` and
``broadcast`` work in place (callers read ``t``): a lowering that returns another
tensor for them, like the example's cast back, has it copied into ``t``.

Usage::

    def fp16_reduce(call, t, **kw):               # a lowering for "zero.grads"
        call.state = {**call.state, "calls": call.state["calls"] + 1}
        out = call.default(t.half(), **{**kw, "async_op": False})
        return out.to(t.dtype)

    step = step.with_transform(record, lowerings={"zero.grads": fp16_reduce}, init=...)
    ...
    ctx.comm.reduce_scatter("zero.grads", flat, op="avg", group=g, async_op=True)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from fscale.hw import comm

OPS = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "broadcast")
_IN_PLACE = ("all_reduce", "broadcast")


@dataclass(frozen=True)
class TaggedLowering:
    """``fn`` replaces every collective tagged ``tag``; ``owner`` is the transform whose
    state slot ``call.state`` reads and writes."""

    tag: str
    owner: str
    fn: Callable


class Call:
    """What a replaced lowering gets: the op, the tag, the default lowering, its state."""

    __slots__ = ("tag", "op", "owner", "_ctx")

    def __init__(self, tag: str, op: str, owner: str, ctx):
        self.tag, self.op, self.owner, self._ctx = tag, op, owner, ctx

    def default(self, t: torch.Tensor, **kwargs):
        """The comm table's lowering of this op (counted under this call's tag)."""
        return getattr(comm, self.op)(t, tag=self.tag, **kwargs)

    @property
    def state(self):
        """The owner's state slot of the running step (set it to replace the slot)."""
        if self.owner not in self._ctx.state:
            raise RuntimeError(
                f"the lowering of {self.tag!r} reads the state slot {self.owner!r}, which the "
                f"step's state does not hold; {self.owner}'s init stage must create it."
            )
        return self._ctx.state[self.owner]

    @state.setter
    def state(self, value) -> None:
        self._ctx.state[self.owner] = value


def _into(t: torch.Tensor, out):
    """The in-place ops' contract: the result ends up in ``t`` (callers ignore ``out``)."""
    if isinstance(out, comm.Handle):
        return out.then(lambda r: r if r is t else t.copy_(r))
    return out if out is t else t.copy_(out)


class Collectives:
    """``ctx.comm``: the tagged collectives of one step call."""

    def __init__(self, lowerings: tuple[TaggedLowering, ...], ctx):
        self._by_tag = {entry.tag: entry for entry in lowerings}
        self._ctx = ctx

    def _run(self, name: str, tag: str, t: torch.Tensor, **kwargs):
        if not isinstance(tag, str) or not tag:
            raise TypeError(
                f"ctx.comm.{name} takes the tag first (e.g. ctx.comm.{name}('dp.grads', t, "
                f"...)), got {tag!r}."
            )
        entry = self._by_tag.get(tag)
        if entry is None:
            return getattr(comm, name)(t, tag=tag, **kwargs)
        kwargs.pop("donate", None)  # a replaced lowering makes its own buffers
        out = entry.fn(Call(tag, name, entry.owner, self._ctx), t, **kwargs)
        if name in _IN_PLACE:
            out = _into(t, out)
        if kwargs.get("async_op") and not isinstance(out, comm.Handle):
            out = comm.Handle(out)
        return out

    def replaced(self, tag: str) -> bool:
        """Whether a transform replaced the lowering of ``tag`` in this step."""
        return tag in self._by_tag

    def all_reduce(self, tag: str, t, op="sum", group=None, async_op=False):
        return self._run("all_reduce", tag, t, op=op, group=group, async_op=async_op)

    def all_gather(self, tag: str, t, group=None, async_op=False, donate=False):
        return self._run("all_gather", tag, t, group=group, async_op=async_op, donate=donate)

    def reduce_scatter(self, tag: str, t, op="sum", group=None, async_op=False, donate=False):
        return self._run(
            "reduce_scatter", tag, t, op=op, group=group, async_op=async_op, donate=donate
        )

    def all_to_all(
        self, tag: str, t, output_split_sizes=None, input_split_sizes=None, group=None,
        async_op=False,
    ):  # fmt: skip
        return self._run(
            "all_to_all",
            tag,
            t,
            output_split_sizes=output_split_sizes,
            input_split_sizes=input_split_sizes,
            group=group,
            async_op=async_op,
        )

    def broadcast(self, tag: str, t, src=0, group=None, async_op=False):
        return self._run("broadcast", tag, t, src=src, group=group, async_op=async_op)

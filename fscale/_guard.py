"""Reliability guards of the step: non-finite steps, rank drift at init, stale state.

``Step.__call__`` and ``Step.init`` call these; nothing here is a stage a transform
replaces. The checks each close a path that was silent (DESIGN.md §6, issue 15):

- ``vote``: one all-reduce per step of ``[loss, non-finite flag]`` over the step's mesh
  (tag ``"guard.nonfinite"``) gives the global mean loss and every rank's verdict on
  the step ([Note: the non-finite guard]).
- ``check_init`` / ``broadcast_init``: all ranks start from the same params
  ([Note: same params on every rank]).
- ``Generation``: a call consumes its ``(params, state)``; using them again raises
  ([Note: stale state]).
- ``check_trainable``: packed (quantized) leaves are refused by ``step.init``.

Usage::

    vote = _guard.vote(ctx, loss, grads, norm)   # in Step.__call__, after finish_grads
    _guard.check_init(step.mesh, params)         # in Step.init, before the layout
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from fscale import tree
from fscale.hw import comm

if TYPE_CHECKING:
    from fscale.hw.mesh import Mesh
    from fscale.step import StepContext

NONFINITE_MODES = ("skip", "skip_now", "skip_late", "off")
SKIPPING = ("skip", "skip_now", "skip_late")
SYNC_INIT_MODES = ("check", "broadcast", "off")
TAG = "guard.nonfinite"

# [Note: the non-finite guard]
# A NaN/inf in one batch used to reach the optimizer: every param non-finite, on
# every rank, for good. Now, after ``finish_grads`` (grads reduced, fp16 grads
# unscaled), each rank forms a local flag -- its loss is non-finite, or one of its
# (reduced, maybe sharded) grads is -- and sends its loss, or NaN when flagged, in
# one all-reduce (sum, one float) over every dim of the step's mesh. That gives both
# the global mean loss (``metrics["loss"]``, which needs the all-reduce anyway) and
# the verdict: the sum is NaN iff some rank saw a non-finite value (a NaN survives
# every sum; an inf loss was flagged, so it arrives as NaN). Every rank then takes the same
# decision: under ``shard_zero`` a rank sees only its shard of the grads, and a rank
# that updated while another skipped would desynchronise them for good. On a
# non-finite step ``Step.__call__`` runs neither clipping, ``update`` nor ``apply``
# (or runs them masked on the device, below): params and the whole state come back
# untouched (the optimizer's count and its LR schedule do not advance), only the
# guard's counters move. After
# ``max_nonfinite_skips`` such steps in a row it raises ``FloatingPointError``.
#
# mixed_precision(fp16) used to all-reduce its own overflow flag and read it on the
# host: it now hands its local flag to this vote (``ctx.flag_nonfinite``) and reads
# the verdict (``ctx.on_verdict``), so there is one vote and one host read. Its
# overflows above the loss-scale floor are expected (the scale halves and the step
# is retried at a lower scale), so they do not count towards the limit; at the
# floor they do.
#
# Cost on the fast path. The flag of the grads comes free from the grad norm when
# ``clip_norm`` is set (a non-finite element makes the norm non-finite; sharded
# norms are already summed over the shard dim), and from fp16's unscale pass;
# otherwise it is one ``torch._foreach_norm`` over the grads (a read of the grad
# bytes, ~1.3 ms for 1.4B fp32 grads at 4.3 TB/s). The all-reduce carries
# 4 bytes (a latency, not bandwidth).
#
# Skipping needs the verdict on the host (a skipped step returns the old state, and
# the count and schedule are host values), so ``nonfinite="skip"`` reads it once per
# step, as fp16 always did (``torch.amp.GradScaler.step`` and DeepSpeed too). Where
# the read goes matters. Read before the update, it stalls the host until backward
# is done, and the update and the next forward are launched while the device idles:
# +2.0% on the 1.3B GPT step (bench/guard.py, one H200, 2026-12-02). So when the
# whole update can skip on the device ([Note: skipping on the device] in
# ``fscale/optim/base.py``: the fused AdamW takes the verdict as a flag, and every
# transform replacing ``update``/``apply`` declares SKIP_SAFE_UPDATE) the update is
# queued first and the host reads the verdict after it, while the device works
# through the update; a skip then hands back the slots of ``state`` that came in,
# whose tensors the masked update left alone. Other stacks (SGD, Lion, LAMB, a chain
# with stateful links, offload's host optimizer, fp16's loss scale, which must move
# before the next step) keep the read before the update. A copy-and-select
# (``torch.where``) alternative would copy params and optimizer state every step,
# far dearer than either. ``nonfinite="off"`` keeps the vote (for the global loss and
# ``metrics["nonfinite"]``, a device tensor then) and never reads it: no sync, no
# protection.
#
# A read after the queued update costs as much as one before it (bench/guard.py, one
# H200: +2.06% and +2.02% over "off" on the 1.3B GPT step): the device then waits
# for the host's next step, whose Python prologue (functional_call's
# reparametrisation, the casts, the hooks) is exposed once the host cannot run a step
# ahead. Hence [Note: reading the verdict a step late].


# [Note: reading the verdict a step late]
# Where the whole update skips on the device (above), nothing on the device needs the
# verdict on the host: only host values do -- the optimizer's count and schedule
# position in the returned slots, the guard's counters, the raise after
# ``max_nonfinite_skips``. So ``nonfinite="skip"`` on an accelerator (and
# ``"skip_late"`` anywhere) queues the update with the device flag, starts a
# non-blocking copy of the verdict into pinned host memory, and returns: the state
# carries a ``PendingVerdict`` holding the slots that came in and those that went out.
# The next call queues its forward and backward first and only then ``settle``s it
# (the copy landed long before: the host stays a whole forward + backward ahead). A
# skipped step's slots are put back -- the tensors in them are the very ones the
# masked update left untouched, so this restores host values only -- before the next
# update reads them: every later step is what an immediate read gives, bit for bit.
# What lags one call: ``metrics["nonfinite"]`` is a device bool, ``skipped_steps``
# counts settled steps, and the raise after the limit comes one call later. The
# forward of the call after a skip sees the skipped call's params, which are equal
# (the same tensors, or casts / gathers of unchanged masters). ``fs.save`` settles
# first, so a checkpoint never holds an unsettled step. ``"skip_now"`` keeps the read
# in every call (exact per-call metrics). On CPU there is no run-ahead to protect, so
# plain ``"skip"`` reads at once there.
_OWN_SLOTS = ("count", "guard", "generation", "layout")


@dataclass
class PendingVerdict:
    """A step's non-finite verdict, queued but not read ([Note: reading the verdict a
    step late]); ``settle`` resolves it."""

    flag: torch.Tensor  # bool, True: skipped (pinned host copy, or the device tensor)
    ready: Any  # a CUDA event recorded after the copy, or None
    before: dict  # the slots the step got
    after: dict  # the slots it returned
    limit: int | None
    loss_scaled: bool

    @classmethod
    def queue(cls, voted: torch.Tensor, before: dict, step_state: dict, limit, loss_scaled):
        bad = ~torch.isfinite(voted)
        ready = None
        if bad.is_cuda:
            host = torch.empty((), dtype=torch.bool, pin_memory=True)
            host.copy_(bad, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record()
            bad = host
        after = {k: v for k, v in step_state.items() if k not in _OWN_SLOTS}
        before = {k: v for k, v in before.items() if k not in _OWN_SLOTS}
        return cls(bad, ready, before, after, limit, loss_scaled)

    def skipped(self) -> bool:
        if self.ready is not None:
            self.ready.synchronize()
        return bool(self.flag)

    def describe_state(self) -> dict:
        # A checkpoint settles first (fs.save); explain and size queries see nothing.
        return {}


def settle(state: dict, *, raise_at_limit: bool = True) -> dict:
    """Resolve the verdict a late-reading step left in ``state`` (in place): a skipped
    step's slots go back to those it got, the guard's counters move. Returns ``state``.

    Usage::

        _guard.settle(state)   # before reading state["guard"] or saving state
    """
    guard = state.get("guard")
    pending = guard.get("pending") if isinstance(guard, dict) else None
    if pending is None:
        return state
    guard = {k: v for k, v in guard.items() if k != "pending"}
    state["guard"] = guard
    if not pending.skipped():
        guard["consecutive"] = 0
        return state
    for key in set(pending.before) | set(pending.after):
        if pending.after.get(key) is pending.before.get(key):
            continue  # the masked update left this slot as it was
        if state.get(key) is not pending.after.get(key):
            raise RuntimeError(
                f"state slot {key!r} was replaced between a step and the reading of that "
                "step's non-finite verdict, so the skipped step cannot be undone; the stage "
                "that replaced it runs before the update and must not (or build the step "
                "with train_step(nonfinite='skip_now'))."
            )
        if key in pending.before:
            state[key] = pending.before[key]
        else:
            del state[key]
    guard["skipped_steps"] += 1
    guard["consecutive"] += 1
    limit = pending.limit
    if raise_at_limit and limit is not None and guard["consecutive"] >= limit:
        raise too_many_skips(guard["consecutive"], limit, pending.loss_scaled)
    return state


def local_flag(ctx: StepContext, loss: torch.Tensor, grads: Any, norm) -> torch.Tensor:
    """1.0 where this rank's loss or grads are non-finite, else 0.0 (a device 0-d fp32)."""
    bad = ~torch.isfinite(loss.detach().float())
    if ctx.nonfinite is not None:  # a stage checked every grad already (fp16 unscale)
        bad = bad | (ctx.nonfinite.to(bad.device) > 0)
    elif norm is not None:
        bad = bad | ~torch.isfinite(norm.to(bad.device))
    else:
        live = [g for g in tree.leaves(grads) if g is not None and g.numel()]
        if live:
            by_device: dict = {}
            for g in live:
                by_device.setdefault((g.device, g.dtype), []).append(g)
            for group in by_device.values():
                norms = torch._foreach_norm(group)  # one dtype per group: one stack
                total = torch.stack(norms).float().sum()
                bad = bad | ~torch.isfinite(total.to(bad.device))
    return bad.float()


def vote(ctx: StepContext, loss: torch.Tensor, grads: Any, norm) -> torch.Tensor:
    """The global mean loss over the step's mesh, NaN if any rank saw inf/nan (0-d)."""
    flag = local_flag(ctx, loss, grads, norm)
    dtype = torch.promote_types(loss.dtype, torch.float32)
    mine = loss.detach().to(dtype).reshape(())
    out = torch.where(flag.to(mine.device) > 0, torch.full_like(mine, math.nan), mine)
    mesh = ctx.step.mesh
    n = 1
    for dim in mesh.dims:  # the sum over a product of dims is the sum of per-dim sums
        if mesh.size(dim) > 1:
            ctx.comm.all_reduce(TAG, out, op="sum", group=mesh.group(dim))
            n *= mesh.size(dim)
    return out / n if n > 1 else out


def too_many_skips(count: int, limit: int, loss_scaled: bool) -> FloatingPointError:
    floor = (
        " mixed_precision(fp16)'s loss scale is at its floor (min_scale), so lowering it "
        "cannot help."
        if loss_scaled
        else ""
    )
    return FloatingPointError(
        f"{count} steps in a row had a non-finite loss or non-finite grads on some rank "
        f"and were skipped (train_step(max_nonfinite_skips={limit})).{floor} Look for "
        "NaN/inf in the batches, a too-high learning rate, or a loss that divides by zero; "
        "params and state are those of the last good step."
    )


# ----------------------------------------------------------------------------- init

# [Note: same params on every rank]
# Ranks built with different seeds used to train diverged replicas (plain data
# parallel) or stitch a model from rows of both inits (ZeRO: each rank keeps its
# own rows of its own init). ``step.init`` now compares two float64 sums per leaf
# (sum and 2-norm) across the ranks of each mesh dim -- one all-gather of 16 bytes
# per leaf, once -- and raises on every rank, naming the first leaf that differs
# and the ranks that disagree. Equal along every dim means equal on the whole mesh.
# ``sync_init="broadcast"`` copies rank 0's params into every rank's instead (DDP's
# constructor does the same), in place.


def _is_live(t) -> bool:
    return isinstance(t, torch.Tensor) and t.device.type != "meta"


def _live(params) -> list[tuple[str, torch.Tensor]]:
    return [
        (p, t) for p, t in zip(tree.paths(params), tree.leaves(params), strict=True) if _is_live(t)
    ]


def check_init(mesh: Mesh, params) -> None:
    """Raise, on every rank, if ranks of ``mesh`` hold different params."""
    leaves = _live(params)
    if not leaves or not comm.is_initialized():
        return
    device = leaves[0][1].device
    with torch.no_grad():
        sums = torch.stack(
            [
                torch.stack(
                    [t.sum(dtype=torch.float64), torch.linalg.vector_norm(t, dtype=torch.float64)]
                ).to(device)
                for _, t in leaves
            ]
        )
    for dim in mesh.dims:
        n = mesh.size(dim)
        if n == 1:
            continue
        group = mesh.group(dim)
        gathered = comm.all_gather(sums.unsqueeze(0), group=group, tag="guard.init")
        everyone = gathered.cpu().view(n, len(leaves), 2)
        first = everyone[:1]
        same = (everyone == first) | (everyone.isnan() & first.isnan())  # NaN == NaN here
        differs = (~same).any(dim=2).any(dim=0)
        if bool(differs.any()):
            i = int(differs.nonzero()[0])
            path = leaves[i][0]
            ranks = [comm._global_rank(group, r) for r in range(n)]
            values = ", ".join(
                f"rank {r}: sum={everyone[j, i, 0].item():.9g}" for j, r in enumerate(ranks)
            )
            raise ValueError(
                f"step.init: ranks hold different params: {path!r} differs across mesh dim "
                f"{dim!r} ({values}). Every rank must start from the same params: seed the "
                "model's init identically on every rank (torch.manual_seed before building "
                "it), or pass train_step(..., sync_init='broadcast') to copy rank 0's params "
                "to every rank."
            )


def broadcast_init(mesh: Mesh, params) -> None:
    """Copy the first rank's params (along every mesh dim) into every rank's, in place."""
    leaves = _live(params)
    if not leaves or not comm.is_initialized():
        return
    with torch.no_grad():
        for dim in mesh.dims:
            if mesh.size(dim) == 1:
                continue
            for _, t in leaves:
                buf = t.detach()
                comm.broadcast(buf, src=0, group=mesh.group(dim), tag="guard.init")


# ----------------------------------------------------------------------------- stale state

# [Note: stale state]
# Inputs are donated: the fused optimizers update params and moments in place, so
# after ``params1, state1, _ = step(params0, state0, batch)`` the tensors in
# ``state0`` hold step 1's values while ``state0`` still says count=0 -- re-using it
# silently restarted Adam's bias correction. ``state["generation"]`` holds a
# ``Generation``: a lineage shared by every state of one ``step.init`` and this
# state's number in it. A call checks that its state is the lineage's newest and
# bumps it; its params' leaves carry the same mark (``_fscale_generation``), so
# params of an older call are refused too. A deep copy of a state is a new lineage
# (a deliberate fork is allowed); a call that raises consumes nothing.


class _Lineage:
    __slots__ = ("newest",)

    def __init__(self):
        self.newest = 0


@dataclass(frozen=True)
class Generation:
    """This state's place in the sequence of states one ``step.init`` started."""

    lineage: _Lineage
    number: int

    @classmethod
    def start(cls) -> Generation:
        return cls(_Lineage(), 0)

    def describe_state(self) -> int:
        return self.number

    def check(self, params) -> None:
        if self.number != self.lineage.newest:
            raise ValueError(
                f"stale state: this state is from step call {self.number} since step.init, but "
                f"call {self.number + 1} already consumed it (the newest is from call "
                f"{self.lineage.newest}) -- inputs are donated (updated in place). Rebind on "
                "every call: `params, state, metrics = step(params, state, batch)`, and pass "
                "the newest params and state."
            )
        # Leaves first, paths only for the message (this runs on every call).
        for i, t in enumerate(tree.leaves(params)):
            mark = getattr(t, "_fscale_generation", None)
            if mark is not None and mark[0] is self.lineage and mark[1] != self.number:
                path = tree.paths(params)[i]
                raise ValueError(
                    f"stale params: param {path!r} is from step call {mark[1]}, the state from "
                    f"call {self.number}. Rebind on every call: `params, state, metrics = "
                    "step(params, state, batch)`, and pass the params returned with the state."
                )

    def advance(self, params) -> Generation:
        """The next generation (consuming this one); marks ``params`` with it."""
        nxt = Generation(self.lineage, self.number + 1)
        self.lineage.newest = nxt.number
        nxt.mark(params)
        return nxt

    def mark(self, params) -> None:
        stamp = (self.lineage, self.number)
        for t in tree.leaves(params):
            if _is_live(t):
                t._fscale_generation = stamp


# ----------------------------------------------------------------------------- leaves


def check_trainable(path: str, leaf: torch.Tensor) -> None:
    """Refuse packed leaves (``fs.quantize``'s ``QuantizedWeight``): autograd cannot
    differentiate their packed bytes, so training them changes nothing."""
    kind = type(leaf)
    trainable = getattr(kind, "fscale_trainable", None)
    if trainable is None:  # leaf types that report themselves to fs.explain are packed
        trainable = kind is torch.Tensor or not hasattr(kind, "fscale_report")
    if not trainable:
        raise TypeError(
            f"param {path!r} is a {kind.__name__} (quantized, packed): it cannot be trained. "
            "Train the full-precision params (fs.functional(model) before fs.quantize) and "
            "quantize after training; keep quantized weights for inference."
        )

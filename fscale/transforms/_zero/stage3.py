"""ZeRO-3 inside a functional forward: lazy params, per-unit gather, freed after use.

[Note: ZeRO-3 lifetime]
``materialize`` hands the loss a dict of ``LazyParam`` wrappers (full shape, no
storage). The first torch op that touches one gathers its whole unit through
``GatherUnit`` -- an autograd Function whose backward is the reduce-scatter (the
transpose of all-gather) -- and the unit before it is dropped. Autograd would
normally keep every gathered weight alive until backward (``F.linear`` saves its
weight); a saved-tensor pack hook replaces any tensor living in a gathered unit
buffer by a small token, and the unpack hook re-gathers the unit in backward. So
at any point of forward and backward at most the current unit is materialized,
plus ``prefetch`` units whose all-gather is in flight: per-rank param memory is
``full/N + (1 + prefetch) units``, and one more unit-sized all-gather buffer
exists transiently while a unit is copied out of it (FSDP2 has the same). No
activation recompute is needed. Both are measured (``_Tracker``) and reported in
the metrics (``zero3_peak_gathered_params_bytes`` / ``..._total_bytes``). A unit
that activation checkpointing runs again in backward gathers on the backward path
([Note: recompute]).

The order units are touched in is recorded; the next forward prefetches in that
order and backward in its reverse (async all-gathers; on CUDA NCCL runs them on
its own stream, overlapping the current unit's compute).

With ``mixed_precision`` inside, shards are cast to the compute dtype *before* the
all-gather (half the bytes) and grads are reduce-scattered in ``reduce_dtype``,
returned in the master dtype.

Where the flat shards live between gathers is the step's ``ParamSource``
(``fscale/param_source.py``): the device by default; ``offload(..., what=("optimizer",
"params"))`` publishes one that keeps them in host memory or a mapped NVMe file and
starts each gather with a host->device copy on a side stream.

Collectives are tagged: ``"zero.params"`` (the all-gather), ``"zero.grads"`` (the
reduce-scatter, and under HSDP the all-reduce of the shard over the replicas).
"""

from __future__ import annotations

import weakref
import zlib

import torch

from fscale.hw import comm
from fscale.param_source import ParamSource
from fscale.policies import PrecisionPolicy
from fscale.transforms._wrapper import is_metadata_query
from fscale.transforms._zero.sharding import Unit, copy_in, copy_out, split_shards

NAME = "shard_zero"


class _Tracker:
    """Live bytes of gathered unit buffers, with peaks.

    ``params``: materialized full params (the copy-out buffers). ``total`` adds the
    all-gather output buffers, in flight (prefetch) or being copied out, and the
    device copies of host shards (``staging``, params offloaded only).

    A buffer counts until its storage is freed, or until the release ``track``
    returns is called, whichever comes first: an all-gather output is released once
    copied out, when fscale drops it. (gloo's worker thread keeps its work, and so the
    buffer, alive a moment past ``wait()``; counted to its free, a later unit's gather
    could land inside that moment and the peak depended on thread timing.)
    """

    def __init__(self):
        self.live = {"params": 0, "total": 0, "staging": 0}
        self.peak = {"params": 0, "total": 0, "staging": 0}

    def track(self, t: torch.Tensor, *, is_params: bool = False, staging: bool = False):
        """Count ``t``'s storage; returns its release (once, whoever calls it first)."""
        n = t.untyped_storage().nbytes()
        kinds = ("params", "total") if is_params else ("total",)
        if staging:
            kinds = ("staging", "total")
        for k in kinds:
            self.live[k] += n
            self.peak[k] = max(self.peak[k], self.live[k])
        return weakref.finalize(t.untyped_storage(), self._release, kinds, n)

    def _release(self, kinds, n: int) -> None:
        for k in kinds:
            self.live[k] -= n


class UnitGatherer:
    """Gathers units on demand for one call of the step (forward and backward)."""

    def __init__(
        self, cfg, ctx, units: list[Unit], flats: dict, source: ParamSource, reduce_dtype, order
    ):
        self.cfg = cfg
        self.comm = ctx.comm  # the step's tagged collectives
        self.units = {u.key: u for u in units}
        self.flats = flats  # unit key -> this rank's flat master shards (see keep_in_flats)
        self.source = source  # where the flats live; gives a device tensor per gather
        self.device = source.device
        self.staged: set[str] = set()  # units whose source copy awaits release
        self.shards: dict = {}  # leaf shards (requires grad), set by materialize
        self.pending: list[comm.Handle] = []  # reduce-scatters waited on after backward
        self.sink_reads_grads = False  # a grad sink reads each grad in backward: wait at once
        self.dtype = source.gather_dtype  # gather dtype (compute dtype) or None for the shard's
        self.reduce_dtype = reduce_dtype
        self.world = cfg.world
        self.tracker = _Tracker()
        self.plan = list(order)  # unit order of the previous call, for forward prefetch
        self.order: list[str] = []  # unit order of this forward
        self.current: tuple[str, list[torch.Tensor]] | None = None  # forward: key, views
        self.buffers: dict[int, str] = {}  # storage ptr of live full buffers -> unit key
        self.backward_unit: list | None = None  # see _backward_unit
        self.inflight: dict[str, comm.Handle] = {}
        self.inflight_release: dict = {}  # unit key -> its all-gather output's release
        self.backward_plan: list[str] = []
        self.backward_pos = 0
        self.in_backward = False
        # check_order="first" (the default): only the first call of the step (count 0),
        # where a rank-dependent unit order shows.
        first = ctx.state.get("count", 0) == 0
        self.check_order = cfg.check_order is True or (cfg.check_order == "first" and first)

    # -- gathering -------------------------------------------------------------------

    def _launch(self, key: str) -> None:
        if key in self.inflight or key not in self.units:
            return
        if self.check_order:
            self._check_same_unit_everywhere(key, self.device)
        with torch.no_grad():
            local, launch = self.source.fetch(key, self.flats[key])
            if self.source.kind != "device":  # a device copy of shards kept elsewhere
                self.tracker.track(local, staging=True)
            self.staged.add(key)
            unit = self.units[key]
            # A cast or staged copy of the shards is ours to give to the gather; the
            # master flats themselves are not ([Note: donated inputs] in comm.py).
            fresh = local.untyped_storage().data_ptr() != (
                self.flats[key].untyped_storage().data_ptr()
            )
            if unit.reduction is not None and unit.world == 1:
                # A unit kept whole: nothing to gather.
                handle = comm.Handle(local if fresh else local.clone())
            else:
                with ParamSource.launch_context(launch):
                    handle = self.comm.all_gather(
                        "zero.params",
                        local,
                        group=self.cfg.group_of(unit.reduction),
                        async_op=True,
                        donate=fresh,
                    )
        # Count the output buffer from the moment it is allocated, not when waited on.
        if handle.buffer is not None:
            self.inflight_release[key] = self.tracker.track(handle.buffer)
        self.inflight[key] = handle

    def _release_staging(self, key: str, gathered: torch.Tensor | None) -> None:
        """The unit's all-gather was waited on: the source's copy for it may go."""
        if key in self.staged:
            self.staged.discard(key)
            self.source.release(key, gathered)

    def _check_same_unit_everywhere(self, key: str, device: torch.device) -> None:
        """Raise on every rank, instead of hanging, if ranks are about to gather different units."""
        code = {k: zlib.crc32(k.encode()) & 0x7FFFFFFF for k in self.units}
        mine = torch.tensor([code[key]], dtype=torch.int64, device=device)
        everyone = self.comm.all_gather("zero.check", mine, group=self.cfg.shard_group).tolist()
        if len(set(everyone)) > 1:
            names = {c: k for k, c in code.items()}
            per_rank = ", ".join(f"rank {r}: {names.get(c, '?')!r}" for r, c in enumerate(everyone))
            raise RuntimeError(
                f"shard_zero(3): ranks disagree on the next unit to gather ({per_rank}). Every "
                "rank must run the same modules in the same order: look for a rank-dependent "
                "branch or data-dependent control flow in the forward."
            )

    def _full_buffer(self, key: str) -> list[torch.Tensor]:
        """Full params of ``key`` (views of one new buffer), from a prefetch if there is one."""
        self._launch(key)
        gathered = self.inflight.pop(key).wait()
        self._release_staging(key, gathered)
        views = copy_out(gathered, self.units[key].specs, self.units[key].world)
        base = views[0]
        self.tracker.track(base, is_params=True)  # while the all-gather buffer still lives
        del gathered
        release = self.inflight_release.pop(key, None)
        if release is not None:
            release()  # copied out: fscale holds it no more ([_Tracker])
        ptr = base.untyped_storage().data_ptr()
        self.buffers[ptr] = key
        # A freed buffer's address is soon reused by an activation: forget it at free.
        weakref.finalize(base.untyped_storage(), self.buffers.pop, ptr, None)
        return views

    def _prefetch_after(self, plan: list[str], pos: int) -> None:
        for key in plan[pos + 1 : pos + 1 + self.cfg.prefetch]:
            self._launch(key)

    # -- forward -----------------------------------------------------------------------

    def forward_views(self, key: str) -> list[torch.Tensor]:
        """Called on first use of a unit's param in forward: gather it, drop the last."""
        if torch._C._current_graph_task_id() != -1:  # inside backward: a recompute
            return self.recompute_views(key)
        if self.current is not None and self.current[0] == key:
            return self.current[1]
        self.current = None  # the previous unit is done: let its buffer go
        pos = len(self.order)
        self.order.append(key)
        shards = [self.shards[s.name] for s in self.units[key].specs]
        with _unseen_by_modes():
            views = list(GatherUnit.apply(self, key, *shards))
            if pos < len(self.plan) and self.plan[pos] == key:
                self._prefetch_after(self.plan, pos)
        self.current = (key, views)
        return views

    def _start_backward(self) -> None:
        # The last unit of forward stays gathered: backward usually starts with it
        # (the output head), so the first unpack reuses it instead of re-gathering.
        self.in_backward = True
        self.backward_plan = list(reversed(self.order))

    # -- saved-tensor hooks --------------------------------------------------------------

    def pack(self, t: torch.Tensor):
        key = self.buffers.get(t.untyped_storage().data_ptr())
        if key is None:
            return t
        return (_TOKEN, key, t.storage_offset(), tuple(t.shape), tuple(t.stride()))

    def unpack(self, packed):
        if not (isinstance(packed, tuple) and packed and packed[0] is _TOKEN):
            return packed
        _, key, offset, shape, stride = packed
        with _unseen_by_modes():
            flat = self._backward_unit(key)[1]
            return torch.as_strided(flat, shape, stride, offset)

    def _backward_unit(self, key: str) -> list:
        """``[key, flat buffer, views, leaf views or None]`` of the unit backward is in."""
        if not self.in_backward:
            self._start_backward()
        if self.backward_unit is None or self.backward_unit[0] != key:
            reuse = self.current is not None and self.current[0] == key
            # The unit after it (in forward order) is done: let its buffer go.
            self.backward_unit = None
            views = self.current[1] if reuse else self._full_buffer(key)
            self.current = None
            base = views[0]
            flat = torch.as_strided(
                base, (base.untyped_storage().nbytes() // base.element_size(),), (1,), 0
            )
            self.backward_unit = [key, flat, views, None]
            self._advance_backward(key)
        return self.backward_unit

    def recompute_views(self, key: str) -> list[torch.Tensor]:
        """A unit's params for its forward run again inside backward ([Note: recompute]).

        [Note: recompute]
        Activation checkpointing runs a unit's forward again in backward; its lazy
        params then land here, not in ``forward_views``: the unit is the backward
        unit (gathered on the backward path, prefetched in backward order, the unit
        before it released), and the forward's unit order and prefetch plan are left
        alone. The views are fresh leaves (no ``GatherUnit`` node: the recompute's
        graph is thrown away, its saved tensors feed the forward's graph) that
        require grad as the forward's did, so autograd saves the same tensors.
        """
        with _unseen_by_modes():
            unit = self._backward_unit(key)
            if unit[3] is None:
                grad = torch.is_grad_enabled() and any(
                    self.shards[s.name].requires_grad for s in self.units[key].specs
                )
                unit[3] = [v.detach().requires_grad_(grad) for v in unit[2]]
        return unit[3]

    def _advance_backward(self, key: str) -> None:
        plan, pos = self.backward_plan, self.backward_pos
        while pos < len(plan) and plan[pos] != key:
            pos += 1
        if pos < len(plan):
            self.backward_pos = pos
            self._prefetch_after(plan, pos)

    def finish(self) -> None:
        self.current = None
        self.backward_unit = None
        for handle in self.pending:
            handle.wait()  # the shard grads autograd returned are only valid from here
        self.pending.clear()
        for key, handle in self.inflight.items():
            # A stray prefetch must complete before its buffer is reused.
            self._release_staging(key, handle.wait())
        self.inflight.clear()
        # The update writes the shards next: no copy may still read them.
        self.source.finish()


# [Note: gathers unseen by dispatch modes]
# A gather is not part of the model's computation, and it takes different paths in
# forward (GatherUnit, the forward prefetch) and in a recompute (the backward unit):
# a TorchDispatchMode that must see the same ops twice -- selective activation
# checkpointing caches ops by their order in the forward and replays them in the
# recompute -- would see them differ. Gathers run with Python dispatch off.
_unseen_by_modes = torch._C._DisableTorchDispatch

_TOKEN = object()
_MAX_PENDING_REDUCE_SCATTERS = 2


class GatherUnit(torch.autograd.Function):
    """Shards of one unit -> its full params; backward: reduce-scatter (mean over ranks)."""

    @staticmethod
    def forward(gatherer: UnitGatherer, key: str, *shards: torch.Tensor):
        return tuple(gatherer._full_buffer(key))

    @staticmethod
    def setup_context(ctx, inputs, output):
        gatherer, key, *shards = inputs
        ctx.gatherer = gatherer
        ctx.key = key
        ctx.shard_dtypes = [s.dtype for s in shards]

    @staticmethod
    def backward(ctx, *grads):
        g = ctx.gatherer
        unit = g.units[ctx.key]
        grads = [
            torch.zeros(s.shape, dtype=g.reduce_dtype or dt, device=_device(grads))
            if gr is None
            else gr
            for gr, s, dt in zip(grads, unit.specs, ctx.shard_dtypes, strict=True)
        ]
        flat = copy_in(grads, unit.specs, unit.world, g.reduce_dtype or grads[0].dtype)
        del grads
        if unit.reduction is None:
            handle = g.cfg.reduce_grads(g.comm, flat)
        else:
            handle = g.cfg.reduce_grads(g.comm, flat, unit.reduction)
        mine = handle.pending_result
        # [Note: deferred reduce-scatter] A synchronous collective would run on the
        # compute stream and stall backward. The shard grads are handed to autograd
        # unread and waited on after backward -- safe only when nothing reads them
        # before that: no dtype cast, and a unit gathered once (a unit used twice,
        # like a tied embedding, has its two grads summed by autograd right away), and
        # no grad sink reading each grad as it comes (accumulation into the total).
        needs_cast = any(dt != flat.dtype for dt in ctx.shard_dtypes)
        if mine is None or needs_cast or g.order.count(ctx.key) > 1 or g.sink_reads_grads:
            mine = handle.wait()
        else:
            g.pending.append(handle)
            # NCCL keeps each collective's input (a full-precision unit of grads)
            # until it is waited on: bound how many are in flight, or backward's
            # peak grows by one unit of grads per block (seen on the 8.5B GPT).
            while len(g.pending) > _MAX_PENDING_REDUCE_SCATTERS:
                g.pending.pop(0).wait()
        pieces = split_shards(mine, unit.specs)
        return (None, None, *(p.to(dt) for p, dt in zip(pieces, ctx.shard_dtypes, strict=True)))


def _device(grads) -> torch.device:
    return next((gr.device for gr in grads if gr is not None), torch.device("cpu"))


# ----------------------------------------------------------------------------- lazy params


class LazyParam(torch.Tensor):
    """A full-shaped stand-in for a sharded param; gathers its unit on first real use."""

    @staticmethod
    def __new__(cls, gatherer: UnitGatherer, key: str, index: int, shape, dtype, device):
        t = torch.Tensor._make_wrapper_subclass(cls, shape, dtype=dtype, device=device)
        t._gatherer, t._key, t._index = gatherer, key, index
        return t

    def materialized(self) -> torch.Tensor:
        return self._gatherer.forward_views(self._key)[self._index]

    # The core's stand-in protocol (fscale.units.materialized): a unit transform that
    # needs real tensors (compile_units) gathers through this, outside its region.
    fscale_materialize = materialized

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if is_metadata_query(func):
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        args = torch.utils._pytree.tree_map_only(LazyParam, LazyParam.materialized, args)
        kwargs = torch.utils._pytree.tree_map_only(LazyParam, LazyParam.materialized, kwargs)
        return func(*args, **kwargs)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise RuntimeError(
            f"{func} reached a ZeRO-3 LazyParam below autograd; this op bypasses "
            "__torch_function__. Use the param through torch ops (F.linear, matmul, ...)."
        )

    def __repr__(self) -> str:
        return f"LazyParam(unit={self._key!r}, shape={tuple(self.shape)}, dtype={self.dtype})"


# ----------------------------------------------------------------------------- stages


def _precision(ctx):
    mp = ctx.step.policy(PrecisionPolicy)
    return (None, None) if mp is None else (mp.param_dtype, mp.reduce_dtype)


@torch.no_grad()
def keep_in_flats(state: dict, shards: dict, *, updated: bool = False) -> dict:
    """Shards as views of their unit's flat buffer (copying in any that are not).

    In-place optimizers (the fused AdamW) keep the views; an optimizer that returns
    new tensors, or params loaded from elsewhere, are copied back so the all-gather,
    which reads the flat buffer, always sees the current values. The param source
    then refreshes anything it derives from the flats (``updated``: the optimizer
    wrote into the views).
    """
    out = dict(shards)
    for unit in state["units"]:
        views = split_shards(state["flats"][unit.key], unit.specs)
        for spec, view in zip(unit.specs, views, strict=True):
            t = shards[spec.name]
            if t is None or t.data_ptr() == view.data_ptr():
                continue
            view.copy_(t)
            out[spec.name] = view
            updated = True
    state["source"].refresh(state["flats"], updated)
    return out


# [Note: stand-in leaves]
# Autograd needs leaves on the device the grads are made on (the reduce-scatter's
# output). When a param source keeps the shards off the device (offload), the loss
# is differentiated w.r.t. stand-ins: a broadcast 0-d device tensor per param, of
# the shard's shape and dtype, no storage of its own. Their values are never read
# (gathers read the flats through the source); their grads are the device grad
# shards, which the optimizer (offloaded) copies out as it does without this.


def _device_leaves(shards: dict, device: torch.device) -> dict:
    """Storage-free stand-ins on ``device`` for shards kept elsewhere ([Note: stand-in leaves])."""
    zeros: dict = {}
    out = {}
    for name, t in shards.items():
        if t is None:
            out[name] = None
            continue
        if t.dtype not in zeros:
            zeros[t.dtype] = torch.zeros((), dtype=t.dtype, device=device)
        out[name] = zeros[t.dtype].expand(t.shape)
    return out


def materialize(cfg, inner, ctx, shards: dict):
    gatherer = ctx.scratch(NAME).get("gatherer")
    if gatherer is None:
        raise RuntimeError("shard_zero(3): materialize ran outside its loss_and_grad stage.")
    gatherer.shards = shards  # the leaves autograd differentiates (views of the flats)
    dtype, _ = _precision(ctx)
    lazies = {}
    for unit in gatherer.units.values():
        for i, spec in enumerate(unit.specs):
            t = shards[spec.name]
            lazies[spec.name] = LazyParam(
                gatherer, unit.key, i, spec.shape, dtype or t.dtype, t.device
            )
    out = {n: lazies.get(n) for n in shards}
    # mixed_precision's cast already happens before the gather; other inner stages see lazies.
    return out if dtype is not None else inner.materialize(ctx, out)


def loss_and_grad(cfg, inner, ctx, shards: dict, batch):
    state = ctx.state[NAME]
    _, reduce_dtype = _precision(ctx)
    keep_in_flats(state, shards)
    source = state["source"]
    gatherer = UnitGatherer(
        cfg, ctx, state["units"], state["flats"], source, reduce_dtype, state.get("order", ())
    )
    flats = list(state["flats"].values())
    if any(source.resident(f) for f in flats):
        shards = _device_leaves(shards, source.device)
    gatherer.sink_reads_grads = ctx.grad_sink is not None
    scratch = ctx.scratch(NAME)
    scratch["gatherer"] = gatherer
    try:
        with torch.autograd.graph.saved_tensors_hooks(gatherer.pack, gatherer.unpack):
            loss, grads = inner.loss_and_grad(ctx, shards, batch)
    finally:
        gatherer.finish()
        scratch.pop("gatherer", None)
    ctx.state[NAME] = {**state, "order": tuple(gatherer.order)}
    peaks = dict(gatherer.tracker.peak)
    staging = peaks.pop("staging")
    for kind, peak in peaks.items():
        key = f"zero3_peak_gathered_{kind}_bytes"
        ctx.metrics[key] = max(peak, ctx.metrics.get(key, 0))
    # Where the persistent shards live: a device copy kept anywhere in the slot shows here.
    nbytes = {k: f.numel() * f.element_size() for k, f in state["flats"].items()}
    resident = {k: source.resident(f) for k, f in state["flats"].items()}
    ctx.metrics["zero3_device_shard_bytes"] = sum(n for k, n in nbytes.items() if not resident[k])
    if source.kind != "device":
        key = "zero3_peak_h2d_staging_bytes"
        ctx.metrics[key] = max(staging, ctx.metrics.get(key, 0))
        counters, levels = source.metrics()
        for name, value in counters.items():  # summed over micro-batches
            ctx.metrics[name] = ctx.metrics.get(name, 0) + value
        ctx.metrics.update(levels)
    return loss, grads

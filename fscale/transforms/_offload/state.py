"""``OffloadState``: an offloaded optimizer's host buffers or swap files, per sub-group.

It owns the memory (the per-group host buffers or the NVMe pool and engine), the
device<->host copies ([Note: offload copy streams]), the update of one sub-group
and the pipeline's event log. The update paths that drive it are in ``update.py``,
its construction in ``init.py``, its checkpoint description in ``describe.py``.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import time
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from fscale import tree
from fscale.io import swap
from fscale.kernels import _elsewhere, cpu_adam
from fscale.optim.base import GradientTransformation, apply_gradients
from fscale.optim.sharded import for_groups_of_leaves, sharded_as
from fscale.placement import Placement, placement_of
from fscale.state import announce_writes, before_write, held
from fscale.transforms._offload import describe
from fscale.transforms._offload.config import OffloadConfig
from fscale.transforms._offload.layout import Group, Slot, scatter, sub
from fscale.transforms._offload.stream import GradStream


class OffloadState:
    """The optimizer state of an offloaded step: host buffers or swap files, per sub-group.

    ``events`` holds the last step's pipeline log ``(seq, time, event, group)``;
    ``close()`` waits for pending work and removes the swap files.
    """

    def __init__(self, cfg: OffloadConfig, inner: GradientTransformation, spec, device):
        self.cfg = cfg
        self.inner = inner
        self.spec = spec
        self.device = device
        self.groups: list[Group] = []
        self.buffers: list[torch.Tensor] = []  # cpu: one per group; nvme: the pool
        self.seconds: list[torch.Tensor] | None = None  # cpu: second buffers, once a save kept one
        self.staging: list[torch.Tensor] = []  # cpu: [Note: grad staging] (update.py)
        self.engine: swap.SwapEngine | None = None
        self._events: list = []
        self._lock = threading.Lock()
        self._seq = 0
        self._pending: Future | None = None  # delayed update in flight
        # Loaded from a checkpoint under delayed_update: the masters are a step ahead of
        # the params, and the next update must copy them in ([Note: resuming the DPU]).
        self._resync = False
        self._bg: ThreadPoolExecutor | None = None
        # What the inner optimizer's norms may do here ([Note: norms of sharded leaves]
        # in fscale/optim/sharded.py): it runs a group of leaves at a time, in a worker.
        self.leaf_shards = for_groups_of_leaves((), where="offload")
        # [Note: offload copy streams] Grads out and params in each get a stream: PCIe
        # is full duplex, so a group's D2H and another's H2D (and, with DPU, all grads
        # out and all masters in) run at the same time instead of in turn. Both streams
        # first wait for everything queued on the compute stream: backward may still
        # be reading the params (stage 3 re-gathers from its flat shards) when the
        # update is called, and writing them under it would be a race.
        cuda = device.type == "cuda"
        self._d2h_stream = torch.cuda.Stream(device) if cuda else None
        self._h2d_stream = torch.cuda.Stream(device) if cuda else None
        # DPU under mixed precision: the updated masters, in the compute dtype, on the
        # device ([Note: DPU staging] in update.py); one view per leaf (None: copied in
        # as before).
        self.device_staging: list[torch.Tensor | None] = []
        self._staged: Any = None  # event: the masters' last H2D copies (DPU) are done
        self.stream: GradStream | None = None  # [Note: streaming grads in backward]
        # By leaf position ([Note: shared masters] in init.py).
        self.shared_masters: list | None = None
        # The state protocol (describe.py): each leaf's path, and the param tensors the
        # optimizer last saw (weak: the step owns them), whose placements
        # shard_zero records after init.
        self.param_paths: list[str] = []
        self.mesh_dims: tuple[str, ...] = ()
        self._leaf_refs: list = []
        self._placements: dict[int, Placement] = {}
        self.closed = False
        # Why this state can no longer be used ([Note: a failed NVMe step] in update.py).
        self.failure: str | None = None

    # -- log ---------------------------------------------------------------------------

    def event(self, kind: str, key: str) -> None:
        if self.engine is not None:
            self.engine.event(kind, key)
            return
        with self._lock:
            self._events.append((self._seq, time.perf_counter(), kind, key))
            self._seq += 1

    @property
    def events(self) -> list:
        return list(self.engine.events if self.engine is not None else self._events)

    def _reset_events(self) -> None:
        if self.engine is not None:
            with self.engine._lock:
                self.engine.events.clear()
        else:
            self._events.clear()

    @property
    def host_bytes(self) -> int:
        return sum(b.numel() for b in (*self.buffers, *self.staging))

    def files(self) -> list[str]:
        return self.engine.files() if self.engine is not None else []

    def close(self) -> None:
        """Finish pending work and remove the swap files (idempotent)."""
        self.closed = True
        if self._pending is not None:
            try:
                self._pending.result()
            finally:
                self._pending = None
        if self._bg is not None:
            self._bg.shutdown(wait=True)
        if self.stream is not None:
            self.stream.close()
        if self.engine is not None:
            self.engine.close()

    def rechecksum(self) -> None:
        """NVMe: the swap files were filled in place on purpose (``fs.load``): take their
        bytes as written, so the next read's checksums accept them."""
        self.wait()
        if self.engine is not None:
            for g in self.groups:
                self.engine.rechecksum(g.key)

    def wait(self) -> None:
        """Until a delayed update in flight is done (it still reaches the params at the
        next step's update)."""
        if self._pending is not None:
            self._pending.result()

    # -- the state protocol --------------------------------------------------------------

    def track(self, leaves: list) -> None:
        """The param leaves the optimizer is given (at init and each update)."""
        self._leaf_refs = [None if t is None else weakref.ref(t) for t in leaves]
        for i, t in enumerate(leaves):
            p = placement_of(t)
            if p is not None:
                self._placements[i] = p

    def placement(self, i: int, shape: tuple[int, ...]) -> Placement:
        """Where param leaf ``i`` (of local ``shape``) lives on the mesh: the placement
        recorded on the param (``fscale.placement``), else whole and replicated over the
        step's mesh."""
        ref = self._leaf_refs[i] if i < len(self._leaf_refs) else None
        p = placement_of(None if ref is None else ref())
        if p is not None:
            self._placements[i] = p
            return p
        return self._placements.get(i) or Placement(tuple(shape), (), self.mesh_dims)

    def describe_state(self) -> dict:
        """The state protocol: masters and metadata ([Note: describing offloaded state])."""
        return describe.offload_slot(self)

    def load_state(self, values: dict) -> None:
        """Plain metadata back from a checkpoint ([Note: loading offloaded state])."""
        describe.load_offload_slot(self, values)
        self._resync = self.cfg.delayed_update

    # -- views -------------------------------------------------------------------------

    def views(self, g: Group, buf: torch.Tensor):
        """Group ``g``'s master and optimizer state, views into its buffer."""
        if g.shared_master:
            master = [self.shared_masters[i] for i in g.leaves]
        else:
            master = [s.view(buf) for s in g.master]
        state_leaves = [x.view(buf) if isinstance(x, Slot) else x for x in g.state_leaves]
        return master, tree.unflatten(g.state_spec, state_leaves)

    def grad_region(self, k: int) -> torch.Tensor:
        """Where group ``k``'s grads land: the tail of its NVMe pool buffer, or a staging
        buffer in turn (cpu)."""
        if self.cfg.tier == "nvme":
            g = self.groups[k]
            buf = self.buffers[k % len(self.buffers)]
            return buf[g.persisted : g.total]
        return self.staging[k % len(self.staging)]

    # -- device <-> host ---------------------------------------------------------------

    def begin_copies(self) -> None:
        """Order both copy streams after the compute queued so far (once per update)."""
        if self._d2h_stream is not None:
            current = torch.cuda.current_stream(self.device)
            self._d2h_stream.wait_stream(current)
            self._h2d_stream.wait_stream(current)

    def to_host(self, k: int, grads: list) -> Any:
        """Copy group ``k``'s grads into its grad views; returns an event to wait on (CUDA)."""
        return self.copy_grads_out(k, grads, self.grad_region(k))

    def copy_grads_out(self, k: int, grads, region: torch.Tensor, *, after=None) -> Any:
        """Group ``k``'s grads (``grads[i]`` for its leaf positions i) into ``region``, on
        the D2H stream after event ``after``; returns an event to wait on (CUDA)."""
        g = self.groups[k]
        self.event("d2h_submit", g.key)
        views = [s.view(region) for s in g.grads]
        if self._d2h_stream is None:
            for dst, i in zip(views, g.leaves, strict=True):
                dst.copy_(grads[i])
            return None
        with torch.cuda.stream(self._d2h_stream):
            if after is not None:
                self._d2h_stream.wait_event(after)
            for dst, i in zip(views, g.leaves, strict=True):
                dst.copy_(grads[i], non_blocking=True)
                grads[i].record_stream(self._d2h_stream)
            done = torch.cuda.Event()
            done.record(self._d2h_stream)
        return done

    def to_device(self, g: Group, master_views: list, params: list) -> None:
        """Updated masters into the params: on the device, or host shards (params offloaded)."""
        if self._h2d_stream is None or params[g.leaves[0]].device.type == "cpu":
            for src, i in zip(master_views, g.leaves, strict=True):
                if params[i].data_ptr() != src.data_ptr():  # shared masters: done
                    params[i].copy_(src)
            return
        with torch.cuda.stream(self._h2d_stream):
            for src, i in zip(master_views, g.leaves, strict=True):
                params[i].copy_(src, non_blocking=True)

    def stage_out(self, k: int, master_views: list) -> None:
        """Group ``k``'s updated masters into their device staging, in the compute dtype."""
        g = self.groups[k]
        pairs = [
            (src, self.device_staging[i])
            for src, i in zip(master_views, g.leaves, strict=True)
            if self.device_staging[i] is not None
        ]
        if self._h2d_stream is None:
            for src, dst in pairs:
                dst.copy_(src)
            return
        with torch.cuda.stream(self._h2d_stream):
            for src, dst in pairs:
                # In the masters' dtype over PCIe (a temporary of one leaf, on this
                # stream), then cast on the device: the same rounding as the gather's.
                dst.copy_(src.to(dst.device, non_blocking=True))

    def sync_device(self) -> None:
        """Host buffers may be reused and params read by the next compute: join the copies."""
        if self._d2h_stream is not None:
            current = torch.cuda.current_stream(self.device)
            for stream in (self._d2h_stream, self._h2d_stream):
                stream.synchronize()
                current.wait_stream(stream)

    def params_in_flight(self) -> Any:
        """The next compute waits (on the device, not the host) for the params copied in;
        returns an event marking the end of those copies (None off CUDA)."""
        if self._h2d_stream is None:
            return None
        torch.cuda.current_stream(self.device).wait_stream(self._h2d_stream)
        done = torch.cuda.Event()
        done.record(self._h2d_stream)
        return done

    # -- the update of one group ---------------------------------------------------------

    @torch.no_grad()
    def update_group(self, k: int, buf: torch.Tensor, grad_region=None) -> None:
        g = self.groups[k]
        src = out = buf
        if held(buf):  # [Note: buffers a snapshot keeps] in fscale/state.py
            out = self.second(k, allocate=True)
            if held(out):  # one save in flight holds one of the two, never both
                raise RuntimeError(
                    f"offload: both host buffers of sub-group {g.key} are held by snapshots "
                    "(a save that was never closed); this is a bug in fscale.checkpoint."
                )
        master, state = self.views(g, buf)
        # [Note: announced writes] in fscale/state.py: an asynchronous save may still need
        # these bytes as they are.
        before_write(out, *(master if g.shared_master else ()))
        redirect = contextlib.nullcontext(None)
        if out is not buf:
            if self.writes_through_kernel():
                redirect = _elsewhere.writing_into(buf, out)  # [Note: writing the step elsewhere]
            else:  # writes of its own (never announced keepable: a direct hold): a copy
                out.copy_(buf)
                buf = out
                master, state = self.views(g, buf)
        region = self.grad_region(k) if grad_region is None else grad_region
        grads = [s.view(region) for s in g.grads]
        n = self.spec.num_leaves
        sub_grads = sub(self.spec, scatter(n, g.leaves, grads), g.leaves)
        sub_master = sub(self.spec, scatter(n, g.leaves, master), g.leaves)
        self.event("update_start", g.key)
        # The fused multi-threaded AdamW on host tensors; norms as the layout allows.
        with cpu_adam.host_kernels(), sharded_as(self.leaf_shards), redirect as written:
            new_params, new_state = apply_gradients(self.inner, sub_grads, state, sub_master)
        new_leaves = tree.leaves(new_params)
        masters_out = master if g.shared_master else self.views(g, out)[0]
        for view, dst, i in zip(master, masters_out, g.leaves, strict=True):
            _settle(view, dst, new_leaves[i], written)
        self._store_state(g, buf, out, new_state, written)
        if out is not src:  # the second buffer is the group's now; the held one its second
            self.buffers[k], self.seconds[k] = out, src
        g.updates += 1
        self.event("update_end", g.key)

    def writes_through_kernel(self) -> bool:
        """Whether the inner optimizer writes params and state only through the
        ``"adamw_update"`` kernel, whose CPU lowerings can write elsewhere: then the
        group buffers are announced keepable ([Note: buffers a snapshot keeps])."""
        mark = getattr(self.inner.update_params, "writes_only_through", None)
        return mark == cpu_adam.OP

    def second(self, k: int, allocate: bool = True) -> torch.Tensor | None:
        """Group ``k``'s second host buffer, the one not in use ([Note: buffers a
        snapshot keeps] in fscale/state.py): all groups' are allocated on the first
        call with ``allocate`` (as the first ones were), and kept."""
        if self.seconds is None:
            if not allocate:
                return None
            seconds = swap.alloc_many([g.persisted for g in self.groups])
            keep = self.writes_through_kernel()  # as init.py announced the first ones
            for j, b in enumerate(seconds):
                announce_writes(b, second=functools.partial(self.second, j) if keep else None)
            self.seconds = seconds
        return self.seconds[k]

    def _store_state(self, g: Group, buf: torch.Tensor, out: torch.Tensor, new_state,
                     written=None) -> None:  # fmt: skip
        """The new state's tensors into their slots of ``out`` (``buf``: where the
        state was read; the same buffer unless the step is written elsewhere)."""
        leaves, spec = tree.flatten(new_state)
        if spec != g.state_spec:
            raise RuntimeError(
                "offload: the inner optimizer returned a state of another structure than its "
                "init built; offload needs a fixed state layout (all fscale.optim optimizers "
                "have one)."
            )
        for k, (slot, new) in enumerate(zip(g.state_leaves, leaves, strict=True)):
            if isinstance(slot, Slot):
                if not isinstance(new, torch.Tensor) or tuple(new.shape) != slot.shape:
                    raise RuntimeError(
                        f"offload: optimizer state leaf {k} changed from a {slot.shape} tensor "
                        f"to {getattr(new, 'shape', type(new).__name__)}; offload needs a "
                        "fixed state layout."
                    )
                _settle(slot.view(buf), slot.view(out), new, written)
            else:
                g.state_leaves[k] = new  # counts and other Python values


def _settle(view: torch.Tensor, dst: torch.Tensor, new: torch.Tensor, written) -> None:
    """Leave a slot's new value ``new`` in ``dst``: its place in the buffer the step
    writes. ``view`` is where it was read; ``written`` what the kernels wrote into
    ``dst`` already ([Note: writing the step elsewhere]), None when ``dst`` is ``view``."""
    if new.data_ptr() != view.data_ptr():  # a new tensor: the optimizer's result
        dst.copy_(new)
    elif dst.data_ptr() != view.data_ptr() and written is not None:
        written.carry(view, dst)  # what the kernels left unchanged (a skipped step: all)


class OptimizerSlot:
    """``state["optimizer"]`` of an offloaded step: the inner optimizer's state, which
    lives in an ``OffloadState`` (also ``state["offload"]``).

    A separate object so that each slot describes itself once: this one the inner
    optimizer's state tree, by the same paths as without offload
    (``optimizer/exp_avg/<param>``), ``state["offload"]`` the masters and metadata.
    """

    def __init__(self, handle: OffloadState):
        self.handle = handle

    def describe_state(self) -> Any:
        return describe.optimizer_slot(self.handle)

    def step_count(self) -> int:
        """``fs.optim.base.step_count``'s answer, without describing the moments."""
        return describe.optimizer_count(self.handle)

    def load_state(self, values: dict) -> None:
        """The optimizer's plain leaves (its count) back from a checkpoint
        ([Note: loading offloaded state] in describe.py)."""
        describe.load_optimizer_slot(self.handle, values)

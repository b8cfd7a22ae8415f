"""``offload(step, tier)``: ZeRO-Offload (host memory) and ZeRO-Infinity (NVMe) as one transform.

The optimizer's working set -- fp32 master weights plus its state (Adam's two
moments): 12 bytes per parameter, 6x a bf16 model -- moves off the accelerator:

- ``tier="cpu"`` (ZeRO-Offload): master weights and optimizer state live in host
  memory (pinned on CUDA), 12 bytes per parameter for AdamW. Each step the reduced
  grads are copied device->host group by group through two staging buffers
  ([Note: grad staging]), the inner optimizer runs on the CPU on the host copies,
  and the updated masters are copied back into the params on their device, in
  their dtype. ``delayed_update=True`` is the paper's one-step delayed parameter
  update (DPU): the grad copies and CPU update of step t run in a background thread
  while step t+1 computes, and the result reaches the params at step t+1's update
  (under mixed precision through a device staging buffer, [Note: DPU staging]: the
  returned params are then the masters rounded to the compute dtype).
- ``tier="nvme"`` (ZeRO-Infinity): the same state lives in swap files under
  ``path`` and passes through host memory in sub-groups ([Note: swap pipeline]);
  only a pool of ``buffer_mb`` buffers is resident.

Apply it over ``shard_zero`` (each rank offloads its own shard; file names carry the
rank) and over ``mixed_precision``::

    step = fs.train_step(loss_fn, fs.optim.adamw(3e-4))
    step = offload(shard_zero(mixed_precision(step, "bf16"), 3), tier="nvme", path="/mnt/nvme")
    params, state = step.init(params)           # checks the path and its free space, writes files
    params, state, metrics = step(params, state, batch)
    state["offload"].close()                     # swap files removed (also at exit)

[Note: where offload hooks in]
``shard_zero`` calls the inner ``update`` stage on its shards, so an ``update`` stage
applied over it would see the full params. What every stack does call, on exactly
the tensors that must be updated (full params, stage-1/2 master shards or stage-3
flat shards), is ``step.optimizer``: offload replaces the step's optimizer by one
whose state is an ``OffloadState`` (host buffers or swap files) and whose
``update_params`` moves grads out, runs the real optimizer there and copies the
result back in place. The inner optimizer runs once per sub-group on a params
tree whose other leaves are ``None`` (fscale's optimizers pass ``None`` leaves
through), so masks and schedules behave as without offload; an optimizer that
couples leaves (``clip_by_global_norm`` inside the chain) would see one sub-group
at a time -- use ``train_step(clip_norm=...)``, which runs before the update.

[Note: swap pipeline]
A sub-group is a run of leaves of at most ``subgroup_mb`` of fp32 master weights
(default ``buffer_mb / 4``: master + two moments + grads fit one buffer). Its
master, state and grads are laid out in one 4096-aligned host buffer; the master
and state part is one swap file. The pool has three buffers (``overlap=True``):

    read group i+1  |  update group i  |  write group i-1

Before reading into a buffer the engine waits for the write that last used it
(group i-2), so at most three groups are in host memory. The optimizer works on
views of the buffer (no copies), and the grads of a group are copied into the
buffer's tail after its read, so the D2H copy of the grads overlaps the disk too.
Every step ends with all writes done. ``overlap=False`` uses one buffer: read,
update, write, in turn.

``what=("optimizer", "params")`` over ``shard_zero(step, 3)`` is ZeRO-Infinity's
param offload: the stage-3 param shards leave the device too -- into pinned host
memory for ``tier="cpu"``, into a memory-mapped file under ``path`` for
``tier="nvme"`` (paged to the drive under memory pressure, [Note: memory-mapped
param shards] in ``fscale/io/swap.py``) -- each gather copies a unit's shard
host->device before its all-gather (prefetched with it), and the update writes the
shards; the device keeps no param shard ([Note: param offload] in ``_zero3.py``)::

    step = shard_zero(mixed_precision(step, "bf16"), 3)
    step = offload(step, "cpu", what=("optimizer", "params"))

Where nothing between backward and the update changes the grads (no ``clip_norm``,
no fp16 loss scaling, ZeRO-3 or a world of one), ``tier="cpu"`` streams them: each
sub-group is copied out, updated on the host and copied back while backward still
runs ([Note: streaming grads in backward] in ``_offload_stream.py``). Otherwise the
copies follow backward group by group (with ``delayed_update``: during the next step).

Not yet: param shards read from NVMe through an explicit pinned pool (as DeepSpeed's
``offload_param=nvme``; here the kernel pages the mapping).

References: Ren et al., "ZeRO-Offload: Democratizing Billion-Scale Model
Training", USENIX ATC 2021; Rajbhandari et al., "ZeRO-Infinity: Breaking the GPU
Memory Wall for Extreme Scale Deep Learning", SC 2021.
"""

from __future__ import annotations

import dataclasses
import math
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from fscale import tree
from fscale.hw import comm
from fscale.io import swap
from fscale.kernels import cpu_adam
from fscale.optim.base import GradientTransformation, apply_gradients
from fscale.policies import (
    MOVES_OPTIMIZER,
    WANTS_FINAL_GRADS,
    OffloadPolicy,
    ParamSourcePolicy,
    PrecisionPolicy,
    ZeroPolicy,
)
from fscale.step import Step, Transform
from fscale.transforms._offload.param_source import HostParamSource
from fscale.transforms._offload_config import (  # noqa: F401  (the rates: public names)
    DISK_BYTES_PER_S,
    H2D_BYTES_PER_S,
    OffloadConfig,
    can_stream,
    shares_masters,
)
from fscale.transforms._offload_plan import plan_offload
from fscale.transforms._offload_stream import GradStream

NAME = "offload"
TIERS = ("cpu", "nvme")
_WHAT = ("optimizer", "params")
_SEGMENT_ALIGN = 64  # tensors inside a buffer start 64-byte aligned (vector loads)


def offload(
    step: Step,
    tier: str = "cpu",
    *,
    what=("optimizer",),
    path=None,
    buffer_mb: float = 64,
    overlap: bool = True,
    subgroup_mb: float | None = None,
    delayed_update: bool = False,
    direct: bool | None = None,
) -> Step:
    """Keep fp32 master weights and optimizer state in host memory or on NVMe.

    Args:
      step: the step to transform; apply offload last (over ``shard_zero`` and
        ``mixed_precision``).
      tier: ``"cpu"`` (ZeRO-Offload) or ``"nvme"`` (ZeRO-Infinity).
      what: ``("optimizer",)``: master weights and optimizer state. ``("optimizer",
        "params")``: ZeRO-3's param shards too, in host memory for either tier (needs
        ``shard_zero(step, 3)`` inside); the device then holds only gathered units.
      path: ``tier="nvme"``: an existing writable directory on the NVMe drive.
        Checked now, and at ``init`` again with the bytes the files will take.
      buffer_mb: ``tier="nvme"``: host memory per buffer of the swap pool (three with
        ``overlap``): sub-groups are cut so that master, state and grads fit one, and
        each buffer is the size of the largest (a single larger leaf makes it larger).
      overlap: pipeline reads, updates and writes of sub-groups (and device<->host
        copies on CUDA), and stream grads in backward where the stack allows it;
        False runs them one after the other, after backward.
      subgroup_mb: fp32 master bytes per sub-group (default ``buffer_mb / 4``).
      delayed_update: ``tier="cpu"``: one-step delayed parameter update (DPU).
        The step's returned params lag one update behind the grads.
      direct: ``tier="nvme"``: O_DIRECT on/off; None probes the filesystem.

    Returns:
      A ``Step`` whose state holds ``state["offload"]``, an ``OffloadState``
      (``.close()`` removes swap files; ``.events`` logs the last step's pipeline).
    """
    if tier not in TIERS:
        raise ValueError(f"offload: unknown tier {tier!r}; use one of {TIERS}.")
    what = (what,) if isinstance(what, str) else tuple(what)
    if not what or any(w not in _WHAT for w in what) or "optimizer" not in what:
        raise ValueError(f"offload: what={what!r}; use ('optimizer',) or ('optimizer', 'params').")
    zero = step.policy(ZeroPolicy)
    if "params" in what:
        if zero is None or zero.stage != 3:
            raise ValueError(
                "offload(what=('optimizer', 'params')) offloads ZeRO-3's param shards: apply "
                "it over shard_zero(step, 3), or offload only ('optimizer',)."
            )
    for name, value in (("buffer_mb", buffer_mb), ("subgroup_mb", subgroup_mb)):
        if value is not None and not (isinstance(value, (int, float)) and value > 0):
            raise ValueError(f"offload: {name} must be a number > 0, got {value!r}.")
    if tier == "nvme":
        path = swap.check_path(path)
    elif path is not None:
        raise ValueError(
            f"offload(tier='cpu') got path={path!r}; a path is for tier='nvme' (swap files)."
        )
    if delayed_update and tier != "cpu":
        raise ValueError(
            "offload: delayed_update=True (ZeRO-Offload's DPU) is for tier='cpu'; NVMe swaps "
            "state through a small buffer pool that cannot also hold a whole pending update."
        )
    buffer_bytes = int(buffer_mb * 2**20)
    subgroup = int(subgroup_mb * 2**20) if subgroup_mb is not None else max(buffer_bytes // 4, 1)
    cfg = OffloadConfig(
        tier,
        what,
        path,
        buffer_bytes,
        subgroup,
        bool(overlap),
        bool(delayed_update),
        direct,
    )
    mp = step.policy(PrecisionPolicy)
    if mp is not None:
        cfg = dataclasses.replace(cfg, compute_dtype=mp.param_dtype)
    cfg = dataclasses.replace(cfg, stream=can_stream(cfg, step), sharded=zero is not None)
    fix = "apply offload last, e.g. offload(shard_zero(mixed_precision(step, 'bf16'), 3), ...)."
    record = Transform(
        NAME,
        options={
            "tier": tier, "what": what, "path": path, "delayed_update": cfg.delayed_update,
            "streams_grads": cfg.stream,
        },
        refuses_outer={"shard_zero": fix, "mixed_precision": fix},
        plan=lambda plan: plan_offload(cfg, zero is not None, mp, plan),
        capabilities=frozenset({MOVES_OPTIMIZER, *((WANTS_FINAL_GRADS,) if cfg.stream else ())}),
    )  # fmt: skip
    inner_init = step.stages.init
    inner_loss_and_grad = step.stages.loss_and_grad

    def loss_and_grad(ctx, params, batch):
        handle = ctx.state.get(NAME)
        if isinstance(handle, OffloadState) and handle.stream is not None:
            handle.stream.begin(ctx)
            ctx.grad_ready = handle.stream.grad_ready
            out = inner_loss_and_grad(ctx, params, batch)
            handle.event("loss_and_grad_end", "")  # instrumentation: what ran in backward
            return out
        return inner_loss_and_grad(ctx, params, batch)

    def init(s, params):
        # The compute device, for an optimizer that may only see host shards.
        live = [t for t in tree.leaves(params) if t is not None]
        hint["device"] = live[0].device if live else torch.device("cpu")
        params, state = inner_init(s, params)
        handle = state.get("optimizer")
        if isinstance(handle, OffloadState):
            state[NAME] = handle
            if any(g.shared_master for g in handle.groups):
                try:
                    _share_masters(handle, params)
                except BaseException:
                    handle.close()  # no swap file outlives a failed init
                    raise
        return params, state

    hint: dict = {}
    new = step.with_transform(
        record,
        policy=OffloadPolicy(tier, what, cfg.delayed_update),
        init=init,
        loss_and_grad=loss_and_grad,
    )
    if "params" in what:
        source = ParamSourcePolicy(HostParamSource, (("tier", tier), ("path", path)))
        new = dataclasses.replace(new, policies=(*new.policies, source))
    return dataclasses.replace(new, optimizer=_offloaded(cfg, step.optimizer, None, hint))


# ----------------------------------------------------------------------------- layout


@dataclasses.dataclass(frozen=True)
class _Slot:
    """Where one tensor lives in a sub-group's buffer."""

    offset: int
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def view(self, buf: torch.Tensor) -> torch.Tensor:
        raw = buf[self.offset : self.offset + self.nbytes]
        return raw.view(self.dtype).view(self.shape)


class _Layout:
    def __init__(self):
        self.size = 0

    def add(self, shape, dtype) -> _Slot:
        slot = _Slot(self.size, tuple(shape), dtype)
        self.size = swap.align_up(self.size + slot.nbytes, _SEGMENT_ALIGN)
        return slot


@dataclasses.dataclass
class _Group:
    key: str
    leaves: list[int]  # positions in the flattened params
    master: list[_Slot]
    grads: list[_Slot]  # offsets in the group's grad region (see OffloadState.grad_region)
    state_spec: Any = None
    state_leaves: list = dataclasses.field(default_factory=list)  # _Slot or a Python value
    persisted: int = 0  # bytes of master + state, 4096-aligned: the swap file
    grad_bytes: int = 0  # the grads, 4096-aligned
    shared_master: bool = False  # the masters are the params' host shards ([Note: shared masters])

    @property
    def total(self) -> int:
        """An NVMe pool buffer: master + state, then the grads."""
        return self.persisted + self.grad_bytes


def _groups(leaves: list, limit: int) -> list[list[int]]:
    out: list[list[int]] = []
    size = 0
    for i, t in enumerate(leaves):
        if t is None:
            continue
        nbytes = t.numel() * 4
        if not out or size + nbytes > limit:
            out.append([])
            size = 0
        out[-1].append(i)
        size += nbytes
    return out


def _master_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)  # fp32 masters; fp64 stays fp64


def _sub(spec, leaves: list, idx: list[int]):
    keep = set(idx)
    return tree.unflatten(spec, [x if i in keep else None for i, x in enumerate(leaves)])


# ----------------------------------------------------------------------------- state


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
        self.groups: list[_Group] = []
        self.buffers: list[torch.Tensor] = []  # cpu: one per group; nvme: the pool
        self.staging: list[torch.Tensor] = []  # cpu: rotating grad buffers ([Note: grad staging])
        self.engine: swap.SwapEngine | None = None
        self._events: list = []
        self._lock = threading.Lock()
        self._seq = 0
        self._pending: Future | None = None  # delayed update in flight
        self._bg: ThreadPoolExecutor | None = None
        # [Note: offload copy streams] Grads out and params in each get a stream: PCIe
        # is full duplex, so a group's D2H and another's H2D (and, with DPU, all grads
        # out and all masters in) run at the same time instead of in turn. Both streams
        # first wait for everything queued on the compute stream: backward may still
        # be reading the params (stage 3 re-gathers from its flat shards) when the
        # update is called, and writing them under it would be a race.
        cuda = device.type == "cuda"
        self._d2h_stream = torch.cuda.Stream(device) if cuda else None
        self._h2d_stream = torch.cuda.Stream(device) if cuda else None
        self.param_buffer: torch.Tensor | None = None  # what=params: ZeRO-3's host shards
        # DPU under mixed precision: the updated masters, in the compute dtype, on the
        # device ([Note: DPU staging]); one view per leaf (None: copied in as before).
        self.device_staging: list[torch.Tensor | None] = []
        self._staged: Any = None  # event: the masters' last H2D copies (DPU) are done
        self.stream: GradStream | None = None  # [Note: streaming grads in backward]
        self.shared_masters: list | None = None  # by leaf position ([Note: shared masters])
        self.closed = False

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

    # -- views -------------------------------------------------------------------------

    def views(self, g: _Group, buf: torch.Tensor):
        """Group ``g``'s master and optimizer state, views into its buffer."""
        if g.shared_master:
            master = [self.shared_masters[i] for i in g.leaves]
        else:
            master = [s.view(buf) for s in g.master]
        state_leaves = [x.view(buf) if isinstance(x, _Slot) else x for x in g.state_leaves]
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

    def to_device(self, g: _Group, master_views: list, params: list) -> None:
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
        master, state = self.views(g, buf)
        region = self.grad_region(k) if grad_region is None else grad_region
        grads = [s.view(region) for s in g.grads]
        n = self.spec.num_leaves
        sub_grads = _sub(self.spec, _scatter(n, g.leaves, grads), g.leaves)
        sub_master = _sub(self.spec, _scatter(n, g.leaves, master), g.leaves)
        self.event("update_start", g.key)
        with cpu_adam.host_kernels():  # the fused multi-threaded AdamW on host tensors
            new_params, new_state = apply_gradients(self.inner, sub_grads, state, sub_master)
        new_leaves = tree.leaves(new_params)
        for view, i in zip(master, g.leaves, strict=True):
            if new_leaves[i].data_ptr() != view.data_ptr():
                view.copy_(new_leaves[i])
        self._store_state(g, buf, new_state)
        self.event("update_end", g.key)

    def _store_state(self, g: _Group, buf: torch.Tensor, new_state) -> None:
        leaves, spec = tree.flatten(new_state)
        if spec != g.state_spec:
            raise RuntimeError(
                "offload: the inner optimizer returned a state of another structure than its "
                "init built; offload needs a fixed state layout (all fscale.optim optimizers "
                "have one)."
            )
        for k, (slot, new) in enumerate(zip(g.state_leaves, leaves, strict=True)):
            if isinstance(slot, _Slot):
                if not isinstance(new, torch.Tensor) or tuple(new.shape) != slot.shape:
                    raise RuntimeError(
                        f"offload: optimizer state leaf {k} changed from a {slot.shape} tensor "
                        f"to {getattr(new, 'shape', type(new).__name__)}; offload needs a "
                        "fixed state layout."
                    )
                view = slot.view(buf)
                if new.data_ptr() != view.data_ptr():
                    view.copy_(new)
            else:
                g.state_leaves[k] = new  # counts and other Python values


def _scatter(n: int, idx: list[int], values: list) -> list:
    out: list = [None] * n
    for i, v in zip(idx, values, strict=True):
        out[i] = v
    return out


# ----------------------------------------------------------------------------- init


def _offloaded(
    cfg: OffloadConfig, inner: GradientTransformation, group, hint: dict
) -> GradientTransformation:
    """``inner`` with its state offloaded ([Note: where offload hooks in])."""

    def init(params):
        leaves = tree.leaves(params)
        if any(isinstance(t, torch.Tensor) and t.device.type == "meta" for t in leaves):
            return inner.init(params)  # fs.explain sizing the state: no offload on meta
        return _init(cfg, inner, group, params, hint.get("device"))

    def update_params(grads, state, params):
        if not isinstance(state, OffloadState):
            raise TypeError(
                "offload: the optimizer state is not an OffloadState; build the state with "
                "step.init of the offloaded step."
            )
        return _update(state, grads, params), state

    @torch.no_grad()
    def update(grads, state, params=None):
        if params is None:
            raise ValueError("offload's optimizer needs the params: update(grads, state, params).")
        new = tree.map(lambda p: None if p is None else p.clone(), params)
        new, state = update_params(grads, state, new)
        return tree.map(lambda n, p: None if p is None else n - p, new, params), state

    return GradientTransformation(init, update, update_params)


@torch.no_grad()
def _init(cfg: OffloadConfig, inner, group, params, device=None) -> OffloadState:
    leaves, spec = tree.flatten(params)
    live = [t for t in leaves if t is not None]
    if device is None:
        device = live[0].device if live else torch.device("cpu")
    handle = OffloadState(cfg, inner, spec, device)
    limit = cfg.subgroup_bytes
    shared = shares_masters(cfg)
    # Layouts first (optimizer init on meta tensors): the NVMe space check must
    # happen before a byte is written.
    for k, idx in enumerate(_groups(leaves, limit)):
        lay = _Layout()
        g = _Group(f"g{k:05d}", idx, [], [], shared_master=shared)
        masters = _Layout() if shared else lay  # shared: shapes only, no bytes here
        g.master = [masters.add(leaves[i].shape, _master_dtype(leaves[i].dtype)) for i in idx]
        metas = [torch.empty(s.shape, dtype=s.dtype, device="meta") for s in g.master]
        meta_state = inner.init(_sub(spec, _scatter(len(leaves), idx, metas), idx))
        s_leaves, g.state_spec = tree.flatten(meta_state)
        g.state_leaves = [
            lay.add(x.shape, x.dtype) if isinstance(x, torch.Tensor) else x for x in s_leaves
        ]
        g.persisted = swap.align_up(lay.size)
        grads = _Layout()
        g.grads = [grads.add(leaves[i].shape, leaves[i].dtype) for i in idx]
        g.grad_bytes = swap.align_up(grads.size)
        handle.groups.append(g)
    if cfg.tier == "nvme":
        _open_swap(cfg, handle, group)
    writes: list[Future] = []
    if cfg.tier == "cpu":
        # Master and state: one buffer per group, carved out of a few pinned
        # allocations. Grads: a small rotating pool ([Note: grad staging]).
        handle.buffers = swap.alloc_many([g.persisted for g in handle.groups])
        largest = max((g.grad_bytes for g in handle.groups), default=1)
        handle.staging = swap.alloc_many([largest] * (2 if cfg.overlap else 1))
    for k, g in enumerate(handle.groups):
        if cfg.tier == "cpu":
            buf = handle.buffers[k]
        else:  # the pool in turn: group k's write overlaps group k+1's init
            n = len(handle.buffers)
            buf = handle.buffers[k % n]
            if k >= n:
                writes[k - n].result()
        if shared:  # the params' host shards, set by share_masters once they exist
            master = [leaves[i].detach() for i in g.leaves]
        else:
            master, _ = handle.views(g, buf)
            for view, i in zip(master, g.leaves, strict=True):
                view.copy_(leaves[i].detach())
        # The real init runs on the host masters; its tensors are copied into the slots.
        state = inner.init(_sub(spec, _scatter(len(leaves), g.leaves, master), g.leaves))
        handle._store_state(g, buf, state)
        if cfg.tier == "nvme":
            writes.append(handle.engine.write(g.key, buf, g.persisted))
    for w in writes:
        w.result()
    handle._reset_events()
    if cfg.tier == "cpu" and cfg.delayed_update:
        handle._bg = ThreadPoolExecutor(1, thread_name_prefix="fscale-offload-dpu")
        if cfg.compute_dtype is not None and "params" not in cfg.what:
            handle.device_staging = _device_staging(leaves, cfg.compute_dtype)
    if cfg.stream and (cfg.sharded or comm.world_size(group) == 1):
        handle.stream = GradStream(handle, leaves)
    return handle


# [Note: shared masters]
# With what=("optimizer", "params") on tier="cpu" (no DPU), ZeRO-3's fp32 host shards
# -- the params the step returns -- are exactly the optimizer's fp32 masters, so the
# optimizer updates them in place instead of keeping a copy: 8 host bytes per param
# for AdamW's moments instead of 12, and no host->host copy after the update. Not
# with delayed_update (the next step computes on the params while the background
# update writes the masters) nor on NVMe (the masters are part of the swap files).


def _share_masters(handle: OffloadState, params: dict) -> None:
    """Point the groups' masters at the params' host shards ([Note: shared masters])."""
    leaves = tree.leaves(params)
    for g in handle.groups:
        for slot, i in zip(g.master, g.leaves, strict=True):
            t = leaves[i]
            bad = t is None or tuple(t.shape) != slot.shape or t.dtype != slot.dtype
            if bad or t.device.type != "cpu":
                raise RuntimeError(
                    f"offload: param leaf {i} is "
                    f"{None if t is None else (tuple(t.shape), t.dtype, t.device.type)}, its "
                    f"optimizer master {(slot.shape, slot.dtype)} on the host; cannot share them."
                )
    handle.shared_masters = leaves


def _device_staging(leaves: list, dtype: torch.dtype) -> list:
    """One buffer of ``dtype`` beside the params, a view per floating leaf wider than it."""
    wide = [
        t is not None and t.is_floating_point() and t.element_size() > dtype.itemsize
        for t in leaves
    ]
    sizes = [t.numel() if w else 0 for t, w in zip(leaves, wide, strict=True)]
    if not any(sizes):
        return []
    device = next(t.device for t, w in zip(leaves, wide, strict=True) if w)
    flat = torch.empty(sum(sizes), dtype=dtype, device=device)
    out, at = [], 0
    for t, n, w in zip(leaves, sizes, wide, strict=True):
        out.append(flat[at : at + n].view(t.shape) if w else None)
        at += n
    return out


def _open_swap(cfg: OffloadConfig, handle: OffloadState, group) -> None:
    """Check the path (on every rank, agreeing on failure), open the engine, allocate the pool."""
    rank = comm.rank()
    persisted = [g.persisted for g in handle.groups]
    # Every file, plus the temporary of the one being rewritten (atomic replace), for
    # each rank on this host sharing the drive.
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    needed = (sum(persisted) + max(persisted, default=0)) * local
    error = None
    try:
        swap.check_path(cfg.path, needed)
    except OSError as e:
        error = e
    if comm.world_size(group) > 1:
        # A rank that raised alone would leave the others blocked in the next collective.
        flag = torch.tensor(0.0 if error is None else 1.0, device=handle.device)
        comm.all_reduce(flag, op="max", group=group)
        if error is None and flag.item() > 0:
            raise RuntimeError(
                f"offload(tier='nvme'): another rank's swap path check failed (see its error); "
                f"rank {rank} stops too."
            )
    if error is not None:
        raise error
    handle.engine = swap.SwapEngine(cfg.path, rank=rank, direct=cfg.direct, record=True)
    size = swap.align_up(max((g.total for g in handle.groups), default=1))
    handle.buffers = [swap.alloc(size) for _ in range(3 if cfg.overlap else 1)]


# ----------------------------------------------------------------------------- update


def _update(handle: OffloadState, grads, params):
    if handle.closed:
        raise RuntimeError(
            f"offload({handle.cfg.tier}): this state was closed (its swap files are gone); "
            "build a new one with step.init to keep training."
        )
    g_leaves, p_leaves = tree.leaves(grads), tree.leaves(params)
    if handle.stream is not None and handle.stream.started:
        handle.stream.finish(g_leaves)  # streamed and updated during backward
        return params
    if handle.cfg.delayed_update:
        _update_delayed(handle, g_leaves, p_leaves)
        return params
    handle._reset_events()
    handle.begin_copies()
    if handle.cfg.tier == "nvme":
        _update_nvme(handle, g_leaves, p_leaves)
    else:
        _update_cpu(handle, g_leaves, p_leaves)
        handle.sync_device()
    return params


# [Note: DPU staging]
# Under mixed precision the device copy of a param is only ever read through its
# cast to the compute dtype (the gather, or mixed_precision's materialize), so with
# delayed_update the background thread sends each group's updated masters to the
# device as soon as they are computed, mid-step, and casts them there into a staging
# buffer of the compute dtype (2 bytes per param for bf16). At the next update the
# params take them with a device-side copy: the masters never cross PCIe on the
# critical path (8.3B fp32 masters: 33 GB, ~0.65 s a step at 50 GB/s, was a stall).
# The training is bit-identical; the params the step returns are the masters
# rounded to the compute dtype (as DeepSpeed's GPU copy is), the masters stay in
# host memory. The staging is written only after the compute queued at the update
# has read it (begin_copies), and the masters only after the copies reading them.

# [Note: grad staging]
# tier="cpu" keeps master and optimizer state per group (12 bytes per parameter
# for AdamW) but no grads: a group's grads are copied device->host into one of two
# staging buffers (each the size of the largest group's grads) just before its
# update, the next group's copy running while this one updates. A grad slot per
# group would add 4 bytes per parameter (8B params: 133 GB of host memory instead
# of 100 GB). With delayed_update the whole loop runs in the background thread,
# reading the step's device grads, which it holds until each group's copy is done.


def _update_cpu(handle: OffloadState, grads: list, params: list | None) -> None:
    """Each group in turn: grads in (one group ahead), update, masters out to ``params``
    (None: the caller copies them later, the delayed update)."""
    groups, bufs = handle.groups, handle.buffers
    ahead = handle.cfg.overlap
    copied: dict[int, Any] = {}
    if groups:
        copied[0] = handle.to_host(0, grads)
    for k in range(len(groups)):
        if ahead and k + 1 < len(groups):
            copied[k + 1] = handle.to_host(k + 1, grads)  # overlaps this group's update
        done = copied.pop(k)
        if done is not None:
            done.synchronize()
        if params is None:
            for i in groups[k].leaves:  # copied out: the device grads can go
                grads[i] = None
        handle.update_group(k, bufs[k])
        master, _ = handle.views(groups[k], bufs[k])
        if params is not None:
            handle.to_device(groups[k], master, params)
        elif handle.device_staging:
            handle.stage_out(k, master)
        if not ahead and k + 1 < len(groups):
            copied[k + 1] = handle.to_host(k + 1, grads)


def _update_delayed(handle: OffloadState, grads: list, params: list) -> None:
    """DPU: apply the update launched last step, then launch this step's in the background.

    The host does not wait for any copy here: this step's grads are copied out by the
    background thread, group by group, as it updates; last step's masters reach the
    params from their device staging ([Note: DPU staging]) or over PCIe now, and the
    next compute waits for them on the device.
    """
    if handle._pending is not None:
        handle._pending.result()
        handle._pending = None
        handle.begin_copies()  # the params may still be read by this step's backward
        if handle.device_staging:
            current = torch.cuda.current_stream(handle.device) if handle._h2d_stream else None
            if current is not None:
                current.wait_stream(handle._h2d_stream)
            for i, staged in enumerate(handle.device_staging):
                if staged is not None:
                    params[i].copy_(staged)  # on the device: a cast, no PCIe
        _copy_unstaged(handle, params)
        handle._staged = handle.params_in_flight()
    handle._reset_events()
    handle.begin_copies()  # grads complete, staging read: ordered after the compute so far
    written = handle._staged

    def run():
        if written is not None:
            written.synchronize()  # the masters are read by H2D copies until then
        _update_cpu(handle, grads, None)

    handle._pending = handle._bg.submit(run)


def _copy_unstaged(handle: OffloadState, params: list) -> None:
    """The masters of leaves without device staging into the params (H2D stream)."""
    staging = handle.device_staging
    for g, buf in zip(handle.groups, handle.buffers, strict=True):
        master, _ = handle.views(g, buf)
        keep = [j for j, i in enumerate(g.leaves) if not staging or staging[i] is None]
        if len(keep) == len(g.leaves):
            handle.to_device(g, master, params)
        elif keep:
            part = dataclasses.replace(g, leaves=[g.leaves[j] for j in keep])
            handle.to_device(part, [master[j] for j in keep], params)


def _update_nvme(handle: OffloadState, grads: list, params: list) -> None:
    engine, groups, pool = handle.engine, handle.groups, handle.buffers
    n = len(pool)
    reads: dict[int, Future] = {}
    writes: dict[int, Future] = {}
    if not groups:
        return
    reads[0] = engine.read(groups[0].key, pool[0])
    try:
        for k, g in enumerate(groups):
            buf = pool[k % n]
            reads.pop(k).result()  # raises SwapCorruptError on a short or corrupt file
            if k + 1 < len(groups) and n > 1:
                # The next group's buffer was last written out by group k + 1 - n.
                prev = writes.get(k + 1 - n)
                if prev is not None:
                    prev.result()
                reads[k + 1] = engine.read(groups[k + 1].key, pool[(k + 1) % n])
            event = handle.to_host(k, grads)
            if event is not None:
                event.synchronize()
            handle.update_group(k, buf)
            master, _ = handle.views(g, buf)
            handle.to_device(g, master, params)
            handle.sync_device()  # the buffer is reused by a later read
            writes[k] = engine.write(g.key, buf, g.persisted)
            if n == 1:
                writes[k].result()
                if k + 1 < len(groups):
                    reads[k + 1] = engine.read(groups[k + 1].key, pool[0])
    finally:
        # Never leave a thread writing into a buffer after an error.
        for fut in [*reads.values(), *writes.values()]:
            try:
                fut.result()
            except Exception:
                pass
    engine.flush()

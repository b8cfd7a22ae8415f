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
  returned params are then the masters rounded to the compute dtype). Both notes
  are in ``_offload/update.py``.
- ``tier="nvme"`` (ZeRO-Infinity): the same state lives in swap files under
  ``path`` and passes through host memory in sub-groups ([Note: swap pipeline] in
  ``_offload/update.py``); only a pool of ``buffer_mb`` buffers is resident.

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
whose state lives in an ``OffloadState`` (host buffers or swap files) and whose
``update_params`` moves grads out, runs the real optimizer there and copies the
result back in place. The inner optimizer runs once per sub-group on a params
tree whose other leaves are ``None`` (fscale's optimizers pass ``None`` leaves
through), so masks and schedules behave as without offload; an optimizer that
couples leaves (``clip_by_global_norm`` inside the chain) would see one sub-group
at a time -- use ``train_step(clip_norm=...)``, which runs before the update.

``what=("optimizer", "params")`` over ``shard_zero(step, 3)`` is ZeRO-Infinity's
param offload: the stage-3 param shards leave the device too -- into pinned host
memory for ``tier="cpu"``, into a memory-mapped file under ``path`` for
``tier="nvme"`` (paged to the drive under memory pressure, [Note: memory-mapped
param shards] in ``fscale/io/swap.py``) -- each gather copies a unit's shard
host->device before its all-gather (prefetched with it), and the update writes the
shards; the device keeps no param shard ([Note: param offload] in
``_offload/param_source.py``)::

    step = shard_zero(mixed_precision(step, "bf16"), 3)
    step = offload(step, "cpu", what=("optimizer", "params"))

Where nothing between backward and the update changes the grads (no ``clip_norm``,
no fp16 loss scaling, ZeRO-3 or a world of one), ``tier="cpu"`` streams them: each
sub-group is copied out, updated on the host and copied back while backward still
runs ([Note: streaming grads in backward] in ``_offload/stream.py``). Otherwise the
copies follow backward group by group (with ``delayed_update``: during the next step).

On NVMe each rank locks its swap directory (a second live run there is refused, a
killed run's files are removed at the next start: [Note: swap lock] in
``fscale/io/swap.py``), SIGTERM/SIGINT remove the files ([Note: swap signals]), and
a step that fails midway -- a full disk, a corrupt file -- leaves the state unusable
with an error saying to load the last checkpoint, never half-applied ([Note: a
failed NVMe step] in ``_offload/update.py``).

``fscale.state.describe(state)`` gives the optimizer state under the paths it has
without offload and the fp32 masters under ``offload/master/<param>``: host tensors
for ``tier="cpu"``, ``StoredTensor`` (file, offset) for ``tier="nvme"``, each with
its param's placement ([Note: describing offloaded state] in ``_offload/describe.py``).

The pieces live in ``_offload/``: ``config.py`` (options, what a stack allows),
``layout.py`` (sub-groups, slots), ``state.py`` (``OffloadState``), ``init.py``
(building it), ``update.py`` (the cpu, delayed and NVMe update paths),
``stream.py`` (grads streamed in backward), ``param_source.py`` (param offload),
``describe.py`` (the state protocol) and ``plan.py`` (``fs.explain``).

Not yet: param shards read from NVMe through an explicit pinned pool (as DeepSpeed's
``offload_param=nvme``; here the kernel pages the mapping).

References: Ren et al., "ZeRO-Offload: Democratizing Billion-Scale Model
Training", USENIX ATC 2021; Rajbhandari et al., "ZeRO-Infinity: Breaking the GPU
Memory Wall for Extreme Scale Deep Learning", SC 2021.
"""

from __future__ import annotations

import dataclasses

import torch

from fscale import tree
from fscale.io import swap
from fscale.optim.base import GradientTransformation
from fscale.optim.sharded import for_groups_of_leaves
from fscale.placement import placement_of
from fscale.policies import (
    MOVES_OPTIMIZER,
    WANTS_FINAL_GRADS,
    OffloadPolicy,
    ParamSourcePolicy,
    PrecisionPolicy,
    ZeroPolicy,
)
from fscale.step import Step, Transform
from fscale.transforms._offload.config import (  # the rates: public names
    DISK_BYTES_PER_S,
    H2D_BYTES_PER_S,
    OffloadConfig,
    can_stream,
)
from fscale.transforms._offload.init import build_state, share_masters
from fscale.transforms._offload.param_source import HostParamSource
from fscale.transforms._offload.plan import plan_offload
from fscale.transforms._offload.state import OffloadState, OptimizerSlot
from fscale.transforms._offload.update import run as run_update

__all__ = ["DISK_BYTES_PER_S", "H2D_BYTES_PER_S", "OffloadState", "offload"]

NAME = "offload"
TIERS = ("cpu", "nvme")
_WHAT = ("optimizer", "params")


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
      (``.close()`` removes swap files; ``.events`` logs the last step's pipeline),
      and in ``state["optimizer"]`` the inner optimizer's state as it lives there.
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
        # The compute device, for an optimizer that may only see host shards, and the
        # mesh dims a whole leaf is replicated over (the state protocol).
        live = [t for t in tree.leaves(params) if t is not None]
        hint["device"] = live[0].device if live else torch.device("cpu")
        hint["mesh_dims"], hint["mesh"] = s.mesh.dims, s.mesh
        params, state = inner_init(s, params)
        slot = state.get("optimizer")
        if isinstance(slot, OptimizerSlot):
            handle = state[NAME] = slot.handle
            if any(g.shared_master for g in handle.groups):
                try:
                    share_masters(handle, params)
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
    return dataclasses.replace(new, optimizer=_offloaded(cfg, step.optimizer, hint))


# ----------------------------------------------------------------------------- optimizer


def _split(leaves: list, mesh) -> list[int]:
    """Positions of the leaves that are shards split across ranks (placed by the
    transform that split them: shard_zero, tensor_parallel, expert_parallel)."""
    out = []
    for i, t in enumerate(leaves):
        placement = placement_of(t) if isinstance(t, torch.Tensor) else None
        if placement is not None and mesh is not None:
            if any(mesh.size(d) > 1 for d in placement.split_dims):
                out.append(i)
    return out


def _offloaded(
    cfg: OffloadConfig, inner: GradientTransformation, hint: dict
) -> GradientTransformation:
    """``inner`` with its state offloaded ([Note: where offload hooks in])."""

    def init(params):
        leaves = tree.leaves(params)
        if any(isinstance(t, torch.Tensor) and t.device.type == "meta" for t in leaves):
            return inner.init(params)  # fs.explain sizing the state: no offload on meta
        handle = build_state(
            cfg, inner, None, params, hint.get("device"), hint.get("mesh_dims", ())
        )
        handle.leaf_shards = for_groups_of_leaves(_split(leaves, hint.get("mesh")), "offload")
        return OptimizerSlot(handle)

    def update_params(grads, state, params):
        if not isinstance(state, OptimizerSlot):
            raise TypeError(
                "offload: the optimizer state is not an offloaded one (got "
                f"{type(state).__name__}); build the state with step.init of the offloaded step."
            )
        return run_update(state.handle, grads, params), state

    @torch.no_grad()
    def update(grads, state, params=None):
        if params is None:
            raise ValueError("offload's optimizer needs the params: update(grads, state, params).")
        new = tree.map(lambda p: None if p is None else p.clone(), params)
        new, state = update_params(grads, state, new)
        return tree.map(lambda n, p: None if p is None else n - p, new, params), state

    return GradientTransformation(init, update, update_params)

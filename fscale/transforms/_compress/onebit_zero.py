"""The 1-bit optimizers over shard_zero 1/2: ``compress_comm(shard_zero(step, s), method)``.

[Note: 1-bit methods under ZeRO-1/2]
Warm-up (and 0/1 Adam's variance steps): the stack below runs untouched, so the step
is exactly ``shard_zero(step, s)`` (grads reduce-scattered ``"zero.grads"``, the
optimizer on this rank's fp32 master rows, the rows all-gathered ``"zero.params"``);
for 1-bit LAMB the rows' optimizer takes its per-layer trust ratio from whole-layer
norms ([Note: LAMB's trust ratio on rows] in ``onebit_zero_rows.py``).

Compression (``LocalGradsPolicy``: on these calls shard_zero leaves the grads full and
local): error feedback needs each rank's full local momentum, so the compressed
exchange replaces ZeRO's grad reduce-scatter. After the non-finite vote, ``update``:

1. folds the local grads into the full local momentum ``M`` (kept in this slot, flat,
   in the params' leaf order: the optimizer's own moments are rows under ZeRO);
2. runs the error-compensated 1-bit mean of ``onebit_allreduce`` on ``M / d`` and
   multiplies the result back by ``d`` (``d``: the frozen variance's bias-corrected
   denominator, flat in leaf order; [Note: compress what the step uses] in
   ``onebit.py``), exactly as plain data parallel does (same contiguous server chunks
   of the same flat vector; ``all_to_all`` of signs + scales to each chunk's server,
   ``all_gather`` of the servers' recompressed chunks, tag ``"compress.momentum"``);
   every rank decodes the same ``M``, zeroed where the frozen variance is ([Note: dead
   coordinates]); 0/1 Adam before ``var_freeze_step`` exchanges the local grads
   instead and folds their synced mean into ``M`` ([Note: 0/1 Adam's 1-bit steps
   between variance updates] in ``onebit.py``), as plain data parallel does;
3. hands its own ZeRO rows of ``M`` (dim-0 blocks of ``ceil(d0 / N)`` rows, [Note:
   shard layout] in ``fscale/transforms/_zero/sharding.py``, read off the optimizer's
   row-shaped moments, never from shard_zero's slot) down to shard_zero's ``update``
   as the "grads" of its master rows; the step's optimizer is wrapped so that on these
   calls it runs the method's step on the rows (``onebit_zero_rows.py``);
4. shard_zero's ``apply`` all-gathers the updated rows (``"zero.params"``).

The first compressed call after an exact step all-gathers the momentum rows and the
variance rows (tag ``"compress.init"``): once for 1-bit Adam / LAMB, after each
variance update for 0/1 Adam. Every rank needs the whole frozen variance: ``d``
divides the whole ``M`` before compression, ``v == 0`` is the dead-coordinate mask,
and 0/1 Adam's local steps move the full params with it.

Why the server chunks are plain data parallel's and not each owner's rows: every rank
decodes the whole ``M`` anyway (it needs it for its next local momentum), so who
serves a chunk is free; with the same chunks the compressed step is *the same
computation* as plain-DP 1-bit Adam. An earlier version served rank ``r``'s ZeRO rows
on rank ``r``: no index was wrong (plain DP run on that permuted order matched it to
1e-6), but 1-bit Adam's frozen-variance step is chaotically sensitive to where chunk
boundaries fall (plain DP with its chunks shifted by 64 elements moved a 36-step
world-4 eval by up to 5%), so its loss was a different sample than plain DP's: 8%
apart on one seed in world 4.

[Note: 1-bit methods under offload]
``offload(compress_comm(step, method), tier)`` (offload last, as always): offload
moves the step's optimizer, which here is already the method's rows step
(``onebit_zero_rows.wrap``), so it runs that step once per host sub-group, on the
host masters and moments, for either tier; the call travels in a context variable set
around the update, in the thread that runs it (hence no ``delayed_update``, whose
optimizer runs a step later in a background thread: refused at init; and no grads
streamed in backward: the ``CHANGES_GRADS_AFTER_BACKWARD`` capability says the
optimizer will not take backward's grads). Plain data parallel takes this path too,
with whole leaves for rows (``Rows(whole=True)``: every rank holds every leaf), so the
three methods and their stacks share one offloaded path:

- the slot's buffers (``M``, the gathered variance, worker/server error, anchor,
  fresh variance) live on the host with the optimizer state, not in the device
  memory offload freed; the exchange runs there, over a group that carries CPU
  tensors (gloo; on GPUs a device-mapped ``"cpu:gloo,cuda:nccl"`` group, checked at
  init); the local grads go to the host once per compressed step;
- the moments are read by the state protocol (``moments``: ``describe_state`` of
  offload's slot, host views or NVMe files), only when the exchange starts after an
  exact step (``ensure_ready``);
- what a call needs per leaf (decayed leaves, LAMB's trust ratios, 0/1 Adam's anchor)
  is keyed by leaf position, since a sub-group holds some of the leaves; LAMB's
  warm-up sums its rows' norms per sub-group (the same sums, element for element;
  whole leaves need no sum);
- on whole leaves the masters are the params, so 0/1 Adam's local steps move them
  too (``_local``: the ops ``local_step`` ran on the params) and a sync starts from
  the slot's anchor rather than the masters (ZeRO's rows stay at the anchor instead).

The result is the same computation as without offload: bitwise, given the same
warm-up (offload's fused host AdamW rounds differently in the last bit; with
``FSCALE_KERNELS=reference`` the tests compare bit for bit). Memory on the host, on
top of offload's 12 bytes/param: ``M`` and the variance (8), worker error (4), server
error (4/N), plus the anchor or fresh variance (4).

Maths vs plain data parallel: bitwise in a world of one; with N > 1 the warm-up's
reduce-scatter rounds differently from the all-reduce (last bit), else the same.

Memory (on top of ZeRO-1/2), per rank: the full local momentum ``M`` (4 bytes/param),
the gathered frozen variance (4; its ``!= 0`` is the live mask), the worker error (4),
the server error (4/N); 0/1 Adam adds the window's anchor (4), 1-bit LAMB its fresh
variance (4, full and equal on every rank: computed from ``M`` with the full params,
plain DP's maths on views, no communication; [Note: 1-bit LAMB's fresh variance] in
``onebit.py``; 1-bit LAMB's step also makes last step's ``M``, the implied grads and
the fresh denominator, 4 + 4 + 4, freed after it). The compressed call
also makes ``d``, ``M / d`` and the dead mask (4 + 4 + 1, freed after it). Stage 3
is refused (no full local momentum without an all-gather of it every step; use
``fs.zeropp``).
"""

from __future__ import annotations

import dataclasses
from functools import partial

import torch

from fscale import tree
from fscale.optim.adam import AdamState, bias_corrected_denom
from fscale.optim.base import step_count
from fscale.optim.masks import decayed_positions
from fscale.optim.schedules import value_at
from fscale.placement import Placement, place
from fscale.policies import CHANGES_GRADS_AFTER_BACKWARD, LocalGradsPolicy, OffloadPolicy
from fscale.state import StoredTensor
from fscale.step import Step, StepContext, Transform
from fscale.transforms._compress import onebit_zero_rows as rows_opt
from fscale.transforms._compress.onebit_allreduce import compressed_mean, plan_momentum_layout

TAG_INIT = "compress.init"
#: The per-layer squared norms of 1-bit LAMB's warm-up (2 floats per layer).
TAG_LAMB = "compress.lamb"


def build_over_zero(step: Step, method, zero, cfg_type) -> Step:
    """The ZeRO-1/2 variant of ``onebit._build`` (checks done by the caller)."""
    from fscale.transforms._compress import onebit as ob

    dim = zero.shard_dim
    hp = dict(step.optimizer.hyperparams)
    cfg = cfg_type(method, hp, dim, step.mesh.size(dim), step.mesh.group(dim))
    record = Transform(
        ob.NAME,
        options={
            "method": method.name,
            "over": f"shard_zero({zero.stage})",
            **{k: v for k, v in dataclasses.asdict(method).items() if k != "name"},
        },
        refuses_inner={"offload": ob._OFFLOAD_FIX},
        plan=lambda plan: _plan(cfg, zero.stage, plan),
        capabilities=frozenset({CHANGES_GRADS_AFTER_BACKWARD}),  # see onebit._build
    )
    inner = step.stages
    new = step.with_transform(
        record,
        policy=LocalGradsPolicy(local=partial(_local, cfg)),
        init=partial(init, cfg, inner),
        reduce_grads=partial(ob._reduce_grads, cfg, inner),
        update=partial(update, cfg, inner),
        apply=partial(apply, cfg, inner),
    )
    return dataclasses.replace(new, optimizer=rows_opt.wrap(cfg, step.optimizer))


def _action(cfg, ctx: StepContext) -> str:
    from fscale.transforms._compress import onebit as ob

    return ob._action(cfg, ctx)


def _local(cfg, ctx: StepContext) -> bool:
    return _action(cfg, ctx) in ("onebit", "local", "sync")


def _is(cfg, kind: str) -> bool:
    return type(cfg.method).__name__ == kind


# ----------------------------------------------------------------------------- layout


@dataclasses.dataclass(frozen=True)
class Rows:
    """The live leaves' flat layout (leaf order) and each rank's ZeRO rows of it
    (``whole``: every rank holds whole leaves, plain data parallel under offload)."""

    shapes: tuple[tuple[int, ...], ...]
    ks: tuple[int, ...]  # elements of one rank's rows, per leaf
    world: int
    whole: bool = False

    @classmethod
    def of(cls, full: list, rows: list, world: int, *, whole: bool = False) -> Rows:
        """The layout of params ``full`` whose moments are ``rows`` (checked)."""
        layout = cls.of_params(full, world, whole=whole)
        for j, (p, m) in enumerate(zip(full, rows, strict=True)):
            want = layout.row_shape(j)
            if tuple(m.shape) != want:
                raise ValueError(
                    f"compress_comm over shard_zero: a moment of shape {tuple(m.shape)} is "
                    f"not the dim-0 row block {want} of its param {tuple(p.shape)} over "
                    f"{world} ranks; the 1-bit methods need shard_zero's default row shards "
                    "(no model-parallel slices)."
                )
        return layout

    @classmethod
    def of_params(cls, full: list, world: int, *, whole: bool = False) -> Rows:
        """The layout of params ``full``: shard_zero's dim-0 row blocks, or whole leaves."""
        shapes = tuple(tuple(p.shape) for p in full)
        rows = [s if whole else (-(-(s or (1,))[0] // world), *(s or (1,))[1:]) for s in shapes]
        return cls(shapes, tuple(torch.Size(r).numel() for r in rows), world, whole)

    def row_shape(self, j: int) -> tuple[int, ...]:
        """Leaf ``j``'s rows on one rank (its full shape when ``whole``)."""
        shape = self.shapes[j]
        if self.whole:
            return shape
        shape = shape or (1,)
        return (-(-shape[0] // self.world), *shape[1:])

    @property
    def numels(self) -> list[int]:
        return [torch.Size(s).numel() for s in self.shapes]

    @property
    def n(self) -> int:
        return sum(self.numels)

    @property
    def s(self) -> int:
        return sum(self.ks)

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Per leaf, a view of ``flat`` in the leaf's full shape."""
        pieces = flat.split(self.numels)
        return [t.view(shape) for t, shape in zip(pieces, self.shapes, strict=True)]

    def own(self, flat: torch.Tensor, rank: int) -> list[torch.Tensor]:
        """Rank ``rank``'s rows of each leaf of ``flat`` (flat, zero-padded to ``k``)."""
        if self.whole:
            return list(flat.split(self.numels))
        out = []
        for t, k in zip(flat.split(self.numels), self.ks, strict=True):
            piece = t[rank * k : (rank + 1) * k]
            if piece.numel() < k:
                piece = torch.cat([piece, piece.new_zeros(k - piece.numel())])
            out.append(piece)
        return out

    def gather(self, comm, group, rows: list) -> torch.Tensor:
        """All-gather every rank's rows (``TAG_INIT``) -> the flat full vector."""
        mine = torch.cat([r.reshape(-1) for r in rows])
        if self.whole:
            return mine
        every = comm.all_gather(TAG_INIT, mine, group=group).view(self.world, self.s)
        out, off = [], 0
        for n, k in zip(self.numels, self.ks, strict=True):
            out.append(every[:, off : off + k].reshape(-1)[:n])
            off += k
        return torch.cat(out)


# ----------------------------------------------------------------------------- moved state


def moments(opt, *, read: bool = True) -> AdamState:
    """The optimizer's ``AdamState``: itself, or, where another transform moved it (the
    state of ``offload``), its description by the state protocol (``fscale.state``):
    host tensors, or tensors read from their NVMe files (``read=False``: meta tensors
    of their shapes)."""
    if isinstance(opt, AdamState):
        return opt
    described = opt.describe_state() if hasattr(opt, "describe_state") else None
    if not isinstance(described, AdamState):
        raise ValueError(
            f"compress_comm needs the optimizer state AdamState(count, exp_avg, exp_avg_sq), "
            f"got {type(opt).__name__}; use the optimizer directly, not inside a chain."
        )

    def tensor(entry):
        if entry is None or isinstance(entry, torch.Tensor):
            return entry
        if isinstance(entry, StoredTensor):
            if read:
                return entry.read()
            return torch.empty(entry.shape, dtype=entry.dtype, device="meta")
        return entry.tensor

    return AdamState(
        described.count,
        tree.map(tensor, described.exp_avg),
        tree.map(tensor, described.exp_avg_sq),
    )


def host_group_or_raise(cfg) -> None:
    """The exchange of host buffers needs a group that carries CPU tensors."""
    import torch.distributed as dist

    name = str(dist.get_backend(cfg.group)).lower()
    if "gloo" not in name and "mpi" not in name:
        raise ValueError(
            f"compress_comm({cfg.method.name}) under offload exchanges the momentum from "
            f"host memory, but the data-parallel group's backend is {name!r}, which carries "
            "no CPU tensors; initialise torch.distributed with a device-mapped backend, "
            "init_process_group('cpu:gloo,cuda:nccl'), before building the mesh."
        )


# ----------------------------------------------------------------------------- stages


def init(cfg, inner, step: Step, params):
    from fscale.transforms._compress import onebit as ob

    params, state = inner.init(step, params)
    ob.refuse_split_leaves(cfg.method.name, step, params)
    offload = step.policy(OffloadPolicy)
    if offload is not None and offload.delayed_update:
        raise ValueError(
            f"compress_comm({cfg.method.name}) cannot run under offload(delayed_update=True): "
            "the delayed update runs the optimizer a step later in a background thread, "
            "after this step's momentum exchange and its call to the optimizer are over; "
            "use offload(..., delayed_update=False)."
        )
    moved = not isinstance(state.get("optimizer"), AdamState)
    opt = moments(state.get("optimizer"), read=False)
    live = [i for i, p in enumerate(tree.leaves(params)) if p is not None]
    full, rows = tree.leaves(params), tree.leaves(opt.exp_avg)
    layout = Rows.of([full[i] for i in live], [rows[i] for i in live], cfg.world, whole=cfg.whole)
    lay = plan_momentum_layout(layout.n, cfg.world)
    # The buffers live with the optimizer state: on the host under offload ([Note:
    # 1-bit methods under offload]), not in the device memory offload freed.
    device = torch.device("cpu") if moved else rows[live[0]].device
    if moved and cfg.world > 1:
        host_group_or_raise(cfg)

    def sharded(numel: int) -> torch.Tensor:
        t = torch.zeros(numel, dtype=torch.float32, device=device)
        return place(t, Placement((cfg.world * numel,), (cfg.dim,), ()))

    def full_flat(dtype=torch.float32) -> torch.Tensor:
        # Equal on every rank after each exchange: replicated.
        return torch.zeros(layout.n, dtype=dtype, device=device)

    slot = {
        "method": cfg.method.name,
        "worker_error": sharded(lay.padded),
        "server_error": sharded(lay.server),
        "momentum": full_flat(),
        "variance": full_flat(),  # the frozen variance, gathered (ensure_ready)
        "ready": False,
        "v_count": 0,  # the updates that moved the variance
    }
    if _is(cfg, "ZeroOneAdam"):
        slot["anchor"] = full_flat()
        slot["window"] = {"steps": 0, "sum_lr": 0.0, "decay": 1.0}
    if _is(cfg, "OnebitLamb"):
        slot["trust"] = torch.zeros(len(live), dtype=torch.float32, device=device)
        slot["trust_steps"] = 0
        slot["fresh_variance"] = full_flat()  # from the synced M: equal on every rank
        slot["factor"] = torch.ones(len(live), dtype=torch.float32, device=device)
    state[ob.NAME] = slot
    return params, state


def update(cfg, inner, ctx: StepContext, grads, params):
    from fscale.transforms._compress import onebit as ob

    action = _action(cfg, ctx)
    slot = dict(ctx.state[ob.NAME])
    ctx.state[ob.NAME] = slot
    if action in ("warmup", "variance"):
        slot["ready"] = False  # the exact step moved the momentum and variance rows
        count = step_count(ctx.state["optimizer"])
        call = None
        if _is(cfg, "OnebitLamb"):
            call = {"mode": "lamb_warmup", "comm": ctx.comm, "group": cfg.group, "trust": {}}
        elif slot["v_count"] != count:  # 0/1 Adam after skipped variance updates
            call = {"mode": "variance", "v_count": slot["v_count"] + 1}
        params = rows_opt.calling(call, inner.update)(ctx, grads, params)
        slot["v_count"] += step_count(ctx.state["optimizer"]) - count  # 0 if it did not step
        if call is not None and call.get("trust"):  # LAMB's warm-up EMA of whole-layer ratios
            trust = torch.stack([call["trust"][i] for i in sorted(call["trust"])])
            beta = cfg.method.coeff_beta
            slot["trust"] = slot["trust"].mul(beta).add_(trust.to(slot["trust"]), alpha=1.0 - beta)
            slot["trust_steps"] = slot["trust_steps"] + 1
        return params
    if slot["v_count"] == 0:
        raise RuntimeError(
            f"compress_comm({cfg.method.name}): the compression phase started but no "
            "full-precision update ever ran (every warm-up step was skipped as non-finite); "
            "raise freeze_step."
        )
    lv = Local(cfg, ctx, grads, params, slot)
    lv.ensure_ready(slot)
    if action in ("local", "sync"):
        call = rows_opt.local_step(cfg, ctx, slot, lv, sync=action == "sync")
    else:
        lamb = _is(cfg, "OnebitLamb")
        m_prev = slot["momentum"].clone() if lamb else None  # last step's synced M
        if ob.compresses_grads(cfg, ctx):  # 0/1 Adam between variance updates
            lv.momentum_(slot, synced(cfg, ctx, slot, lv.flat_grads()))
        else:
            lv.momentum_(slot)
            exchange_(cfg, ctx, slot)
        call = {"mode": "lamb" if lamb else "adam"}
        if lamb:
            call["trust"] = dict(zip(lv.idx, _lamb_trust(cfg, slot, lv, m_prev), strict=True))
    # The rows' calls run once per offloaded sub-group, on a subset of the leaves: what
    # they need per leaf is keyed by leaf position.
    decayed = {lv.idx[j] for j in lv.decayed}
    call.update(v_count=slot["v_count"], lr=lv.lr, wd=lv.wd, decayed=decayed)
    moms = lv.own_rows(slot["momentum"])
    return rows_opt.calling(call, inner.update)(ctx, moms, params)


def apply(cfg, inner, ctx: StepContext, params):
    """0/1 Adam's local steps moved only this rank's full params: nothing to gather
    (the masters stay at the window's anchor until the sync sets them)."""
    if _action(cfg, ctx) == "local":
        return params
    return inner.apply(ctx, params)


class Local:
    """One compressed call's live leaves: local fp32 grads (with L2), full params, rows."""

    def __init__(self, cfg, ctx: StepContext, grads, params, slot: dict):
        hp = cfg.hp
        self.cfg, self.ctx = cfg, ctx
        self.count = step_count(ctx.state["optimizer"])
        self.lr = value_at(hp["lr"], self.count, "lr")
        self.wd = value_at(hp["weight_decay"], self.count, "weight_decay")
        g_leaves, self.spec = tree.flatten(grads)
        self.n_leaves = len(g_leaves)
        self.idx = [i for i, g in enumerate(g_leaves) if g is not None]
        p_leaves = tree.leaves(params)
        self.ps = [p_leaves[i] for i in self.idx]
        self.rows = Rows.of_params(self.ps, cfg.world, whole=cfg.whole)
        # The slot's buffers live with the optimizer state (the host under offload).
        self.device = slot["momentum"].device
        self.gs = [g_leaves[i].to(self.device, torch.float32) for i in self.idx]
        self._host_ps = None
        self.decayed = []
        if self.wd != 0.0:
            self.decayed = decayed_positions(
                hp["mask"], params, self.idx, owner=hp["name"], wd=self.wd
            )
        l2 = not _is(cfg, "OnebitLamb") and not hp.get("decoupled", False)
        if l2:  # torch.optim.Adam's L2: into the local grads, before the momentum
            ps = self.slot_params()
            for j in self.decayed:
                self.gs[j] = self.gs[j].add(ps[j].to(self.gs[j].dtype), alpha=self.wd)

    @property
    def rank(self) -> int:
        return self.ctx.step.mesh.rank(self.cfg.dim)

    def slot_params(self) -> list[torch.Tensor]:
        """The full params on the slot's device: themselves, or a copy made once
        (params on an accelerator, the slot on the host); ``write_params`` sends
        changes back."""
        if self._host_ps is None:
            self._host_ps = [
                p if p.device == self.device else p.detach().to(self.device) for p in self.ps
            ]
        return self._host_ps

    def write_params(self) -> None:
        """The params moved on the slot's device (0/1 Adam's local steps) back into place."""
        for p, h in zip(self.ps, self._host_ps or self.ps, strict=True):
            if h is not p:
                p.copy_(h)

    def ensure_ready(self, slot: dict) -> None:
        """After an exact step: the full momentum and frozen variance from the rows, once
        (read by the state protocol where another transform moved the optimizer)."""
        if slot["ready"]:
            return
        opt = moments(self.ctx.state["optimizer"])
        m_rows, v_rows = tree.leaves(opt.exp_avg), tree.leaves(opt.exp_avg_sq)
        comm, group = self.ctx.comm, self.cfg.group
        for name, rows in (("momentum", m_rows), ("variance", v_rows)):
            mine = [rows[i].to(self.device) for i in self.idx]
            slot[name].copy_(self.rows.gather(comm, group, mine))
        slot["ready"] = True

    def flat_grads(self) -> torch.Tensor:
        return torch.cat([g.reshape(-1) for g in self.gs])

    def momentum_(self, slot: dict, grads: torch.Tensor | None = None) -> None:
        """``M = b1 M + (1 - b1) g`` (``g``: the local grads unless given)."""
        flat = self.flat_grads() if grads is None else grads
        slot["momentum"].lerp_(flat, 1.0 - self.cfg.hp["b1"])

    def own_rows(self, flat: torch.Tensor):
        """This rank's rows of ``flat`` as a tree shaped like the optimizer's moments, on
        the params' device (shard_zero's update takes them as the grads of its rows)."""
        out = [None] * self.n_leaves
        own = self.rows.own(flat, self.rank)
        for j, (i, r) in enumerate(zip(self.idx, own, strict=True)):
            out[i] = r.view(self.rows.row_shape(j)).to(self.ps[j].device)
        return tree.unflatten(self.spec, out)


@torch.no_grad()
def synced(cfg, ctx: StepContext, slot: dict, x: torch.Tensor) -> torch.Tensor:
    """``d *`` the compressed mean of ``x / d``, zero where ``v == 0``: plain DP's
    ``_exchange_scaled`` ([Note: compress what the step uses] in ``onebit.py``). ``d``
    is elementwise in the flat variance, so bitwise the concatenation of plain DP's
    per-leaf denominators."""
    from fscale.transforms._compress.onebit import TAG

    hp, v = cfg.hp, slot["variance"]
    d = bias_corrected_denom([v], hp["b2"], hp["eps"], slot["v_count"])[0]
    lay = plan_momentum_layout(x.numel(), cfg.world)
    out = compressed_mean(
        ctx.comm, TAG, cfg.group, x / d, slot["worker_error"], slot["server_error"], lay
    )
    return out.mul_(d).masked_fill_(v == 0, 0.0)


def exchange_(cfg, ctx: StepContext, slot: dict, x: torch.Tensor | None = None) -> None:
    """``M`` <- ``synced(x)`` (``x`` default ``M``)."""
    slot["momentum"].copy_(synced(cfg, ctx, slot, slot["momentum"] if x is None else x))


def _lamb_trust(cfg, slot: dict, lv: Local, m_prev: torch.Tensor) -> list[torch.Tensor]:
    """1-bit LAMB's trust ratios for this step, from the full (flat) synced momentum,
    frozen variance, fresh variance and full params every rank holds: plain DP's
    ``onebit.lamb_trust_`` on per-leaf views, so equal on every rank, no communication
    ([Note: 1-bit LAMB's fresh variance] in ``onebit.py``)."""
    from fscale.transforms._compress.onebit import lamb_trust_

    hp, views = cfg.hp, lv.rows.views
    vs = views(slot["variance"])
    denom = bias_corrected_denom(vs, hp["b2"], hp["eps"], slot["v_count"])
    _, trust = lamb_trust_(
        cfg, slot, ms=views(slot["momentum"]), m_prev=views(m_prev), vs=vs, denom=denom,
        fresh=views(slot["fresh_variance"]), ps=lv.slot_params(), decayed=lv.decayed, wd=lv.wd,
        t=lv.count + 1,
    )  # fmt: skip
    return list(trust)


# ----------------------------------------------------------------------------- plan


def _plan(cfg, stage: int, plan) -> None:
    from fscale.plan import Collective
    from fscale.transforms._compress.onebit import TAG

    if not plan.param_count:
        return
    n, world = plan.param_count, cfg.world
    lay = plan_momentum_layout(n, world)
    grads = [c for c in plan.collectives if c.tag == "zero.grads"]
    plan.collectives[:] = [c for c in plan.collectives if c not in grads]
    if world > 1:
        plan.collectives += [
            Collective("all_to_all", lay.world * lay.message, "update", tag=TAG),
            Collective("all_gather", lay.message, "update", tag=TAG),
        ]
    extra = 8 * n + 4 * (lay.padded + lay.server)  # M, the gathered variance, errors
    if _is(cfg, "ZeroOneAdam"):
        extra += 4 * n  # the window's anchor
    if _is(cfg, "OnebitLamb"):
        extra += 4 * n  # the fresh variance
    plan.memory["compress_comm buffers"] = extra
    plan.notes.append(
        f"compress_comm({cfg.method.name}) over shard_zero({stage}): after warm-up the "
        f"compressed momentum exchange ({lay.world * lay.message + lay.message:,} bytes/step) "
        f"replaces the reduce-scatter of grads ({sum(c.bytes for c in grads):,} bytes in "
        "the warm-up); the all-gather of updated rows (zero.params) stays"
        f"{' except on 0/1 Adam local steps' if _is(cfg, 'ZeroOneAdam') else ''}. It costs, "
        "per rank, the full local momentum, the gathered frozen variance and worker/server "
        f"error: {extra:,} "
        f"bytes{' (stage 2 no longer holds only 1/N of the grads state)' if stage == 2 else ''}."
    )

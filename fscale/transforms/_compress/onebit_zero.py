"""1-bit Adam over shard_zero 1/2: ``compress_comm(shard_zero(step, s), onebit_adam(...))``.

[Note: 1-bit Adam under ZeRO-1/2]
Warm-up: the stack below runs untouched, so the step is exactly ``shard_zero(step, s)``
over Adam (bit for bit: grads reduce-scattered ``"zero.grads"``, Adam on this rank's
fp32 master rows, the rows all-gathered ``"zero.params"``).

Compression (``state["count"] >= freeze_step``): error feedback needs each rank's
full local momentum, so the compressed exchange replaces ZeRO's grad reduce-scatter.
The step publishes ``LocalGradsPolicy``: on these calls shard_zero leaves the grads
full and local. After the step's non-finite vote, ``update``:

1. folds the local grads into the full local momentum ``M`` (kept in this slot:
   the optimizer's own moments are rows under ZeRO): ``M = b1 M + (1 - b1) g``;
2. lays ``M`` out rank-major, server ``r``'s chunk being rank ``r``'s ZeRO rows of
   every leaf (dim-0 blocks of ``ceil(d0 / N)`` rows, [Note: shard layout] in
   ``fscale/transforms/_zero/sharding.py``: read off the optimizer's row-shaped
   moments, never from shard_zero's slot), and runs the error-compensated 1-bit mean
   of ``onebit_allreduce`` on it (``all_to_all`` of signs + scales to each chunk's
   owner, the owner averages and adds its server error, ``all_gather`` of the owner's
   recompressed chunk; tag ``"compress.momentum"``); every rank decodes the same
   ``M``, zeroed where the frozen variance is ([Note: dead coordinates]);
3. hands its own rows of ``M`` down to shard_zero's ``update`` as the "grads" of its
   master rows; the step's optimizer is wrapped so that on these calls it sets the
   rows' ``exp_avg`` to them and steps with the variance frozen, as 1-bit Adam does;
4. shard_zero's ``apply`` all-gathers the updated rows (``"zero.params"``, as in
   warm-up: under ZeRO only a row's owner has its variance and master).

The first compression step all-gathers the warm-up's momentum rows and the
variance's non-zero mask once (tag ``"compress.init"``).

Maths vs plain data parallel: identical in a world of one. With N > 1 the server
chunks follow ZeRO's rows (each leaf padded to ``N * rows``) instead of plain 1-bit
Adam's contiguous ``ceil(n / N)`` ranges, so the scales average other groups of
elements: not bitwise the plain-DP run, same method.

Memory (what the method costs on top of ZeRO-1/2): the full local momentum ``M``
(fp32, 4 bytes/param), the worker error (4 bytes/param), the server error (4/N) and
the alive mask (1 byte/param), per rank. Stage 3 is refused (no full local momentum
without an all-gather of it every step; use ``fs.zeropp``).
"""

from __future__ import annotations

import contextvars
import dataclasses
from functools import partial

import torch

from fscale import tree
from fscale.kernels.onebit import onebit_unpack
from fscale.optim.adam import AdamState, bias_corrected_denom
from fscale.optim.base import apply_gradients
from fscale.optim.masks import decayed_positions
from fscale.optim.schedules import value_at
from fscale.placement import Placement, place
from fscale.policies import LocalGradsPolicy
from fscale.step import Step, StepContext, Transform
from fscale.transforms._compress.onebit_allreduce import (
    _unwire,
    plan_layout,
    server_step,
    worker_step,
)

TAG_INIT = "compress.init"

# What the wrapped optimizer needs on a compression call (the optimizer protocol has
# no context argument; set around shard_zero's update only).
_ROWS: contextvars.ContextVar[dict | None] = contextvars.ContextVar(
    "fscale_onebit_rows", default=None
)


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
        conflicts={"offload": ob._OFFLOAD_FIX},
        plan=lambda plan: _plan(cfg, zero.stage, plan),
    )
    inner = step.stages
    policy = LocalGradsPolicy(local=partial(_local, cfg))
    new = step.with_transform(
        record,
        policy=policy,
        init=partial(_init, cfg, inner),
        reduce_grads=partial(ob._reduce_grads, cfg, inner),
        update=partial(_update, cfg, inner),
    )
    return dataclasses.replace(new, optimizer=_rows_optimizer(cfg, step.optimizer))


def _local(cfg, ctx: StepContext) -> bool:
    from fscale.transforms._compress import onebit as ob

    return ob._action(cfg, ctx) == "onebit"


def _rows_optimizer(cfg, tx):
    """The step's optimizer; on a compression call, 1-bit Adam's frozen-variance step on
    the master rows with the synced momentum rows as "grads"."""

    def update_params(grads, state, params):
        call = _ROWS.get()
        if call is None:
            return apply_gradients(tx, grads, state, params)
        return _rows_adam(cfg, call, grads, state, params)

    return tx._replace(update_params=update_params)


# ----------------------------------------------------------------------------- layout


def _row_numels(full: list, rows: list, world: int) -> list[int]:
    """Per leaf: elements of one rank's rows; checks the dim-0 block layout."""
    ks = []
    for p, m in zip(full, rows, strict=True):
        shape = tuple(p.shape) or (1,)
        want = (-(-shape[0] // world), *shape[1:])
        if tuple(m.shape) != want:
            raise ValueError(
                f"compress_comm over shard_zero: a moment of shape {tuple(m.shape)} is not "
                f"the dim-0 row block {want} of its param {tuple(p.shape)} over {world} ranks; "
                "the 1-bit methods need shard_zero's default row shards (no model-parallel "
                "slices)."
            )
        ks.append(m.numel())
    return ks


def _rank_major(flats: list, ks: list, world: int, out: torch.Tensor) -> torch.Tensor:
    """Full leaves -> ``(world, S)``: row ``r`` holds rank ``r``'s rows of every leaf."""
    off = 0
    for t, k in zip(flats, ks, strict=True):
        flat = t.reshape(-1)
        block = out[:, off : off + k]
        n = flat.numel()
        whole = n // k  # ranks whose rows are all real
        if whole:
            block[:whole].copy_(flat[: whole * k].view(whole, k))
        if whole < world:
            block[whole:].zero_()
            rest = n - whole * k
            if rest:
                block[whole, :rest].copy_(flat[whole * k :])
        off += k
    return out


# ----------------------------------------------------------------------------- stages


def _init(cfg, inner, step: Step, params):
    from fscale.transforms._compress import onebit as ob

    params, state = inner.init(step, params)
    opt = state.get("optimizer")
    if not isinstance(opt, AdamState):
        raise ValueError(
            f"compress_comm({cfg.method.name}) needs the optimizer state AdamState(count, "
            f"exp_avg, exp_avg_sq), got {type(opt).__name__}; use the optimizer directly."
        )
    live = [i for i, p in enumerate(tree.leaves(params)) if p is not None]
    full, rows = tree.leaves(params), tree.leaves(opt.exp_avg)
    ks = _row_numels([full[i] for i in live], [rows[i] for i in live], cfg.world)
    s = sum(ks)
    lay = plan_layout(cfg.world * s, cfg.world)
    device = full[live[0]].device

    def sharded(numel: int) -> torch.Tensor:
        t = torch.zeros(numel, dtype=torch.float32, device=device)
        return place(t, Placement((cfg.world * numel,), (cfg.dim,), ()))

    state[ob.NAME] = {
        "method": cfg.method.name,
        "worker_error": sharded(lay.padded),
        "server_error": sharded(lay.server),
        # Equal on every rank after each exchange: replicated.
        "momentum": torch.zeros(cfg.world, s, dtype=torch.float32, device=device),
        "alive": torch.zeros(cfg.world, s, dtype=torch.uint8, device=device),
        "ready": False,
        "v_count": 0,
    }
    return params, state


def _update(cfg, inner, ctx: StepContext, grads, params):
    from fscale.transforms._compress import onebit as ob

    action = ob._action(cfg, ctx)
    slot = dict(ctx.state[ob.NAME])
    ctx.state[ob.NAME] = slot
    if action == "warmup":
        params = inner.update(ctx, grads, params)
        slot["v_count"] = ctx.state["optimizer"].count
        return params
    if slot["v_count"] == 0:
        raise RuntimeError(
            f"compress_comm({cfg.method.name}): the compression phase started but no "
            "full-precision update ever ran (every warm-up step was skipped as non-finite); "
            "raise freeze_step."
        )
    return _onebit_rows(cfg, inner, ctx, slot, grads, params)


@torch.no_grad()
def _onebit_rows(cfg, inner, ctx: StepContext, slot: dict, grads, params):
    hp = cfg.hp
    opt = ctx.state["optimizer"]
    g_leaves, spec = tree.flatten(grads)
    idx = [i for i, g in enumerate(g_leaves) if g is not None]
    p_leaves = tree.leaves(params)
    m_rows, v_rows = tree.leaves(opt.exp_avg), tree.leaves(opt.exp_avg_sq)
    ps = [p_leaves[i] for i in idx]
    ks = _row_numels(ps, [m_rows[i] for i in idx], cfg.world)
    lr = value_at(hp["lr"], opt.count, "lr")
    wd = value_at(hp["weight_decay"], opt.count, "weight_decay")
    decoupled = hp.get("decoupled", False)
    gs = [g_leaves[i].to(torch.float32) for i in idx]
    decayed = decayed_positions(hp["mask"], params, idx, owner=hp["name"], wd=wd) if wd else []
    if not decoupled:  # torch.optim.Adam's L2: into the local grads, before the momentum
        for j in decayed:
            gs[j] = gs[j].add(ps[j].to(gs[j].dtype), alpha=wd)
    world, group = cfg.world, cfg.group
    rank = ctx.step.mesh.rank(cfg.dim)
    momentum, alive = slot["momentum"], slot["alive"]
    s = momentum.shape[1]
    if not slot["ready"]:  # the warm-up's momentum rows and live coordinates, once
        own = torch.cat([m_rows[i].reshape(-1) for i in idx])
        momentum.copy_(ctx.comm.all_gather(TAG_INIT, own, group=group).view(world, s))
        mask = torch.cat([(v_rows[i] != 0).reshape(-1) for i in idx]).to(torch.uint8)
        alive.copy_(ctx.comm.all_gather(TAG_INIT, mask, group=group).view(world, s))
        slot["ready"] = True
    grad_rows = _rank_major(gs, ks, world, torch.empty_like(momentum))
    momentum.lerp_(grad_rows, 1.0 - hp["b1"])
    del grad_rows
    lay = plan_layout(world * s, world)
    x = momentum.new_zeros(world, lay.server)
    x[:, :s] = momentum
    send = worker_step(x.view(-1), slot["worker_error"], lay)
    received = ctx.comm.all_to_all(ob_tag(), send.view(-1), group=group)
    mine = server_step(received, slot["server_error"], lay)
    gathered = ctx.comm.all_gather(ob_tag(), mine, group=group)
    bits, scales = _unwire(gathered, lay)
    decoded = onebit_unpack(bits, scales).view(world, lay.server)[:, :s]
    momentum.copy_(decoded.masked_fill(alive == 0, 0.0))
    mine_rows = momentum[rank].split(ks)
    moms = [None] * len(g_leaves)
    for j, i in enumerate(idx):
        moms[i] = mine_rows[j].view(m_rows[i].shape)
    call = {
        "v_count": slot["v_count"],
        "lr": lr,
        "wd": wd,
        "decayed": decayed,
        "decoupled": decoupled,
    }
    token = _ROWS.set(call)
    try:
        return inner.update(ctx, tree.unflatten(spec, moms), params)
    finally:
        _ROWS.reset(token)


def ob_tag() -> str:
    from fscale.transforms._compress.onebit import TAG

    return TAG


@torch.no_grad()
def _rows_adam(cfg, call: dict, moms, state: AdamState, params):
    """Frozen-variance Adam on this rank's master rows, ``moms`` the synced momentum rows."""
    hp = cfg.hp
    m_leaves, _ = tree.flatten(moms)
    idx = [i for i, m in enumerate(m_leaves) if m is not None]
    p_leaves = tree.leaves(params)
    ms_state, vs_state = tree.leaves(state.exp_avg), tree.leaves(state.exp_avg_sq)
    ps = [p_leaves[i] for i in idx]
    ms = [ms_state[i] for i in idx]
    vs = [vs_state[i] for i in idx]
    for m, mom in zip(ms, (m_leaves[i] for i in idx), strict=True):
        m.copy_(mom)
    t = state.count + 1
    lr = call["lr"]
    denom = bias_corrected_denom(vs, hp["b2"], hp["eps"], call["v_count"])
    bias1 = 1.0 - hp["b1"] ** t
    if call["decoupled"]:
        for j in call["decayed"]:
            ps[j].mul_(1.0 - lr * call["wd"])
    for p, m, d in zip(ps, ms, denom, strict=True):
        p.sub_((m / d).mul_(lr / bias1).to(p.dtype))
    return params, AdamState(t, state.exp_avg, state.exp_avg_sq)


# ----------------------------------------------------------------------------- plan


def _plan(cfg, stage: int, plan) -> None:
    from fscale.plan import Collective
    from fscale.transforms._compress.onebit import TAG

    if not plan.param_count:
        return
    n, world = plan.param_count, cfg.world
    s = -(-n // world)  # about one rank's rows (each leaf's padding aside)
    lay = plan_layout(world * s, world)
    grads = [c for c in plan.collectives if c.tag == "zero.grads"]
    plan.collectives[:] = [c for c in plan.collectives if c not in grads]
    if world > 1:
        plan.collectives += [
            Collective("all_to_all", lay.world * lay.message, "update", tag=TAG),
            Collective("all_gather", lay.message, "update", tag=TAG),
        ]
    extra = 4 * world * s + 4 * (lay.padded + lay.server) + world * s
    plan.memory["compress_comm buffers"] = extra
    plan.notes.append(
        f"compress_comm({cfg.method.name}) over shard_zero({stage}): after warm-up the "
        f"compressed momentum exchange ({lay.world * lay.message + lay.message:,} bytes/step) "
        f"replaces the reduce-scatter of grads ({sum(c.bytes for c in grads):,} bytes in "
        "the warm-up); the all-gather of updated rows (zero.params) stays. It costs, per "
        f"rank, the full local momentum, worker/server error and a live mask: {extra:,} "
        f"bytes{' (stage 2 no longer holds only 1/N of the grads state)' if stage == 2 else ''}."
    )

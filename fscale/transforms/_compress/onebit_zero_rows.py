"""The 1-bit methods' steps on shard_zero's master rows, and 0/1 Adam's local steps.

``onebit_zero.py`` hands shard_zero's ``update`` this rank's rows of the synced
momentum as the "grads" of its master rows; the step's optimizer is wrapped
(``wrap``) so that, inside ``calling(call, ...)``, it runs ``call["mode"]`` on the
rows instead of its own update (the optimizer protocol has no context argument:
the call travels in a context variable set around shard_zero's ``update`` only):

- ``"adam"``: 1-bit Adam's step with the frozen variance (the rows' ``exp_avg`` is
  set to the synced momentum);
- ``"lamb"``: 1-bit LAMB's step with the frozen variance and the step's trust ratios
  (``call["trust"]``: the frozen ones times the fresh-variance factors, computed on
  the full vectors by ``onebit_zero._lamb_trust``);
- ``"lamb_warmup"``: exact LAMB with whole-layer trust ratios (below);
- ``"variance"``: 0/1 Adam's exact step once some steps kept the variance (the
  variance's bias correction at ``call["v_count"]``, ``onebit.variance_step_``);
- ``"sync"``: 0/1 Adam's sync, ``x = anchor' - sum(step sizes) * m / denom`` on the rows;
- ``"local"``: 0/1 Adam's local step: the count moves, the rows do not (whole leaves,
  plain data parallel under offload: the masters take the params' local step).

Under offload each call sees one host sub-group's leaves: what a call carries per leaf
(``decayed``, ``trust``, ``anchor``) is keyed by leaf position in the whole tree.

[Note: LAMB's trust ratio on rows]
LAMB scales each layer by ``||p|| / ||r||``; a rank holds only its rows of the layer,
so the rows' squared norms are summed over the ranks (one all-reduce of 2 floats per
layer, tag ``"compress.lamb"``) before the ratio, in the warm-up only: after it the
ratios are their frozen EMA times a factor computed from whole layers of the full
vectors every rank holds, equal on every rank. (``shard_zero(lamb)`` alone
would take each rank's ratio of its own rows.) ``sqrt(n * n) == n`` in IEEE
arithmetic, so in a world of one this is bitwise ``fs.optim.lamb``.

[Note: 0/1 Adam under ZeRO-1/2]
0/1 Adam's local steps move each rank's params apart, while ZeRO keeps one fp32 master
per row. The master rows stay at the window's anchor; between syncs each rank steps
its *full* params (the copy ZeRO-1/2 keeps for compute) with its full local momentum
``M`` and the frozen variance, both all-gathered into the slot by the first compressed
call after the last exact step (tag ``"compress.init"``): no communication, and
shard_zero's all-gather of the rows is skipped (``onebit_zero._apply``). A sync
compresses the window's average momentum ``(anchor' - x) * denom / sum(step sizes)``
like 1-bit Adam's momentum (in units of the step, ``onebit_zero.exchange_``); the
owner sets its rows' momentum to the synced one and its masters to ``anchor' -
sum(step sizes) * m / denom`` (``anchor'``: the masters with the window's decoupled
decay), and shard_zero's all-gather brings every rank to the same params: the maths of
plain 0/1 Adam, on rows. Under mixed_precision the local steps move the compute-dtype
copy; the sync starts again from the fp32 masters. What ZeRO cannot hold: a
checkpoint between two syncs keeps rank 0's window (as plain 0/1 Adam's does), and
stage 3 (no full params on a rank to step locally).
"""

from __future__ import annotations

import contextvars

import torch

from fscale import tree
from fscale.optim._leaves import norms
from fscale.optim.adam import AdamState, bias_corrected_denom, update_moments_
from fscale.optim.base import apply_gradients
from fscale.optim.masks import decayed_positions
from fscale.optim.schedules import value_at

_CALL: contextvars.ContextVar[dict | None] = contextvars.ContextVar(
    "fscale_onebit_rows", default=None
)


def calling(call: dict | None, fn):
    """``fn`` with the wrapped optimizer running ``call`` (None: the optimizer itself)."""

    def run(*args):
        token = _CALL.set(call)
        try:
            return fn(*args)
        finally:
            _CALL.reset(token)

    return run


def wrap(cfg, tx):
    """The step's optimizer; inside ``calling(call, ...)``, the method's rows step."""

    def update_params(grads, state, params):
        call = _CALL.get()
        if call is None:
            return apply_gradients(tx, grads, state, params)
        return _MODES[call["mode"]](cfg, call, grads, state, params)

    return tx._replace(update_params=update_params)


class _RowLeaves:
    def __init__(self, grads, state: AdamState, params):
        g_leaves, _ = tree.flatten(grads)
        self.idx = [i for i, g in enumerate(g_leaves) if g is not None]
        p_leaves = tree.leaves(params)
        ms, vs = tree.leaves(state.exp_avg), tree.leaves(state.exp_avg_sq)
        self.gs = [g_leaves[i] for i in self.idx]
        self.ps = [p_leaves[i] for i in self.idx]
        self.ms = [ms[i] for i in self.idx]
        self.vs = [vs[i] for i in self.idx]

    def set_momentum_(self) -> None:
        for m, g in zip(self.ms, self.gs, strict=True):
            m.copy_(g)

    def decayed(self, call: dict) -> list[int]:
        """Positions among these leaves of the decayed ones (``call["decayed"]``: leaf
        positions of the whole tree; an offloaded sub-group holds some of them)."""
        return [j for j, i in enumerate(self.idx) if i in call["decayed"]]


# ----------------------------------------------------------------------------- modes


@torch.no_grad()
def _adam(cfg, call: dict, moms, state: AdamState, params):
    """1-bit Adam on the rows, ``moms`` the synced momentum rows (onebit._onebit_step)."""
    hp = cfg.hp
    rl = _RowLeaves(moms, state, params)
    rl.set_momentum_()
    t, lr = state.count + 1, call["lr"]
    denom = bias_corrected_denom(rl.vs, hp["b2"], hp["eps"], call["v_count"])
    bias1 = 1.0 - hp["b1"] ** t
    if hp.get("decoupled", False):
        for j in rl.decayed(call):
            rl.ps[j].mul_(1.0 - lr * call["wd"])
    for p, m, d in zip(rl.ps, rl.ms, denom, strict=True):
        p.sub_((m / d).mul_(lr / bias1).to(p.dtype))
    return params, AdamState(t, state.exp_avg, state.exp_avg_sq)


@torch.no_grad()
def _lamb(cfg, call: dict, moms, state: AdamState, params):
    """1-bit LAMB on the rows: frozen variance, the step's whole-layer trust ratios."""
    hp = cfg.hp
    rl = _RowLeaves(moms, state, params)
    rl.set_momentum_()
    t, lr = state.count + 1, call["lr"]
    denom = bias_corrected_denom(rl.vs, hp["b2"], hp["eps"], call["v_count"])
    rs = torch._foreach_div(rl.ms, denom)
    torch._foreach_div_(rs, 1.0 - hp["b1"] ** t)
    for j in rl.decayed(call):
        rs[j].add_(rl.ps[j].to(rs[j].dtype), alpha=call["wd"])
    trusts = [call["trust"][i] for i in rl.idx]
    for p, r, trust in zip(rl.ps, rs, trusts, strict=True):
        p.sub_((r * (trust * lr)).to(p.dtype))
    return params, AdamState(t, state.exp_avg, state.exp_avg_sq)


@torch.no_grad()
def _lamb_warmup(cfg, call: dict, grads, state: AdamState, params):
    """Exact LAMB (``fs.optim.lamb``'s ops) on the rows, whole-layer trust ratios
    ([Note: LAMB's trust ratio on rows]); ``call["trust"]``: the ratios by leaf
    position, for the EMA."""
    hp = cfg.hp
    rl = _RowLeaves(grads, state, params)
    count = state.count
    t = count + 1
    lr, wd = value_at(hp["lr"], count, "lr"), value_at(hp["weight_decay"], count, "weight_decay")
    new_state = AdamState(t, state.exp_avg, state.exp_avg_sq)
    if not rl.idx:
        return params, new_state
    gs = [g if g.dtype == m.dtype else g.to(m.dtype) for g, m in zip(rl.gs, rl.ms, strict=True)]
    update_moments_(rl.ms, rl.vs, gs, hp["b1"], hp["b2"])
    denom = bias_corrected_denom(rl.vs, hp["b2"], hp["eps"], t)
    rs = torch._foreach_div(rl.ms, denom)
    torch._foreach_div_(rs, 1.0 - hp["b1"] ** t)
    if wd != 0.0:
        decayed = decayed_positions(hp["mask"], params, rl.idx, owner="lamb", wd=wd)
        if decayed:
            torch._foreach_add_([rs[j] for j in decayed], [rl.ps[j] for j in decayed], alpha=wd)
    first = rs[0].device
    local = torch.stack(
        [n.to(first, torch.float32) for n in norms(rl.ps)]
        + [n.to(first, torch.float32) for n in norms(rs)]
    )
    total = local * local  # whole layers (plain data parallel under offload): no sum
    if not cfg.whole:
        total = call["comm"].all_reduce(_tag(), total, op="sum", group=call["group"])
    w, u = total.sqrt().chunk(2)
    trust = torch.where((w > 0) & (u > 0), w / u, torch.ones_like(w))
    call["trust"].update(zip(rl.idx, trust.unbind(), strict=True))  # by leaf, over sub-groups
    scales = [s.to(r.device, r.dtype) for s, r in zip((trust * -lr).unbind(), rs, strict=True)]
    torch._foreach_mul_(rs, scales)
    leaves, spec = tree.flatten(params)
    out = list(leaves)
    for i, p, r in zip(rl.idx, rl.ps, rs, strict=True):
        out[i] = p + r.to(p.dtype)
    return tree.unflatten(spec, out), new_state


def _tag() -> str:
    from fscale.transforms._compress.onebit_zero import TAG_LAMB

    return TAG_LAMB


@torch.no_grad()
def _variance(cfg, call: dict, grads, state: AdamState, params):
    """0/1 Adam's variance step on the rows, the reduce-scattered grads' rows
    (``onebit._variance_step``: L2 into the grads, then ``variance_step_``)."""
    from fscale.transforms._compress.onebit import variance_step_

    hp = cfg.hp
    rl = _RowLeaves(grads, state, params)
    count = state.count
    lr, wd = value_at(hp["lr"], count, "lr"), value_at(hp["weight_decay"], count, "weight_decay")
    decayed = []
    if wd != 0.0:
        decayed = decayed_positions(hp["mask"], params, rl.idx, owner=hp["name"], wd=wd)
    gs = [g.to(m.dtype) for g, m in zip(rl.gs, rl.ms, strict=True)]
    if not hp.get("decoupled", False):  # torch.optim.Adam's L2, before the moments
        for j in decayed:
            gs[j] = gs[j].add(rl.ps[j].to(gs[j].dtype), alpha=wd)
    variance_step_(
        rl.ps, rl.ms, rl.vs, gs, hp, lr=lr, wd=wd, decayed=decayed, t=count + 1,
        v_count=call["v_count"],
    )  # fmt: skip
    return params, AdamState(count + 1, state.exp_avg, state.exp_avg_sq)


@torch.no_grad()
def _sync(cfg, call: dict, moms, state: AdamState, params):
    """0/1 Adam's sync on the rows: momentum set, masters from the window's anchor."""
    hp = cfg.hp
    rl = _RowLeaves(moms, state, params)
    rl.set_momentum_()
    denom = bias_corrected_denom(rl.vs, hp["b2"], hp["eps"], call["v_count"])
    decayed = set(rl.decayed(call))
    anchor = call.get("anchor")  # whole leaves: the masters moved with the local steps
    for j, (p, m, d) in enumerate(zip(rl.ps, rl.ms, denom, strict=True)):
        a = p.float() if anchor is None else anchor[rl.idx[j]].to(p.device)
        start = a * call["decay"] if j in decayed else a
        p.copy_(start - m.mul(call["sum_lr"]).div_(d))
    return params, AdamState(state.count + 1, state.exp_avg, state.exp_avg_sq)


@torch.no_grad()
def _local(cfg, call: dict, moms, state: AdamState, params):
    """0/1 Adam's local step: on ZeRO's rows nothing moves (they stay at the window's
    anchor); on whole leaves (plain data parallel under offload) the masters take the
    step the params took (``local_step``), the same ops on the same values."""
    if cfg.whole:
        from fscale.transforms._compress.onebit import local_adam_step_

        hp = cfg.hp
        rl = _RowLeaves(moms, state, params)
        denom = bias_corrected_denom(rl.vs, hp["b2"], hp["eps"], call["v_count"])
        window = {"steps": 0, "sum_lr": 0.0, "decay": 1.0}
        local_adam_step_(
            rl.ps, rl.gs, denom, rl.decayed(call), call["step_size"], call["shrink"], window
        )
    return params, AdamState(state.count + 1, state.exp_avg, state.exp_avg_sq)


_MODES = {
    "adam": _adam,
    "lamb": _lamb,
    "lamb_warmup": _lamb_warmup,
    "variance": _variance,
    "sync": _sync,
    "local": _local,
}


# ----------------------------------------------------------------------------- 0/1 Adam


@torch.no_grad()
def local_step(cfg, ctx, slot: dict, lv, *, sync: bool) -> dict:
    """0/1 Adam after the variance froze, on the full params ([Note: 0/1 Adam under
    ZeRO-1/2]); on a sync step the window's average momentum is exchanged into ``M``.
    Returns the rows' call."""
    from fscale.transforms._compress import onebit as ob
    from fscale.transforms._compress.onebit_zero import exchange_

    hp = cfg.hp
    decoupled = hp.get("decoupled", False)
    window = dict(slot["window"])
    ps = lv.slot_params()
    if window["steps"] == 0:
        slot["anchor"].copy_(torch.cat([p.detach().reshape(-1).float() for p in ps]))
    lv.momentum_(slot)
    ms, vs = lv.rows.views(slot["momentum"]), lv.rows.views(slot["variance"])
    denom = bias_corrected_denom(vs, hp["b2"], hp["eps"], slot["v_count"])
    step_size = lv.lr / (1.0 - hp["b1"] ** (lv.count + 1))
    shrink = 1.0 - lv.lr * lv.wd if decoupled else 1.0
    window = ob.local_adam_step_(ps, ms, denom, lv.decayed, step_size, shrink, window)
    lv.write_params()
    # Whole leaves (plain data parallel under offload): the masters are the params
    # themselves, so they take the local step too, and a sync starts from the anchor
    # ([Note: 1-bit methods under offload] in onebit_zero.py).
    call = {"mode": "local", "step_size": step_size, "shrink": shrink}
    if sync:
        u, _, _ = ob.window_momentum(slot["anchor"], ps, denom, lv.decayed, window)
        exchange_(cfg, ctx, slot, u)
        call = {"mode": "sync", "sum_lr": window["sum_lr"], "decay": window["decay"]}
        if cfg.whole:
            call["anchor"] = dict(zip(lv.idx, lv.rows.views(slot["anchor"]), strict=True))
        window = {"steps": 0, "sum_lr": 0.0, "decay": 1.0}
    slot["window"] = window
    return call

"""The 1-bit optimizers of ``compress_comm``: 1-bit Adam, 0/1 Adam and 1-bit LAMB.

Each is a frozen dataclass with ``name`` and ``apply(step)``; ``apply`` replaces the
step's ``reduce_grads`` and ``update`` stages and keeps its buffers in the
``"compress_comm"`` state slot. The compressed collective is
``onebit_allreduce.compressed_mean`` (tag ``"compress.momentum"``).

Usage::

    step = fs.train_step(loss_fn, fs.optim.adam(1e-3))
    step = fs.compress_comm(step, onebit_adam(freeze_step=100))
    step = fs.compress_comm(fs.mixed_precision(step, "bf16"), zero_one_adam(var_freeze_step=100))
    step = fs.compress_comm(lamb_step, onebit_lamb(freeze_step=100))

References:
  Tang et al., "1-bit Adam: Communication Efficient Large-Scale Training with Adam's
  Convergence Speed", ICML 2021. Lu et al., "Maximizing Communication Efficiency for
  Large-scale Training via 0/1 Adam", ICLR 2023 (arXiv 2022). Li et al., "1-bit LAMB:
  Communication Efficient Large-Scale Large-Batch Training with LAMB's Convergence
  Speed", 2021.

[Note: phases]
Warm-up (the step's ``state["count"] < freeze_step``): the plain step's
``reduce_grads`` and ``update`` run untouched: exact full-precision Adam/LAMB.
Compression: ``reduce_grads`` returns the *local* grads; ``update`` folds them into
the momentum (``m = b1 m + (1 - b1) g_local``, where ``m`` is last step's synchronised
momentum), averages ``m`` over the ranks with ``compressed_mean`` in units of the step
([Note: compress what the step uses]; every rank gets the same bits, so params stay
equal on every rank), and steps with the variance frozen at its last full-precision
value: ``denom = sqrt(v) / sqrt(1 - b2^T) + eps`` where ``T`` (``v_count``) is the
number of updates that moved ``v`` (torch.optim's bias correction, kept where it
stopped; for 0/1 Adam, which skips variance updates, fewer than the step count).
The exchange happens in ``update``, after the step's non-finite vote: a skipped step
communicates nothing on any rank. ``clip_norm`` in the compression phase clips each
rank's local grads by their local norm (there is no global grad any more).

[Note: where the state lives]
Momentum and variance stay in the optimizer's own ``AdamState`` (``state["optimizer"]``):
no second model-sized copy of either (the compression phase writes that slot as the
warm-up's ``update`` does).
The ``"compress_comm"`` slot holds what only the method knows: the worker error (a
padded flat vector per rank) and server error (1/N of it per rank), placed as shards
over the data-parallel dim so ``fs.save`` writes every rank's buffers (DeepSpeed
saved rank 0's only), plus plain counters (``v_count``: the updates that moved the
variance; the local-step window) and,
for 0/1 Adam, the anchor params of the window, for 1-bit LAMB the trust-ratio EMA, the
per-layer factors and the fresh variance (flat, one float per param, replicated: it is
computed from the synced momentum, equal on every rank; [Note: 1-bit LAMB's fresh
variance]).
Error buffers are per rank: resume with the same world size. 0/1 Adam between two
syncs has per-rank params and momentum, which a checkpoint (laid out as replicated)
keeps from rank 0 only: resume is exact from a checkpoint taken on a sync step (and
always in a world of one); from mid-window the ranks resume equal, on rank 0's window.

[Note: dead coordinates]
A coordinate whose gradient was always zero (an unused position-embedding row) has
``v == 0``, so its step is ``m / eps``; exact Adam keeps ``m == 0`` there, but sign
compression hands it ``+-scale`` of its chunk, a step of ``lr * scale / 1e-8``. The
synced momentum is therefore zeroed where the frozen variance is zero (what
DeepSpeed's ``exp_avg_mask`` does by hand); ``v`` is equal on every rank, so the
mask is too.

[Note: compress what the step uses]
The step divides the momentum by ``denom`` per coordinate, and one 1-bit chunk (up to
128 elements) mixes coordinates whose ``denom`` differ by orders of magnitude. Sign
compression gives every coordinate of a chunk the same magnitude (its mean), and
error feedback only bounds the error in the units compressed: in momentum units, a
coordinate with a small ``denom`` in a chunk of large ones takes steps far above its
Adam step (and the error, released over later steps, is amplified by ``1 / denom``
and, through the momentum's recursion, by about ``1 / (1 - b1)``). So the compressed
mean is taken of ``m / denom`` and multiplied back: with the variance frozen (equal
on every rank) this is the same linear mean, and the compression error is bounded in
units of the step, uniformly over coordinates. It is 1-bit LAMB's momentum scaling
(each layer's momentum scaled to one magnitude before compression, Li et al. 2021)
taken to single coordinates. Measured on tests/transforms/test_onebit.py's text GPT
(world 4, 80 steps, 3 data seeds): 1-bit Adam +3.0% -> +2.0% above Adam, 0/1 Adam's
sensitivity to where chunk boundaries fall removed.
"""

from __future__ import annotations

import bisect
import dataclasses
import math
import weakref

import torch

from fscale import tree
from fscale.kernels import onebit_cpu
from fscale.kernels.onebit_cpu import lerp_addcdiv_
from fscale.optim._leaves import norms
from fscale.optim.adam import AdamState, bias_corrected_denom, update_moments_
from fscale.optim.masks import decayed_positions
from fscale.optim.schedules import value_at
from fscale.placement import Placement, place, placement_of
from fscale.policies import (
    CHANGES_GRADS_AFTER_BACKWARD,
    MOVES_OPTIMIZER,
    OffloadPolicy,
    ZeroPolicy,
)
from fscale.step import Step, StepContext, Transform
from fscale.transforms._compress import onebit_zero_rows as rows_opt
from fscale.transforms._compress.onebit_allreduce import (
    CPU_BLOCK,
    compressed_mean,
    plan_momentum_layout,
)

NAME = "compress_comm"
TAG = "compress.momentum"

_ZERO_FIX = (
    "the 1-bit methods compose with shard_zero stages 1 and 2 (compress_comm(shard_zero("
    "step, 1 or 2), onebit_adam / zero_one_adam / onebit_lamb(...)): the compressed "
    "momentum exchange replaces ZeRO's grad reduce-scatter ([Note: 1-bit methods under "
    "ZeRO-1/2] in _compress/onebit_zero.py). "
    "Stage 3 is refused by design: ZeRO-3 never holds a whole param on a rank, so there "
    "is no full local momentum to error-compensate without all-gathering it every step "
    "(and keeping it, plus error buffers, would undo ZeRO-3's memory savings); for "
    "compressed ZeRO-3 traffic use fs.compress_comm(fs.shard_zero(step, 3), fs.zeropp())."
)
_OFFLOAD_FIX = (
    "apply offload last, over compress_comm: offload(compress_comm(step, method), 'cpu') "
    "(the 1-bit methods hand offload their step as the optimizer it moves: [Note: 1-bit "
    "methods under offload] in _compress/onebit_zero.py)."
)


# ----------------------------------------------------------------------------- methods


def _int_at_least(owner: str, name: str, value, low: int, why: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{owner}: {name} must be an int >= {low} ({why}), got {value!r}.")
    return value


@dataclasses.dataclass(frozen=True)
class OnebitAdam:
    freeze_step: int
    name: str = "onebit_adam"

    def apply(self, step: Step) -> Step:
        return _build(step, self, ("adam", "adamw"))


@dataclasses.dataclass(frozen=True)
class ZeroOneAdam:
    var_freeze_step: int
    var_update_scaler: int
    local_step_scaler: int
    local_step_clipper: int
    name: str = "zero_one_adam"

    def apply(self, step: Step) -> Step:
        return _build(step, self, ("adam", "adamw"))


@dataclasses.dataclass(frozen=True)
class OnebitLamb:
    freeze_step: int
    coeff_beta: float
    factor_max: float
    factor_min: float
    factor_threshold: float
    name: str = "onebit_lamb"

    def apply(self, step: Step) -> Step:
        return _build(step, self, ("lamb",))


def onebit_adam(*, freeze_step: int) -> OnebitAdam:
    """1-bit Adam: exact Adam for ``freeze_step`` steps, then frozen variance and
    error-compensated 1-bit momentum exchange ([Note: phases]).

    Args:
      freeze_step: full-precision warm-up steps (>= 1: the variance it freezes must
        have been estimated). DeepSpeed suggests ~15-25% of the run.

    Usage: ``fs.compress_comm(step, fs.onebit_adam(freeze_step=100))`` (adam/adamw step).
    """
    _int_at_least("onebit_adam", "freeze_step", freeze_step, 1, "full-precision warm-up steps")
    return OnebitAdam(freeze_step)


def zero_one_adam(
    *,
    var_freeze_step: int,
    var_update_scaler: int = 16,
    local_step_scaler: int = 32768,
    local_step_clipper: int = 16,
) -> ZeroOneAdam:
    """0/1 Adam: adaptive variance freezing, then 1-bit sync with local steps.

    Args:
      var_freeze_step: after this many steps the variance never moves again and
        sync rounds start being skipped.
      var_update_scaler: before ``var_freeze_step`` the variance is updated (with an
        exact all-reduce of the grads) every ``I`` steps, ``I`` doubling after each
        ``var_update_scaler`` such updates; the other steps are 1-bit Adam steps.
      local_step_scaler: after ``var_freeze_step`` the sync interval ``H`` doubles
        every ``local_step_scaler`` steps ... The paper grows ``H`` as the learning
        rate decays (local steps at a high learning rate cost convergence): set it to
        the span over which your schedule halves the learning rate. The default,
        2^15, is DeepSpeed's (32678 there): no local steps in a short run.
      local_step_clipper: ... up to this many steps.

    [Note: 0/1 Adam, simplified] Schedules are pure functions of the step count
    (``_zero_one_schedule``). Between syncs each rank steps with its local momentum
    from the window's anchor params; a sync compresses the window's average momentum
    ``(anchor' - x) * denom / sum(step sizes)`` (``anchor'``: the anchor with the
    window's decoupled decay), then every rank sets ``m`` to the synced average and
    ``x = anchor' - sum(step sizes) * m / denom``, bitwise equal on every rank. The
    paper's bias of the momentum after a local window and its staleness tweaks are
    left out. Variance steps after the first skipped one are Adam steps whose
    variance bias correction counts the variance updates (``v_count``), not the steps:
    ``v`` moved only ``v_count`` times, so ``1 - b2^count`` would shrink ``denom`` by
    ``sqrt(v_count / count)`` and raise every later step by its inverse (on the test's
    80-step run, 28 of 39 steps: 18% larger steps, a loss 8-11% above Adam's).

    [Note: 0/1 Adam's 1-bit steps between variance updates]
    Before ``var_freeze_step`` the steps that skip the variance update exchange the
    local *grads* (in units of the step, ``g / denom``, error-compensated) and fold
    the synced mean into the momentum, as DeepSpeed's ZeroOneAdam does; after it,
    the momentum is exchanged (1-bit Adam's step, the local windows). Compressing the
    momentum there instead put the compression error into the momentum, which
    carries it (about ``1 / (1 - b1)`` times over) into the variance steps that
    follow; with scales per 32 elements, the test's run spiked after the local steps
    began (+15/+2.7/+8.4% above Adam over data seeds 1-3; grads: +0.7/+0.6/+0.3%).
    The error buffers carry over at the freeze: zeroing them (DeepSpeed) or scaling
    them by ``1 - b1`` (grads to momentum units) measured +2.5/+1.8/+1.7% and
    +2.2/+1.9/+1.6%.

    Usage: ``fs.compress_comm(step, fs.zero_one_adam(var_freeze_step=100))``.
    """
    owner = "zero_one_adam"
    _int_at_least(owner, "var_freeze_step", var_freeze_step, 1, "steps before the variance freezes")
    _int_at_least(owner, "var_update_scaler", var_update_scaler, 1, "variance updates per interval")
    _int_at_least(owner, "local_step_scaler", local_step_scaler, 1, "steps per sync interval")
    _int_at_least(owner, "local_step_clipper", local_step_clipper, 1, "the longest sync interval")
    return ZeroOneAdam(var_freeze_step, var_update_scaler, local_step_scaler, local_step_clipper)


def onebit_lamb(
    *,
    freeze_step: int,
    coeff_beta: float = 0.9,
    factor_max: float = 4.0,
    factor_min: float = 0.5,
    factor_threshold: float = 0.1,
) -> OnebitLamb:
    """1-bit LAMB: exact LAMB for ``freeze_step`` steps, then each layer's trust ratio
    frozen at its warm-up EMA and rescaled by a clipped fresh-variance factor, frozen
    variance and 1-bit momentum with error feedback ([Note: 1-bit LAMB's fresh variance]).

    Args:
      freeze_step: full-precision warm-up steps (>= 1).
      coeff_beta: EMA decay of the per-layer trust ratios over the warm-up, in [0, 1).
      factor_max: the largest factor on a frozen trust ratio (> 0; DeepSpeed's 4.0).
      factor_min: the smallest factor, in (0, factor_max] (DeepSpeed's 0.5).
      factor_threshold: how far a layer's factor may move in one step, relative to its
        last one, >= 0 (DeepSpeed's 0.1). ``factor_min = factor_max = 1`` keeps the
        warm-up ratios frozen.

    [Note: 1-bit LAMB's fresh variance]
    Li et al. 2021 (Algorithm 1) and DeepSpeed's ``OnebitLamb``: freezing the variance
    and the trust ratios would keep each layer's step size where the warm-up left it;
    so every compressed step also keeps a *fresh* variance ``v'`` (set to the frozen
    ``v`` on the first compressed step), moved by the grads the synced momentum
    implies, ``g = (m - b1 m_prev) / (1 - b1)`` (``m_prev``: last step's synced
    momentum; every rank has the same bits, so ``v'`` is equal on every rank and is
    never communicated). Per layer, the factor is ``max(denom / denom')`` over the
    layer's coordinates (``denom'``: ``v'``'s denominator), pulled to 1 by the share
    ``min(1, ||r_adam|| / ||r||)`` of the direction that is Adam's where the layer is
    decayed (``f s + 1 - s``), clipped to ``[factor_min, factor_max]`` and then to
    within ``factor_threshold`` of the layer's last factor (1 at the freeze); the
    step's trust ratio is the frozen one times it. Unlike DeepSpeed (no bias
    correction, meant for long warm-ups), both denominators are bias-corrected: ``v``
    at the ``v_count`` updates that moved it, ``v'`` at every update (the step
    number), so a short warm-up's bias does not read as a variance change. Memory: ``v'``
    (4 bytes/param in the slot, plain DP and ZeRO alike), ``m_prev``, ``g`` and
    ``denom'`` during the step (3 x 4 bytes/param, freed after it). Measured on
    tests/transforms/test_onebit.py's text GPT (world 4, 80 steps, 40 of warm-up,
    factors 0.8-1.4 at the end): 1-bit LAMB +4.4/+4.4/+4.3% above LAMB over data seeds
    1-3 before, +4.1/+4.5/+4.9% with it (fp32 scales per 128 elements). What closed
    the gap was finer compression scales ([Note: 8-bit scale codes] in
    ``onebit_allreduce.py``): -0.3/-0.7/+0.5%.

    Usage: ``fs.compress_comm(step, fs.onebit_lamb(freeze_step=100))`` (lamb step).
    """
    owner = "onebit_lamb"
    _int_at_least(owner, "freeze_step", freeze_step, 1, "full-precision warm-up steps")

    def real(name, value, want):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{owner}: {name} must be a float {want}, got {value!r}.")
        return float(value)

    coeff_beta = real("coeff_beta", coeff_beta, "in [0, 1)")
    if not 0.0 <= coeff_beta < 1.0:
        raise ValueError(f"{owner}: coeff_beta must be in [0, 1), got {coeff_beta!r}.")
    factor_max = real("factor_max", factor_max, "> 0")
    factor_min = real("factor_min", factor_min, "in (0, factor_max]")
    factor_threshold = real("factor_threshold", factor_threshold, ">= 0")
    if not (0.0 < factor_min <= factor_max < math.inf):
        raise ValueError(
            f"{owner}: need 0 < factor_min <= factor_max (finite), got factor_min="
            f"{factor_min!r}, factor_max={factor_max!r}; DeepSpeed's are 0.5 and 4.0."
        )
    if not 0.0 <= factor_threshold < math.inf:
        raise ValueError(
            f"{owner}: factor_threshold must be a finite float >= 0, got {factor_threshold!r}."
        )
    return OnebitLamb(freeze_step, coeff_beta, factor_max, factor_min, factor_threshold)


# ----------------------------------------------------------------------------- build

_SPLIT_FIX = (
    "the 1-bit exchange averages one flat momentum vector over the data-parallel ranks, "
    "which hold different slices of a split param, so their average means nothing (and "
    "1-bit LAMB's frozen trust ratios would be per slice). Not built: compress a step whose "
    "params are whole on every rank (plain data parallel, shard_zero 1/2)."
)


def _build(step: Step, method, optimizers: tuple[str, ...]) -> Step:
    if step.policy(OffloadPolicy) is not None:
        raise ValueError(
            f"compress_comm({method.name}) cannot be applied over offload: {_OFFLOAD_FIX}"
        )  # offload captured the optimizer it moves when it was built
    hp = step.optimizer.hyperparams
    got = None if hp is None else hp.get("name")
    if got not in optimizers:
        want = " or ".join(f"fs.optim.{o}(...)" for o in optimizers)
        raise ValueError(
            f"compress_comm({method.name}) needs a step built with {want}, but its optimizer "
            f"is {got or 'one that does not describe itself (e.g. a chain)'}; build the step "
            f"with train_step(loss_fn, {want}) (clip with train_step(clip_norm=...))."
        )
    zero = step.policy(ZeroPolicy)
    if zero is not None and zero.stage == 3:
        raise ValueError(
            f"compress_comm({method.name}) cannot be applied over shard_zero(stage=3): {_ZERO_FIX}"
        )
    dims = [d for d in step.mesh.dims if step.mesh.size(d) > 1]
    model = [d for d in dims if d not in step.data_dims()]
    if model:
        raise ValueError(
            f"compress_comm({method.name}) cannot be applied over tensor_parallel (mesh dims "
            f"{model} split the model): {_SPLIT_FIX}"
        )
    if len(dims) > 1:
        raise ValueError(
            f"compress_comm({method.name}) needs a 1-D data-parallel mesh, got {step.mesh}; "
            "build the step on one dim (train_step(mesh=mesh['dp'])); HSDP is not built."
        )
    from fscale.transforms._compress import onebit_zero

    if zero is not None:
        return onebit_zero.build_over_zero(step, method, zero, _Config)
    dim = dims[0] if dims else step.mesh.dims[0]
    cfg = _Config(method, dict(hp), dim, step.mesh.size(dim), step.mesh.group(dim))
    # Under offload (applied over this) the optimizer state lives on the host, in
    # sub-groups: the steps then take onebit_zero's path, on whole leaves
    # ([Note: 1-bit methods under offload] in onebit_zero.py).
    whole = dataclasses.replace(cfg, whole=True)
    record = Transform(
        NAME,
        options={
            "method": method.name,
            **{k: v for k, v in dataclasses.asdict(method).items() if k != "name"},
        },
        conflicts={"shard_zero": _ZERO_FIX},
        refuses_inner={"offload": _OFFLOAD_FIX},
        plan=lambda plan: _plan(cfg, plan),
        # In the compression phase the optimizer steps with the synced momentum, not
        # the grads backward made: offload must not stream them into its update.
        capabilities=frozenset({CHANGES_GRADS_AFTER_BACKWARD}),
    )
    inner = step.stages

    def init(s, params):
        if s.has(MOVES_OPTIMIZER):
            return onebit_zero.init(whole, inner, s, params)
        return _init(cfg, inner, s, params)

    def reduce_grads(ctx, grads):
        return _reduce_grads(cfg, inner, ctx, grads)

    def update(ctx, grads, params):
        if ctx.step.has(MOVES_OPTIMIZER):
            return onebit_zero.update(whole, inner, ctx, grads, params)
        return _update(cfg, inner, ctx, grads, params)

    def apply(ctx, params):
        if ctx.step.has(MOVES_OPTIMIZER):
            return onebit_zero.apply(whole, inner, ctx, params)
        return inner.apply(ctx, params)

    new = step.with_transform(
        record, init=init, reduce_grads=reduce_grads, update=update, apply=apply
    )
    return dataclasses.replace(new, optimizer=rows_opt.wrap(whole, step.optimizer))


@dataclasses.dataclass(frozen=True)
class _Config:
    method: object
    hp: dict
    dim: str
    world: int
    group: object
    #: Every rank holds whole leaves of the optimizer state (plain data parallel under
    #: offload), not shard_zero's rows ([Note: 1-bit methods under offload]).
    whole: bool = False
    #: What the compression phase may reuse between steps ([Note: dead coordinates]).
    cache: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)


def _plan(cfg: _Config, plan) -> None:
    """``fs.explain``: the compression phase's collectives and the error buffers."""
    from fscale.plan import Collective

    if not plan.param_count:
        return
    lay = plan_momentum_layout(plan.param_count, cfg.world)
    warm = [c for c in plan.collectives if c.stage == "reduce_grads" and c.tag == "dp.grads"]
    plan.collectives[:] = [c for c in plan.collectives if c not in warm]
    if cfg.world > 1:
        plan.collectives += [
            Collective("all_to_all", lay.world * lay.message, "update", tag=TAG),
            Collective("all_gather", lay.message, "update", tag=TAG),
        ]
    errors = 4 * (lay.padded + lay.server)
    if isinstance(cfg.method, ZeroOneAdam):
        errors += 4 * lay.n  # the window's anchor
    if isinstance(cfg.method, OnebitLamb):
        errors += 4 * lay.n  # the fresh variance
    plan.memory["compress_comm buffers"] = errors
    fp32 = sum(c.bytes for c in warm)
    if cfg.world == 1:
        return
    plan.notes.append(
        f"compress_comm({cfg.method.name}): collectives shown for the compression phase "
        f"({lay.world * lay.message + lay.message:,} bytes/step vs {fp32:,} for the fp32 "
        "all-reduce of the warm-up steps); 0/1 Adam also skips rounds after var_freeze_step."
    )


# ----------------------------------------------------------------------------- schedule


def _zero_one_schedule(m: ZeroOneAdam, k: int) -> str:
    """0/1 Adam's action at step ``k`` (0-based): "variance" (exact Adam), "onebit"
    (compressed step, variance kept), "local" (no communication) or "sync"."""
    if k < m.var_freeze_step:
        start, interval = 0, 1
        while k >= start + m.var_update_scaler * interval:  # blocks of scaler updates
            start += m.var_update_scaler * interval
            interval *= 2
        return "variance" if (k - start) % interval == 0 else "onebit"
    j = k - m.var_freeze_step
    h = min(2 ** min(j // m.local_step_scaler, 62), m.local_step_clipper)
    if h == 1:
        return "onebit"
    return "sync" if (j + 1) % h == 0 else "local"


def _action(cfg: _Config, ctx: StepContext) -> str:
    k = ctx.state["count"]
    m = cfg.method
    if isinstance(m, ZeroOneAdam):
        return _zero_one_schedule(m, k)
    return "warmup" if k < m.freeze_step else "onebit"


# ----------------------------------------------------------------------------- init


def refuse_split_leaves(method_name: str, step: Step, params) -> None:
    """Raise if a laid-out param is split across ranks (expert_parallel's banks)."""
    split = []
    for path, t in zip(tree.paths(params), tree.leaves(params), strict=True):
        placement = placement_of(t) if isinstance(t, torch.Tensor) else None
        if placement is not None and any(step.mesh.size(d) > 1 for d in placement.split_dims):
            split.append(path)
    if split:
        raise ValueError(
            f"compress_comm({method_name}) cannot run on params split across ranks "
            f"({split[:3]}, e.g. expert_parallel's expert banks): {_SPLIT_FIX}"
        )


def _init(cfg: _Config, inner, step: Step, params):
    params, state = inner.init(step, params)
    refuse_split_leaves(cfg.method.name, step, params)
    if not isinstance(state.get("optimizer"), AdamState):
        raise ValueError(
            f"compress_comm({cfg.method.name}) needs the optimizer state AdamState(count, "
            f"exp_avg, exp_avg_sq), got {type(state.get('optimizer')).__name__}; use the "
            "optimizer directly, not inside a chain."
        )
    live = [p for p in tree.leaves(params) if p is not None]
    lay = plan_momentum_layout(sum(p.numel() for p in live), cfg.world)
    device = live[0].device

    def sharded(numel: int) -> torch.Tensor:
        t = torch.zeros(numel, dtype=torch.float32, device=device)
        return place(t, Placement((cfg.world * numel,), (cfg.dim,), ()))

    slot = {
        "method": cfg.method.name,
        "worker_error": sharded(lay.padded),
        "server_error": sharded(lay.server),
        "v_count": 0,  # optimizer count of the last update that moved the variance
    }
    if isinstance(cfg.method, ZeroOneAdam):
        slot["anchor"] = torch.zeros(lay.n, dtype=torch.float32, device=device)
        slot["window"] = {"steps": 0, "sum_lr": 0.0, "decay": 1.0}
    if isinstance(cfg.method, OnebitLamb):
        slot["trust"] = torch.zeros(len(live), dtype=torch.float32, device=device)
        slot["trust_steps"] = 0
        # [Note: 1-bit LAMB's fresh variance]: equal on every rank, so replicated.
        slot["fresh_variance"] = torch.zeros(lay.n, dtype=torch.float32, device=device)
        slot["factor"] = torch.ones(len(live), dtype=torch.float32, device=device)
    state[NAME] = slot
    return params, state


# ----------------------------------------------------------------------------- stages


def _reduce_grads(cfg: _Config, inner, ctx: StepContext, grads):
    action = _action(cfg, ctx)
    ctx.metrics["compress_phase"] = action  # here: update does not run on a skipped step
    if action in ("warmup", "variance"):
        return inner.reduce_grads(ctx, grads)
    return grads  # the compression phase exchanges the momentum instead, in update


def _update(cfg: _Config, inner, ctx: StepContext, grads, params):
    action = _action(cfg, ctx)
    slot = dict(ctx.state[NAME])
    ctx.state[NAME] = slot
    if action in ("warmup", "variance"):
        if isinstance(cfg.method, OnebitLamb):
            return _lamb_warmup(cfg, inner, ctx, slot, grads, params)
        count = ctx.state["optimizer"].count
        if slot["v_count"] != count:  # 0/1 Adam after skipped variance updates
            return _variance_step(cfg, ctx, slot, grads, params)
        params = inner.update(ctx, grads, params)
        slot["v_count"] += ctx.state["optimizer"].count - count  # 0 if it did not step
        return params
    if slot["v_count"] == 0:
        raise RuntimeError(
            f"compress_comm({cfg.method.name}): the compression phase started but no "
            "full-precision update ever ran (every warm-up step was skipped as non-finite); "
            "raise freeze_step."
        )
    if isinstance(cfg.method, ZeroOneAdam) and action in ("local", "sync"):
        return _local_step(cfg, ctx, slot, grads, params, sync=action == "sync")
    return _onebit_step(cfg, ctx, slot, grads, params)


class _Leaves:
    """The live leaves of one update: grads (fp32), params, moments, decayed positions."""

    def __init__(self, cfg: _Config, ctx: StepContext, grads, params, *, l2: bool):
        opt = ctx.state["optimizer"]
        hp = cfg.hp
        self.cfg = cfg
        self.count = opt.count
        self.t = opt.count + 1
        self.lr = value_at(hp["lr"], opt.count, "lr")
        self.wd = value_at(hp["weight_decay"], opt.count, "weight_decay")
        g_leaves, self.spec = tree.flatten(grads)
        self.idx = [i for i, g in enumerate(g_leaves) if g is not None]
        p_leaves = tree.leaves(params)
        self.ps = [p_leaves[i] for i in self.idx]
        m_leaves, v_leaves = tree.leaves(opt.exp_avg), tree.leaves(opt.exp_avg_sq)
        self.ms = [m_leaves[i] for i in self.idx]
        self.vs = [v_leaves[i] for i in self.idx]
        self.gs = [g_leaves[i].to(m.dtype) for i, m in zip(self.idx, self.ms, strict=True)]
        self.decayed = []
        if self.wd != 0.0:
            self.decayed = decayed_positions(
                hp["mask"], params, self.idx, owner=hp["name"], wd=self.wd
            )
        if l2 and self.decayed:  # torch.optim.Adam's L2: into the grads, before the moments
            for j in self.decayed:
                self.gs[j] = self.gs[j].add(self.ps[j].to(self.gs[j].dtype), alpha=self.wd)
        self.opt = opt

    @property
    def numels(self) -> list[int]:
        return [m.numel() for m in self.ms]

    def local_momentum_(self, b1: float) -> None:
        torch._foreach_lerp_(self.ms, self.gs, 1.0 - b1)

    def flat_momentum(self) -> torch.Tensor:
        return torch.cat([m.reshape(-1) for m in self.ms])

    def set_momentum_(self, flat: torch.Tensor) -> None:
        """The synced momentum, zero where the frozen variance is ([Note: dead coordinates])."""
        _unflat_into(self.ms, flat)
        zero_dead_(self.cfg, self.ms, self.vs)

    def commit(self, ctx: StepContext) -> None:
        ctx.state["optimizer"] = AdamState(self.t, self.opt.exp_avg, self.opt.exp_avg_sq)


def _unflat_into(dst: list, flat: torch.Tensor) -> None:
    offset = 0
    for t in dst:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()


def zero_dead_(cfg, ts: list, vs: list) -> None:
    """``ts`` zeroed where the variance ``vs`` is zero ([Note: dead coordinates]), by the
    positions cached while ``vs`` are unchanged."""
    for j, idx in _dead_positions(cfg, vs):
        t = ts[j]
        if t.is_contiguous():
            t.view(-1).index_fill_(0, idx, 0.0)
        else:
            t.masked_fill_(vs[j] == 0, 0.0)


def _dead_positions(cfg, vs: list) -> list:
    """``(leaf, flat positions where v == 0)`` for the leaves ``vs`` that have any.

    [Note: dead coordinates, cached]
    The mask ``v == 0`` is recomputed only when the variance may have moved: the cache
    holds weak references to the leaves it was taken from and their version counters
    (bumped by every in-place write), so another tensor or a write in place (a variance
    step, a load into the state) recomputes it. The frozen variance of 1-bit Adam and
    LAMB is read once; ``v == 0`` and a ``masked_fill_`` per step were ~55 ms a step at
    21M params on one CPU thread, the cached positions (a few) cost nothing.
    """

    def positions():
        out = []
        for j, v in enumerate(vs):
            idx = torch.nonzero(v.reshape(-1) == 0).view(-1)
            if idx.numel():
                out.append((j, idx))
        return out

    return _cached(cfg, "dead", vs, (), positions)


def _cached(cfg, name: str, vs: list, extra: tuple, make):
    """``make()``, kept in ``cfg.cache[name]`` while the tensors ``vs`` are the same
    objects at the same versions and ``extra`` is equal ([Note: dead coordinates, cached])."""
    try:
        versions = tuple(v._version for v in vs)
    except RuntimeError:  # inference tensors have no version counter
        return make()
    hit = cfg.cache.get(name)
    if (
        hit is not None
        and hit["versions"] == versions
        and hit["extra"] == extra
        and len(hit["refs"]) == len(vs)
        and all(r() is v for r, v in zip(hit["refs"], vs, strict=True))
    ):
        return hit["value"]
    value = make()
    cfg.cache[name] = {
        "refs": [weakref.ref(v) for v in vs],
        "versions": versions,
        "extra": extra,
        "value": value,
    }
    return value


def _exchange_into(
    cfg: _Config, ctx: StepContext, slot: dict, nums: list, denom: list, into: list
) -> list:
    """The compressed mean of the flat ``nums / denom`` ([Note: compress what the step
    uses]), written into the leaves ``into`` (they may be ``nums``): the quotients go
    straight into the worker error and the mean straight into the leaves
    ([Note: decoding into the destination] in ``onebit_allreduce.py``), the same bits
    as ``_exchange`` of the concatenated quotients without its two model-sized copies."""
    lay = plan_momentum_layout(sum(t.numel() for t in nums), cfg.world)

    def add_quotients(y: torch.Tensor) -> None:
        # y + q / d by addcdiv_ (value 1): the quotient rounded, then the sum rounded,
        # as y.add_(q / d).
        offset = 0
        for q, d in zip(nums, denom, strict=True):
            y[offset : offset + q.numel()].view_as(q).addcdiv_(q, d)
            offset += q.numel()

    return compressed_mean(
        ctx.comm, TAG, cfg.group, add_quotients, slot["worker_error"], slot["server_error"],
        lay, into=into,
    )  # fmt: skip


def _fp32_contiguous(*groups: list) -> bool:
    return all(t.dtype == torch.float32 and t.is_contiguous() for g in groups for t in g)


def _exchange(cfg: _Config, ctx: StepContext, slot: dict, flat: torch.Tensor) -> torch.Tensor:
    lay = plan_momentum_layout(flat.numel(), cfg.world)
    return compressed_mean(
        ctx.comm, TAG, cfg.group, flat, slot["worker_error"], slot["server_error"], lay
    )


def _exchange_scaled(
    cfg: _Config, ctx: StepContext, slot: dict, flat: torch.Tensor, denom: list
) -> torch.Tensor:
    """The compressed mean of a momentum-like ``flat``, taken in units of the step
    ([Note: compress what the step uses])."""
    d = torch.cat([t.reshape(-1) for t in denom])
    return _exchange(cfg, ctx, slot, flat / d).mul_(d)


def compresses_grads(cfg, ctx: StepContext) -> bool:
    """0/1 Adam before ``var_freeze_step``: its 1-bit steps exchange the local grads,
    not the momentum ([Note: 0/1 Adam's 1-bit steps between variance updates])."""
    m = cfg.method
    return type(m).__name__ == "ZeroOneAdam" and ctx.state["count"] < m.var_freeze_step


@torch.no_grad()
def _onebit_step(cfg: _Config, ctx: StepContext, slot: dict, grads, params):
    """Local momentum, compressed mean, Adam/LAMB step with the frozen variance (0/1
    Adam before its variance freezes: compressed mean of the grads, then momentum)."""
    hp = cfg.hp
    lamb = isinstance(cfg.method, OnebitLamb)
    lv = _Leaves(cfg, ctx, grads, params, l2=not lamb and not hp.get("decoupled", False))
    if not lamb and not compresses_grads(cfg, ctx) and _blockwise_ok(lv):
        _adam_step_blockwise(cfg, ctx, slot, lv)
        lv.commit(ctx)
        return params
    m_prev = [m.clone() for m in lv.ms] if lamb else None  # last step's synced momentum
    denom = bias_corrected_denom(lv.vs, hp["b2"], hp["eps"], slot["v_count"])
    # _exchange_scaled's quotients and products taken per leaf: the same values, without
    # the flat momentum and flat denom (two model-sized copies, ~0.1 s a step at 21M on
    # a CPU). The mask zeroes come before the product: 0 * denom stays 0.
    fast = _fp32_contiguous(lv.ms, lv.gs, denom)
    if compresses_grads(cfg, ctx):
        if fast:
            gs = _exchange_into(cfg, ctx, slot, lv.gs, denom, [torch.empty_like(m) for m in lv.ms])
        else:
            scaled = torch.cat([q.reshape(-1) for q in torch._foreach_div(lv.gs, denom)])
            flat = _exchange(cfg, ctx, slot, scaled)
            gs = [t.view_as(m) for t, m in zip(flat.split(lv.numels), lv.ms, strict=True)]
        zero_dead_(cfg, gs, lv.vs)  # [Note: dead coordinates]
        torch._foreach_mul_(gs, denom)
        lv.gs = gs
        lv.local_momentum_(hp["b1"])  # from the synced grads: equal on every rank
    else:
        lv.local_momentum_(hp["b1"])
        if fast:
            _exchange_into(cfg, ctx, slot, lv.ms, denom, lv.ms)
            zero_dead_(cfg, lv.ms, lv.vs)
        else:
            scaled = torch.cat([q.reshape(-1) for q in torch._foreach_div(lv.ms, denom)])
            lv.set_momentum_(_exchange(cfg, ctx, slot, scaled))
        torch._foreach_mul_(lv.ms, denom)
    bias1 = 1.0 - hp["b1"] ** lv.t
    if lamb:
        fresh = [
            t.view_as(m)
            for t, m in zip(
                slot["fresh_variance"].split([m.numel() for m in lv.ms]), lv.ms, strict=True
            )
        ]
        rs, trust = lamb_trust_(
            cfg, slot, ms=lv.ms, m_prev=m_prev, vs=lv.vs, denom=denom, fresh=fresh,
            ps=lv.ps, decayed=lv.decayed, wd=lv.wd, t=lv.t,
        )  # fmt: skip
        for j, (p, r) in enumerate(zip(lv.ps, rs, strict=True)):
            p.sub_((r * (trust[j] * lv.lr)).to(p.dtype))
    else:
        if hp.get("decoupled", False):
            for j in lv.decayed:
                lv.ps[j].mul_(1.0 - lv.lr * lv.wd)
        for p, m, d in zip(lv.ps, lv.ms, denom, strict=True):
            p.sub_((m / d).mul_(lv.lr / bias1).to(p.dtype))
    lv.commit(ctx)
    return params


#: Elements per block of ``_adam_step_blockwise`` (1 MiB of fp32: the block's
#: denominator and quotients stay in a CPU core's cache).
_BLOCK = 1 << 18


def _blockwise_ok(lv: _Leaves) -> bool:
    return all(
        t.device.type == "cpu" and t.is_contiguous() and t.dtype == torch.float32
        for t in (*lv.ms, *lv.vs)
    ) and all(p.device.type == "cpu" and p.is_contiguous() for p in lv.ps)


def _blocks(ts: list):
    """``(leaf, start, stop)`` over the flat elements of ``ts``, ``_BLOCK`` at a time."""
    for j, t in enumerate(ts):
        for a in range(0, t.numel(), _BLOCK):
            yield j, a, min(a + _BLOCK, t.numel())


@torch.no_grad()
def _adam_step_blockwise(cfg: _Config, ctx: StepContext, slot: dict, lv: _Leaves) -> None:
    """1-bit Adam's momentum step (``_onebit_step`` without LAMB or the grads exchange)
    on a CPU, block by block.

    [Note: the 1-bit Adam step in blocks on a CPU]
    The same elementwise ops in the same order as ``_onebit_step``'s, on each leaf in
    blocks of ``_BLOCK`` elements, so the bits are equal: each block of the momentum
    takes its local update (``lerp_``) and goes on, while in cache, as ``m / denom``
    into the worker error (``addcdiv_``); each decoded block of the mean gets the
    dead-coordinate mask and is multiplied by ``denom`` straight into the momentum
    (``decode``'s ``each``: no copy of the decoded values, [Note: decoding into the
    destination]), and the decay and the step run on it while it is still in cache,
    with one block-sized temporary (a second pass over the momentum, params and
    denominator from memory was ~20 ms a step at 21M params; the whole-leaf ``lerp_``
    before the exchange, another ~15 ms). ``denom`` is a function of the frozen
    variance: it is kept between steps while the variance leaves are unchanged (by
    ``_cached``, like the dead positions), 4 bytes a param held on the CPU in exchange
    for its three passes (sqrt, divide, add: ~45 ms a step at 21M params on one thread
    of the 2-core box, where model-sized temporaries also cost their fresh pages).
    """
    hp = cfg.hp
    ms, vs, ps = lv.ms, lv.vs, lv.ps
    b2, eps, v_count = hp["b2"], hp["eps"], slot["v_count"]
    dens = _cached(
        cfg, "denom", vs, (b2, eps, v_count), lambda: bias_corrected_denom(vs, b2, eps, v_count)
    )
    # Decoded blocks are at most CPU_BLOCK elements, the quotient blocks _BLOCK.
    q_buf = torch.empty(
        min(max(_BLOCK, CPU_BLOCK), max(m.numel() for m in ms)), dtype=torch.float32
    )

    def denom(j: int, a: int, b: int) -> torch.Tensor:
        return dens[j].view(-1)[a:b]

    offsets = [0]
    for m in ms:
        offsets.append(offsets[-1] + m.numel())
    gs, w = lv.gs, 1.0 - hp["b1"]

    def add_quotients(y: torch.Tensor, lo: int, hi: int) -> None:
        # y holds elements lo:hi of the worker error: each block gets its local momentum
        # (lerp_, as _Leaves.local_momentum_ on whole leaves: elementwise, the same bits)
        # and its quotients just before it is compressed (compressed_mean's by_block),
        # while the block's momentum is in cache.
        j = bisect.bisect_right(offsets, lo) - 1
        while j < len(ms) and offsets[j] < hi:
            a, b = max(lo, offsets[j]) - offsets[j], min(hi, offsets[j + 1]) - offsets[j]
            if a < b:
                part = y[offsets[j] + a - lo : offsets[j] + b - lo]
                # One C loop when it can ([Note: the 1-bit CPU loops in C]).
                lerp_addcdiv_(ms[j].view(-1)[a:b], gs[j].view(-1)[a:b], denom(j, a, b), part, w)
            j += 1

    # The step runs on each decoded block while it is in cache ([Note: the 1-bit Adam
    # step in blocks on a CPU]): the mask, the decay and the update per element, in
    # the order of the whole-leaf passes, so the same bits.
    dead = dict(_dead_positions(cfg, vs))  # [Note: dead coordinates]
    decayed = set(lv.decayed) if hp.get("decoupled", False) else set()
    shrink = 1.0 - lv.lr * lv.wd
    step_size = lv.lr / (1.0 - hp["b1"] ** lv.t)
    first = [0]  # the first leaf not yet stepped through to its end

    def step_block(vals: torch.Tensor, lo: int, hi: int) -> None:
        # vals: the decoded mean of elements lo:hi; m = vals * denom written straight
        # into the momentum (the copy of the decoded values and the product in one op).
        j = first[0]
        while j < len(ms) and offsets[j] < hi:
            a, b = max(lo, offsets[j]) - offsets[j], min(hi, offsets[j + 1]) - offsets[j]
            if a < b:
                v = vals[offsets[j] + a - lo : offsets[j] + b - lo]
                idx = dead.get(j)
                if idx is not None:  # before the product: 0 * d is 0
                    idx = idx[(idx >= a) & (idx < b)]
                    if idx.numel():
                        v.index_fill_(0, idx - a, 0.0)
                p = ps[j].view(-1)[a:b]
                if j in decayed:
                    p.mul_(shrink)
                d = denom(j, a, b)
                m = torch.mul(v, d, out=ms[j].view(-1)[a:b])
                q = torch.div(m, d, out=q_buf[: b - a]).mul_(step_size)
                p.sub_(q.to(p.dtype))
            if offsets[j + 1] > hi:
                break  # the rest of this leaf is in the next block
            j += 1
        first[0] = j

    lay = plan_momentum_layout(offsets[-1], cfg.world)
    lib = onebit_cpu.loops()
    packed = None
    if lib is not None and onebit_cpu.ok(*ps, *dens) and all(p.dtype == torch.float32 for p in ps):
        dead_at = {j: idx.contiguous() for j, idx in dead.items()}

        def packed(bits: torch.Tensor, scales: torch.Tensor) -> None:
            # The step of every leaf in one C loop over its elements of the packed mean:
            # step_block's ops on each element, the same bits ([Note: the 1-bit CPU
            # loops in C] in fscale/kernels/onebit_cpu.py).
            for j, (m, p, d) in enumerate(zip(ms, ps, dens, strict=True)):
                idx = dead_at.get(j)
                lib.decode_step(
                    bits.data_ptr(), scales.data_ptr(), lay.chunk, offsets[j], m.numel(),
                    d.data_ptr(), m.data_ptr(), p.data_ptr(), step_size, shrink,
                    int(j in decayed), 0 if idx is None else idx.data_ptr(),
                    0 if idx is None else idx.numel(),
                )  # fmt: skip

    compressed_mean(
        ctx.comm, TAG, cfg.group, add_quotients, slot["worker_error"], slot["server_error"],
        lay, each=step_block, by_block=True, packed=packed,
    )  # fmt: skip


# ----------------------------------------------------------------------------- 0/1 Adam


@torch.no_grad()
def _variance_step(cfg: _Config, ctx: StepContext, slot: dict, grads, params):
    """0/1 Adam's exact step once some steps kept the variance: Adam on the all-reduced
    grads, the variance's bias correction counting only the updates that moved it
    ([Note: 0/1 Adam, simplified])."""
    lv = _Leaves(cfg, ctx, grads, params, l2=not cfg.hp.get("decoupled", False))
    slot["v_count"] += 1
    variance_step_(
        lv.ps, lv.ms, lv.vs, lv.gs, cfg.hp, lr=lv.lr, wd=lv.wd, decayed=lv.decayed,
        t=lv.t, v_count=slot["v_count"],
    )  # fmt: skip
    lv.commit(ctx)
    return params


@torch.no_grad()
def variance_step_(
    ps: list, ms: list, vs: list, gs: list, hp: dict, *, lr, wd, decayed, t, v_count
) -> None:
    """0/1 Adam's variance step in place (plain DP's and, on ZeRO rows,
    ``onebit_zero_rows``'s): Adam with the moments moved by ``gs`` (L2 already in
    them), the first moment's bias correction at step ``t`` and the variance's at
    ``v_count``, the updates that moved it, this one included."""
    update_moments_(ms, vs, gs, hp["b1"], hp["b2"])
    denom = bias_corrected_denom(vs, hp["b2"], hp["eps"], v_count)
    if hp.get("decoupled", False):
        for j in decayed:
            ps[j].mul_(1.0 - lr * wd)
    step_size = lr / (1.0 - hp["b1"] ** t)
    for p, m, d in zip(ps, ms, denom, strict=True):
        p.sub_((m / d).mul_(step_size).to(p.dtype))


def _flat_params(ps: list) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).float() for p in ps])


@torch.no_grad()
def local_adam_step_(ps, ms, denom, decayed, step_size: float, shrink: float, window: dict):
    """0/1 Adam's local step on ``ps`` (decoupled decay ``shrink`` on the ``decayed``
    positions, 1.0 for none); returns ``window`` advanced by it. Plain DP and the ZeRO
    path share it ([Note: 0/1 Adam, simplified])."""
    if shrink != 1.0:
        for j in decayed:
            ps[j].mul_(shrink)
    for p, m, d in zip(ps, ms, denom, strict=True):
        p.sub_((m / d).mul_(step_size).to(p.dtype))
    return {
        "steps": window["steps"] + 1,
        "sum_lr": window["sum_lr"] + step_size,
        "decay": window["decay"] * shrink,
    }


def window_momentum(anchor: torch.Tensor, ps, denom, decayed, window: dict):
    """The window's average momentum in units of the step, ``(start - x) * denom /
    sum_lr`` (``start`` the anchor with the window's decay on decayed leaves, ``x`` the
    params now); returns it with ``start`` and the flat denominator."""
    flat_denom = torch.cat([d.reshape(-1) for d in denom])
    decay = torch.cat(
        [
            torch.full((p.numel(),), window["decay"] if j in decayed else 1.0)
            for j, p in enumerate(ps)
        ]
    ).to(flat_denom.device)
    start = anchor * decay
    return (start - _flat_params(ps)).mul_(flat_denom).div_(window["sum_lr"]), start, flat_denom


@torch.no_grad()
def _local_step(cfg: _Config, ctx: StepContext, slot: dict, grads, params, *, sync: bool):
    """0/1 Adam after the variance froze: a local Adam step; on a sync step, the window's
    average momentum goes through the compressed mean ([Note: 0/1 Adam, simplified])."""
    hp = cfg.hp
    decoupled = hp.get("decoupled", False)
    lv = _Leaves(cfg, ctx, grads, params, l2=not decoupled)
    window = dict(slot["window"])
    if window["steps"] == 0:
        slot["anchor"].copy_(_flat_params(lv.ps))
    lv.local_momentum_(hp["b1"])
    denom = bias_corrected_denom(lv.vs, hp["b2"], hp["eps"], slot["v_count"])
    step_size = lv.lr / (1.0 - hp["b1"] ** lv.t)
    shrink = 1.0 - lv.lr * lv.wd if decoupled else 1.0
    window = local_adam_step_(lv.ps, lv.ms, denom, lv.decayed, step_size, shrink, window)
    if sync:
        # The window's average momentum, compressed like 1-bit Adam's.
        u, start, flat_denom = window_momentum(slot["anchor"], lv.ps, denom, lv.decayed, window)
        m = _exchange_scaled(cfg, ctx, slot, u, denom)
        lv.set_momentum_(m)
        m = lv.flat_momentum()  # masked
        _unflat_into(lv.ps, start - m.mul(window["sum_lr"]).div_(flat_denom))
        window = {"steps": 0, "sum_lr": 0.0, "decay": 1.0}
    slot["window"] = window
    lv.commit(ctx)
    return params


# ----------------------------------------------------------------------------- 1-bit LAMB


@torch.no_grad()
def _lamb_warmup(cfg: _Config, inner, ctx: StepContext, slot: dict, grads, params):
    """Exact LAMB, plus the EMA of each layer's trust ratio ``||p|| / ||r||``."""
    hp = cfg.hp
    # References, not copies: lamb's update returns new param tensors, so these still
    # hold the params its trust ratio and decay term saw.
    old = [p for p in tree.leaves(params) if p is not None]
    count = ctx.state["optimizer"].count
    params = inner.update(ctx, grads, params)
    opt = ctx.state["optimizer"]
    if opt.count == count:  # the optimizer did not step
        return params
    slot["v_count"] = opt.count
    ms = [m for m in tree.leaves(opt.exp_avg) if m is not None]
    vs = [v for v in tree.leaves(opt.exp_avg_sq) if v is not None]
    denom = bias_corrected_denom(vs, hp["b2"], hp["eps"], opt.count)
    rs = torch._foreach_div(ms, denom)
    torch._foreach_div_(rs, 1.0 - hp["b1"] ** opt.count)
    wd = value_at(hp["weight_decay"], count, "weight_decay")
    if wd != 0.0:
        idx = list(range(len(old)))
        for j in decayed_positions(hp["mask"], params, idx, owner="lamb", wd=wd):
            rs[j].add_(old[j].float(), alpha=wd)
    r_norms = torch.stack([torch.linalg.vector_norm(r.float()) for r in rs])
    w_norms = torch.stack([torch.linalg.vector_norm(p.detach().float()) for p in old])
    trust = torch.where((w_norms > 0) & (r_norms > 0), w_norms / r_norms, torch.ones_like(w_norms))
    beta = cfg.method.coeff_beta
    slot["trust"] = slot["trust"].mul(beta).add_(trust, alpha=1.0 - beta)
    slot["trust_steps"] = slot["trust_steps"] + 1
    return params


def _frozen_trust(cfg: _Config, slot: dict) -> torch.Tensor:
    """The bias-corrected warm-up EMA of each layer's trust ratio (no sync)."""
    steps = slot["trust_steps"]
    return slot["trust"] / (1.0 - cfg.method.coeff_beta ** max(steps, 1))


@torch.no_grad()
def lamb_trust_(
    cfg, slot: dict, *, ms, m_prev, vs, denom, fresh, ps, decayed, wd, t
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """1-bit LAMB's compressed step, per layer ([Note: 1-bit LAMB's fresh variance]):
    the direction ``r`` and the trust ratio, the frozen one times the clipped factor.

    ``ms``: the synced momentum; ``m_prev``: last step's; ``vs``/``denom``: the frozen
    variance and its denominator; ``fresh``: the fresh variance (moved in place; set
    to ``vs`` on the first compressed step); all whole layers, leaf by leaf, so plain
    DP and ZeRO's rows (which pass views of their flat full vectors) compute the same
    bits. Updates ``slot["factor"]``. Returns ``(rs, trust)``, ``trust`` 0-d tensors.
    """
    m, hp = cfg.method, cfg.hp
    b1, b2 = hp["b1"], hp["b2"]
    if t - 1 == slot["v_count"]:  # the first compressed step: start from the frozen one
        torch._foreach_copy_(fresh, vs)
    # The local grads' mean as the synced momentum implies it: m = b1 m_prev + (1 - b1) g.
    gs = torch._foreach_sub(ms, torch._foreach_mul(m_prev, b1))
    torch._foreach_div_(gs, 1.0 - b1)
    torch._foreach_mul_(fresh, b2)
    torch._foreach_addcmul_(fresh, gs, gs, value=1.0 - b2)
    del gs
    # The fresh variance moved on every update (t of them), the frozen one v_count times.
    real = bias_corrected_denom(fresh, b2, hp["eps"], t)
    factor = torch.stack([torch.div(d, r).amax() for d, r in zip(denom, real, strict=True)])
    del real
    rs = torch._foreach_div(ms, denom)
    torch._foreach_div_(rs, 1.0 - b1**t)
    if decayed:
        # Where decay dominates the direction, the variance says less about the step:
        # the factor is pulled to 1 by the share of ||r|| that is Adam's direction.
        pre = torch.stack(norms([rs[j] for j in decayed]))
        for j in decayed:
            rs[j].add_(ps[j].to(rs[j].dtype), alpha=wd)
        post = torch.stack(norms([rs[j] for j in decayed]))
        share = torch.where(post > 0, (pre / post).clamp(max=1.0), torch.ones_like(post))
        at = torch.tensor(decayed, device=factor.device)
        factor[at] = factor[at] * share + (1.0 - share)
    last = slot["factor"]
    factor = factor.clamp(m.factor_min, m.factor_max)
    factor = torch.minimum(
        torch.maximum(factor, last * (1.0 - m.factor_threshold)),
        last * (1.0 + m.factor_threshold),
    )
    slot["factor"] = factor
    return rs, (_frozen_trust(cfg, slot) * factor).unbind()

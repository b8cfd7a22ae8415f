"""``mixed_precision(step, dtype)``: fp32 master weights, bf16/fp16 compute, fp16 loss scaling.

The params the step holds (and returns) stay in their master dtype, fp32. Each
call, ``materialize`` casts them to the compute dtype *inside* differentiation, so
the forward and backward run in bf16/fp16 and the cast's backward hands fp32
grads to the fp32 masters (DeepSpeed's bf16/fp16 engines, FSDP2's
``MixedPrecisionPolicy(param_dtype, reduce_dtype)``). Gradients are reduced across
ranks in ``reduce_dtype`` and returned in the master dtype.

fp16's 5 exponent bits underflow small gradients, so fp16 also gets dynamic loss
scaling ([Note: loss scaling]); bf16 has fp32's range and needs none.

Usage::

    step = fs.train_step(loss_fn, fs.optim.adamw(3e-4))
    step = shard_zero(mixed_precision(step, "bf16"), stage=3)   # mixed_precision goes inside
    params, state = step.init(params)                           # params stay fp32
    params, state, metrics = step(params, state, batch)

    step = mixed_precision(step, "fp16")                        # + dynamic loss scaling
    ...; metrics["loss_scale"], metrics["overflow"], metrics["skipped_steps"]

References: Micikevicius et al., "Mixed Precision Training", ICLR 2018;
Kalamkar et al., "A Study of BFLOAT16 for Deep Learning Training", 2019.

[Note: loss scaling]
The loss is multiplied by ``scale`` before autograd (``ctx.loss_scale``; the
default ``loss_and_grad`` does it and returns the unscaled loss), so small fp16
activation grads stay representable. ``finish_grads`` (after ``reduce_grads``,
before clipping) multiplies the grads by ``1/scale`` -- exact, the scale is a power
of two -- and checks them for inf/nan. Under ``shard_zero`` each rank holds only its
shard of the grads, so an overflow may be visible on one rank alone: the local flag
goes into the step's one non-finite vote over the mesh (``ctx.flag_nonfinite``,
[Note: the non-finite guard] in ``fscale/_guard.py``; it used to be a second
all-reduce, ``"mp.overflow"``), and every rank then takes the same decision (a rank
that updated while another skipped would desynchronise them for good). On overflow
the step skips the optimizer entirely: params and optimizer state are returned
untouched (an LR schedule does not advance either, as in DeepSpeed). The verdict
comes back through ``ctx.on_verdict``, where the scale moves. Overflows above the
floor are expected and do not count towards ``train_step(max_nonfinite_skips=...)``;
at the floor (``min_scale``) lowering the scale cannot help, and they do. The scale
follows DeepSpeed's ``DynamicLossScaler``:

- an overflow with ``hysteresis`` units left spends one; at its last unit it halves
  the scale instead (never below ``min_scale``), and each later overflow halves it
  again until the scale next grows;
- ``growth_interval`` consecutive clean steps double the scale and restore the
  hysteresis.

Skipping is a Python branch, so the verdict is read on the host: one device sync
per step, the step's only one (the guard's read, shared by every precision). That
keeps a skipped step free (no optimizer maths to throw away, no ``torch.where`` over
every param and moment) and is what DeepSpeed and ``torch.amp.GradScaler.step`` do.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from fscale import tree
from fscale.casts import cast_all, cast_each
from fscale.policies import CHANGES_GRADS_AFTER_BACKWARD, PrecisionPolicy
from fscale.step import Step, StepContext, Transform
from fscale.transforms._precision_cast import CastGroups

NAME = "mixed_precision"

_COMPUTE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
_REDUCE_DTYPES = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp64": torch.float64,
}
_HALF = (torch.bfloat16, torch.float16)


@dataclasses.dataclass(frozen=True)
class _Config:
    param_dtype: torch.dtype
    reduce_dtype: torch.dtype
    cast_inputs: bool
    scaling: bool  # fp16: dynamic loss scaling
    init_scale: float
    growth_interval: int
    hysteresis: int
    min_scale: float


def mixed_precision(
    step: Step,
    dtype: str | torch.dtype,
    *,
    reduce_dtype: str | torch.dtype = torch.float32,
    cast_inputs: bool = True,
    init_scale: float = 2.0**16,
    growth_interval: int = 1000,
    hysteresis: int = 2,
    min_scale: float = 1.0,
) -> Step:
    """Keep fp32 master params, compute in ``dtype``, reduce grads in ``reduce_dtype``.

    Apply it before ``shard_zero`` (``shard_zero(mixed_precision(step, "bf16"), 3)``):
    ZeRO-3 then all-gathers the params already cast (half the bytes) and
    reduce-scatters the grads in ``reduce_dtype``.

    Args:
      step: the step to transform.
      dtype: compute dtype: ``"bf16"`` or ``"fp16"`` (or ``torch.bfloat16`` / ``torch.float16``).
      reduce_dtype: dtype of the gradient reduction across ranks (a floating dtype;
        ``"bf16"`` halves the bytes of the reduction at some precision cost). Grads are
        rounded to it in a world of one too, so every world size does the same maths.
      cast_inputs: cast the batch's floating tensors to ``dtype`` before ``loss_fn``
        (FSDP2's ``cast_forward_inputs``); integer tensors (token ids) are left alone.
        Targets are cast too: pass False and cast inside ``loss_fn`` to keep them fp32.
      init_scale: fp16: the initial loss scale (DeepSpeed's ``2 ** initial_scale_power``).
      growth_interval: fp16: clean steps in a row before the scale doubles.
      hysteresis: fp16: overflows tolerated before the scale halves (DeepSpeed's
        ``hysteresis``; 1 halves on every overflow).
      min_scale: fp16: the scale never drops below this.

    Returns:
      A ``Step`` whose metrics also hold, for fp16, ``loss_scale`` (the scale this
      step used), ``overflow`` (bool: the step was skipped) and ``skipped_steps``.
      The returned loss is fp32.
    """
    param_dtype = _compute_dtype(dtype)
    reduce_dtype = _reduce_dtype(reduce_dtype)
    _check_scaling(init_scale, growth_interval, hysteresis, min_scale)
    if not isinstance(cast_inputs, bool):
        raise TypeError(
            f"mixed_precision: cast_inputs must be a bool, got {type(cast_inputs).__name__}."
        )
    cfg = _Config(
        param_dtype,
        reduce_dtype,
        cast_inputs,
        param_dtype == torch.float16,
        float(init_scale),
        growth_interval,
        hysteresis,
        float(min_scale),
    )
    options = {"param_dtype": param_dtype, "reduce_dtype": reduce_dtype}
    if cfg.scaling:
        options.update(
            init_scale=cfg.init_scale,
            growth_interval=growth_interval,
            hysteresis=hysteresis,
            min_scale=cfg.min_scale,
        )
    # Grads change after backward when they are unscaled (fp16) or round-trip through
    # a narrower reduce dtype: a transform acting on grads in backward must know.
    changes = cfg.scaling or reduce_dtype != torch.float32
    record = Transform(
        NAME,
        options=options,
        refuses_inner={
            "shard_zero": "apply mixed_precision first: shard_zero(mixed_precision(step), stage)."
        },
        plan=lambda plan: _plan(cfg, plan),
        capabilities=frozenset({CHANGES_GRADS_AFTER_BACKWARD} if changes else ()),
        scratch=True,
    )
    policy = PrecisionPolicy(param_dtype, reduce_dtype, cfg.scaling)
    inner = step.stages

    # Named (not lambdas) so fs.explain's stage table says what runs.
    def init(s, params):
        return _init(cfg, inner, s, params)

    casts = CastGroups()

    def materialize(ctx, params):
        return _materialize(cfg, inner, casts, ctx, params)

    def loss_and_grad(ctx, params, batch):
        return _loss_and_grad(cfg, inner, ctx, params, batch)

    def reduce_grads(ctx, grads):
        return _reduce_grads(cfg, inner, ctx, grads)

    def finish_grads(ctx, grads):
        return _unscale_and_check(cfg, inner, ctx, grads)

    def update(ctx, grads, params):
        return _update(cfg, inner, ctx, grads, params)

    stages = dict(
        init=init, materialize=materialize, loss_and_grad=loss_and_grad, reduce_grads=reduce_grads
    )
    if cfg.scaling:
        stages.update(finish_grads=finish_grads, update=update)
    return step.with_transform(record, policy=policy, **stages)


# ----------------------------------------------------------------------------- arguments


def _compute_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype) and dtype in _HALF:
        return dtype
    if isinstance(dtype, str) and dtype in _COMPUTE_DTYPES:
        return _COMPUTE_DTYPES[dtype]
    raise ValueError(
        f"mixed_precision: unknown compute dtype {dtype!r}; use one of 'bf16', 'fp16' "
        "(or torch.bfloat16, torch.float16). For fp32 compute, leave mixed_precision out."
    )


def _reduce_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, str) and dtype in _REDUCE_DTYPES:
        return _REDUCE_DTYPES[dtype]
    if isinstance(dtype, torch.dtype) and dtype in _REDUCE_DTYPES.values():
        return dtype
    raise ValueError(
        f"mixed_precision: reduce_dtype must be a floating dtype among torch.float32, "
        f"torch.bfloat16, torch.float16, torch.float64 (or 'fp32', 'bf16', 'fp16', 'fp64'), "
        f"got {dtype!r}."
    )


def _check_scaling(init_scale, growth_interval, hysteresis, min_scale) -> None:
    def number(name, value):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"mixed_precision: {name} must be a number, got {value!r}.")
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"mixed_precision: {name} must be finite and > 0, got {value!r}.")

    def count(name, value, what):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(
                f"mixed_precision: {name} must be an int >= 1 ({what}), got {value!r}."
            )

    number("init_scale", init_scale)
    number("min_scale", min_scale)
    if init_scale < min_scale:
        raise ValueError(
            f"mixed_precision: init_scale={init_scale!r} is below min_scale={min_scale!r}; "
            "raise init_scale or lower min_scale."
        )
    count("growth_interval", growth_interval, "clean steps before the loss scale doubles")
    count("hysteresis", hysteresis, "1 halves the loss scale on every overflow")


# ----------------------------------------------------------------------------- stages


def _init(cfg: _Config, inner, step: Step, params):
    for path, t in zip(tree.paths(params), tree.leaves(params), strict=True):
        if t is not None and t.dtype in _HALF:
            raise ValueError(
                f"mixed_precision keeps fp32 master weights, but param {path!r} is {t.dtype}. "
                "Pass fp32 params (e.g. fs.functional(model.float())); the cast to "
                f"{cfg.param_dtype} happens inside the step."
            )
    params, state = inner.init(step, params)
    if cfg.scaling:
        device = next(t.device for t in tree.leaves(params) if t is not None)
        state[NAME] = {
            "scale": torch.tensor(cfg.init_scale, dtype=torch.float32, device=device),
            "clean_steps": 0,  # consecutive steps without overflow since the last change
            "hysteresis": cfg.hysteresis,  # overflows left before the next halving
            "skipped_steps": 0,
        }
    return params, state


def _materialize(cfg: _Config, inner, casts: CastGroups, ctx: StepContext, params):
    # Runs under autograd: the cast's backward returns fp32 grads to the fp32 masters,
    # a launch per unit each way ([Note: cast groups] in _precision_cast.py).
    # Under shard_zero(3) this stage does not run: ZeRO-3 reads the PrecisionPolicy
    # and casts the shards before its all-gather (half the bytes), not after.
    return casts(ctx, inner.materialize(ctx, params), cfg.param_dtype)


def _loss_and_grad(cfg: _Config, inner, ctx: StepContext, params, batch):
    if cfg.cast_inputs:
        batch = tree.map(lambda t: _cast(t, cfg.param_dtype), batch)
    if cfg.scaling:
        ctx.loss_scale = ctx.state[NAME]["scale"]
    loss, grads = inner.loss_and_grad(ctx, params, batch)
    return (loss.float() if loss.dtype in _HALF else loss), grads


def _reduce_grads(cfg: _Config, inner, ctx: StepContext, grads):
    leaves, spec = tree.flatten(grads)
    masters = [None if g is None else g.dtype for g in leaves]
    if all(d in (None, cfg.reduce_dtype) for d in masters):
        return inner.reduce_grads(ctx, grads)
    # Multi-tensor casts ([Note: cast groups] in _precision_cast.py), both ways.
    cast = tree.unflatten(spec, cast_all(leaves, cfg.reduce_dtype))
    del leaves, grads  # the master-dtype grads can go once cast
    reduced = tree.leaves(inner.reduce_grads(ctx, cast))
    return tree.unflatten(spec, cast_each(reduced, masters))


def _cast(t, dtype: torch.dtype):
    if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != dtype:
        return t.to(dtype)
    return t


# ----------------------------------------------------------------------------- loss scaling


@torch.no_grad()
def _unscale_and_check(cfg: _Config, inner, ctx: StepContext, grads):
    """Grads / scale in place, and the overflow flag all ranks agree on ([Note: loss scaling])."""
    scale = ctx.state[NAME]["scale"]
    inv = scale.reciprocal()
    live = [g for g in tree.leaves(grads) if g is not None]
    found = torch.zeros((), dtype=torch.float32, device=scale.device)
    for g in live:
        g.mul_(inv.to(g.device))
        found = torch.maximum(found, (~torch.isfinite(g)).any().to(found.device, found.dtype))
    # Sharded grads (shard_zero) differ per rank: one rank may see the inf alone; the
    # step's non-finite vote over its mesh decides for every rank ([Note: loss scaling]).
    ctx.flag_nonfinite(found)
    ctx.on_verdict.append(lambda overflow: _move_scale(cfg, ctx, overflow))
    ctx.scratch(NAME)["checked"] = True
    return inner.finish_grads(ctx, grads)


def _update(cfg: _Config, inner, ctx: StepContext, grads, params):
    if not ctx.scratch(NAME).pop("checked", False):
        raise RuntimeError(
            "mixed_precision(fp16): update ran without its finish_grads stage, so the grads "
            "were neither unscaled nor checked; a transform applied over mixed_precision must "
            "call the finish_grads stage it replaces."
        )
    return inner.update(ctx, grads, params)


def _move_scale(cfg: _Config, ctx: StepContext, overflow: bool) -> bool:
    """The loss scale after the step's verdict; True when an overflow is expected (the
    scale used was above its floor, so a lower one may pass)."""
    slot = dict(ctx.state[NAME])
    ctx.metrics["loss_scale"] = slot["scale"]
    expected = False
    if overflow:
        # The host already waited for the verdict: reading the scale costs no sync.
        expected = float(slot["scale"]) > cfg.min_scale
        slot["skipped_steps"] += 1
        slot["clean_steps"] = 0
        if slot["hysteresis"] > 1:
            slot["hysteresis"] -= 1
        else:
            slot["scale"] = torch.clamp(slot["scale"] * 0.5, min=cfg.min_scale)
    else:
        slot["clean_steps"] += 1
        if slot["clean_steps"] >= cfg.growth_interval:
            slot["scale"] = slot["scale"] * 2.0
            slot["clean_steps"] = 0
            slot["hysteresis"] = cfg.hysteresis
    ctx.state[NAME] = slot
    ctx.metrics["overflow"] = overflow
    return expected


# ----------------------------------------------------------------------------- plan


def _plan(cfg: _Config, plan) -> None:

    name = _short(cfg.param_dtype)
    size = torch.empty((), dtype=cfg.param_dtype).element_size()
    plan.notes.append(
        f"mixed_precision: fp32 master weights, compute in {name} (materialize's {name} "
        f"copy of the params, {plan.param_count * size:,} bytes, lives through forward and "
        f"backward); grads reduced in {_short(cfg.reduce_dtype)}."
    )
    master = plan.param_bytes // max(plan.param_count, 1)
    reduce_size = torch.empty((), dtype=cfg.reduce_dtype).element_size()
    if master and reduce_size != master:
        for c in plan.collectives:
            if c.stage == "reduce_grads":
                c.bytes = c.bytes * reduce_size // master
    if cfg.scaling:
        plan.notes.append(
            "mixed_precision(fp16): dynamic loss scaling; an overflow skips the step (the "
            "step's non-finite vote, one host read per step)."
        )


def _short(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}.get(
        dtype, str(dtype)
    )

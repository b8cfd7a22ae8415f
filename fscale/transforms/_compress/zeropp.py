"""``zeropp(qwz=True, hpz=None, qgz=True)``: ZeRO++ as a ``compress_comm`` method.

ZeRO++ (Wang et al., "ZeRO++: Extremely Efficient Collective Communication for
Giant Model Training", 2023) cuts ZeRO-3's traffic three ways; here each is a swap
of one of ``shard_zero(3)``'s tagged collectives for this step only:

- qwZ: the param all-gather (``"zero.params"``, forward and backward re-gathers)
  moves int8 codes with one scale per block: half of bf16's bytes, plus the scales.
- qgZ: the grad reduce-scatter (``"zero.grads"``) becomes an int4 all_to_all
  (a quarter of bf16's bytes, plus the scales), summed in fp32 by each chunk's
  owner; under HSDP the replicas' all-reduce is quantized too (hierarchical:
  intra-node, then inter-node). Optional error feedback.
- hpZ: after each forward gather a rank keeps 1/k of the unit, so the backward
  re-gather runs inside its group of k ranks (tag ``"zero.params.hpz"``): the
  secondary partition of ``zeropp_hpz.py``, reached through ZeRO-3's param source.

The wire formats are in ``zeropp_comm.py``, the kernels in ``fscale/kernels/blockq.py``.

Usage::

    step = fs.shard_zero(fs.mixed_precision(step, "bf16"), 3)
    step = fs.compress_comm(step, fs.zeropp(qwz=True, hpz=2, qgz=True))
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import partial

import torch

from fscale.hw import comm
from fscale.kernels import blockq
from fscale.policies import ParamSourcePolicy, PrecisionPolicy, ZeroPolicy
from fscale.step import Step, Transform
from fscale.transforms._compress.zeropp_comm import (
    ErrorBuffers,
    WireFormat,
    quantized_all_gather,
    quantized_reduce,
)
from fscale.transforms._compress.zeropp_hpz import HpzChannel, HpzSource, hpz_all_gather
from fscale.transforms._compress.zeropp_plan import plan_zeropp

NAME = "zeropp"


@dataclass(frozen=True)
class ZeroPP:
    """The ZeRO++ method; build it with ``zeropp(...)`` and pass it to ``compress_comm``."""

    qwz: bool = True
    hpz: int | None = None
    qgz: bool = True
    block: int = 256
    grad_block: int = 256
    scale_dtype: torch.dtype = torch.float32
    error_feedback: bool = False
    name: str = NAME

    def apply(self, step: Step) -> Step:
        zero = step.policy(ZeroPolicy)
        if zero is None or zero.stage != 3:
            got = "no shard_zero" if zero is None else f"shard_zero stage {zero.stage}"
            raise ValueError(
                f"zeropp compresses ZeRO-3's param all-gathers and grad reduce-scatters, but "
                f"the step has {got}; apply it over stage 3: "
                "fs.compress_comm(fs.shard_zero(step, 3), fs.zeropp())."
            )
        dims, size = step.mesh.dims, step.mesh.size()
        world = step.mesh.size(zero.shard_dim)
        lowerings, policy = {}, None
        gather = _default_gather
        if self.qwz:
            gather = partial(quantized_all_gather, WireFormat(8, self.block, self.scale_dtype))
            lowerings["zero.params"] = gather
        if self.hpz is not None:
            channel = _hpz_channel(step, zero, self.hpz)
            policy = ParamSourcePolicy(HpzSource, (("channel", channel),))
            lowerings["zero.params"] = partial(hpz_all_gather, channel, gather)
        if self.qgz:
            fmt = WireFormat(4, self.grad_block, self.scale_dtype, self.error_feedback, dims, size)
            lowerings["zero.grads"] = partial(quantized_reduce, fmt)
        record = Transform(
            NAME,
            options={
                k: v
                for k, v in dataclasses.asdict(self).items()
                if k not in ("name", "scale_dtype") and (k != "hpz" or v is not None)
            },
            requires=("shard_zero",),
            plan=partial(plan_zeropp, self, step.policy(PrecisionPolicy), world, size // world),
        )
        inner = step.stages
        errors = ErrorBuffers(self.qgz and self.error_feedback, dims, size)
        stages = {"init": partial(_init, inner, policy, errors)}
        if self.qgz and self.error_feedback:
            stages["loss_and_grad"] = partial(_loss_and_grad, inner)
        return step.with_transform(record, policy=policy, lowerings=lowerings, **stages)


def zeropp(
    qwz: bool = True,
    hpz: int | None = None,
    qgz: bool = True,
    *,
    block: int = 256,
    grad_block: int | None = None,
    scale_dtype: torch.dtype = torch.float32,
    error_feedback: bool = False,
) -> ZeroPP:
    """ZeRO++ for ``compress_comm`` over ``shard_zero(step, 3)``.

    Args:
      qwz: int8 block-quantized param all-gathers (forward and backward).
      hpz: group size k of hpZ's secondary partition (e.g. GPUs per node): backward
        re-gathers stay inside groups of k consecutive ranks. It must divide the
        world, and ZeRO-3 must shard over the whole world (not HSDP). None: off.
      qgz: int4 block-quantized gradient reduce-scatter by all_to_all (and, under
        HSDP, a quantized all-reduce over the replicas).
      block: elements per scale for qwZ (a power of two >= 16).
      grad_block: elements per scale for qgZ (default ``block``).
      scale_dtype: ``torch.float32`` or ``torch.float16`` scales.
      error_feedback: qgZ keeps what quantization dropped and adds it back next step.

    Returns:
      A method: ``fs.compress_comm(step, fs.zeropp())``.

    References:
      Wang et al., "ZeRO++: Extremely Efficient Collective Communication for Giant
      Model Training", 2023.
    """
    grad_block = block if grad_block is None else grad_block
    if hpz is not None and (isinstance(hpz, bool) or not isinstance(hpz, int) or hpz < 1):
        raise ValueError(f"zeropp(hpz={hpz!r}): hpz is a group size, an int >= 1 (or None).")
    for name, value in (("block", block), ("grad_block", grad_block)):
        try:
            blockq.check(8, value, scale_dtype)
        except ValueError as e:
            raise ValueError(f"zeropp({name}={value!r}): {e}") from None
    if not (qwz or qgz or hpz):
        raise ValueError(
            "zeropp(qwz=False, hpz=None, qgz=False) compresses nothing; enable qwz or qgz "
            "(or drop compress_comm)."
        )
    if error_feedback and not qgz:
        raise ValueError("zeropp(error_feedback=True) applies to qgZ; pass qgz=True too.")
    return ZeroPP(bool(qwz), hpz, bool(qgz), block, grad_block, scale_dtype, bool(error_feedback))


def _hpz_channel(step: Step, zero: ZeroPolicy, hpz) -> HpzChannel:
    """Check hpZ's group size against the mesh and make the k-rank groups (collective)."""
    world = step.mesh.size(zero.shard_dim)
    if world % hpz:
        raise ValueError(
            f"zeropp(hpz={hpz}): the group size must divide the {world} ranks of the shard "
            f"dim {zero.shard_dim!r}; pick a divisor of {world} (e.g. the GPUs per node)."
        )
    if step.mesh.size() != world or comm.world_size() != world:
        raise ValueError(
            f"zeropp(hpz={hpz}) needs ZeRO-3 sharded over the whole world (a 1-D mesh); "
            f"this mesh is {dict(zip(step.mesh.dims, step.mesh.sizes, strict=True))}. Under "
            "HSDP the gathers already stay in the shard group: drop hpz."
        )
    if step.policy(ParamSourcePolicy) is not None:
        raise ValueError(
            f"zeropp(hpz={hpz}) keeps its secondary partition in ZeRO-3's param source, "
            "which another transform (offload of params) already replaced; drop hpz or "
            "offload only the optimizer."
        )
    rank = comm.rank()
    if comm.rank(step.mesh.group(zero.shard_dim)) != rank:
        raise ValueError(
            f"zeropp(hpz={hpz}): the shard dim's ranks are not in global rank order; build "
            "the mesh with init_device_mesh over range(world)."
        )
    # Every rank makes every group, in the same order (comm.new_group is collective).
    groups = [comm.new_group(range(g * hpz, (g + 1) * hpz)) for g in range(world // hpz)]
    return HpzChannel(hpz, groups[rank // hpz], rank % hpz)


def _default_gather(call, t, **kw):
    return call.default(t, **kw)


# ----------------------------------------------------------------------------- stages


def _init(inner, policy, errors, step: Step, params):
    if policy is not None and step.policy(ParamSourcePolicy) is not policy:
        raise ValueError(
            "zeropp(hpz=...) keeps its secondary partition in ZeRO-3's param source, but "
            "a transform applied after it (offload(..., what=('optimizer', 'params'))) "
            "replaced the source; drop hpz or offload only the optimizer."
        )
    params, state = inner.init(step, params)
    # The lowerings' slot: error-feedback buffers by exchange order, made at the first
    # exchange or by fs.load ([Note: qgZ error feedback] in zeropp_comm.py); empty
    # without error feedback, which the plain flag tells a later load.
    state[NAME] = {
        "cursor": 0,
        "error": dataclasses.replace(errors, buffers={}),
        "exchanges": 0,
        "error_feedback": errors.enabled,
    }
    return params, state


def _loss_and_grad(inner, ctx, params, batch):
    ctx.state[NAME] = {**ctx.state[NAME], "cursor": 0}  # exchanges count from 0 per pass
    return inner.loss_and_grad(ctx, params, batch)

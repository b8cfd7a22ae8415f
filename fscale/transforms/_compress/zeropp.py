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
- hpZ (a secondary param partition inside groups of k ranks) is refused at build
  time: see [Note: what hpZ needs from ZeRO-3].

The wire formats are in ``zeropp_comm.py``, the kernels in ``fscale/kernels/blockq.py``.

Usage::

    step = fs.shard_zero(fs.mixed_precision(step, "bf16"), 3)
    step = fs.compress_comm(step, fs.zeropp(qwz=True, qgz=True))

[Note: what hpZ needs from ZeRO-3]
hpZ keeps, after each forward gather, this rank's 1/k slice of the gathered unit
and serves the unit's backward re-gather from the k ranks of its group. The
lowering of ``"zero.params"`` gets only the local shard and the group: it cannot
tell which unit it gathers (units of a transformer have equal sizes) nor reuse a
forward result in backward. ZeRO-3 would need to expose, through the protocol,
the unit key and phase of each gather -- e.g. ``Call.meta = {"unit": key,
"phase": "forward" | "backward" | "recompute"}`` passed by ``ctx.comm.all_gather
(..., meta=...)`` -- and a point where the gathered buffer may be kept (the
``ParamSource.release(key, gathered)`` hook has it, but a source cannot change the
group of the next gather). With those, hpZ is a lowering plus a small cache freed
at ``ParamSource.finish``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import partial

import torch

from fscale.kernels import blockq
from fscale.policies import ZeroPolicy
from fscale.step import Step, Transform
from fscale.transforms._compress.zeropp_comm import (
    WireFormat,
    quantized_all_gather,
    quantized_reduce,
)

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
        world = step.mesh.size(zero.shard_dim)
        if self.hpz is not None:
            _check_hpz(self.hpz, world, zero.shard_dim)
            raise NotImplementedError(
                f"zeropp(hpz={self.hpz}): hpZ needs ZeRO-3 to tell a param gather's unit "
                "and phase (forward / backward re-gather) to its lowering, which the "
                "tagged-collective protocol does not carry yet ([Note: what hpZ needs from "
                "ZeRO-3] in fscale/transforms/_compress/zeropp.py). Use zeropp(hpz=None) "
                "(qwZ and qgZ), or HSDP (shard_zero on a ('replicate', 'shard') mesh) to "
                "keep gathers inside a group."
            )
        dims, size = step.mesh.dims, step.mesh.size()
        lowerings = {}
        if self.qwz:
            fmt = WireFormat(8, self.block, self.scale_dtype)
            lowerings["zero.params"] = partial(quantized_all_gather, fmt)
        if self.qgz:
            fmt = WireFormat(4, self.grad_block, self.scale_dtype, self.error_feedback, dims, size)
            lowerings["zero.grads"] = partial(quantized_reduce, fmt)
        record = Transform(
            NAME,
            options={
                k: v
                for k, v in dataclasses.asdict(self).items()
                if k not in ("name", "hpz", "scale_dtype")
            },
            requires=("shard_zero",),
        )
        inner = step.stages
        stages = {"init": partial(_init, inner)}
        if self.qgz and self.error_feedback:
            stages["loss_and_grad"] = partial(_loss_and_grad, inner)
        return step.with_transform(record, lowerings=lowerings, **stages)


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
      hpz: group size k of hpZ's secondary partition: refused for now (validated,
        then NotImplementedError; see the module's Note). None: off.
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


def _check_hpz(hpz, world: int, dim: str) -> None:
    if isinstance(hpz, bool) or not isinstance(hpz, int) or hpz < 1:
        raise ValueError(f"zeropp(hpz={hpz!r}): hpz is a group size, an int >= 1 (or None).")
    if world % hpz:
        raise ValueError(
            f"zeropp(hpz={hpz}): the group size must divide the {world} ranks of the shard "
            f"dim {dim!r}; pick a divisor of {world} (e.g. the GPUs per node)."
        )


# ----------------------------------------------------------------------------- stages


def _init(inner, step: Step, params):
    params, state = inner.init(step, params)
    # The lowerings' slot: error-feedback buffers by exchange order ([Note: qgZ error
    # feedback] in zeropp_comm.py); empty without error feedback.
    state[NAME] = {"cursor": 0, "error": {}}
    return params, state


def _loss_and_grad(inner, ctx, params, batch):
    ctx.state[NAME] = {**ctx.state[NAME], "cursor": 0}  # exchanges count from 0 per pass
    return inner.loss_and_grad(ctx, params, batch)

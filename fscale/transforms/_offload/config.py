"""The configuration of ``offload`` and the predicates on it (what a stack allows)."""

from __future__ import annotations

import dataclasses

import torch

from fscale.policies import CHANGES_GRADS_AFTER_BACKWARD
from fscale.step import Step

# Rates fs.explain uses for transfer times: PCIe Gen5 x16 host<->device as measured
# with pinned memory on H100/H200 hosts, and one local NVMe drive with O_DIRECT.
H2D_BYTES_PER_S = 55e9
DISK_BYTES_PER_S = 1.5e9


@dataclasses.dataclass(frozen=True)
class OffloadConfig:
    tier: str
    what: tuple[str, ...]
    path: str | None
    buffer_bytes: int
    subgroup_bytes: int
    overlap: bool
    delayed_update: bool
    direct: bool | None
    compute_dtype: torch.dtype | None = None  # mixed_precision's param dtype
    stream: bool = False  # grads streamed in backward where the stack allows it
    sharded: bool = False  # over shard_zero (else the world must be one to stream)


def can_stream(cfg: OffloadConfig, step: Step) -> bool:
    """Whether nothing between backward and the update changes the grads, so that they
    can go to the host as backward makes them ([Note: streaming grads in backward] in
    ``stream.py``)."""
    if cfg.tier != "cpu" or cfg.delayed_update or "params" in cfg.what or not cfg.overlap:
        return False  # DPU streams during the next step; param shards live on the host
    if step.clip_norm is not None:
        return False  # the clip coefficient needs every grad first
    # fp16 unscaling, a reduce-dtype round trip, ZeRO-1/2's reduction after backward...
    return not step.has(CHANGES_GRADS_AFTER_BACKWARD)


def shares_masters(cfg: OffloadConfig) -> bool:
    """Whether the params' host shards double as the fp32 masters ([Note: shared masters]
    in ``_offload/init.py``)."""
    return cfg.tier == "cpu" and "params" in cfg.what and not cfg.delayed_update

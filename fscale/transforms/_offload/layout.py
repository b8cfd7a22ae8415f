"""Sub-groups and where each of their tensors lives inside one host buffer (or swap file).

A sub-group is a run of param leaves of at most ``subgroup_bytes`` of fp32 masters
([Note: swap pipeline] in ``update.py``). Its masters and optimizer state are laid
out back to back in one buffer (``Group.persisted`` bytes, 4096-aligned: for
``tier="nvme"`` exactly the swap file), each tensor 64-byte aligned; the grads get
a region of their own (``Group.grads``). A ``Slot`` is one tensor's place in that
buffer, so the same offsets address the host buffer and the file.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from fscale import tree
from fscale.io import swap

SEGMENT_ALIGN = 64  # tensors inside a buffer start 64-byte aligned (vector loads)


@dataclasses.dataclass(frozen=True)
class Slot:
    """Where one tensor lives in a sub-group's buffer (and, on NVMe, its file)."""

    offset: int
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def view(self, buf: torch.Tensor) -> torch.Tensor:
        raw = buf[self.offset : self.offset + self.nbytes]
        return raw.view(self.dtype).view(self.shape)


class Layout:
    """Packs tensors one after the other, each ``SEGMENT_ALIGN``-aligned."""

    def __init__(self):
        self.size = 0

    def add(self, shape, dtype) -> Slot:
        slot = Slot(self.size, tuple(shape), dtype)
        self.size = swap.align_up(self.size + slot.nbytes, SEGMENT_ALIGN)
        return slot


@dataclasses.dataclass
class Group:
    key: str
    leaves: list[int]  # positions in the flattened params
    master: list[Slot]
    grads: list[Slot]  # offsets in the group's grad region (see OffloadState.grad_region)
    state_spec: Any = None
    state_leaves: list = dataclasses.field(default_factory=list)  # Slot or a Python value
    # For each state leaf, the param position its tensor belongs to (Adam's moments of
    # leaf i), or None (a value or a tensor shared by the group's leaves).
    owners: list = dataclasses.field(default_factory=list)
    persisted: int = 0  # bytes of master + state, 4096-aligned: the swap file
    grad_bytes: int = 0  # the grads, 4096-aligned
    # The masters are the params' host shards ([Note: shared masters] in init.py).
    shared_master: bool = False
    updates: int = 0  # optimizer steps this group has taken

    @property
    def total(self) -> int:
        """An NVMe pool buffer: master + state, then the grads."""
        return self.persisted + self.grad_bytes


def group_leaves(leaves: list, limit: int) -> list[list[int]]:
    """Runs of consecutive non-None leaves of at most ``limit`` fp32 bytes (a larger leaf
    is a group of its own)."""
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


def master_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)  # fp32 masters; fp64 stays fp64


def sub(spec, leaves: list, idx: list[int]):
    """The params tree with only positions ``idx`` kept (the others ``None``)."""
    keep = set(idx)
    return tree.unflatten(spec, [x if i in keep else None for i, x in enumerate(leaves)])


def scatter(n: int, idx: list[int], values: list) -> list:
    """``n`` leaves, ``values`` at positions ``idx`` and ``None`` elsewhere."""
    out: list = [None] * n
    for i, v in zip(idx, values, strict=True):
        out[i] = v
    return out


def state_owners(state_paths: list[str], state_leaves: list, param_paths: list[str], g) -> list:
    """For each leaf of group ``g``'s optimizer state, the param position it belongs to.

    The optimizer state holds params-shaped trees (Adam's two moments), so a moment's
    path ends with its param's path (``"exp_avg.blocks.0.w"``); the longest such
    param of the group, with the master's shape, owns it. Anything else (a count, a
    tensor of another shape) has no owner: None.
    """
    mine = {param_paths[i]: (i, slot.shape) for i, slot in zip(g.leaves, g.master, strict=True)}
    owners: list = []
    for path, leaf in zip(state_paths, state_leaves, strict=True):
        owner = None
        if isinstance(leaf, torch.Tensor):
            parts = path.split(".")
            for k in range(len(parts)):  # longest suffix first
                hit = mine.get(".".join(parts[k:]))
                if hit is not None:
                    owner = hit[0] if tuple(leaf.shape) == hit[1] else None
                    break
        owners.append(owner)
    return owners

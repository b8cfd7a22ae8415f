"""Norms of leaves that are shards: what an optimizer needs from the transform that
sharded the leaves it sees.

An elementwise optimizer (SGD, Adam, Lion) is right on any shard. LAMB's per-leaf
trust ratio and ``clip_by_global_norm`` are not: each needs a norm over the whole
leaf (or every leaf). The step and the sharding transforms say which leaves are
split over which process groups (``sharded_as``); the optimizers take their norms
with ``leaf_norms`` / ``total_norm``, which sum the shards' squares over those groups.

Usage (inside an optimizer's update; ``idx`` are the leaves' positions in the tree)::

    w_norms = leaf_norms(params_at_idx, idx)
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from fscale.optim._leaves import norms

# [Note: norms of sharded leaves]
# The optimizer protocol has no context argument, so the layout of the leaves travels
# by a context variable, as the skip flag does ([Note: skipping on the device]):
# ``positions`` maps a leaf's position in the flattened params tree to the process
# groups its shards span (a leaf split over two mesh dims spans two groups: the sum
# over their product is the sum over one, then the other). Leaves absent from the map
# are whole on every rank (replicas count once). The sums are one all-reduce per
# distinct group tuple, in a fixed order, so every rank issues the same collectives;
# the positions must be those of the full tree on every rank (fscale's sharded
# transforms give every rank every leaf, padded where its shard is empty).
# ``reduce`` is None where no collective may run (offload's host update runs in a
# worker thread, a group of leaves at a time): a norm that needs one raises there, as
# a norm over all leaves does wherever ``whole_tree`` is False.


@dataclass(frozen=True)
class LeafShards:
    """Which leaves are split over which groups, and how to sum over a group."""

    positions: Mapping[int, tuple] = field(default_factory=dict)
    reduce: Callable[[torch.Tensor, object], None] | None = None  # in-place sum over a group
    whole_tree: bool = True  # False: the optimizer sees some of the leaves at a time
    where: str = "the step"  # who laid the leaves out, for errors


_SHARDS: contextvars.ContextVar[LeafShards | None] = contextvars.ContextVar(
    "fscale_leaf_shards", default=None
)


@contextlib.contextmanager
def sharded_as(shards: LeafShards | None) -> Iterator[None]:
    """Optimizer norms inside sum over the shards ``shards`` describes (None: all whole)."""
    token = _SHARDS.set(shards)
    try:
        yield
    finally:
        _SHARDS.reset(token)


def current() -> LeafShards | None:
    """The ``LeafShards`` of the enclosing ``sharded_as`` block, or None."""
    return _SHARDS.get()


def _squares(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Per-tensor sums of squares, fp32 at least (float64 kept), as 0-d tensors."""
    out = []
    for t in tensors:
        wide = torch.promote_types(t.dtype, torch.float32)
        out.append(torch.linalg.vector_norm(t, dtype=wide).square())
    return out


def _summed_over_shards(squares: list[torch.Tensor], positions: Sequence[int], owner: str):
    """``squares`` with each one summed over the groups its leaf spans."""
    shards = current()
    if shards is None or not squares:
        return squares
    by_groups: dict[tuple, list[int]] = {}
    for k, pos in enumerate(positions):
        groups = tuple(shards.positions.get(pos, ()))
        if groups:
            by_groups.setdefault(groups, []).append(k)
    if by_groups and shards.reduce is None:
        raise RuntimeError(
            f"{owner} takes a norm over leaves that {shards.where} split across ranks, "
            f"but {shards.where} runs the optimizer where no collective can run. Use an "
            "elementwise optimizer there (adamw, sgd, lion), or clip with "
            "train_step(clip_norm=...), which is computed over the shards."
        )
    out = list(squares)
    for groups, ks in by_groups.items():  # dict order: the same on every rank
        first = squares[ks[0]]
        stacked = torch.stack([squares[k].to(first.device, first.dtype) for k in ks])
        for group in groups:
            shards.reduce(stacked, group)
        for k, total in zip(ks, stacked.unbind(), strict=True):
            out[k] = total.to(squares[k].device)
    return out


def any_split(positions: Sequence[int]) -> bool:
    """Whether some leaf at ``positions`` is split across ranks here."""
    shards = current()
    return shards is not None and any(shards.positions.get(p) for p in positions)


def leaf_norms(tensors: Sequence[torch.Tensor], positions: Sequence[int], *, owner="an optimizer"):
    """The 2-norm of each whole leaf (0-d tensors, fp32 for half-precision inputs);
    ``tensors[k]`` is this rank's shard of the leaf at tree position ``positions[k]``."""
    if len(tensors) != len(positions):
        raise ValueError(f"leaf_norms: {len(tensors)} tensors but {len(positions)} positions.")
    if not any_split(positions):
        return norms(list(tensors))  # every leaf whole here: the local norms, bit for bit
    return [s.sqrt() for s in _summed_over_shards(_squares(tensors), positions, owner)]


def is_whole_tree() -> bool:
    """False where the optimizer sees some of the leaves at a time (offload's groups)."""
    shards = current()
    return shards is None or shards.whole_tree


def refuse_total_norm(owner: str) -> None:
    """Raise where no call of the optimizer sees every leaf."""
    shards = current()
    if shards is not None and not shards.whole_tree:
        raise RuntimeError(
            f"{owner} takes a norm over every leaf, but {shards.where} runs the optimizer "
            "on a group of leaves at a time, so no call sees them all. Clip with "
            "train_step(clip_norm=...) instead: the step clips the reduced grads before "
            "the update."
        )


def total_norm(tensors: Sequence[torch.Tensor], positions: Sequence[int], *, owner="an optimizer"):
    """The 2-norm of all the leaves together, summed over their shards (0-d fp32-or-wider
    tensor on the first one's device); refused where the optimizer sees some leaves at a
    time."""
    refuse_total_norm(owner)
    if not tensors:
        return torch.zeros((), dtype=torch.float32)
    squares = _summed_over_shards(_squares(tensors), positions, owner)
    first = squares[0]
    return torch.stack([s.to(first.device, first.dtype) for s in squares]).sum().sqrt()


def for_groups_of_leaves(split: Iterable[int], where: str) -> LeafShards:
    """What an optimizer run a group of leaves at a time, off the main thread, may do:
    per-leaf norms of the leaves not in ``split`` (positions split across ranks)."""
    # No collective runs there (reduce is None), so the groups are never used.
    positions = {i: ("elsewhere",) for i in split}
    return LeafShards(positions, reduce=None, whole_tree=False, where=where)

"""The state protocol for offloaded state: what ``fscale.state.describe`` sees of it.

[Note: describing offloaded state]
An offloaded step has two slots, each described once (``fscale/state.py``):

- ``state["optimizer"]`` (``OptimizerSlot``) is the inner optimizer's state tree,
  with the paths it has without offload (``optimizer/exp_avg/<param>``,
  ``optimizer/count``), so a checkpoint does not depend on the tier or on how the
  leaves were cut into sub-groups. Each sub-group holds the state of its own
  leaves (the others are ``None`` in its tree), so the trees are merged leaf by
  leaf: a tensor comes from the one group that holds it, a Python value (the step
  count) is given once when every group agrees (after an interrupted update they
  may not: then one value per group key).
- ``state["offload"]`` (``OffloadState``) is the fp32 masters by param path plus
  plain metadata: tier, what, delayed_update, and per group key its params, its
  update count and (NVMe) its file.

Tensors are ``TensorEntry`` for ``tier="cpu"`` -- views of the group's host buffer
(or, with [Note: shared masters] in ``init.py``, the params' host shards) -- and
``StoredTensor`` for ``tier="nvme"``: a swap file is the group's buffer as it is,
raw bytes with no header (the CRCs stay in memory, ``fscale/io/swap.py``), so a
tensor is ``slot.nbytes`` bytes at its slot's offset. Each write replaces the
file whole and every update ends with its writes flushed, so between steps the
files hold the state. A master or moment has the placement of its param, read
from the param tensors the optimizer was last given (shard_zero places them after
init); a tensor that belongs to no single param is whole and replicated.

Describing waits for a delayed update in flight (the values are then those of the
update the next step applies); the thread pools, engine and streams are never
part of the description.
"""

from __future__ import annotations

from typing import Any

from fscale import tree
from fscale.placement import Placement
from fscale.state import StoredTensor, TensorEntry
from fscale.transforms._offload.layout import Slot


def optimizer_slot(handle) -> Any:
    """The inner optimizer's state tree, merged over sub-groups (see the note)."""
    _check_open(handle)
    handle.wait()
    groups = handle.groups
    if not groups:
        return {}
    if any(g.state_spec != groups[0].state_spec for g in groups):
        # An optimizer whose state layout depends on the leaves it is given: per group.
        return {g.key: _group_state(handle, k) for k, g in enumerate(groups)}
    merged = []
    for pos in range(len(groups[0].state_leaves)):
        found = {}
        for k, g in enumerate(groups):
            value = g.state_leaves[pos]
            if value is not None:
                found[g.key] = _entry(handle, k, value, g.owners[pos])
        merged.append(_merge(found))
    return tree.unflatten(groups[0].state_spec, merged)


def optimizer_count(handle) -> int:
    """The inner optimizer's step count, from the first sub-group's plain leaves (the
    sub-groups step together; ``optimizer_slot`` would describe every moment)."""
    _check_open(handle)
    handle.wait()
    if not handle.groups:
        return 0
    g = handle.groups[0]
    count = getattr(tree.unflatten(g.state_spec, g.state_leaves), "count", None)
    if isinstance(count, int):
        return count
    return getattr(optimizer_slot(handle), "count", None)  # step_count refuses a non-int


def offload_slot(handle) -> dict:
    """The masters by param path, and the plain metadata of the sub-groups."""
    _check_open(handle)
    handle.wait()
    cfg = handle.cfg
    groups, master = {}, {}
    for k, g in enumerate(handle.groups):
        paths = [handle.param_paths[i] for i in g.leaves]
        groups[g.key] = {"params": paths, "updates": g.updates}
        if cfg.tier == "nvme":
            groups[g.key]["file"] = handle.engine.file_path(g.key)
        for path, i, slot, grad in zip(paths, g.leaves, g.master, g.grads, strict=True):
            if g.shared_master:
                t = handle.shared_masters[i]
                master[path] = TensorEntry(t, handle.placement(i, tuple(t.shape)))
            else:
                # Each update copies the master into its param (to_device), unless the
                # update is delayed (the params lag a step) or casts it (a grad slot has
                # its param's dtype).
                mirrors = not cfg.delayed_update and grad.dtype == slot.dtype
                master[path] = _entry(handle, k, slot, i, mirrors_param=mirrors)
    return {
        "tier": cfg.tier,
        "what": list(cfg.what),
        "delayed_update": cfg.delayed_update,
        "groups": groups,
        "master": master,
    }


def _entry(handle, k: int, value, owner: int | None, *, mirrors_param: bool = False):
    """A state or master leaf of group ``k``: a described tensor, or the Python value."""
    if not isinstance(value, Slot):
        return value
    if owner is not None:
        placement = handle.placement(owner, value.shape)
    else:
        placement = Placement(value.shape, (), handle.mesh_dims)
    g = handle.groups[k]
    if handle.cfg.tier == "nvme":
        path = handle.engine.file_path(g.key)
        return StoredTensor(path, value.offset, value.shape, value.dtype, placement, mirrors_param)
    return TensorEntry(value.view(handle.buffers[k]), placement, mirrors_param)


def _merge(found: dict) -> Any:
    """One leaf of the merged tree from the groups that hold it (see the note)."""
    if not found:
        return None
    values = list(found.values())
    if len(values) == 1:
        return values[0]
    plain = not any(isinstance(v, (TensorEntry, StoredTensor)) for v in values)
    if plain and all(type(v) is type(values[0]) and v == values[0] for v in values):
        return values[0]
    return found  # per group key: a group-level tensor, or groups that disagree


def _group_state(handle, k: int) -> Any:
    g = handle.groups[k]
    leaves = [_entry(handle, k, v, o) for v, o in zip(g.state_leaves, g.owners, strict=True)]
    return tree.unflatten(g.state_spec, leaves)


def _check_open(handle) -> None:
    if handle.closed:
        raise RuntimeError(
            f"offload({handle.cfg.tier}): this state was closed (its buffers and swap files "
            "are gone); describe the state of a live step."
        )
    if handle.failure is not None:  # [Note: a failed NVMe step]: never checkpoint the mix
        raise RuntimeError(handle.failure)


# [Note: loading offloaded state]
# ``fs.load`` fills the tensors of a fresh step in place (the host views and the
# NVMe swap files); what it cannot reach are the Python values the groups keep in
# their state leaves (the optimizer's ``count``) and the groups' update counts.
# ``load_state`` takes them back by the paths ``describe_state`` gave them.


def load_optimizer_slot(handle, values: dict) -> None:
    """The plain leaves of the merged optimizer tree (``{path: value}``, paths relative
    to the slot) back into every group's state leaves."""
    from fscale.state import _walk

    handle.wait()
    groups = handle.groups
    if not groups:
        return
    uniform = all(g.state_spec == groups[0].state_spec for g in groups)
    for g in groups:
        positions: dict = {}
        n = len(g.state_leaves)
        _walk("", tree.unflatten(g.state_spec, list(range(n))), positions)
        for path, pos in positions.items():
            rel = path[1:] if uniform else f"{g.key}{path}"
            value = g.state_leaves[pos]
            if value is None or isinstance(value, Slot):
                continue
            if f"{rel}/{g.key}" in values:  # groups that disagreed when saved
                g.state_leaves[pos] = values[f"{rel}/{g.key}"]
            elif rel in values:
                g.state_leaves[pos] = values[rel]


def load_offload_slot(handle, values: dict) -> None:
    """The groups' update counts back (by group key); on NVMe, the swap files' checksums."""
    handle.wait()
    for g in handle.groups:
        updates = values.get(f"groups/{g.key}/updates")
        if isinstance(updates, int):
            g.updates = updates
    if handle.cfg.tier == "nvme":
        # fs.load wrote the checkpoint's bytes into the swap files in place, a chunk at
        # a time: the engine takes them as written (their CRCs recomputed).
        handle.rechecksum()

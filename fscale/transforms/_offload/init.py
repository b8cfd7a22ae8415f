"""Building an ``OffloadState``: sub-group layouts, host buffers or swap files, first writes."""

from __future__ import annotations

import functools
import os
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from fscale import tree
from fscale.hw import comm
from fscale.io import swap
from fscale.state import announce_writes
from fscale.transforms._offload.config import OffloadConfig, shares_masters
from fscale.transforms._offload.layout import (
    Group,
    Layout,
    group_leaves,
    master_dtype,
    scatter,
    state_owners,
    sub,
)
from fscale.transforms._offload.state import OffloadState
from fscale.transforms._offload.stream import GradStream


@torch.no_grad()
def build_state(
    cfg: OffloadConfig, inner, group, params, device=None, mesh_dims=()
) -> OffloadState:
    leaves, spec = tree.flatten(params)
    live = [t for t in leaves if t is not None]
    if device is None:
        device = live[0].device if live else torch.device("cpu")
    handle = OffloadState(cfg, inner, spec, device)
    try:
        handle.param_paths, handle.mesh_dims = tree.paths(params), tuple(mesh_dims)
        handle.track(leaves)
        limit = cfg.subgroup_bytes
        shared = shares_masters(cfg)
        # Layouts first (optimizer init on meta tensors): the NVMe space check must
        # happen before a byte is written.
        for k, idx in enumerate(group_leaves(leaves, limit)):
            lay = Layout()
            g = Group(f"g{k:05d}", idx, [], [], shared_master=shared)
            masters = Layout() if shared else lay  # shared: shapes only, no bytes here
            g.master = [masters.add(leaves[i].shape, master_dtype(leaves[i].dtype)) for i in idx]
            metas = [torch.empty(s.shape, dtype=s.dtype, device="meta") for s in g.master]
            meta_state = inner.init(sub(spec, scatter(len(leaves), idx, metas), idx))
            s_leaves, g.state_spec = tree.flatten(meta_state)
            g.state_leaves = [
                lay.add(x.shape, x.dtype) if isinstance(x, torch.Tensor) else x for x in s_leaves
            ]
            g.owners = state_owners(tree.paths(meta_state), s_leaves, handle.param_paths, g)
            g.persisted = swap.align_up(lay.size)
            grads = Layout()
            g.grads = [grads.add(leaves[i].shape, leaves[i].dtype) for i in idx]
            g.grad_bytes = swap.align_up(grads.size)
            handle.groups.append(g)
        if cfg.tier == "nvme":
            _open_swap(cfg, handle, group)
        writes: list[Future] = []
        if cfg.tier == "cpu":
            # Master and state: one buffer per group, carved out of a few pinned
            # allocations. Grads: a small rotating pool ([Note: grad staging] in update.py).
            handle.buffers = swap.alloc_many([g.persisted for g in handle.groups])
            # Written only by update_group. With an optimizer whose writes all go through
            # the AdamW kernel a save may keep a group's buffer, the update then writing
            # the second at no extra cost; others keep the background copy, which runs
            # during the forward instead of inside the update.
            keep = handle.writes_through_kernel()
            for k, buf in enumerate(handle.buffers):
                announce_writes(buf, second=functools.partial(handle.second, k) if keep else None)
            largest = max((g.grad_bytes for g in handle.groups), default=1)
            handle.staging = swap.alloc_many([largest] * (2 if cfg.overlap else 1))
        for k, g in enumerate(handle.groups):
            if cfg.tier == "cpu":
                buf = handle.buffers[k]
            else:  # the pool in turn: group k's write overlaps group k+1's init
                n = len(handle.buffers)
                buf = handle.buffers[k % n]
                if k >= n:
                    writes[k - n].result()
            if shared:  # the params' host shards, set by share_masters once they exist
                master = [leaves[i].detach() for i in g.leaves]
            else:
                master, _ = handle.views(g, buf)
                for view, i in zip(master, g.leaves, strict=True):
                    view.copy_(leaves[i].detach())
            # The real init runs on the host masters; its tensors are copied into the slots.
            state = inner.init(sub(spec, scatter(len(leaves), g.leaves, master), g.leaves))
            handle._store_state(g, buf, buf, state)
            if cfg.tier == "nvme":
                writes.append(handle.engine.write(g.key, buf, g.persisted))
        for w in writes:
            w.result()
        handle._reset_events()
        if cfg.tier == "cpu" and cfg.delayed_update:
            handle._bg = ThreadPoolExecutor(1, thread_name_prefix="fscale-offload-dpu")
            if cfg.compute_dtype is not None and "params" not in cfg.what:
                handle.device_staging = device_staging(leaves, cfg.compute_dtype)
        if cfg.stream and (cfg.sharded or comm.world_size(group) == 1):
            handle.stream = GradStream(handle, leaves)
    except BaseException:
        handle.close()  # no swap file or lock outlives a failed init (ENOSPC writing them)
        raise
    return handle


# [Note: shared masters]
# With what=("optimizer", "params") on tier="cpu" (no DPU), ZeRO-3's fp32 host shards
# -- the params the step returns -- are exactly the optimizer's fp32 masters, so the
# optimizer updates them in place instead of keeping a copy: 8 host bytes per param
# for AdamW's moments instead of 12, and no host->host copy after the update. Not
# with delayed_update (the next step computes on the params while the background
# update writes the masters) nor on NVMe (the masters are part of the swap files).


def share_masters(handle: OffloadState, params: dict) -> None:
    """Point the groups' masters at the params' host shards ([Note: shared masters])."""
    leaves = tree.leaves(params)
    for g in handle.groups:
        for slot, i in zip(g.master, g.leaves, strict=True):
            t = leaves[i]
            bad = t is None or tuple(t.shape) != slot.shape or t.dtype != slot.dtype
            if bad or t.device.type != "cpu":
                raise RuntimeError(
                    f"offload: param leaf {i} is "
                    f"{None if t is None else (tuple(t.shape), t.dtype, t.device.type)}, its "
                    f"optimizer master {(slot.shape, slot.dtype)} on the host; cannot share them."
                )
    handle.shared_masters = leaves
    for g in handle.groups:  # written only by update_group ([Note: announced writes])
        for i in g.leaves:
            announce_writes(leaves[i])


def device_staging(leaves: list, dtype: torch.dtype) -> list:
    """One buffer of ``dtype`` beside the params, a view per floating leaf wider than it."""
    wide = [
        t is not None and t.is_floating_point() and t.element_size() > dtype.itemsize
        for t in leaves
    ]
    sizes = [t.numel() if w else 0 for t, w in zip(leaves, wide, strict=True)]
    if not any(sizes):
        return []
    device = next(t.device for t, w in zip(leaves, wide, strict=True) if w)
    flat = torch.empty(sum(sizes), dtype=dtype, device=device)
    out, at = [], 0
    for t, n, w in zip(leaves, sizes, wide, strict=True):
        out.append(flat[at : at + n].view(t.shape) if w else None)
        at += n
    return out


def _open_swap(cfg: OffloadConfig, handle: OffloadState, group) -> None:
    """Check the path (on every rank, agreeing on failure), open the engine, allocate the pool."""
    rank = comm.rank()
    persisted = [g.persisted for g in handle.groups]
    # Every file, plus the temporary of the one being rewritten (atomic replace), for
    # each rank on this host sharing the drive.
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    needed = (sum(persisted) + max(persisted, default=0)) * local
    error = None
    try:
        swap.check_path(cfg.path, needed)
    except OSError as e:
        error = e
    if comm.world_size(group) > 1:
        # A rank that raised alone would leave the others blocked in the next collective.
        flag = torch.tensor(0.0 if error is None else 1.0, device=handle.device)
        comm.all_reduce(flag, op="max", group=group)
        if error is None and flag.item() > 0:
            raise RuntimeError(
                f"offload(tier='nvme'): another rank's swap path check failed (see its error); "
                f"rank {rank} stops too."
            )
    if error is not None:
        raise error
    handle.engine = swap.SwapEngine(cfg.path, rank=rank, direct=cfg.direct, record=True)
    size = swap.align_up(max((g.total for g in handle.groups), default=1))
    handle.buffers = [swap.alloc(size) for _ in range(3 if cfg.overlap else 1)]

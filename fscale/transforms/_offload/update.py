"""The update paths of an offloaded optimizer: host (cpu), delayed (DPU) and NVMe.

``run`` is what the offloaded optimizer's ``update_params`` calls with the grads and
params of every leaf it owns (the full params, or this rank's shards). Grads
streamed in backward were already used (``stream.py``); otherwise the groups go
through the host one after the other, as the notes below describe.

[Note: swap pipeline]
A sub-group is a run of leaves of at most ``subgroup_mb`` of fp32 master weights
(default ``buffer_mb / 4``: master + two moments + grads fit one buffer). Its
master, state and grads are laid out in one 4096-aligned host buffer; the master
and state part is one swap file (``layout.py``). The pool has three buffers
(``overlap=True``):

    read group i+1  |  update group i  |  write group i-1

Before reading into a buffer the engine waits for the write that last used it
(group i-2), so at most three groups are in host memory. The optimizer works on
views of the buffer (no copies), and the grads of a group are copied into the
buffer's tail after its read, so the D2H copy of the grads overlaps the disk too.
Every step ends with all writes done. ``overlap=False`` uses one buffer: read,
update, write, in turn.

[Note: a failed NVMe step]
A step updates the sub-groups one after the other, each copied into the params and
written back as it goes, so an error midway (ENOSPC or EIO writing a file, a
corrupt file read, an interrupt) leaves the groups before it at step t+1 and the
rest at step t, in the params and on the drive: each file is whole ([Note: swap
files] in ``fscale/io/swap.py``), but the set mixes two steps. Rolling back would
need the previous version of every file kept until all of the step's writes
succeeded: room on the drive for two copies of the state instead of one file more
(``_open_swap``), and that room is what decides the largest model a drive takes.
So the state is marked unusable instead: the failing step raises its own error
(with a note saying so), and every later step, and ``describe`` (no checkpoint of
the mixed state), raise a ``RuntimeError`` that names the first error and says to
load the last checkpoint -- never the stale error again, and never a silent
half-applied step. ``close()`` still removes the files.
"""

from __future__ import annotations

import dataclasses
from concurrent.futures import Future
from typing import Any

import torch

from fscale import tree
from fscale.transforms._offload.state import OffloadState


def run(handle: OffloadState, grads, params):
    if handle.closed:
        raise RuntimeError(
            f"offload({handle.cfg.tier}): this state was closed (its swap files are gone); "
            "build a new one with step.init to keep training."
        )
    if handle.failure is not None:
        raise RuntimeError(handle.failure)  # [Note: a failed NVMe step]
    g_leaves, p_leaves = tree.leaves(grads), tree.leaves(params)
    handle.track(p_leaves)
    if handle.stream is not None and handle.stream.started:
        handle.stream.finish(g_leaves)  # streamed and updated during backward
        return params
    if handle.cfg.delayed_update:
        update_delayed(handle, g_leaves, p_leaves)
        return params
    handle._reset_events()
    handle.begin_copies()
    if handle.cfg.tier == "nvme":
        update_nvme(handle, g_leaves, p_leaves)
    else:
        update_cpu(handle, g_leaves, p_leaves)
        handle.sync_device()
    return params


# [Note: DPU staging]
# Under mixed precision the device copy of a param is only ever read through its
# cast to the compute dtype (the gather, or mixed_precision's materialize), so with
# delayed_update the background thread sends each group's updated masters to the
# device as soon as they are computed, mid-step, and casts them there into a staging
# buffer of the compute dtype (2 bytes per param for bf16). At the next update the
# params take them with a device-side copy: the masters never cross PCIe on the
# critical path (8.3B fp32 masters: 33 GB, ~0.65 s a step at 50 GB/s, was a stall).
# The training is bit-identical; the params the step returns are the masters
# rounded to the compute dtype (as DeepSpeed's GPU copy is), the masters stay in
# host memory. The staging is written only after the compute queued at the update
# has read it (begin_copies), and the masters only after the copies reading them.

# [Note: grad staging]
# tier="cpu" keeps master and optimizer state per group (12 bytes per parameter
# for AdamW) but no grads: a group's grads are copied device->host into one of two
# staging buffers (each the size of the largest group's grads) just before its
# update, the next group's copy running while this one updates. A grad slot per
# group would add 4 bytes per parameter (8B params: 133 GB of host memory instead
# of 100 GB). With delayed_update the whole loop runs in the background thread,
# reading the step's device grads, which it holds until each group's copy is done.


def update_cpu(handle: OffloadState, grads: list, params: list | None) -> None:
    """Each group in turn: grads in (one group ahead), update, masters out to ``params``
    (None: the caller copies them later, the delayed update)."""
    groups, bufs = handle.groups, handle.buffers
    ahead = handle.cfg.overlap
    copied: dict[int, Any] = {}
    if groups:
        copied[0] = handle.to_host(0, grads)
    for k in range(len(groups)):
        if ahead and k + 1 < len(groups):
            copied[k + 1] = handle.to_host(k + 1, grads)  # overlaps this group's update
        done = copied.pop(k)
        if done is not None:
            done.synchronize()
        if params is None:
            for i in groups[k].leaves:  # copied out: the device grads can go
                grads[i] = None
        handle.update_group(k, bufs[k])
        master, _ = handle.views(groups[k], bufs[k])
        if params is not None:
            handle.to_device(groups[k], master, params)
        elif handle.device_staging:
            handle.stage_out(k, master)
        if not ahead and k + 1 < len(groups):
            copied[k + 1] = handle.to_host(k + 1, grads)


def update_delayed(handle: OffloadState, grads: list, params: list) -> None:
    """DPU: apply the update launched last step, then launch this step's in the background.

    The host does not wait for any copy here: this step's grads are copied out by the
    background thread, group by group, as it updates; last step's masters reach the
    params from their device staging ([Note: DPU staging]) or over PCIe now, and the
    next compute waits for them on the device.
    """
    # [Note: resuming the DPU] A checkpoint saved between steps holds the params the
    # device had (a step behind) and the masters with the update that was in flight;
    # the update of the first step after the load must copy those masters in, as the
    # uninterrupted run's did. Its device staging was not saved: every leaf goes over
    # PCIe that once.
    resync, handle._resync = handle._resync, False
    if handle._pending is not None or resync:
        if handle._pending is not None:
            handle._pending.result()
            handle._pending = None
        handle.begin_copies()  # the params may still be read by this step's backward
        if handle.device_staging and not resync:
            current = torch.cuda.current_stream(handle.device) if handle._h2d_stream else None
            if current is not None:
                current.wait_stream(handle._h2d_stream)
            for i, staged in enumerate(handle.device_staging):
                if staged is not None:
                    params[i].copy_(staged)  # on the device: a cast, no PCIe
        _copy_unstaged(handle, params, every_leaf=resync)
        handle._staged = handle.params_in_flight()
    handle._reset_events()
    handle.begin_copies()  # grads complete, staging read: ordered after the compute so far
    written = handle._staged

    def run():
        if written is not None:
            written.synchronize()  # the masters are read by H2D copies until then
        update_cpu(handle, grads, None)

    handle._pending = handle._bg.submit(run)


def _copy_unstaged(handle: OffloadState, params: list, *, every_leaf: bool = False) -> None:
    """The masters of leaves without device staging (or of all) into the params (H2D stream)."""
    staging = None if every_leaf else handle.device_staging
    for g, buf in zip(handle.groups, handle.buffers, strict=True):
        master, _ = handle.views(g, buf)
        keep = [j for j, i in enumerate(g.leaves) if not staging or staging[i] is None]
        if len(keep) == len(g.leaves):
            handle.to_device(g, master, params)
        elif keep:
            part = dataclasses.replace(g, leaves=[g.leaves[j] for j in keep])
            handle.to_device(part, [master[j] for j in keep], params)


def update_nvme(handle: OffloadState, grads: list, params: list) -> None:
    """The swap pipeline; any error marks the state unusable ([Note: a failed NVMe step])."""
    before = [g.updates for g in handle.groups]
    try:
        _swap_groups(handle, grads, params)
        handle.engine.flush()
    except BaseException as e:
        done = sum(g.updates != n for g, n in zip(handle.groups, before, strict=True))
        handle.failure = (
            f"offload(tier='nvme'): this state is unusable: a step failed midway "
            f"({type(e).__name__}: {e}) after {done} of {len(handle.groups)} sub-groups had "
            "been updated, so the params and the swap files mix two steps. Load the last "
            "checkpoint (fs.load) into a fresh state from step.init to continue; close() this "
            "one to free its swap files."
        )
        e.add_note(
            f"offload(tier='nvme'): {done} of {len(handle.groups)} sub-groups were updated "
            "before this error; the state is now unusable: load the last checkpoint."
        )
        raise


def _swap_groups(handle: OffloadState, grads: list, params: list) -> None:
    engine, groups, pool = handle.engine, handle.groups, handle.buffers
    n = len(pool)
    reads: dict[int, Future] = {}
    writes: dict[int, Future] = {}
    if not groups:
        return
    reads[0] = engine.read(groups[0].key, pool[0])
    try:
        for k, g in enumerate(groups):
            buf = pool[k % n]
            reads.pop(k).result()  # raises SwapCorruptError on a short or corrupt file
            if k + 1 < len(groups) and n > 1:
                # The next group's buffer was last written out by group k + 1 - n.
                prev = writes.get(k + 1 - n)
                if prev is not None:
                    prev.result()
                reads[k + 1] = engine.read(groups[k + 1].key, pool[(k + 1) % n])
            event = handle.to_host(k, grads)
            if event is not None:
                event.synchronize()
            handle.update_group(k, buf)
            master, _ = handle.views(g, buf)
            handle.to_device(g, master, params)
            handle.sync_device()  # the buffer is reused by a later read
            writes[k] = engine.write(g.key, buf, g.persisted)
            if n == 1:
                writes[k].result()
                if k + 1 < len(groups):
                    reads[k + 1] = engine.read(groups[k + 1].key, pool[0])
    finally:
        # Never leave a thread writing into a buffer after an error.
        for fut in [*reads.values(), *writes.values()]:
            try:
                fut.result()
            except Exception:
                pass

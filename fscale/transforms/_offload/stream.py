"""Grads streamed to the host *during* backward, and updated there as they arrive.

[Note: streaming grads in backward]
With ``offload(step, "cpu")`` and nothing between backward and the update that
changes grads (no ``clip_norm``, no fp16 loss scaling, no reduction left after
backward: ``shard_zero(step, 3)`` or a world of one, ``mixed_precision`` reducing
in fp32), a leaf's grad is final the moment the last micro-batch's backward hands
it over ([Note: final grads in backward] in ``fscale/_accumulate.py``). ``GradStream``
then moves the whole ZeRO-Offload pipeline into backward, per sub-group:

    backward makes group k's grads  ->  D2H into a free staging buffer (d2h stream,
    after an event on the compute stream)  ->  host AdamW (a worker thread)  ->
    updated masters H2D into the params (h2d stream)

so the copies and the host update of the groups whose grads are done overlap the
backward of the rest, and the update stage only waits for the tail. Two staging
buffers rotate ([Note: grad staging] in ``update.py``): a group whose grads are
final while both are in use waits in a queue (backward never blocks); the worker
frees a buffer after each update and starts the next copy. A group's params are
written only after its grads are final, and nothing in backward reads a param
after its grad is final (autograd runs a leaf's accumulation once, after every use).

Same numbers as the update after backward: the same grads reach the same host
optimizer group by group (tests compare the two bit for bit). One difference: an
exception in the last micro-batch's backward (a device OOM) leaves the groups that
were already streamed updated, as an exception inside the update stage would.

A non-finite loss skips the step as it does without streaming: the loss is voted on
before the last backward ([Note: a loss vote before streamed updates] in
``fscale/step.py``), and the worker reads that vote before its first update of the
step; on a non-finite vote it updates no group (the grads are dropped, the staging
buffers freed), and the step's guard finds nothing changed. A finite loss whose
grads are not (an overflow inside backward) was already applied: the step raises.
"""

from __future__ import annotations

import collections
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

VOTE_TAG = "offload.loss_vote"  # the collective of [Note: a loss vote before streamed updates]


class GradStream:
    """The per-step streaming pipeline of one ``OffloadState`` (see the module note)."""

    def __init__(self, handle, leaves: list):
        self.handle = handle
        # grad_ready's index counts the non-None leaves; groups use flattened positions.
        self.positions = [i for i, t in enumerate(leaves) if t is not None]
        self.group_of = {i: k for k, g in enumerate(handle.groups) for i in g.leaves}
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="fscale-offload-stream")
        self.lock = threading.Lock()
        self.ctx: Any = None  # the step call this state belongs to
        self.reset()

    def reset(self) -> None:
        self.left = [len(g.leaves) for g in self.handle.groups]
        self.grads: dict[int, torch.Tensor] = {}  # flattened position -> final grad
        self.ptrs: dict[int, int] = {}  # position -> its data_ptr (checked at the update)
        self.params: dict[int, torch.Tensor] = {}  # position -> the param (alias)
        self.queue: collections.deque = collections.deque()
        self.free = list(range(len(self.handle.staging)))
        self.futures: list[Future] = []
        self.loss_bad: torch.Tensor | None = None  # ranks with a non-finite loss (0-d)
        self.loss_voted: Any = None  # a CUDA event after that vote, or None
        self.poisoned: bool | None = None  # read by the worker before its first update
        self.applied = False  # a group's update ran this step

    def begin(self, ctx) -> None:
        """Called at each micro-batch's loss_and_grad; a new step call starts fresh."""
        if ctx is self.ctx:
            return
        self.wait()  # a step that raised mid-backward leaves nothing running
        self.reset()
        self.ctx = ctx
        ctx.before_final_backward = self.vote_loss
        ctx.streamed_updates = self.settle
        self.handle._reset_events()

    def vote_loss(self, loss: torch.Tensor) -> None:
        """Before the last backward: whether any rank's loss is non-finite, summed over
        the step's mesh, queued where the loss is; the worker reads it before its first
        update ([Note: a loss vote before streamed updates] in fscale/step.py)."""
        ctx = self.ctx
        bad = (~torch.isfinite(loss.float())).to(torch.float32).reshape(())
        mesh = ctx.step.mesh
        for dim in mesh.dims:
            if mesh.size(dim) > 1:
                ctx.comm.all_reduce(VOTE_TAG, bad, op="sum", group=mesh.group(dim))
        if bad.is_cuda:  # to pinned memory behind the vote: the worker reads the host copy
            host = torch.empty((), dtype=torch.float32, pin_memory=True)
            host.copy_(bad, non_blocking=True)  # (a .item() on its stream could wait for
            self.loss_voted = torch.cuda.Event()  # backward's later kernels)
            self.loss_voted.record(torch.cuda.current_stream(bad.device))
            bad = host
        self.loss_bad = bad

    # -- in backward (the main thread) --------------------------------------------------

    def grad_ready(self, index: int, grad: torch.Tensor, leaf: torch.Tensor) -> None:
        pos = self.positions[index]
        self.grads[pos], self.params[pos], self.ptrs[pos] = grad, leaf, grad.data_ptr()
        k = self.group_of[pos]
        self.left[k] -= 1
        if self.left[k]:
            return
        after = None
        if self.handle._d2h_stream is not None:
            after = torch.cuda.Event()
            after.record(torch.cuda.current_stream(self.handle.device))
        with self.lock:
            self.queue.append((k, after))
            self._pump()

    def _pump(self) -> None:
        """Copy queued groups out while a staging buffer is free (holding the lock)."""
        while self.queue and self.free:
            k, after = self.queue.popleft()
            slot = self.free.pop()
            region = self.handle.staging[slot]
            done = self.handle.copy_grads_out(k, self.grads, region, after=after)
            self.futures.append(self.pool.submit(self._update, k, slot, done))

    # -- the worker thread ----------------------------------------------------------------

    @torch.no_grad()
    def _update(self, k: int, slot: int, done) -> None:
        handle = self.handle
        if done is not None:
            done.synchronize()
        g = handle.groups[k]
        for i in g.leaves:  # on the host now: the device grad can go once the step ends
            self.grads[i] = None
        if self.poisoned is None:
            self.poisoned = self._loss_was_bad()
        if not self.poisoned:
            handle.update_group(k, handle.buffers[k], handle.staging[slot])
            master, _ = handle.views(g, handle.buffers[k])
            handle.to_device(g, master, self.params)
            self.applied = True
        with self.lock:
            self.free.append(slot)
            self._pump()

    def _loss_was_bad(self) -> bool:
        if self.loss_bad is None:  # no vote this step (a stage without the sink)
            return False
        if self.loss_voted is not None:
            self.loss_voted.synchronize()
        return bool(self.loss_bad.item() > 0)

    # -- the update stage ---------------------------------------------------------------

    def settle(self) -> bool:
        """A skipped step: wait for the worker; True when it applied any update (the
        loss vote was finite, so this step's state is already changed)."""
        self.wait()
        return self.applied

    @property
    def started(self) -> bool:
        return bool(self.futures) or bool(self.queue)

    def finish(self, grads: list) -> None:
        """Every group was streamed: check they were this step's grads, wait, join copies."""
        missing = [g.key for g, n in zip(self.handle.groups, self.left, strict=True) if n]
        if missing:
            raise RuntimeError(
                f"offload: grads of sub-groups {missing[:4]} never became final in backward "
                "while others did; streaming needs every grad announced (a bug)."
            )
        self.wait()
        if self.poisoned:  # the step's own vote would have skipped it: never here
            raise RuntimeError(
                "offload: the loss vote before backward was non-finite, yet the step went on "
                "to its update; its groups were not updated (a bug)."
            )
        for pos, ptr in self.ptrs.items():
            if grads[pos] is None or grads[pos].data_ptr() != ptr:
                raise RuntimeError(
                    "offload: the update got other grads than backward made (a stage between "
                    f"them replaced leaf {pos}'s); streaming grads in backward is unsafe here."
                )
        self.handle.sync_device()
        self.reset()

    def wait(self) -> None:
        """Until every copy and update is done, those the worker starts meanwhile too."""
        error = None
        while True:
            with self.lock:
                if not self.futures:
                    break
                future = self.futures.pop(0)
            try:
                future.result()
            except Exception as e:  # keep waiting: no worker may outlive the step
                error = error or e
        if error is not None:
            self.queue.clear()
            raise error

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self.pool.shutdown(wait=True)

"""Who runs in the next forward, and how many tokens each: continuous batching.

Two policies over one token budget (``max_tokens_per_step``) per forward:

- ``"splitfuse"`` (DeepSpeed-FastGen's Dynamic SplitFuse): every decoding sequence gets
  its one token first, then prompt chunks fill what is left of the budget -- running
  partial prompts first, then waiting requests in arrival order. A long prompt is split
  over several steps, so forwards stay the same size and decodes never stall behind it.
- ``"prefill_first"`` (vLLM v0): whole prompts run first, as many as fit in the budget;
  decodes run only in steps with no prompt to admit. A prompt longer than the whole
  budget is chunked (else it could never run).

Usage::

    sched = Scheduler(BlockManager(64, 16), max_tokens_per_step=256, max_num_seqs=32)
    sched.add(seq)
    batch = sched.schedule()         # Batch(seqs=[...], num_tokens=[...]) or empty
"""

from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass, field

from fscale.serve.kv_cache import BlockManager
from fscale.serve.sequence import Sequence, Status

POLICIES = ("splitfuse", "prefill_first")


@dataclass
class Batch:
    """The sequences of one forward and how many new tokens each feeds."""

    seqs: list[Sequence] = field(default_factory=list)
    num_tokens: list[int] = field(default_factory=list)

    @property
    def total_tokens(self) -> int:
        return sum(self.num_tokens)

    def __len__(self) -> int:
        return len(self.seqs)


class Scheduler:
    """Waiting queue (FCFS) and running set, within a token budget and the KV blocks.

    [Note: preemption and starvation]
    When a running sequence needs a block and none is free, the newest running
    sequence not yet scheduled in this step is preempted (its blocks released, its
    progress recomputed later) and re-queued at the *front* of the waiting queue; if
    the sequence asking is itself the newest, it is the one preempted. So the oldest
    request always progresses, and since ``add_request`` refuses a request whose
    prompt + max_tokens cannot fit in the whole cache, it always can: every request
    finishes in bounded steps. ``running`` is kept in arrival order. No request is
    admitted in a step that preempted (it would take the blocks just freed back).
    """

    def __init__(
        self,
        blocks: BlockManager,
        *,
        max_tokens_per_step: int,
        max_num_seqs: int,
        policy: str = "splitfuse",
    ):
        if policy not in POLICIES:
            raise ValueError(f"scheduler={policy!r} is not known; use one of {list(POLICIES)}.")
        if max_tokens_per_step < 1 or max_num_seqs < 1:
            raise ValueError(
                f"max_tokens_per_step ({max_tokens_per_step}) and max_num_seqs "
                f"({max_num_seqs}) must be >= 1."
            )
        self.blocks = blocks
        self.budget = max_tokens_per_step
        self.max_num_seqs = max_num_seqs
        self.policy = policy
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preempted_total = 0

    # -- queue changes ----------------------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def finish(self, seq: Sequence) -> None:
        """Take ``seq`` out (finished or aborted) and release its blocks."""
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        elif seq.status is Status.WAITING:
            self.waiting.remove(seq)
        self.blocks.release(seq)
        seq.status = Status.FINISHED

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # -- scheduling -------------------------------------------------------------------------

    def schedule(self) -> Batch:
        """The next forward's batch (empty when there is nothing to run)."""
        batch = Batch()
        self._preempted = False
        self._in_batch: set[int] = set()  # id() of batch.seqs: O(1) membership at B=256
        if self.policy == "splitfuse":
            self._run(batch, decodes=True)
            self._run(batch, decodes=False)
            self._admit(batch, whole=False)
        else:
            self._run(batch, decodes=False)
            self._admit(batch, whole=True)
            if not batch.seqs:
                self._run(batch, decodes=True)
        assert batch.total_tokens <= self.budget
        return batch

    def _left(self, batch: Batch) -> int:
        return self.budget - batch.total_tokens

    def _run(self, batch: Batch, *, decodes: bool) -> None:
        """Schedule running sequences (decoding ones, or partial prompts) in arrival order."""
        i = 0
        while i < len(self.running) and self._left(batch) > 0:
            seq = self.running[i]
            left = seq.remaining  # 0: its pending token is its last (sequence.py)
            if id(seq) in self._in_batch or not left or (left == 1) != decodes:
                i += 1
                continue
            n = min(left, self._left(batch))
            if self._reserve_or_preempt(seq, n, batch):
                batch.seqs.append(seq)
                batch.num_tokens.append(n)
                self._in_batch.add(id(seq))
                i += 1
            # else seq itself was preempted and left `running`: index i is the next one

    def _reserve_or_preempt(self, seq: Sequence, n: int, batch: Batch) -> bool:
        while not self.blocks.reserve(seq, n):
            victim = next((s for s in reversed(self.running) if id(s) not in self._in_batch), None)
            if victim is None or victim.arrival < seq.arrival:
                victim = seq
            self._preempt(victim)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.release(seq)
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.num_preempted_total += 1
        self._preempted = True

    def _admit(self, batch: Batch, *, whole: bool) -> None:
        """Move waiting requests to running while budget, blocks and seats allow (FCFS)."""
        while (
            self.waiting
            and not self._preempted
            and self._left(batch) > 0
            and len(self.running) < self.max_num_seqs
        ):
            seq = self.waiting[0]
            if seq.num_pending:  # preempted with its next token on the device: next step
                return
            hit = self.blocks.match_prefix(seq)
            if seq.num_cached_tokens is None:
                seq.num_cached_tokens = hit
            n = min(seq.remaining, self._left(batch))
            if whole and n < seq.remaining and batch.seqs:
                self.blocks.release(seq)  # the whole prompt does not fit: next step
                return
            if not self.blocks.reserve(seq, n):
                self.blocks.release(seq)  # wait for running requests to free blocks
                return
            self.waiting.popleft()
            seq.status = Status.RUNNING
            bisect.insort(self.running, seq, key=lambda s: s.arrival)
            batch.seqs.append(seq)
            batch.num_tokens.append(n)
            self._in_batch.add(id(seq))

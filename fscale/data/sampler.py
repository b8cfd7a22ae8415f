"""``CurriculumSampler``: draw each step's batch from the buckets a schedule allows.

DeepSpeed's difficulty-based curriculum: at step ``t`` only samples of buckets
``0..schedule(t)`` of a ``DifficultyIndex`` may be drawn, so training starts on the
easiest data and widens to all of it (``build_index(scores, 100)`` makes bucket ``d``
the ``d + 1``-th percentile: DeepSpeed's ``difficulty_type="percentile"``). The
sampler yields sample ids for one rank, ``batch_size`` per step (a
``DataLoader(dataset, sampler=s, batch_size=batch_size)`` turns them into that
rank's batches).

Usage::

    index = build_index(scores_by_length(dataset), num_buckets=8)
    sampler = CurriculumSampler(index, fixed_linear(0, 7, steps=5000), batch_size=32, seed=0)
    loader = DataLoader(dataset, sampler=sampler, batch_size=32)
    ...
    extra = {"sampler": sampler.state_dict(step=state["count"])}   # saved with the checkpoint
    sampler.load_state_dict(extra["sampler"])                       # on resume

[Note: how a step's batch is drawn]
A *phase* is a run of consecutive steps with the same ``d = schedule(t)``; it starts
at step ``t0``. Within it the allowed ids ``A = index.upto(d)`` are shuffled by a
permutation seeded with ``(seed, t0, cycle)`` and cut into windows of one global
batch (``batch_size * world``); step ``t0 + s`` takes window ``s % (|A| // global)``
of cycle ``s // (|A| // global)``, and rank ``r`` its ``r``-th slice. So:

- every id drawn at step ``t`` is in a bucket ``<= schedule(t)``;
- within a step the ranks' ids are disjoint (slices of one window of a permutation);
- within a cycle no id repeats (an epoch over ``A``; ``|A| mod global`` ids sit out
  each cycle, different ones each time);
- the ids are a pure function of ``(seed, step, rank)``: resuming is setting the
  position, and no RNG state needs saving.

References: DeepSpeed data efficiency (difficulty-based curriculum learning).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import Sampler

from fscale.data.difficulty import DifficultyIndex
from fscale.data.schedules import Schedule


class CurriculumSampler(Sampler[int]):
    """Sample ids for one rank; at step ``t`` only from buckets ``<= schedule(t)``.

    Args:
      index: the ``DifficultyIndex`` (``build_index``).
      schedule: ``step -> d``, the hardest allowed bucket (``0..num_buckets - 1``), e.g.
        ``fixed_linear(0, num_buckets - 1, steps)`` from ``fscale.data``.
      batch_size: samples per step on this rank (the DataLoader's ``batch_size``).
      seed: the draws are a function of ``(seed, step, rank)`` only.
      rank, world: this rank and the data-parallel world size (default: from
        ``torch.distributed`` when initialised, else 0 and 1).
      num_steps: stop after this many steps (None: never; ``len()`` then raises).
    """

    def __init__(
        self,
        index: DifficultyIndex,
        schedule: Callable[[int], int],
        *,
        batch_size: int,
        seed: int = 0,
        rank: int | None = None,
        world: int | None = None,
        num_steps: int | None = None,
    ):
        if not isinstance(index, DifficultyIndex):
            raise TypeError(
                f"CurriculumSampler: index must be a DifficultyIndex (build_index(scores, "
                f"num_buckets)), got {type(index).__name__}."
            )
        if not callable(schedule):
            raise TypeError("CurriculumSampler: schedule must be callable (step -> bucket).")
        _positive("batch_size", batch_size)
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"CurriculumSampler: seed must be an int >= 0, got {seed!r}.")
        if num_steps is not None:
            _positive("num_steps", num_steps)
        rank, world = _rank_world(rank, world)
        self.index, self.schedule, self.batch_size = index, schedule, batch_size
        self.seed, self.rank, self.world, self.num_steps = seed, rank, world, num_steps
        self.position = 0  # ids this rank has handed out
        self._allowed: dict[int, np.ndarray] = {}
        self._perm: tuple[tuple[int, int], np.ndarray] | None = None
        if isinstance(schedule, Schedule):
            for d in schedule.values():
                self._allowed_ids(d, f"schedule value {d}")

    # -- the draw ([Note: how a step's batch is drawn]) -----------------------------

    def ids_at(self, step: int) -> np.ndarray:
        """The ``batch_size`` sample ids this rank draws at ``step``."""
        return self._ids(step, self._phase_start(step, self._difficulty(step)))

    def _ids(self, step: int, t0: int) -> np.ndarray:
        d = self._difficulty(step)
        allowed = self._allowed_ids(d, f"schedule({step}) = {d}")
        per_cycle = len(allowed) // self.global_batch
        cycle, window = divmod(step - t0, per_cycle)
        key = (t0, cycle)
        if self._perm is None or self._perm[0] != key:
            rng = np.random.default_rng([self.seed, t0, cycle])
            self._perm = (key, rng.permutation(len(allowed)))
        lo = window * self.global_batch + self.rank * self.batch_size
        return allowed[self._perm[1][lo : lo + self.batch_size]]

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world

    def _difficulty(self, step: int) -> int:
        d = self.schedule(step)
        if isinstance(d, (bool, np.bool_)) or not isinstance(d, (int, np.integer)):
            raise TypeError(
                f"CurriculumSampler: schedule({step}) returned {d!r}; it must return a bucket "
                "id (int)."
            )
        return int(d)

    def _allowed_ids(self, d: int, what: str) -> np.ndarray:
        if d not in self._allowed:
            k = self.index.num_buckets
            if not 0 <= d < k:
                raise ValueError(
                    f"CurriculumSampler: {what}, but the index has buckets 0..{k - 1}; "
                    f"schedule the hardest allowed bucket, e.g. fixed_linear(0, {k - 1}, steps)."
                )
            allowed = self.index.upto(d)
            if len(allowed) < self.global_batch:
                raise ValueError(
                    f"CurriculumSampler: {what} allows {len(allowed)} samples (buckets "
                    f"0..{d}), fewer than one global batch of {self.global_batch} (batch_size="
                    f"{self.batch_size} x world={self.world}); start the schedule at a higher "
                    "bucket, build the index with fewer buckets, or use a smaller batch."
                )
            self._allowed[d] = allowed
        return self._allowed[d]

    def _phase_start(self, step: int, d: int) -> int:
        """The first step of the run of steps with value ``d`` that contains ``step``."""
        if isinstance(self.schedule, Schedule) and self.schedule.monotone:
            lo, hi = 0, step  # monotone: the first step whose value reaches d
            while lo < hi:
                mid = (lo + hi) // 2
                if self._difficulty(mid) >= d:
                    hi = mid
                else:
                    lo = mid + 1
            return lo
        t0 = step
        while t0 > 0 and self._difficulty(t0 - 1) == d:
            t0 -= 1
        return t0

    # -- Sampler --------------------------------------------------------------------

    def __iter__(self) -> Iterator[int]:
        t0, d_prev = None, None
        while self.num_steps is None or self.position < self.num_steps * self.batch_size:
            step, offset = divmod(self.position, self.batch_size)
            d = self._difficulty(step)
            # The phase start is searched once; later steps extend it or start a new one.
            if t0 is None:
                t0 = self._phase_start(step, d)
            elif d != d_prev:
                t0 = step
            d_prev = d
            ids = self._ids(step, t0)
            for i in ids[offset:].tolist():
                self.position += 1
                yield i

    def __len__(self) -> int:
        if self.num_steps is None:
            raise TypeError(
                "CurriculumSampler(num_steps=None) is endless and has no len(); pass "
                "num_steps=... for a finite sampler."
            )
        return self.num_steps * self.batch_size

    # -- resume ---------------------------------------------------------------------

    def state_dict(self, step: int | None = None) -> dict:
        """Where the sampler is: ids handed out so far, or as of ``step`` trained steps.

        A DataLoader prefetches, so the sampler's own position runs ahead of training;
        pass the step count the checkpoint holds (``state["count"]``) to resume exactly
        after the last batch trained on.
        """
        position = self.position
        if step is not None:
            if isinstance(step, bool) or not isinstance(step, int) or step < 0:
                raise ValueError(
                    f"CurriculumSampler.state_dict: step must be an int >= 0, got {step!r}."
                )
            position = step * self.batch_size
        return {
            "position": position,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "world": self.world,
            "num_samples": len(self.index),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state`` (``state_dict``): the same ids follow, in the same order."""
        mine = self.state_dict()
        for key in ("seed", "batch_size", "world", "num_samples"):
            if state.get(key) != mine[key]:
                raise ValueError(
                    f"CurriculumSampler.load_state_dict: the saved sampler had {key}="
                    f"{state.get(key)!r}, this one {mine[key]!r}; the draws would differ. Build "
                    f"the sampler with the saved {key} (or start a new run)."
                )
        position = state.get("position")
        if isinstance(position, bool) or not isinstance(position, int) or position < 0:
            raise ValueError(f"CurriculumSampler.load_state_dict: bad position {position!r}.")
        self.position = position


def _positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"CurriculumSampler: {name} must be an int >= 1, got {value!r}.")


def _rank_world(rank, world) -> tuple[int, int]:
    dist = torch.distributed
    live = dist.is_available() and dist.is_initialized()
    if world is None:
        world = dist.get_world_size() if live else 1
    if rank is None:
        rank = dist.get_rank() if live else 0
    for name, value, low in (("world", world, 1), ("rank", rank, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"CurriculumSampler: {name} must be an int >= {low}, got {value!r}.")
    if rank >= world:
        raise ValueError(f"CurriculumSampler: rank={rank} is not below world={world}.")
    return rank, world

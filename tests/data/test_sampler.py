"""CurriculumSampler: only allowed buckets, every allowed bucket reached, disjoint ranks,
no repeats within a cycle, deterministic by seed, exact resume, and errors naming the fix."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from fscale.data import CurriculumSampler, build_index, fixed_discrete, fixed_linear
from tests.helpers import error_text

N, BUCKETS, BATCH = 240, 6, 4
SCHEDULE = fixed_linear(0, BUCKETS - 1, steps=50)


@pytest.fixture(scope="module")
def index():
    return build_index(np.random.default_rng(1).permutation(N).astype(float), BUCKETS)


def _steps(sampler, n_steps: int) -> list[np.ndarray]:
    ids = list(itertools.islice(iter(sampler), n_steps * sampler.batch_size))
    return [np.array(ids[i : i + sampler.batch_size]) for i in range(0, len(ids), BATCH)]


def test_draws_only_allowed_buckets_and_reaches_all_of_them(index):
    sampler = CurriculumSampler(index, SCHEDULE, batch_size=BATCH, seed=7)
    steps = _steps(sampler, 400)
    reached: dict[int, set] = {}
    for t, ids in enumerate(steps):
        d = SCHEDULE(t)
        assert len(ids) == BATCH and (index.buckets[ids] <= d).all(), t
        reached.setdefault(d, set()).update(index.buckets[ids].tolist())
    # Each level's phase reaches every bucket it allows (the last phase: all of them).
    assert reached == {d: set(range(d + 1)) for d in range(BUCKETS)}
    assert {int(i) for ids in steps[50:] for i in ids} == set(range(N))


def test_no_repeats_within_a_cycle_and_ranks_are_disjoint(index):
    world = 3
    ranks = [
        _steps(
            CurriculumSampler(index, SCHEDULE, batch_size=BATCH, seed=3, rank=r, world=world), 120
        )
        for r in range(world)
    ]
    for t in range(120):
        together = np.concatenate([ranks[r][t] for r in range(world)])
        assert len(set(together.tolist())) == world * BATCH, t  # disjoint across ranks
    # The last phase (value 5 from step 50): cycles of |A| // (B * world) = 20 steps.
    cycle = [int(i) for t in range(50, 70) for r in range(world) for i in ranks[r][t]]
    assert len(cycle) == len(set(cycle)) == N


def test_deterministic_by_seed(index):
    a = _steps(CurriculumSampler(index, SCHEDULE, batch_size=BATCH, seed=5), 60)
    b = _steps(CurriculumSampler(index, SCHEDULE, batch_size=BATCH, seed=5), 60)
    c = _steps(CurriculumSampler(index, SCHEDULE, batch_size=BATCH, seed=6), 60)
    assert all((x == y).all() for x, y in zip(a, b, strict=True))
    assert any((x != z).any() for x, z in zip(a, c, strict=True))


@pytest.mark.parametrize(
    "schedule",
    [SCHEDULE, fixed_discrete([1, 3, 1, 5], [7, 20, 33]), lambda t: (t // 9) % BUCKETS],
    ids=["linear", "discrete-non-monotone", "plain-callable"],
)
@pytest.mark.parametrize("cut", [0, 1, 37, 173])
def test_resume_continues_the_exact_same_sequence(index, schedule, cut):
    make = lambda: CurriculumSampler(index, schedule, batch_size=BATCH, seed=11)  # noqa: E731
    whole = list(itertools.islice(iter(make()), 400))
    first = make()
    head = list(itertools.islice(iter(first), cut))
    saved = first.state_dict()
    again = make()
    again.load_state_dict(saved)
    assert head + list(itertools.islice(iter(again), 400 - cut)) == whole


def test_a_data_loader_gets_each_steps_ids_and_resumes_from_the_step_count(index):
    dataset = torch.arange(N) * 10
    sampler = CurriculumSampler(index, SCHEDULE, batch_size=BATCH, seed=2, num_steps=30)
    assert len(sampler) == 30 * BATCH
    batches = list(DataLoader(dataset, sampler=sampler, batch_size=BATCH))
    assert len(batches) == 30
    for t, batch in enumerate(batches):
        assert torch.equal(batch, torch.as_tensor(sampler.ids_at(t)) * 10)
    # A loader prefetches: resume from the number of steps trained, not the position.
    later = CurriculumSampler(index, SCHEDULE, batch_size=BATCH, seed=2, num_steps=30)
    later.load_state_dict(sampler.state_dict(step=12))
    assert all(
        torch.equal(a, b)
        for a, b in zip(
            DataLoader(dataset, sampler=later, batch_size=BATCH), batches[12:], strict=True
        )
    )


def test_errors_name_the_fix(index):
    def sampler(schedule=SCHEDULE, **kw):
        kw = {"batch_size": BATCH, **kw}
        return CurriculumSampler(index, schedule, **kw)

    endless = sampler()
    other = sampler(seed=1).state_dict()
    cases = {
        lambda: sampler(fixed_linear(0, BUCKETS, 10)): "buckets 0..5",
        lambda: sampler(
            fixed_linear(0, 5, 10), batch_size=N // BUCKETS + 1
        ): "fewer than one global",
        lambda: sampler(batch_size=0): "batch_size must be an int >= 1",
        lambda: sampler(seed=-1): "seed must be an int >= 0",
        lambda: sampler(rank=2, world=2): "rank=2 is not below world=2",
        lambda: sampler(lambda t: 0.5).ids_at(0): "must return a bucket id",
        lambda: sampler(lambda t: -1).ids_at(0): "buckets 0..5",
        lambda: CurriculumSampler([1, 2], SCHEDULE, batch_size=1): "must be a DifficultyIndex",
        lambda: len(endless): "endless",
        lambda: endless.load_state_dict(other): "seed=1",
        lambda: endless.state_dict(step=-1): "step must be an int >= 0",
    }
    for fn, text in cases.items():
        msg = error_text(fn)
        assert text in msg, (text, msg)

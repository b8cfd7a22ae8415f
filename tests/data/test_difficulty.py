"""The difficulty index: percentile buckets by rank, scores by length and by a reference
model's loss, a save/load round trip, corrupt files refused, and errors that name the fix."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from fscale.data import DifficultyIndex, build_index, scores_by_length, scores_by_loss
from tests.helpers import error_text


@settings(max_examples=60, deadline=None)
@given(
    scores=st.lists(st.integers(0, 20), min_size=1, max_size=200),  # many ties
    num_buckets=st.integers(1, 12),
)
def test_buckets_are_equal_sized_percentiles_ordered_by_score(scores, num_buckets):
    n = len(scores)
    if num_buckets > n:
        assert "num_buckets <=" in error_text(lambda: build_index(scores, num_buckets))
        return
    index = build_index(scores, num_buckets)
    sizes = np.bincount(index.buckets, minlength=num_buckets)
    assert sizes.sum() == n and sizes.max() - sizes.min() <= 1 and sizes.min() >= 1
    # Harder buckets never hold a lower score; ties across a boundary go by sample id.
    order = np.lexsort((np.arange(n), np.asarray(scores)))
    assert (np.diff(index.buckets[order]) >= 0).all()
    for b in range(num_buckets):
        assert (index.members(b) == np.flatnonzero(index.buckets == b)).all()
        assert (index.upto(b) == np.flatnonzero(index.buckets <= b)).all()
    assert index.edges[0] == min(scores) and index.edges[-1] == max(scores)


def test_round_trip_through_a_file(tmp_path):
    index = build_index(np.random.default_rng(0).normal(size=101), 7)
    index.save(tmp_path / "idx.npz")
    back = DifficultyIndex.load(tmp_path / "idx.npz")
    assert back.num_buckets == 7 and len(back) == 101
    assert np.array_equal(back.scores, index.scores) and np.array_equal(back.buckets, index.buckets)
    assert back.scores.dtype == np.float64 and back.buckets.dtype == np.int64


def test_corrupt_or_foreign_files_are_refused(tmp_path):
    index = build_index(np.arange(10.0), 5)
    bad = tmp_path / "bad.npz"
    np.savez(bad, format=np.int64(1), scores=index.scores, buckets=index.buckets + 5,
             num_buckets=np.int64(5))  # fmt: skip
    assert "inconsistent" in error_text(lambda: DifficultyIndex.load(bad))
    other = tmp_path / "other.npz"
    np.savez(other, weights=np.zeros(3))
    assert "not a difficulty index" in error_text(lambda: DifficultyIndex.load(other))
    future = tmp_path / "future.npz"
    np.savez(future, format=np.int64(2), scores=index.scores, buckets=index.buckets,
             num_buckets=np.int64(5))  # fmt: skip
    assert "format 2" in error_text(lambda: DifficultyIndex.load(future))
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip")
    with pytest.raises(Exception):  # noqa: B017 - numpy's own error for a non-archive
        DifficultyIndex.load(junk)


def test_scores_by_length():
    seqs = [[1, 2, 3], [1], torch.arange(5), np.zeros(2)]
    assert scores_by_length(seqs).tolist() == [3, 1, 5, 2]
    rows = [{"ids": torch.arange(n)} for n in (4, 2)]
    assert scores_by_length(rows, key="ids").tolist() == [4, 2]


def test_scores_by_loss_equal_each_sample_scored_alone():
    torch.manual_seed(0)
    ref = torch.nn.Sequential(torch.nn.Embedding(16, 8), torch.nn.Linear(8, 16))
    samples = [torch.randint(0, 16, (6,)) for _ in range(7)]

    def per_sample(batch):  # batch: (b, 6) token ids; next-token loss per sample
        logits = ref(batch[:, :-1])
        ce = F.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="none")
        return ce.mean(dim=1)

    scores = scores_by_loss(per_sample, samples, batch_size=3)  # 3 + 3 + 1
    alone = [per_sample(s[None]).item() for s in samples]
    assert np.allclose(scores, alone, rtol=1e-6, atol=0)
    index = build_index(scores, 3)
    assert index.buckets[int(np.argmin(scores))] == 0
    assert index.buckets[int(np.argmax(scores))] == 2


def test_errors_name_the_fix():
    cases = {
        lambda: build_index([], 1): "non-empty 1-D",
        lambda: build_index(np.zeros((2, 2)), 1): "non-empty 1-D",
        lambda: build_index([1.0, float("nan")], 1): "samples [1] are not finite",
        lambda: build_index([1.0, 2.0], 0): "num_buckets must be an int >= 1",
        lambda: build_index([1.0, 2.0], 3): "use num_buckets <= 2",
        lambda: build_index([1.0], 1).members(1): "outside 0..0",
        lambda: scores_by_loss(lambda b: b.sum(), [torch.zeros(2)] * 3, 2): "one loss per sample",
        lambda: scores_by_loss(lambda b: b, [torch.zeros(())] * 3, 0): "batch_size must be",
    }
    for fn, text in cases.items():
        msg = error_text(fn)
        assert text in msg, (text, msg)

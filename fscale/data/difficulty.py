"""An offline difficulty index: per-sample scores sorted into percentile buckets.

DeepSpeed's difficulty-based curriculum first scores every sample once (its length,
its vocabulary rarity, a reference model's loss ...), then samples only the easy
ones early in training. ``build_index`` turns the scores into ``num_buckets``
buckets of (nearly) equal size, bucket 0 the easiest; ``CurriculumSampler`` draws
from buckets ``<= schedule(step)``. The index is a small ``.npz`` file (numpy
arrays only, loaded without pickle).

Usage::

    index = build_index(scores_by_length(dataset), num_buckets=8)
    index.save("difficulty.npz"); index = DifficultyIndex.load("difficulty.npz")
    index.upto(2)        # sample ids in buckets 0, 1, 2, sorted

[Note: buckets are percentiles of rank]
Samples are ordered by (score, sample id) and the sample of rank ``r`` of ``n`` goes
to bucket ``r * num_buckets // n``: every bucket holds ``n // num_buckets`` or one
more samples, so "the easiest 25 %" means a quarter of the data even when many
scores tie (lengths often do). Ties are broken by sample id, so equal scores may
straddle a bucket boundary, always the same way. ``edges[b]`` is the smallest score in
bucket ``b`` (``edges[-1]``: the largest score overall), for display.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import default_collate

_FORMAT = 1


@dataclass(frozen=True, eq=False)
class DifficultyIndex:
    """Per-sample scores and buckets; bucket 0 holds the easiest samples."""

    scores: np.ndarray  # float64, (n,)
    buckets: np.ndarray  # int64, (n,), in [0, num_buckets)
    num_buckets: int

    @property
    def edges(self) -> np.ndarray:
        """The smallest score of each bucket, then the largest score (``num_buckets + 1``)."""
        lows = [self.scores[self.buckets == b].min() for b in range(self.num_buckets)]
        return np.array([*lows, self.scores.max()], dtype=np.float64)

    def __len__(self) -> int:
        return len(self.scores)

    def members(self, bucket: int) -> np.ndarray:
        """Sample ids in ``bucket``, sorted."""
        return np.flatnonzero(self.buckets == self._bucket(bucket))

    def upto(self, bucket: int) -> np.ndarray:
        """Sample ids in buckets ``0..bucket``, sorted."""
        return np.flatnonzero(self.buckets <= self._bucket(bucket))

    def _bucket(self, bucket) -> int:
        if isinstance(bucket, bool) or not isinstance(bucket, (int, np.integer)):
            raise TypeError(f"a bucket is an int, got {bucket!r}.")
        if not 0 <= bucket < self.num_buckets:
            raise ValueError(f"bucket {bucket} is outside 0..{self.num_buckets - 1}.")
        return int(bucket)

    def save(self, path: str | os.PathLike) -> None:
        """Write the index to ``path`` (``.npz``; numpy adds the suffix when missing)."""
        np.savez(
            path,
            format=np.int64(_FORMAT),
            scores=self.scores,
            buckets=self.buckets,
            num_buckets=np.int64(self.num_buckets),
        )

    @classmethod
    def load(cls, path: str | os.PathLike) -> DifficultyIndex:
        """Read an index ``save`` wrote (checked: a corrupt file raises, never half-loads)."""
        with np.load(path, allow_pickle=False) as f:
            missing = {"format", "scores", "buckets", "num_buckets"} - set(f.files)
            if missing:
                raise ValueError(
                    f"{os.fspath(path)} is not a difficulty index (missing {sorted(missing)}); "
                    "write one with build_index(...).save(path)."
                )
            if int(f["format"]) != _FORMAT:
                raise ValueError(
                    f"{os.fspath(path)}: difficulty index format {int(f['format'])}, this "
                    f"fscale reads {_FORMAT}; rebuild it with build_index."
                )
            scores, buckets, k = f["scores"], f["buckets"], int(f["num_buckets"])
        _check_index(scores, buckets, k, os.fspath(path))
        return cls(scores, buckets, k)


def build_index(scores, num_buckets: int) -> DifficultyIndex:
    """Sort per-sample ``scores`` (higher: harder) into ``num_buckets`` percentile buckets.

    Args:
      scores: one finite number per sample (a sequence, numpy array or 1-D tensor).
      num_buckets: how many buckets (1 <= num_buckets <= number of samples).

    Returns:
      A ``DifficultyIndex`` ([Note: buckets are percentiles of rank]).
    """
    if isinstance(scores, torch.Tensor):
        scores = scores.detach().cpu().double().numpy()
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 1 or scores.size == 0:
        raise ValueError(
            f"build_index: scores must be a non-empty 1-D sequence (one per sample), got "
            f"shape {scores.shape}."
        )
    bad = np.flatnonzero(~np.isfinite(scores))
    if bad.size:
        raise ValueError(
            f"build_index: scores of samples {bad[:5].tolist()} are not finite "
            f"({scores[bad[:5]].tolist()}); drop those samples or score them again."
        )
    n = scores.size
    if isinstance(num_buckets, bool) or not isinstance(num_buckets, int) or not 1 <= num_buckets:
        raise ValueError(f"build_index: num_buckets must be an int >= 1, got {num_buckets!r}.")
    if num_buckets > n:
        raise ValueError(
            f"build_index: num_buckets={num_buckets} is more than the {n} samples; every "
            f"bucket must hold a sample, so use num_buckets <= {n}."
        )
    order = np.lexsort((np.arange(n), scores))  # by score, ties by sample id
    buckets = np.empty(n, dtype=np.int64)
    buckets[order] = np.arange(n, dtype=np.int64) * num_buckets // n
    return DifficultyIndex(scores, buckets, num_buckets)


def scores_by_length(samples: Sequence, *, key: str | None = None) -> np.ndarray:
    """Each sample's length as its score: ``len(sample)`` (or ``len(sample[key])``).

    A tensor's length is its last dim (``(T,)`` token ids: ``T``).

    Usage::

        scores_by_length(dataset, key="input_ids")
    """
    out = np.empty(len(samples), dtype=np.float64)
    for i in range(len(samples)):
        s = samples[i] if key is None else samples[i][key]
        out[i] = s.shape[-1] if isinstance(s, (torch.Tensor, np.ndarray)) and s.ndim else len(s)
    return out


@torch.no_grad()
def scores_by_loss(
    model_fn: Callable,
    samples: Sequence,
    batch_size: int,
    *,
    collate: Callable = default_collate,
) -> np.ndarray:
    """Each sample's loss under a reference model as its score (harder: higher loss).

    Args:
      model_fn: ``model_fn(batch) -> (b,)`` per-sample losses for a collated batch
        of ``b`` samples (e.g. a cross-entropy with ``reduction="none"`` averaged over
        each sample's tokens). Runs under ``torch.no_grad()``.
      samples: an indexable dataset.
      batch_size: samples per call of ``model_fn``.
      collate: builds a batch from a list of samples (``default_collate``).

    Usage::

        scores = scores_by_loss(lambda b: per_sample_ce(ref, b), dataset, batch_size=64)
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"scores_by_loss: batch_size must be an int >= 1, got {batch_size!r}.")
    n = len(samples)
    out = np.empty(n, dtype=np.float64)
    for lo in range(0, n, batch_size):
        ids = range(lo, min(n, lo + batch_size))
        losses = model_fn(collate([samples[i] for i in ids]))
        losses = torch.as_tensor(losses).detach()
        if tuple(losses.shape) != (len(ids),):
            raise ValueError(
                f"scores_by_loss: model_fn returned shape {tuple(losses.shape)} for a batch "
                f"of {len(ids)} samples; return one loss per sample, shape ({len(ids)},) "
                "(e.g. reduction='none', then a mean over each sample's tokens)."
            )
        out[lo : lo + len(ids)] = losses.double().cpu().numpy()
    return out


def _check_index(scores, buckets, k: int, where: str) -> None:
    ok = (
        scores.ndim == 1
        and buckets.shape == scores.shape
        and scores.dtype == np.float64
        and buckets.dtype == np.int64
        and 1 <= k <= max(scores.size, 1)
        and scores.size > 0
        and bool(np.isfinite(scores).all())
        and buckets.min() >= 0
        and buckets.max() < k
        and np.unique(buckets).size == k
    )
    if not ok:
        raise ValueError(
            f"{where}: the difficulty index is inconsistent (scores {scores.shape} "
            f"{scores.dtype}, buckets {buckets.shape} {buckets.dtype}, num_buckets={k}); "
            "rebuild it with build_index(...).save(path)."
        )

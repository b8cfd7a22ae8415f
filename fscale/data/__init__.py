"""Data for curricula: schedules, an offline difficulty index and a sampler over it.

Usage::

    from fscale.data import CurriculumSampler, build_index, fixed_linear, scores_by_length

    index = build_index(scores_by_length(dataset), num_buckets=8)
    sampler = CurriculumSampler(index, fixed_linear(0, 7, steps=5000), batch_size=32)
"""

from fscale.data.difficulty import DifficultyIndex, build_index, scores_by_length, scores_by_loss
from fscale.data.sampler import CurriculumSampler
from fscale.data.schedules import Schedule, fixed_discrete, fixed_linear, fixed_root

__all__ = [
    "CurriculumSampler",
    "DifficultyIndex",
    "Schedule",
    "build_index",
    "fixed_discrete",
    "fixed_linear",
    "fixed_root",
    "scores_by_length",
    "scores_by_loss",
]

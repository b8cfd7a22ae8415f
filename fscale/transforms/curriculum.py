"""``curriculum(step, schedule)``: sequence-length warm-up, by truncating or reshaping the batch.

Early in pre-training, long sequences with a large batch and learning rate make GPT
training unstable (loss spikes); training on short sequences first and growing them
lets the same run use a larger batch and learning rate (Li et al., DeepSpeed's
"curriculum learning" / data efficiency). Each call, ``schedule(count)`` (``count``:
calls of the step so far, ``state["count"]``, skipped steps included) gives a length
``L``, and every sequence tensor of the batch is cut to length ``L`` before the inner
``loss_and_grad`` stage, so with ``accumulate > 1`` every micro-batch is cut the same
way. Two modes (DeepSpeed's ``seqlen_truncate`` and ``seqlen_reshape``):

- ``mode="truncate"`` (default): a ``(B, T)`` tensor becomes ``(B, L)``, its first
  ``L`` positions ([Note: truncation keeps positions right]); a step feeds ``B * L``
  tokens, so early steps are small (and, on a GPU, launch-bound).
- ``mode="reshape"``: a ``(B, T)`` tensor becomes ``(B * (T // L), L)``: row ``b``
  splits into ``T // L`` consecutive windows, rows ``b * (T // L) + j`` (window ``j``
  of row ``b``), and the last ``T % L`` tokens of each row are dropped; a step feeds
  ``B * (T // L) * L`` tokens, all of them when ``L`` divides ``T``
  ([Note: reshape packs windows]). Pass ``divides=T`` to the ``seqlen_*`` helpers to
  keep every length a divisor of ``T``. The other tensor leaves whose dim 0 is ``B``
  (a per-sample weight) are repeated per window (``repeat_interleave``); the rest
  pass as they are.

``metrics["seqlen"]`` reports ``L``, ``metrics["tokens"]`` the tokens this rank fed
this step (rows x ``L`` of the cut tensors, summed over micro-batches).

Which tensors are cut (``keys``, ``dim``):

- ``keys=None`` (default): every tensor leaf of the batch with more than ``dim``
  dims, along ``dim`` (default 1: ``{"x": (B, T), "y": (B, T)}``); they must all have
  the same size there, else name them;
- ``keys=["x", "y"]``: those leaves (paths as ``fs.tree.paths`` writes them) along ``dim``;
- ``keys={"x": 1, "mask": (1, 2)}``: per-leaf dims (a ``(B, T, T)`` mask is cut in both;
  truncate mode only: a window's mask is not a cut of the full one).

The batch dim (0) is never cut: ``accumulate`` splits it (in reshape mode each
micro-batch of ``B / accumulate`` rows is reshaped, which gives the same rows as the
micro-batches of the reshaped batch). The curriculum keeps no state of its own: the
length is a function of ``state["count"]``, which every checkpoint already holds, so
a resumed run continues at the same length.

Usage::

    step = fs.train_step(loss_fn, fs.optim.adamw(3e-4))
    step = curriculum(step, seqlen_warmup(64, 1024, steps=2000))   # bucket chosen: <= 8 shapes
    params, state, metrics = step(params, state, {"x": x, "y": y})  # (B, 1024) each
    metrics["seqlen"]                                              # 64 at first
    # The same tokens every step: (B * 16, 64) at first; lengths 64, 128, 256, 512, 1024.
    step = curriculum(step, seqlen_warmup(64, 1024, 2000, divides=1024), mode="reshape")

[Note: truncation keeps positions right]
Cutting to the first ``L`` tokens keeps positions ``0..L-1`` where they were. A
learned position table is read at ``arange(L)``: each kept token gets the same row as
at full length. RoPE rotates q and k by ``m * theta`` at position ``m`` and the score
depends on ``m - n`` only; models slice their cos/sin tables to ``[:L]``, the same
angles as at full length. With causal attention token ``i`` sees only tokens
``0..i``, so the truncated forward computes the full forward's first ``L`` outputs
(up to rounding: attention kernels reduce over other shapes; the tests check 1e-6
for both kinds of positions): the step is the full step with the loss restricted to
the first ``L`` targets. Taking a window from the middle would move tokens to other
positions; ``mode="reshape"`` does, on purpose ([Note: reshape packs windows]). Rows
of a learned table past ``L`` get zero grads during the warm-up (decoupled weight
decay still shrinks them), which is why the warm-up ends at full length.

[Note: reshape packs windows]
Truncation feeds ``B * L`` tokens a step: at ``L = T / 16`` a GPU step is tiny and
launch-bound, slow per token, which eats what the curriculum saves. Reshaping feeds
``B * (T // L) * L`` (``B * T`` when ``L`` divides ``T``): every step about as big as a
full-length one, only the attention span is short. What changes against truncation:
each window is a new sequence, so its tokens are at positions ``0..L-1``, not where
they were in the row (a learned table is read at ``arange(L)``, RoPE's tables sliced to
``[:L]``: both fine, as for any packed batch of short sequences, and the row's later
tokens train the first ``L`` position rows); no token attends across a window
boundary (the first token of window ``j > 0`` has no context, as the first token of a
row); and the last ``T % L`` tokens of each row are neither fed nor counted. The
reshaped step is the plain step on the reshaped batch, bit for bit (the tests check
this alone, under accumulation, mixed precision, ZeRO-3 and random-LTD).

[Note: at most 8 shapes]
Each distinct length is a new input shape: ``torch.compile`` specialises on it (and
recompiles, up to ``torch._dynamo.config.recompile_limit``, 8 by default), CUDA
graphs are captured per shape and kernel autotuning runs per shape. So the
``seqlen_*`` helpers round lengths down to a multiple of ``bucket`` and refuse a
schedule with more than ``max_shapes`` (8) distinct lengths; ``bucket=None`` picks the
smallest multiple of 8 (tensor-core friendly, DeepSpeed's advice for
``difficulty_step``) that gives at most 8. ``curriculum`` checks a ``Schedule``'s
``values()`` when it is applied; a plain callable is checked as it runs: the call
that would produce the ``max_shapes + 1``-th distinct length raises. In reshape mode a
length is still one shape, ``(B * (T // L), L)``; ``divides=T`` then rounds each length
further down to a divisor of ``T``, which only merges lengths.

References: Li et al., "The Stability-Efficiency Dilemma: Investigating Sequence
Length Warmup for Training GPT Models", NeurIPS 2022; DeepSpeed data efficiency
(curriculum learning, ``seqlen_truncate`` and ``seqlen_reshape``).
"""

from __future__ import annotations

import bisect
import functools
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from fscale import tree
from fscale.data.schedules import Schedule, fixed_discrete, fixed_linear, fixed_root
from fscale.step import Step, StepContext, Transform

NAME = "curriculum"
MAX_SHAPES = 8  # torch._dynamo.config.recompile_limit's default ([Note: at most 8 shapes])
_ALIGN = 8  # auto buckets are multiples of this (tensor cores)
MODES = ("truncate", "reshape")  # DeepSpeed's seqlen_truncate, seqlen_reshape


# ----------------------------------------------------------------------------- schedules


def seqlen_warmup(
    start: int,
    end: int,
    steps: int,
    *,
    bucket: int | None = None,
    divides: int | None = None,
    max_shapes: int = MAX_SHAPES,
) -> Schedule:
    """Linear length warm-up (DeepSpeed's ``fixed_linear``), at most ``max_shapes`` lengths.

    Args:
      start: the length at step 0 (>= 1).
      end: the full length, reached at ``steps`` and kept after.
      steps: step count at which the warm-up ends.
      bucket: lengths between are rounded down to a multiple of it; None: the smallest
        multiple of 8 that gives at most ``max_shapes`` distinct lengths.
      divides: then round each length down to a divisor of it (the full length ``T``:
        ``curriculum(..., mode="reshape")`` then drops no tokens); ``start`` and ``end``
        must divide it. None: no such rounding.
      max_shapes: refuse a schedule with more distinct lengths ([Note: at most 8 shapes]).

    Usage::

        seqlen_warmup(64, 1024, steps=2000, bucket=128).values()   # (64, 128, ..., 1024)
        seqlen_warmup(64, 1024, steps=2000, divides=1024).values() # (64, 128, 256, 512, 1024)
    """
    return _ramp("seqlen_warmup", start, end, steps, 1.0, bucket, divides, max_shapes)


def seqlen_root(
    start: int,
    end: int,
    steps: int,
    *,
    degree: float = 2.0,
    bucket: int | None = None,
    divides: int | None = None,
    max_shapes: int = MAX_SHAPES,
) -> Schedule:
    """Root length warm-up (DeepSpeed's ``fixed_root``): along ``(t / steps) ** (1 / degree)``.

    Arguments as ``seqlen_warmup``; ``degree`` >= 1 (2: a square root, fast at first).

    Usage::

        seqlen_root(64, 1024, steps=2000, degree=2)
    """
    return _ramp("seqlen_root", start, end, steps, degree, bucket, divides, max_shapes)


def seqlen_discrete(
    lengths, boundaries, *, divides: int | None = None, max_shapes: int = MAX_SHAPES
) -> Schedule:
    """Fixed lengths (DeepSpeed's ``fixed_discrete``): ``lengths[i]`` while the step count
    is below ``boundaries[i]``, ``lengths[-1]`` after.

    ``divides=T`` checks that every length divides ``T`` (for ``mode="reshape"``); the
    lengths given are used as they are.

    Usage::

        seqlen_discrete([128, 512, 1024], [1000, 3000])
    """
    schedule = fixed_discrete(lengths, boundaries)
    _check_lengths("seqlen_discrete", schedule, _max_shapes(max_shapes))
    if divides is not None:
        divides = _divides(divides)
        for length in schedule.values():
            _check_divisor("seqlen_discrete", "length", length, divides)
    return schedule


@dataclass(frozen=True)
class _DivisorSchedule(Schedule):
    """A linear or root ``Schedule`` whose values are rounded down to divisors of ``divides``.

    Rounding down to a member of a fixed set keeps the values monotone, so the base
    ``values()`` (a binary search over ``self(t)``) holds."""

    divides: int = 1

    def __call__(self, t: int) -> int:
        return _floor_divisor(super().__call__(t), self.divides)


@functools.cache
def _divisors(n: int) -> tuple[int, ...]:
    small = [d for d in range(1, int(n**0.5) + 1) if n % d == 0]
    return tuple(sorted(set(small) | {n // d for d in small}))


def _floor_divisor(value: int, n: int) -> int:
    """The largest divisor of ``n`` that is <= ``value`` (``value`` >= 1)."""
    divisors = _divisors(n)
    return divisors[max(0, bisect.bisect_right(divisors, value) - 1)]


def _divides(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(
            f"divides must be an int >= 1 (the full sequence length; lengths are rounded "
            f"down to its divisors), got {value!r}."
        )
    return value


def _check_divisor(what: str, name: str, value: int, divides: int) -> None:
    if value > divides:
        raise ValueError(
            f"{what}: divides={divides} keeps every length a divisor of {divides}, but "
            f"{name}={value} is above it; end the schedule at {divides} (the full length)."
        )
    if divides % value:
        below = _floor_divisor(value, divides)
        above = next(d for d in _divisors(divides) if d >= value)
        raise ValueError(
            f"{what}: divides={divides} keeps every length a divisor of {divides}, but "
            f"{name}={value} is not one; use {below} or {above}."
        )


def _ramp(what, start, end, steps, degree, bucket, divides, max_shapes) -> Schedule:
    max_shapes = _max_shapes(max_shapes)
    if isinstance(start, int) and not isinstance(start, bool) and start < 1:
        raise ValueError(
            f"{what}: start must be >= 1 (a sequence of {start} tokens has no loss), got "
            f"start={start!r}."
        )

    def make(b: int) -> Schedule:
        if degree == 1.0:
            schedule = fixed_linear(start, end, steps, bucket=b)
        else:
            schedule = fixed_root(start, end, steps, degree=degree, bucket=b)
        if divides is None:
            return schedule
        return _DivisorSchedule(**vars(schedule), divides=divides)

    if divides is not None:
        divides = _divides(divides)
        make(_ALIGN)  # argument errors first
        _check_divisor(what, "start", start, divides)
        _check_divisor(what, "end", end, divides)

    if bucket is not None:
        schedule = make(bucket)
        n = len(schedule.values())
        if n > max_shapes:
            fit = _smallest_bucket(make, end, max_shapes)
            raise ValueError(
                f"{what}(start={start}, end={end}, steps={steps}, bucket={bucket}) gives {n} "
                f"distinct lengths, more than max_shapes={max_shapes}: each is a new shape "
                f"for torch.compile and CUDA graphs. Use bucket={fit.bucket} (or bucket=None "
                "to pick it), or raise max_shapes."
            )
        return schedule
    make(_ALIGN)  # argument errors name the schedule before the search runs
    if start != end and max_shapes < 2:
        raise ValueError(
            f"{what}: max_shapes={max_shapes} allows one length, but start={start} and "
            f"end={end} differ; raise max_shapes or use a constant length (no curriculum)."
        )
    return _smallest_bucket(make, end, max_shapes)


def _smallest_bucket(make, end: int, max_shapes: int) -> Schedule:
    # Values fall to {start, end} once the bucket passes end: the search ends by then.
    for b in range(_ALIGN, max(end, 1) + 2 * _ALIGN, _ALIGN):
        schedule = make(b)
        if len(schedule.values()) <= max_shapes:
            return schedule
    raise AssertionError("unreachable: a bucket above end gives at most two lengths")


def _max_shapes(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"max_shapes must be an int >= 1, got {value!r}.")
    return value


def _check_lengths(what: str, schedule: Schedule, max_shapes: int) -> None:
    values = schedule.values()
    if min(values) < 1:
        raise ValueError(
            f"{what}: lengths must be >= 1 (a sequence of 0 tokens has no loss), got "
            f"{min(values)} among {list(values)}."
        )
    if len(values) > max_shapes:
        raise ValueError(
            f"{what}: {len(values)} distinct lengths {list(values)}, more than "
            f"max_shapes={max_shapes}: each is a new shape for torch.compile and CUDA "
            "graphs. Use fewer lengths, or raise max_shapes."
        )


# ----------------------------------------------------------------------------- transform


def curriculum(
    step: Step,
    schedule: Callable[[int], int],
    *,
    mode: str = "truncate",
    keys=None,
    dim: int = 1,
    max_shapes: int = MAX_SHAPES,
) -> Step:
    """Cut the batch's sequences to ``schedule(state["count"])`` tokens before each grad.

    Args:
      step: the step to transform (any stack: it wraps ``loss_and_grad`` only).
      schedule: ``count -> length``; ``seqlen_warmup``, ``seqlen_root``,
        ``seqlen_discrete`` or any callable returning an int >= 1.
      mode: ``"truncate"``: ``(B, T) -> (B, L)``, the first ``L`` tokens of each row;
        ``"reshape"``: ``(B, T) -> (B * (T // L), L)``, each row split into consecutive
        windows, the last ``T % L`` tokens of each row dropped (use lengths dividing
        ``T``: ``seqlen_warmup(..., divides=T)``) ([Note: reshape packs windows]).
      keys: which batch leaves to cut (module doc): None (every tensor with a ``dim``),
        a list of leaf paths, or ``{path: dim or (dims...)}`` (several dims: truncate only).
      dim: the sequence dim of the leaves ``keys`` does not map to dims (>= 1).
      max_shapes: at most this many distinct lengths ([Note: at most 8 shapes]).

    Returns:
      A ``Step`` whose metrics also hold ``seqlen``, the length this call used, and
      ``tokens``, the tokens this rank fed (rows x length of the cut tensors, summed
      over micro-batches).
    """
    if not callable(schedule):
        raise TypeError(
            f"curriculum: schedule must be callable (count -> length), got "
            f"{type(schedule).__name__}; use seqlen_warmup(start, end, steps)."
        )
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise ValueError(
            f"curriculum: dim must be an int >= 1 (dim 0 is the batch, which accumulate "
            f"splits), got {dim!r}."
        )
    if mode not in MODES:
        raise ValueError(
            f"curriculum: mode must be 'truncate' (DeepSpeed's seqlen_truncate) or 'reshape' "
            f"(seqlen_reshape), got {mode!r}."
        )
    max_shapes = _max_shapes(max_shapes)
    cut = _normalise_keys(keys, dim)
    if mode == "reshape":
        for k, dims in (cut or {}).items():
            if len(dims) > 1:
                raise ValueError(
                    f"curriculum: mode='reshape' splits each row into windows along one "
                    f"sequence dim, but keys[{k!r}] cuts dims {dims} (a (B, T, T) mask?), and "
                    "a window's mask is not a cut of the full one. Leave the mask out of the "
                    "batch and build it in loss_fn from the fed length (e.g. causal attention "
                    "with is_causal=True), or use mode='truncate'."
                )
    if isinstance(schedule, Schedule):
        _check_lengths("curriculum", schedule, max_shapes)
    record = Transform(
        NAME,
        options={"schedule": _describe(schedule), "mode": mode, "keys": cut, "dim": dim},
        plan=lambda plan: _plan(schedule, mode, plan),
    )
    lengths = _Lengths(schedule, max_shapes)
    inner = step.stages

    def loss_and_grad(ctx, params, batch):
        return _loss_and_grad(lengths, mode, cut, dim, inner, ctx, params, batch)

    return step.with_transform(record, loss_and_grad=loss_and_grad)


def _normalise_keys(keys, dim: int) -> dict[str, tuple[int, ...]] | None:
    if keys is None:
        return None
    if isinstance(keys, str):
        keys = [keys]
    if isinstance(keys, Mapping):
        items = [(k, v if isinstance(v, tuple) else (v,)) for k, v in keys.items()]
    else:
        items = [(k, (dim,)) for k in keys]
    if not items:
        raise ValueError("curriculum: keys is empty; name the sequence tensors, or pass None.")
    for k, dims in items:
        if not isinstance(k, str):
            raise TypeError(f"curriculum: keys are batch leaf paths (str), got {k!r}.")
        if not dims or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in dims):
            raise ValueError(
                f"curriculum: keys[{k!r}] must be a dim >= 1 or a tuple of them (dim 0 is the "
                f"batch), got {dims!r}."
            )
    return dict(items)


class _Lengths:
    """The schedule's length for a count, checked; remembers the lengths this process
    produced so a plain callable cannot exceed ``max_shapes`` ([Note: at most 8 shapes])."""

    def __init__(self, schedule, max_shapes: int):
        self.schedule = schedule
        self.max_shapes = max_shapes
        self.seen: set[int] = set()

    def __call__(self, count: int) -> int:
        length = self.schedule(count)
        if isinstance(length, torch.Tensor) and length.numel() == 1:
            length = length.item()
        if isinstance(length, numbers.Integral) and not isinstance(length, bool):
            length = int(length)  # numpy ints too
        else:
            raise TypeError(
                f"curriculum: schedule({count}) returned {length!r}; it must return an int length."
            )
        if length < 1:
            raise ValueError(
                f"curriculum: schedule({count}) returned length {length}; lengths must be >= 1."
            )
        if length not in self.seen:
            if len(self.seen) >= self.max_shapes:
                raise ValueError(
                    f"curriculum: schedule({count}) returned {length}, a new length after "
                    f"{sorted(self.seen)}: more than max_shapes={self.max_shapes} distinct "
                    "shapes, each a recompile for torch.compile. Round lengths to a bucket "
                    "(seqlen_warmup(..., bucket=...)) or raise max_shapes."
                )
            self.seen.add(length)
        return length


def _loss_and_grad(
    lengths: _Lengths, mode: str, cut, dim: int, inner, ctx: StepContext, params, batch
):
    count = ctx.state["count"]
    length = lengths(count)
    batch, rows = _cut(batch, length, count, mode, cut, dim)
    ctx.metrics["seqlen"] = length
    # loss_and_grad runs once per micro-batch: the step's tokens are their sum.
    ctx.metrics["tokens"] = ctx.metrics.get("tokens", 0) + rows * length
    return inner.loss_and_grad(ctx, params, batch)


def _cut(batch, length: int, count: int, mode: str, cut, dim: int):
    """``batch`` with the chosen leaves cut to ``length`` along their sequence dims
    (``mode``), and the rows the cut leaves then have."""
    leaves, spec = tree.flatten(batch)
    paths = tree.paths(batch)
    if cut is None:
        chosen = {
            i: (dim,) for i, t in enumerate(leaves) if isinstance(t, torch.Tensor) and t.ndim > dim
        }
        if not chosen:
            raise ValueError(
                f"curriculum: no batch tensor has a dim {dim} to cut (leaves: "
                f"{_shapes(paths, leaves)}); pass dim=... or keys=... naming the sequences."
            )
        sizes = {paths[i]: leaves[i].shape[dim] for i in chosen}
        if len(set(sizes.values())) > 1:
            raise ValueError(
                f"curriculum: keys=None cuts every batch tensor along dim {dim}, but their "
                f"sizes there differ: {sizes}. Pass keys=[...] naming the sequence tensors "
                "(or {path: dims} for e.g. a (B, T, T) mask)."
            )
    else:
        index = {p: i for i, p in enumerate(paths)}
        missing = sorted(set(cut) - set(index))
        if missing:
            raise ValueError(
                f"curriculum: keys {missing} are not in the batch; its leaves are {paths}."
            )
        chosen = {index[k]: dims for k, dims in cut.items()}
        for i, dims in chosen.items():
            t = leaves[i]
            if not isinstance(t, torch.Tensor) or t.ndim <= max(dims):
                raise ValueError(
                    f"curriculum: batch leaf {paths[i]!r} is {_shape(t)}, which has no dim "
                    f"{max(dims)} to cut; fix keys."
                )
    for i, dims in chosen.items():
        t = leaves[i]
        for d in dims:
            if length > t.shape[d]:
                raise ValueError(
                    f"curriculum: the schedule gives length {length} at step count {count}, "
                    f"but batch leaf {paths[i]!r} has shape {tuple(t.shape)}, only "
                    f"{t.shape[d]} along dim {d}; end the schedule at <= {t.shape[d]} (e.g. "
                    f"seqlen_warmup(start, {t.shape[d]}, steps)) or feed longer sequences."
                )
    if mode == "reshape":
        return _reshape(leaves, spec, paths, chosen, length)
    out = list(leaves)
    for i, dims in chosen.items():
        t = leaves[i]
        if any(t.shape[d] != length for d in dims):
            for d in dims:
                t = t.narrow(d, 0, length)
            # A copy of token ids is small; a contiguous tensor keeps .view() in loss_fn working.
            out[i] = t.contiguous()
    return tree.unflatten(spec, out), _rows(leaves, chosen)


def _reshape(leaves, spec, paths, chosen, length: int):
    """The chosen leaves, ``(B, ..., T, ...)``, as ``(B * (T // L), ..., L, ...)``: row
    ``b * (T // L) + j`` is window ``j`` of row ``b`` ([Note: reshape packs windows]);
    the other leaves with ``B`` rows repeated per window."""
    first = min(chosen)
    dims = chosen[first]
    rows, full = leaves[first].shape[0], leaves[first].shape[dims[0]]
    for i, (d,) in chosen.items():  # one dim each: curriculum() refused more
        if (leaves[i].shape[0], leaves[i].shape[d]) != (rows, full):
            raise ValueError(
                f"curriculum: mode='reshape' splits every cut leaf's rows into windows, so "
                f"they must share the batch size and sequence length; {paths[first]!r} has "
                f"shape {tuple(leaves[first].shape)} (dim {dims[0]}), {paths[i]!r} "
                f"{tuple(leaves[i].shape)} (dim {d}). Name only the (B, T) sequence tensors "
                "in keys=[...] (build e.g. shared position ids in loss_fn), or use "
                "mode='truncate'."
            )
    windows = full // length
    if windows == 1 and full == length:
        return tree.unflatten(spec, list(leaves)), rows
    out = list(leaves)
    for i, (d,) in chosen.items():
        t = leaves[i].narrow(d, 0, windows * length)  # the last T % L tokens dropped
        t = t.unflatten(d, (windows, length)).movedim(d, 1).flatten(0, 1)
        out[i] = t.contiguous()
    for i, t in enumerate(leaves):
        if i not in chosen and isinstance(t, torch.Tensor) and t.ndim and t.shape[0] == rows:
            out[i] = t.repeat_interleave(windows, dim=0)  # a per-sample value, per window
    return tree.unflatten(spec, out), rows * windows


def _rows(leaves, chosen) -> int:
    return leaves[min(chosen)].shape[0]


def _shape(t) -> str:
    return f"shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__


def _shapes(paths, leaves) -> dict[str, str]:
    return {p: _shape(t) for p, t in zip(paths, leaves, strict=True)}


def _describe(schedule) -> str:
    if isinstance(schedule, Schedule):
        if schedule.kind == "fixed_discrete":
            return f"fixed_discrete({list(schedule.levels)}, at {list(schedule.boundaries)})"
        degree = "" if schedule.kind == "fixed_linear" else f", degree={schedule.degree:g}"
        divides = getattr(schedule, "divides", None)
        divides = "" if divides is None else f", divides={divides}"
        return (
            f"{schedule.kind}({schedule.start}->{schedule.end} over {schedule.steps} steps"
            f"{degree}, bucket={schedule.bucket}{divides})"
        )
    return getattr(schedule, "__name__", type(schedule).__name__)


def _plan(schedule, mode: str, plan) -> None:
    lengths = f" (lengths {list(schedule.values())})" if isinstance(schedule, Schedule) else ""
    how = "cut to" if mode == "truncate" else "split into (B * (T // L), L) windows of length"
    plan.notes.append(
        f"curriculum ({mode}): sequences {how} {_describe(schedule)}{lengths} before each "
        "loss_and_grad; activation and FLOP estimates are for the full batch."
    )

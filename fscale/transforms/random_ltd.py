"""``random_ltd(step, layers=..., keep=...)``: random layerwise token dropping.

Random-LTD (Yao et al., 2022) skips most tokens in the middle layers of a
transformer: in each selected unit, every sequence keeps a random subset of
``keep`` token positions, the unit runs on those tokens only, and its outputs are
scattered back into the full sequence. A dropped token passes the unit unchanged
(the residual bypass), so the first and last units, which see every token, keep
the model's full-length view. Each unit and each sample draws its own subset;
the subset is sorted, so a causal unit attends causally over the kept tokens.

- ``keep``: tokens kept per sequence, an int or a schedule ``count -> int`` of the
  step's calls so far (``state["count"]``; the paper grows it to the full length).
  ``keep >= seq`` runs the unit on the whole sequence, untouched: the step is then
  the plain step bit for bit.
- ``layers``: which units drop tokens: unit indices (``range(1, 11)``) or unit names
  (``"blocks.3"``); by default every unit but the first and the last.
- ``seed``: the draw's seed ([Note: the draw]).

It is a unit transform (as ``checkpoint_activations``): ``train_step(...,
model=model)`` gives the step its units, and each selected unit's forward is
wrapped; no stage changes but a thin ``loss_and_grad`` wrapper that hands the
call's count and keep to the hook ([Note: the call reaches the hook]). So it goes
anywhere in a stack: over or under ``shard_zero``, ``mixed_precision``,
``checkpoint_activations`` and ``offload``. ``metrics["random_ltd_keep"]`` reports
the tokens each sequence kept in the selected units (``min(keep, seq)``).

What the unit is given: its first argument (or ``hidden_states=``) is the hidden
state, ``(batch, seq, ...)``. Every tensor argument (also inside tuples, such as
Hugging Face's ``position_embeddings=(cos, sin)``) whose first two dims are
``(batch or 1, seq)`` is gathered along the sequence (``position_ids``, RoPE's
cos/sin: the kept tokens keep their positions), and a 4-D ``(batch or 1, heads or
1, seq, seq)`` attention mask is gathered along both of its last dims. Other
arguments pass as they are. The unit returns the hidden state (or a tuple whose
first element is it); it must keep the shape of its input.

``layer_token_lr`` is the paper's LayerToken learning-rate schedule: its decay
follows the layer-tokens the run has consumed, not the steps.

Usage::

    step = fs.train_step(loss_fn, fs.optim.adamw(lr=lr), model=apply)
    step = random_ltd(step, keep=lambda count: min(128 + count // 100, 2048))
    lr = layer_token_lr(3e-4, keep=..., seq_len=2048, n_layers=24, n_dropped=22,
                        warmup_steps=2_000, total_steps=100_000)

[Note: the draw]
The kept positions of unit ``u`` (its index in ``step.units.names``) in
micro-batch ``m`` of the call with ``count`` calls before it are::

    g = torch.Generator(device=x.device).manual_seed(
        (((seed * P + count) * P + m) * P + u) % 2**63)            # P = 1_000_003
    noise = torch.rand(batch, seq, generator=g, device=x.device)
    keep_idx = noise.argsort(dim=1, stable=True)[:, :keep].sort(dim=1).values

A fresh generator per unit call: the global RNG is untouched (dropout masks are
those of the plain step), and a recompute (``checkpoint_activations`` over this
transform) draws the same positions again. Ranks of a data-parallel world use the
same seed: they draw the same positions for the same row of their local batch,
which is fine, since the rows hold different samples (their grads are averaged as
usual). The micro-batch index ``m`` (0 without accumulation) gives each
micro-batch its own draw; an accumulated step therefore draws other subsets than
the same batch unsplit.

[Note: the call reaches the hook]
A unit hook is ``hook(unit_name, forward)``, with no step context; the count and
keep of the call live in the step context. The ``loss_and_grad`` wrapper puts
them in a context variable for the duration of the inner stage (as
``fscale.optim.schedules.reporting`` does) and the hook reads it when it wraps the
unit, once per call, not when the unit runs: a checkpoint recompute in backward
may run on autograd's worker threads, where the variable is not set. Outside a
step call (the module used directly, ``fs.explain``) the variable is unset and the
unit runs on every token.

References:
  Yao et al., "Random-LTD: Random and Layerwise Token Dropping Brings Efficient
  Training for Large-Scale Transformers", 2022 (arXiv:2211.11586).
"""

from __future__ import annotations

import contextvars
import math
import numbers
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from fscale.step import Step, Transform

NAME = "random_ltd"
_P = 1_000_003

KeepSchedule = int | Callable[[int], int]


def random_ltd(
    step: Step,
    *,
    keep: KeepSchedule,
    layers: Iterable[int | str] | None = None,
    seed: int = 0,
) -> Step:
    """Drop tokens at random in the selected units: each runs on ``keep`` tokens per sequence.

    Args:
      step: the step to transform; it must know the model's units
        (``fs.train_step(loss_fn, opt, model=model)`` or ``model=apply``).
      keep: tokens each sequence keeps in a selected unit: an int >= 1, or a schedule
        ``count -> int`` (count: the step's calls so far). ``keep >= seq`` drops nothing.
      layers: the units that drop tokens, by index in ``step.units.names`` (negative
        counts from the end) or by name; default: all but the first and the last.
      seed: seeds the draw ([Note: the draw]).

    Returns:
      A ``Step`` whose selected units see ``keep`` random tokens of each sequence;
      ``metrics["random_ltd_keep"]`` holds the tokens kept this step.
    """
    _check_keep(keep)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"random_ltd: seed must be an int, got {seed!r}.")
    units = _units_of(step)
    selected = _select(units.names, layers)
    record = Transform(
        NAME,
        options={
            "keep": keep if isinstance(keep, int) else getattr(keep, "__name__", "schedule"),
            "layers": [units.names[i] for i in sorted(selected)],
            "seed": int(seed),
        },
        plan=lambda plan: plan.notes.append(
            f"random_ltd: {len(selected)} of {len(units.names)} units run on `keep` random "
            "tokens per sequence; the others on all of them."
        ),
        scratch=True,
    )
    index_of = {name: i for i, name in enumerate(units.names)}
    inner = step.stages.loss_and_grad

    def loss_and_grad(ctx, params, batch):
        scratch = ctx.scratch(NAME)
        micro = scratch.get("micro", 0)  # one call per micro-batch
        scratch["micro"] = micro + 1
        count = int(ctx.state["count"])
        call = _Call(int(seed), count, micro, _keep_at(keep, count))
        token = _CALL.set(call)
        try:
            out = inner(ctx, params, batch)
        finally:
            _CALL.reset(token)
        ctx.metrics["random_ltd_keep"] = call.keep if call.kept is None else call.kept
        return out

    def hook(name: str, forward: Callable) -> Callable:
        unit = index_of[name]
        call = _CALL.get(None)  # [Note: the call reaches the hook]
        if unit not in selected or call is None:
            return forward
        return _dropping(forward, call, unit, name)

    return step.with_transform(record, unit_hook=hook, loss_and_grad=loss_and_grad)


# ----------------------------------------------------------------------------- checks


def _check_keep(keep) -> None:
    if callable(keep):
        return
    if isinstance(keep, bool) or not isinstance(keep, numbers.Integral):
        raise TypeError(
            f"random_ltd: keep must be an int (tokens kept per sequence) or a schedule "
            f"count -> int, got {keep!r}."
        )
    if keep < 1:
        raise ValueError(
            f"random_ltd: keep must be >= 1 (tokens kept per sequence), got {keep}; to "
            "drop nothing, pass keep >= the sequence length (or leave random_ltd out)."
        )


def _keep_at(keep: KeepSchedule, count: int) -> int:
    if not callable(keep):
        return int(keep)
    value = keep(count)
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or value != int(value):
        raise ValueError(
            f"random_ltd: the keep schedule returned {value!r} at count {count}; it must "
            "return an int (tokens kept per sequence)."
        )
    if value < 1:
        raise ValueError(
            f"random_ltd: the keep schedule returned {value} at count {count}; it must be "
            ">= 1 (clamp it, e.g. max(1, ...))."
        )
    return int(value)


def _units_of(step: Step):
    if step.units is None:
        raise ValueError(
            "random_ltd drops tokens inside the model's units, but the step does not know "
            "the model: build it with fs.train_step(loss_fn, opt, model=model) (or "
            "model=apply from fs.functional)."
        )
    if not step.units.names:
        raise ValueError(
            f"random_ltd drops tokens inside the model's units, but "
            f"{type(step.units.module).__name__} has none (no ModuleList); pass "
            "train_step(..., units=...) naming its blocks."
        )
    return step.units


def _select(names: tuple[str, ...], layers) -> frozenset[int]:
    n = len(names)
    if layers is None:
        if n < 3:
            raise ValueError(
                f"random_ltd: the model has {n} units ({list(names)}); by default tokens are "
                "dropped in all but the first and the last unit, which leaves none. Pass "
                "layers=[...] naming the units to drop tokens in."
            )
        return frozenset(range(1, n - 1))
    if isinstance(layers, (str, int)):
        layers = [layers]
    chosen = set()
    for item in layers:
        if isinstance(item, str):
            if item not in names:
                raise ValueError(
                    f"random_ltd: layers names {item!r}, which is not a unit; the units are "
                    f"{list(names)}."
                )
            chosen.add(names.index(item))
        elif isinstance(item, numbers.Integral) and not isinstance(item, bool):
            if not -n <= item < n:
                raise ValueError(
                    f"random_ltd: layers has index {item}, but the model has {n} units "
                    f"(0..{n - 1}: {list(names)})."
                )
            chosen.add(int(item) % n)
        else:
            raise TypeError(
                f"random_ltd: layers must hold unit indices or unit names, got {item!r}."
            )
    if not chosen:
        raise ValueError(
            f"random_ltd: layers names no unit; name some of {list(names)} (by index or name)."
        )
    return frozenset(chosen)


# ----------------------------------------------------------------------------- the hook


@dataclass
class _Call:
    """What one ``loss_and_grad`` call tells the hooks: the draw's key and keep."""

    seed: int
    count: int
    micro: int
    keep: int
    kept: int | None = field(default=None)  # min(keep, seq) once a unit has run


_CALL: contextvars.ContextVar[_Call | None] = contextvars.ContextVar("fscale_random_ltd")


def draw_seed(seed: int, count: int, micro: int, unit: int) -> int:
    """The generator seed of unit ``unit``'s draw ([Note: the draw])."""
    return (((seed * _P + count) * _P + micro) * _P + unit) % 2**63


def kept_positions(
    seed: int, count: int, micro: int, unit: int, batch: int, seq: int, keep: int, device=None
) -> torch.Tensor:
    """The sorted ``(batch, keep)`` positions unit ``unit`` keeps ([Note: the draw])."""
    g = torch.Generator(device=device).manual_seed(draw_seed(seed, count, micro, unit))
    noise = torch.rand(batch, seq, generator=g, device=device)
    return noise.argsort(dim=1, stable=True)[:, :keep].sort(dim=1).values


def _dropping(forward: Callable, call: _Call, unit: int, name: str) -> Callable:
    def wrapped(*args, **kwargs):
        x = args[0] if args else kwargs.get("hidden_states")
        if not isinstance(x, torch.Tensor) or x.ndim < 2:
            raise TypeError(
                f"random_ltd: unit {name!r} got {type(x).__name__} as its first argument; it "
                "must be the hidden state, a (batch, seq, ...) tensor. Select units that "
                "take the hidden state first with layers=[...]."
            )
        batch, seq = x.shape[:2]
        call.kept = min(call.keep, seq)
        if call.keep >= seq:  # nothing to drop: the plain unit, bit for bit
            return forward(*args, **kwargs)
        idx = kept_positions(
            call.seed, call.count, call.micro, unit, batch, seq, call.keep, x.device
        )
        args = tuple(_gather(a, idx, batch, seq) for a in args)
        kwargs = {k: _gather(v, idx, batch, seq) for k, v in kwargs.items()}
        return _scatter(x, idx, forward(*args, **kwargs), name)

    return wrapped


def _gather(value, idx: torch.Tensor, batch: int, seq: int):
    """``value`` at the kept positions where it has a sequence dim, else as it is."""
    if isinstance(value, (tuple, list)):
        return type(value)(_gather(v, idx, batch, seq) for v in value)
    if not isinstance(value, torch.Tensor) or value.ndim < 2 or value.shape[0] not in (1, batch):
        return value
    keep = idx.shape[1]
    if value.ndim == 4 and value.shape[-2:] == (seq, seq):  # an attention mask: rows and columns
        value = value.expand(batch, *value.shape[1:])
        heads = value.shape[1]
        rows = idx[:, None, :, None].expand(batch, heads, keep, seq)
        cols = idx[:, None, None, :].expand(batch, heads, keep, keep)
        return value.gather(2, rows).gather(3, cols)
    if value.shape[1] != seq:
        return value
    value = value.expand(batch, *value.shape[1:])
    return value.gather(
        1, idx.view(batch, keep, *[1] * (value.ndim - 2)).expand(batch, keep, *value.shape[2:])
    )


def _scatter(x: torch.Tensor, idx: torch.Tensor, out, name: str):
    """The unit's outputs on the kept tokens, put back into its input (dropped ones bypass)."""
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return type(out)((_scatter(x, idx, out[0], name), *out[1:]))
    want = (x.shape[0], idx.shape[1], *x.shape[2:])
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != want:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(
            f"random_ltd: unit {name!r} returned {got} for a {want} input; a unit that "
            "drops tokens must return the hidden state in its input's shape (a residual "
            "block). Leave this unit out of layers=[...]."
        )
    index = idx.view(*idx.shape, *[1] * (x.ndim - 2)).expand(want)
    return x.to(out.dtype).scatter(1, index, out)


# ----------------------------------------------------------------------------- LayerToken LR


def layer_token_lr(
    peak: float,
    *,
    keep: KeepSchedule,
    seq_len: int,
    n_layers: int,
    n_dropped: int,
    warmup_steps: int,
    total_steps: int,
    end: float = 0.0,
) -> Callable[[int], float]:
    """The LayerToken LR schedule: linear warmup in steps, then a cosine decay in layer-tokens.

    A step of random-LTD costs each sequence ``layer_tokens(c) = n_dropped *
    min(keep(c), seq_len) + (n_layers - n_dropped) * seq_len`` layer-tokens (tokens
    times the layers they pass through) instead of the ``n_layers * seq_len`` of a
    full step. The decay is driven by the layer-tokens consumed so far,
    ``LT(c) = sum(layer_tokens(s) for s < c)``, against the budget of the full-length
    baseline, ``total_steps * n_layers * seq_len``: with ``u = (LT(c) - LT(w)) /
    (budget - LT(w))`` clipped to [0, 1] (``w = warmup_steps``)::

        lr(c) = peak * c / w                                   c < w
        lr(c) = end + (peak - end) * (1 + cos(pi * u)) / 2     c >= w

    A run that drops tokens consumes fewer layer-tokens per step, so its LR decays
    more slowly than the step-based schedule and reaches ``end`` when it has used the
    baseline's layer-token budget (after more than ``total_steps`` steps). With
    ``keep >= seq_len`` it is the step-based ``warmup_cosine(peak, w, total_steps,
    end)``. The batch size cancels (it is the same every step).

    Args:
      peak: the LR after warmup.
      keep: the keep given to ``random_ltd`` (an int or a schedule ``count -> int``).
      seq_len: the full sequence length.
      n_layers: all units of the model.
      n_dropped: the units that drop tokens (``len(layers)`` of ``random_ltd``).
      warmup_steps: linear warmup, in steps (>= 0).
      total_steps: steps of the full-length baseline; sets the layer-token budget.
      end: the final LR.

    Returns:
      ``lr(count)``, usable as ``fs.optim.adamw(lr=...)``; ``lr.layer_tokens(count)``
      gives ``LT(count)`` per sequence.

    References:
      Yao et al., 2022, section 4 (the LayerToken LR schedule).
    """
    for arg, value, low in (
        ("seq_len", seq_len, 1),
        ("n_layers", n_layers, 1),
        ("n_dropped", n_dropped, 0),
        ("warmup_steps", warmup_steps, 0),
        ("total_steps", total_steps, 1),
    ):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
            raise ValueError(f"layer_token_lr: {arg} must be an int >= {low}, got {value!r}.")
    if n_dropped > n_layers:
        raise ValueError(
            f"layer_token_lr: n_dropped={n_dropped} exceeds n_layers={n_layers}; n_dropped "
            "counts the units that drop tokens, among all n_layers."
        )
    if warmup_steps >= total_steps:
        raise ValueError(
            f"layer_token_lr: warmup_steps={warmup_steps} must be < total_steps={total_steps}."
        )
    for arg, value in (("peak", peak), ("end", end)):
        if not (isinstance(value, numbers.Real) and math.isfinite(value) and value >= 0):
            raise ValueError(f"layer_token_lr: {arg} must be a finite float >= 0, got {value!r}.")
    _check_keep(keep)
    full = n_layers - n_dropped

    def per_step(count: int) -> int:
        return n_dropped * min(_keep_at(keep, count), seq_len) + full * seq_len

    # Prefix sums, grown on demand: the schedule is read once per step, so the sum
    # over the whole history is never recomputed (LT(c) is prefix[c]).
    prefix = [0]

    def layer_tokens(count: int) -> int:
        if not callable(keep):
            return count * per_step(0)
        while len(prefix) <= count:
            prefix.append(prefix[-1] + per_step(len(prefix) - 1))
        return prefix[count]

    budget = total_steps * n_layers * seq_len
    start = layer_tokens(warmup_steps)

    def lr(count: int) -> float:
        if count < warmup_steps:
            return peak * count / warmup_steps
        u = min(max((layer_tokens(count) - start) / (budget - start), 0.0), 1.0)
        return end + (peak - end) * 0.5 * (1.0 + math.cos(math.pi * u))

    lr.layer_tokens = layer_tokens
    return lr


__all__ = ["kept_positions", "layer_token_lr", "random_ltd"]

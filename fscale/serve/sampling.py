"""Next tokens from a batch of logits: greedy, temperature, top-k, top-p, seeded.

Usage::

    tokens = sample(logits, [seq.params for seq in seqs], [seq.generator for seq in seqs],
                    default_generator)          # list[int], one per row
    tokens = sample_tokens(...)                 # the same as a device tensor, no host sync

[Note: seeded sampling is batch-independent]
Every non-greedy row draws its token by the exponential race (argmax of p / E with
E ~ Exp(1) i.i.d., which picks token i with probability p_i): a request with a seed
draws its E from its own generator, one row of V numbers per token, so its choices
depend only on its logits and its seed, never on who else is in the batch. Rows
without a seed share the engine's generator, drawn in one call for all of them.
"""

from __future__ import annotations

import torch

from fscale.serve.params import SamplingParams


def row_argmax(logits: torch.Tensor) -> torch.Tensor:
    """``logits.argmax(dim=-1)`` for ``[B, V]`` logits, the same index (the first of
    equal maxima; a NaN wins as it does there), in two passes where a batch has few rows.

    torch reduces each row in one block: a 128K-word vocabulary's argmax was a 28 us
    kernel at batch 1 on an H200 (profiler time, ~1% of an FP6 8B decode step; in the
    decode graph the gain was within its run-to-run noise, < 0.01 ms). Split into P
    chunks (P dividing V) the first pass has B * P rows; the first chunk holding the
    row's max is the argmax's, and within it the first index of that max is.
    """
    B, V = logits.shape
    parts = _ARGMAX_PARTS.get(V)
    if parts is None:
        parts = _ARGMAX_PARTS[V] = max(
            (p for p in range(32, 1025) if V % p == 0 and V // p >= 64), default=1
        )
    if parts == 1 or B > 8:
        return logits.argmax(dim=-1)
    best, inner = logits.reshape(B, parts, V // parts).max(dim=-1)
    chunk = best.argmax(dim=-1, keepdim=True)
    return (chunk * (V // parts) + inner.gather(-1, chunk)).squeeze(-1)


_ARGMAX_PARTS: dict[int, int] = {}  # vocabulary size -> chunks (1: one pass)


def _filter(logits: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    """Logits with everything outside each row's top-k / top-p set at -inf."""
    V = logits.shape[-1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    k = torch.tensor([V if t <= 0 else min(t, V) for t in top_k], device=logits.device)
    drop = torch.arange(V, device=logits.device)[None, :] >= k[:, None]
    p = torch.tensor(top_p, device=logits.device, dtype=torch.float32)
    probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(-1)
    # Drop a token when the ones before it already reach p (the first is always kept).
    drop |= (probs.cumsum(-1) - probs) >= p[:, None]
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)


def sample(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
    default: torch.Generator | None = None,
    greedy: torch.Tensor | None = None,
) -> list[int]:
    """One token per row of ``logits`` ``[B, V]`` (float32); ``greedy``: its argmax per
    row when already computed (the runner's CUDA graphs do), else computed here."""
    return sample_tokens(logits, params, generators, default, greedy).tolist()


def sample_tokens(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
    default: torch.Generator | None = None,
    greedy: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`sample`'s tokens as a tensor on the logits' device (int64 ``[B]``), with
    no host sync: overlapped steps feed them to the next forward before reading them."""
    if greedy is None:
        greedy = row_argmax(logits)
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if not rows:
        return greedy
    x = logits[rows]
    temps = torch.tensor([params[i].temperature for i in rows], device=x.device)
    x = x / temps[:, None]
    if any(params[i].top_k > 0 or params[i].top_p < 1.0 for i in rows):
        x = _filter(x, [params[i].top_k for i in rows], [params[i].top_p for i in rows])
    probs = x.softmax(dim=-1)
    race = torch.empty_like(probs)
    # Rows without a seed share the engine's generator: one draw for all of them (a
    # launch per row cost ~2 us of GPU and ~4 us of host each, for hundreds of rows).
    shared = [j for j, i in enumerate(rows) if generators[i] is None]
    if len(shared) == len(rows):
        race.exponential_(generator=default)
    elif shared:
        idx = torch.tensor(shared, device=race.device)
        race[idx] = torch.empty_like(race[idx]).exponential_(generator=default)
    for j, i in enumerate(rows):
        if generators[i] is not None:
            race[j].exponential_(generator=generators[i])
    picked = (probs / race).argmax(dim=-1)
    out = greedy.clone()
    out[rows] = picked
    return out

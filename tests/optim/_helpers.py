"""Shared helpers for the optimizer tests: random pytrees, torch.optim runs, error measure."""

from __future__ import annotations

import torch
from hypothesis import strategies as st

from fscale import tree
from fscale.optim import apply_gradients, apply_updates

STEPS = 10
TOL = 1e-6

# Several params of random shapes (0-d excluded: biases and norms are 1-D, weights 2-D+).
shapes = st.lists(
    st.lists(st.integers(1, 5), min_size=1, max_size=3).map(tuple), min_size=1, max_size=4
)
seeds = st.integers(0, 2**31 - 1)


def make_params(shape_list, seed, dtype=torch.float32) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {f"p{i}": torch.randn(s, generator=gen).to(dtype) for i, s in enumerate(shape_list)}


def make_grads(params: dict, seed, steps=STEPS) -> list[dict]:
    gen = torch.Generator().manual_seed(seed + 1)
    return [
        {k: torch.randn(p.shape, generator=gen).to(p.dtype) for k, p in params.items()}
        for _ in range(steps)
    ]


def clone(t):
    return tree.map(lambda x: None if x is None else x.clone(), t)


def rel_err(a: dict, b: dict, start: dict | None = None) -> float:
    """Max over leaves of ``max|a - b| / scale``, a norm-wise relative error per tensor.

    ``scale`` is ``max|b|``, or ``max(|b|, |start|)`` given the params the run
    started from: rounding errors are ulps of the magnitudes the trajectory went
    through, so a tensor that ends near zero must not turn ulps into a large ratio.
    """
    worst = 0.0
    starts = [None] * len(tree.leaves(b)) if start is None else tree.leaves(start)
    for x, y, s in zip(tree.leaves(a), tree.leaves(b), starts, strict=True):
        x, y = x.double(), y.double()
        scale = y.abs().max()
        if s is not None:
            scale = torch.maximum(scale, s.double().abs().max())
        worst = max(worst, ((x - y).abs().max() / scale.clamp_min(1e-30)).item())
    return worst


def run_torch(make_opt, params: dict, grads_seq: list[dict], lrs=None) -> dict:
    """Run a torch.optim optimizer; ``make_opt(list_of_params)`` builds it."""
    tparams = {k: torch.nn.Parameter(p.clone()) for k, p in params.items()}
    opt = make_opt(tparams)
    for k, grads in enumerate(grads_seq):
        if lrs is not None:
            for group in opt.param_groups:
                group["lr"] = lrs(k)
        for name, p in tparams.items():
            g = grads[name]
            p.grad = None if g is None else g.clone()
        opt.step()
    return {k: p.detach() for k, p in tparams.items()}


def run_fscale(tx, params: dict, grads_seq: list[dict], *, fused=False):
    """``(params, state)`` after the sequence, through ``update`` + ``apply_updates`` or fused."""
    params = clone(params)
    state = tx.init(params)
    for grads in grads_seq:
        grads = clone(grads)
        if fused:
            params, state = apply_gradients(tx, grads, state, params)
        else:
            updates, state = tx.update(grads, state, params)
            params = apply_updates(params, updates)
    return params, state

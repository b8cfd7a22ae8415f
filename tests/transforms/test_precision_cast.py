"""mixed_precision's grouped cast ([Note: cast groups]): same maths as ``.to``, fewer launches."""

from __future__ import annotations

import copy

import pytest
import torch

import fscale as fs
from fscale.models.gpt import GPT, GPTConfig
from fscale.transforms import _precision_cast
from fscale.transforms._precision_cast import CastGroups, _CastGroup
from fscale.units import find_units
from tests.helpers import lm_batches, lm_loss


class _Ctx:
    def __init__(self, units=None, hooked=False):
        self.step = type("S", (), {"units": units})()
        self.grad_sink = object() if hooked else None
        self.grad_ready = None


def test_grouped_cast_equals_to_both_ways():
    gen = torch.Generator().manual_seed(0)
    params = {
        "a": torch.randn(7, 5, generator=gen),
        "b": torch.randn(13, generator=gen),
        "unused": torch.randn(3, generator=gen),
        "half": torch.randn(4, generator=gen).to(torch.bfloat16),  # left alone
        "ids": torch.arange(4),
    }
    cotangent = {k: torch.randn(v.shape, generator=gen) for k, v in params.items()}

    def run(cast):
        leaves = {k: v.detach().requires_grad_(v.is_floating_point()) for k, v in params.items()}
        out = cast(leaves)
        loss = sum((out[k].float() * cotangent[k]).sum() for k in ("a", "b", "half"))
        wrt = [leaves[k] for k in ("a", "b", "unused", "half")]
        return out, torch.autograd.grad(loss, wrt, allow_unused=True)

    casts = CastGroups()
    got, got_grads = run(lambda p: casts(_Ctx(), p, torch.bfloat16))
    want, want_grads = run(
        lambda p: {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in p.items()}
    )
    assert got["half"] is not None and got["ids"].dtype == torch.int64
    for k in params:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0)
        assert got[k].dtype == want[k].dtype
    for g, w in zip(got_grads, want_grads, strict=True):
        if w is None:
            assert g is None
        else:
            assert g.dtype == w.dtype
            torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_groups_follow_units_and_grad_hooks():
    model = GPT(GPTConfig.tiny())
    units = find_units(model)
    paths = [n for n, _ in model.named_parameters()]
    todo = tuple(range(len(paths)))
    by_unit = _precision_cast._group(units, paths, todo, hooked=True)
    assert len(by_unit) == len(units.names) + 1  # the blocks, and the root's params
    for idx in by_unit:
        assert len({units.key_of(paths[i]) for i in idx}) == 1
    assert _precision_cast._group(None, paths, todo, hooked=False) == [list(todo)]
    assert _precision_cast._group(None, paths, todo, hooked=True) == [[i] for i in todo]


@pytest.mark.parametrize("tied", [False, True])
def test_mixed_precision_step_equals_per_leaf_casts(tied, monkeypatch):
    """Bit for bit against the per-leaf ``.to`` it replaces, and one cast per unit."""
    torch.manual_seed(0)
    cfg = GPTConfig.tiny(bias=False, tie_embeddings=tied)
    model = GPT(cfg)
    batches = lm_batches(3, 4, 8, vocab=cfg.vocab_size, seed=1)

    def train():
        params, apply = fs.functional(copy.deepcopy(model))
        step = fs.train_step(lm_loss(apply), fs.optim.adamw(1e-2), model=apply, clip_norm=1.0)
        step = fs.mixed_precision(step, "bf16")
        params, state = step.init(params)
        for batch in batches:
            params, state, _ = step(params, state, batch)
        return params

    calls = []
    real = _CastGroup.apply
    monkeypatch.setattr(_CastGroup, "apply", lambda *a: calls.append(len(a) - 1) or real(*a))
    grouped = train()
    n_units = len(find_units(model).names)
    assert len(calls) == 3 * (n_units + 1)  # a launch per unit, not per param
    assert sum(calls) == 3 * len(list(model.parameters()))

    def per_leaf(self, ctx, params, dtype):
        return fs.tree.map(
            lambda t: t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t,
            params,
        )

    monkeypatch.setattr(CastGroups, "__call__", per_leaf)
    reference = train()
    for name in reference:
        torch.testing.assert_close(grouped[name], reference[name], rtol=0, atol=0)

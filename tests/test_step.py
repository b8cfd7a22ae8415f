"""The plain step equals nn.Module + torch.optim + loss.backward()."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import fscale as fs
from tests.helpers import (
    TiedLM,
    lm_batches,
    lm_loss,
    max_rel_error,
    mlp,
    regression_batches,
    regression_loss,
    torch_reference,
)


def _train(step, params, batches):
    params, state = step.init(params)
    metrics = None
    for batch in batches:
        params, state, metrics = step(params, state, batch)
    return params, state, metrics


def _adamw_torch(ps):
    return torch.optim.AdamW(ps, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)


def _adamw_fs():
    return fs.optim.adamw(lr=1e-2, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1)


def _mse_module(module, batch):
    return F.mse_loss(module(batch["x"]), batch["y"])


def _ce_module(module, batch):
    return F.cross_entropy(module(batch["x"]).flatten(0, 1), batch["y"].flatten())


def test_adamw_step_equals_torch_adamw_over_10_steps():
    model = mlp([5, 16, 7, 3])
    batches = regression_batches(10, 8, 5, 3)
    expected = torch_reference(model, _adamw_torch, _mse_module, batches)
    params, apply = fs.functional(copy.deepcopy(model))
    params, _, metrics = _train(fs.train_step(regression_loss(apply), _adamw_fs()), params, batches)
    assert max_rel_error(params, expected) <= 1e-6
    assert torch.isfinite(metrics["loss"])


def test_tied_weights_stay_tied_and_match_torch():
    model = TiedLM()
    batches = lm_batches(10, 4, 6, vocab=11)
    expected = torch_reference(model, _adamw_torch, _ce_module, batches)
    params, apply = fs.functional(copy.deepcopy(model))
    assert "head.weight" not in params  # the tied weight appears once, under its first name
    params, _, _ = _train(fs.train_step(lm_loss(apply), _adamw_fs()), params, batches)
    expected.pop("head.weight", None)
    assert max_rel_error(params, expected) <= 1e-6


def test_gpt_with_tied_embeddings_matches_torch():
    gpt = pytest.importorskip("fscale.models.gpt")
    torch.manual_seed(0)
    model = gpt.GPT(gpt.GPTConfig.tiny())
    cfg = model.cfg if hasattr(model, "cfg") else gpt.GPTConfig.tiny()
    batches = lm_batches(10, 2, 8, vocab=cfg.vocab_size)
    expected = torch_reference(model, _adamw_torch, _ce_module, batches)
    params, apply = fs.functional(copy.deepcopy(model))
    params, _, _ = _train(fs.train_step(lm_loss(apply), _adamw_fs()), params, batches)
    expected = {k: v for k, v in expected.items() if k in params}
    assert max_rel_error(params, expected) <= 1e-6


@pytest.mark.parametrize("k", [2, 4])
def test_accumulate_equals_one_larger_batch(k):
    model = mlp([4, 9, 2])
    big = regression_batches(5, 8, 4, 2)
    params, apply = fs.functional(copy.deepcopy(model))
    ref, _, _ = _train(fs.train_step(regression_loss(apply), fs.optim.sgd(0.1)), params, big)
    params, apply = fs.functional(copy.deepcopy(model))
    acc_step = fs.train_step(regression_loss(apply), fs.optim.sgd(0.1), accumulate=k)
    got, _, metrics = _train(acc_step, params, big)
    assert max_rel_error(got, ref) <= 1e-6
    assert metrics["loss"].shape == ()


def test_clip_norm_equals_clip_grad_norm():
    model = mlp([6, 12, 4])
    batches = regression_batches(10, 8, 6, 4)
    make = lambda ps: torch.optim.SGD(ps, lr=0.5)  # large lr so clipping is active
    expected = torch_reference(model, make, _mse_module, batches, clip_norm=0.05)
    params, apply = fs.functional(copy.deepcopy(model))
    step = fs.train_step(regression_loss(apply), fs.optim.sgd(0.5), clip_norm=0.05)
    got, _, metrics = _train(step, params, batches)
    assert max_rel_error(got, expected) <= 1e-6
    assert metrics["grad_norm"] > 0.05  # clipping really happened on the last step


def test_has_aux_metrics_and_count():
    model = mlp([3, 2])
    params, apply = fs.functional(model)

    def loss_fn(p, batch):
        out = apply(p, batch["x"])
        return F.mse_loss(out, batch["y"]), {"out_mean": out.mean().detach()}

    step = fs.train_step(loss_fn, fs.optim.sgd(0.1), has_aux=True)
    params, state, metrics = _train(step, params, regression_batches(3, 4, 3, 2))
    assert state["count"] == 3
    assert set(metrics) >= {"loss", "out_mean", "comm_bytes"}
    assert metrics["comm_bytes"] == {}  # world of one: nothing crosses a wire


def test_unused_param_gets_zero_grad_and_no_error():
    model = mlp([3, 4, 2])
    params, apply = fs.functional(model)
    params["extra"] = torch.ones(3)  # never used by the loss
    step = fs.train_step(regression_loss(apply), fs.optim.sgd(0.1))
    params, _, _ = _train(step, params, regression_batches(2, 4, 3, 2))
    assert torch.equal(params["extra"], torch.ones(3))


def test_load_params_writes_back_into_a_module():
    model = mlp([3, 4, 2])
    params, apply = fs.functional(copy.deepcopy(model))
    params = {k: v + 1 for k, v in params.items()}
    fs.load_params(model, params)
    for k, v in model.named_parameters():
        assert torch.equal(v, params[k])


def test_accumulate_adds_later_micro_batches_in_backward(monkeypatch):
    """Micro-batches after the first add each grad into the total as backward makes it
    (no second whole set of grads), and the total is bit-identical to summing after."""
    from fscale import _accumulate as step_module

    model = mlp([4, 9, 2])
    (batch,) = regression_batches(1, 12, 4, 2)
    params, apply = fs.functional(copy.deepcopy(model))
    loss = regression_loss(apply)
    seen = []

    def record(grads, state, params=None):
        seen.append({k: v.clone() for k, v in grads.items()})
        return grads, state

    opt = fs.optim.GradientTransformation(lambda p: (), record)
    adds = []
    real_add = step_module._AccumulateInto.add

    def spy(self, index, grad):
        adds.append(index)
        real_add(self, index, grad)

    monkeypatch.setattr(step_module._AccumulateInto, "add", spy)
    step = fs.train_step(loss, opt, accumulate=3)
    p, state = step.init(params)
    step(p, state, batch)
    assert sorted(adds) == sorted(list(range(len(params))) * 2)  # micro-batches 2 and 3
    expected = None
    for micro in step_module._split_batch(batch, 3):
        leaves = [t.detach().requires_grad_(True) for t in params.values()]
        g = torch.autograd.grad(loss(dict(zip(params, leaves, strict=True)), micro), leaves)
        if expected is None:
            expected = list(g)
        else:
            expected = [a.add_(b) for a, b in zip(expected, g, strict=True)]
    for (name, got), want in zip(seen[0].items(), expected, strict=True):
        assert torch.equal(got, want.mul_(1.0 / 3)), name

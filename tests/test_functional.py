"""fs.functional: params dict + pure apply, for any nn.Module."""

from __future__ import annotations

import torch
from torch import nn

import fscale as fs
from tests.helpers import TiedLM


def test_apply_equals_forward_and_ties_weights():
    torch.manual_seed(0)
    model = TiedLM()
    params, apply = fs.functional(model)
    x = torch.randint(0, 11, (2, 5))
    torch.testing.assert_close(apply(params, x), model(x), rtol=0, atol=0)
    assert "head.weight" not in params and "emb.weight" in params
    # Changing the one tied tensor changes both of its uses.
    bumped = dict(params, **{"emb.weight": params["emb.weight"] + 1.0})
    logits = apply(bumped, x)
    with torch.no_grad():
        model.emb.weight.add_(1.0)
    torch.testing.assert_close(logits, model(x))


def test_tied_weight_grad_sums_every_use():
    torch.manual_seed(0)
    model = TiedLM()
    params, apply = fs.functional(model)
    x = torch.randint(0, 11, (2, 5))
    w = params["emb.weight"].detach().requires_grad_(True)
    (g,) = torch.autograd.grad(apply({**params, "emb.weight": w}, x).square().sum(), [w])
    model(x).square().sum().backward()  # the module: one Parameter under both names
    torch.testing.assert_close(g, model.emb.weight.grad, rtol=0, atol=0)
    # The caller's dict is not changed by spelling out the ties.
    assert "head.weight" not in params


def test_buffers_and_frozen_params_come_from_the_module():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    model[0].bias.requires_grad_(False)
    params, apply = fs.functional(model.eval())
    assert set(params) == {"0.weight", "1.weight", "1.bias"}
    x = torch.randn(3, 4)
    torch.testing.assert_close(apply(params, x), model(x))


def test_apply_is_differentiable_in_params():
    model = nn.Linear(3, 2)
    params, apply = fs.functional(model)
    w = params["weight"].detach().requires_grad_(True)
    out = apply({**params, "weight": w}, torch.ones(1, 3)).sum()
    (g,) = torch.autograd.grad(out, [w])
    torch.testing.assert_close(g, torch.ones(2, 3))


def test_huggingface_model_if_installed():
    transformers = __import__("pytest").importorskip("transformers")
    cfg = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=8, vocab_size=17, n_positions=8)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    params, apply = fs.functional(model)
    assert "lm_head.weight" not in params  # tied to wte
    x = torch.randint(0, 17, (1, 5))
    torch.testing.assert_close(apply(params, x).logits, model(x).logits)


def test_apply_swaps_params_in_and_always_back():
    """[Note: swapping params in]: the module's own Parameters return after every call,
    an exception included; names that are not Parameter slots go to functional_call."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    params, apply = fs.functional(model)
    own = {n: p for n, p in model.named_parameters()}
    doubled = {n: 2 * p for n, p in params.items()}
    x = torch.randn(5, 3)
    want = torch.func.functional_call(model, doubled, (x,), strict=False)
    torch.testing.assert_close(apply(doubled, x), want, rtol=0, atol=0)
    assert all(p is own[n] for n, p in model.named_parameters())
    try:
        apply(doubled, torch.randn(5, 7))  # wrong width: the first Linear raises
    except RuntimeError:
        pass
    assert all(p is own[n] for n, p in model.named_parameters())
    # A buffer given by name is not a Parameter slot: functional_call serves the call.
    stats = {**doubled, "1.running_mean": torch.ones(4)}
    model.eval()
    own_mean = model[1].running_mean
    want = torch.func.functional_call(model, stats, (x,), strict=False)
    torch.testing.assert_close(apply(stats, x), want, rtol=0, atol=0)
    assert model[1].running_mean is own_mean

"""fscale.aux_loss: terms a module adds in its forward join the differentiated loss once."""

import torch
from torch import nn

import fscale as fs
from fscale import aux_loss


class _Routed(nn.Module):
    """Two blocks whose forward adds a penalty on their activations, like a router's."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(4, 4) for _ in range(2))

    def forward(self, x):
        for block in self.blocks:
            x = torch.tanh(block(x))
            aux_loss.add("penalty", 0.1 * x.square().mean())
        return x


def _reference(params, model, batch):
    """The same step by hand: grads of loss + 0.1 * sum of the two penalties."""
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    x = batch
    penalty = 0.0
    for i in range(2):
        x = torch.tanh(x @ leaves[f"blocks.{i}.weight"].T + leaves[f"blocks.{i}.bias"])
        penalty = penalty + 0.1 * x.square().mean()
    loss = x.sum()
    grads = torch.autograd.grad(loss + penalty, list(leaves.values()))
    new = {k: v.detach() - 0.5 * g for (k, v), g in zip(leaves.items(), grads, strict=True)}
    return new, penalty.detach()


def test_aux_terms_are_added_once_and_reported():
    for checkpointed in (False, True):
        torch.manual_seed(0)
        model = _Routed()
        params, apply = fs.functional(model)
        batch = torch.randn(3, 4)
        expected, penalty = _reference(params, model, batch)
        step = fs.train_step(lambda p, b, f=apply: f(p, b).sum(), fs.optim.sgd(0.5), model=model)
        if checkpointed:  # the recomputed forward must not add the penalty again
            step = fs.checkpoint_activations(step)
        params, state = step.init(params)
        params, state, metrics = step(params, state, batch)
        for name, value in expected.items():
            torch.testing.assert_close(params[name], value, rtol=0, atol=1e-6)
        torch.testing.assert_close(metrics["aux/penalty"], penalty)


def test_add_outside_a_step_is_a_no_op_and_checks_its_input():
    model = _Routed()
    model(torch.randn(2, 4))  # no collector: nothing to add to, nothing raised
    with aux_loss.collecting() as aux:
        model(torch.randn(2, 4))
        try:
            aux_loss.add("bad", torch.ones(3))
        except ValueError as err:
            assert "scalar" in str(err)
        else:
            raise AssertionError("a non-scalar aux term was accepted")
    assert len(aux.terms["penalty"]) == 2

"""Small models and reference loops shared by the parity tests."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

# ``@pytest.mark.parametrize("device", CPU_AND_CUDA)``: CPU always, CUDA as a gpu case.
CPU_AND_CUDA = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.gpu,
            pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
        ],
    ),
]


class TiedLM(nn.Module):
    """A tiny language model whose output head shares the embedding weight."""

    def __init__(self, vocab: int = 11, dim: int = 8):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.body = nn.Sequential(nn.Linear(dim, dim), nn.Tanh(), nn.LayerNorm(dim))
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, x):
        return self.head(self.body(self.emb(x)))


def mlp(widths: list[int], seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for a, b in zip(widths[:-1], widths[1:], strict=False):
        layers += [nn.Linear(a, b), nn.GELU()]
    return nn.Sequential(*layers[:-1])


def regression_loss(apply):
    def loss_fn(params, batch):
        return F.mse_loss(apply(params, batch["x"]), batch["y"])

    return loss_fn


def lm_loss(apply):
    def loss_fn(params, batch):
        logits = apply(params, batch["x"])
        return F.cross_entropy(logits.flatten(0, 1), batch["y"].flatten())

    return loss_fn


def regression_batches(n_steps: int, batch: int, d_in: int, d_out: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [
        {"x": torch.randn(batch, d_in, generator=g), "y": torch.randn(batch, d_out, generator=g)}
        for _ in range(n_steps)
    ]


def lm_batches(n_steps: int, batch: int, seq: int, vocab: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [
        {
            "x": torch.randint(0, vocab, (batch, seq), generator=g),
            "y": torch.randint(0, vocab, (batch, seq), generator=g),
        }
        for _ in range(n_steps)
    ]


def torch_reference(module: nn.Module, make_opt, loss_of_module, batches, clip_norm=None):
    """Train a deep copy of ``module`` the ordinary way; return its named params."""
    module = copy.deepcopy(module)
    opt = make_opt(module.parameters())
    for batch in batches:
        opt.zero_grad(set_to_none=True)
        loss_of_module(module, batch).backward()
        if clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(module.parameters(), clip_norm)
        opt.step()
    return {k: v.detach() for k, v in module.named_parameters()}


def max_rel_error(a: dict, b: dict) -> float:
    """Largest ``|a - b| / max|b|`` over the shared keys (keys must match)."""
    assert set(a) == set(b), (sorted(a), sorted(b))
    worst = 0.0
    for k in a:
        denom = b[k].abs().max().clamp_min(1e-12)
        worst = max(worst, ((a[k] - b[k]).abs().max() / denom).item())
    return worst


def error_text(fn) -> str:
    """``"Type: message"`` of what ``fn()`` raises, or ``"ok"``: ranks return it as plain
    text (an exception may not pickle), and the test checks the message."""
    try:
        fn()
    except Exception as e:  # the test reads the message
        return f"{type(e).__name__}: {e}"
    return "ok"

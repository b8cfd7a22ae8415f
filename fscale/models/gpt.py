"""A GPT-2-style decoder: the reference model for tests, examples and benchmarks.

A plain ``nn.Module`` with nothing fscale-specific in it, so every transform is
exercised on an ordinary model. Its layout is part of the contract:

- ``blocks`` is an ``nn.ModuleList`` of :class:`Block`; each child is one shard
  unit for ZeRO-3 (the default unit is "each child of the top-level ModuleList").
- ``head.weight`` *is* ``tok_emb.weight`` (one ``Parameter``) when
  ``tie_embeddings``; both live outside ``blocks``, so a tied pair never spans
  two units.

Efficiency choices for the 1.4B / 8.5B GPU configs: one fused ``qkv`` Linear,
``F.scaled_dot_product_attention(is_causal=True)`` (flash / memory-efficient
kernels on CUDA), pre-LayerNorm, no dropout.

Usage::

    from fscale.models import GPT, GPTConfig, gpt_loss

    model = GPT(GPTConfig.small())
    params, apply = fs.functional(model)
    loss_fn = gpt_loss(apply)  # loss_fn(params, {"x": idx, "y": targets}) -> 0-d loss

References:
    Radford et al., "Language Models are Unsupervised Multitask Learners" (GPT-2), 2019.
    Chowdhery et al., "PaLM", 2022, appendix B (the FLOPs-per-token accounting).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class GPTConfig:
    """Shape of a :class:`GPT`.

    Args:
        vocab_size: number of token ids (pad to a multiple of 64 on GPU, e.g. 50304).
        n_layer: number of transformer blocks.
        n_head: attention heads; must divide ``d_model``.
        d_model: residual stream width.
        seq_len: maximum sequence length (size of the learned position table).
        tie_embeddings: share one Parameter between ``tok_emb`` and ``head``.
        bias: biases in Linear and LayerNorm layers.
        dropout: dropout probability on attention, residual and embedding paths.
    """

    vocab_size: int
    n_layer: int
    n_head: int
    d_model: int
    seq_len: int
    tie_embeddings: bool = True
    bias: bool = True
    dropout: float = 0.0

    def __post_init__(self):
        for name in ("vocab_size", "n_layer", "n_head", "d_model", "seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"GPTConfig.{name} must be a positive int, got {value!r}.")
        if self.d_model % self.n_head:
            raise ValueError(
                f"GPTConfig.d_model={self.d_model} is not divisible by n_head={self.n_head}; "
                "pick n_head among the divisors of d_model."
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout}.")

    def replace(self, **changes: Any) -> GPTConfig:
        """A copy with ``changes`` applied, e.g. ``GPTConfig.small().replace(seq_len=64)``."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def tiny(cls, **changes: Any) -> GPTConfig:
        """2 layers, d=32, byte vocabulary: unit tests (~36k params)."""
        return cls(vocab_size=256, n_layer=2, n_head=2, d_model=32, seq_len=64).replace(**changes)

    @classmethod
    def small(cls, **changes: Any) -> GPTConfig:
        """4 layers, d=128, byte vocabulary: the CPU example (~0.85M params)."""
        return cls(vocab_size=256, n_layer=4, n_head=4, d_model=128, seq_len=128).replace(**changes)

    @classmethod
    def gpt_1b4(cls, **changes: Any) -> GPTConfig:
        """24 layers x 2048, 16 heads, seq 2048, vocab 50304: ~1.3B params (single-GPU bench)."""
        return cls(vocab_size=50304, n_layer=24, n_head=16, d_model=2048, seq_len=2048).replace(
            **changes
        )

    @classmethod
    def gpt_8b5(cls, **changes: Any) -> GPTConfig:
        """40 layers x 4096, 32 heads, seq 2048, vocab 50304: ~8.3B params (ZeRO/offload bench)."""
        return cls(vocab_size=50304, n_layer=40, n_head=32, d_model=4096, seq_len=2048).replace(
            **changes
        )


class CausalSelfAttention(nn.Module):
    """Multi-head causal attention with one fused ``qkv`` projection."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.dropout = cfg.dropout
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=cfg.bias)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.proj.residual = True  # scaled at init, see GPT._init_weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        # (B, T, 3, H, Dh) -> three (B, H, T, Dh) views: one matmul, no copies before SDPA.
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    """``d -> 4d -> GELU -> d``."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, 4 * cfg.d_model, bias=cfg.bias)
        self.proj = nn.Linear(4 * cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.proj.residual = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))


class Block(nn.Module):
    """Pre-LayerNorm transformer block; the ZeRO-3 shard unit."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln1(x)))
        return x + self.drop(self.mlp(self.ln2(x)))


class GPT(nn.Module):
    """GPT-2-style decoder: ``forward(idx: (B, T) long) -> logits (B, T, vocab_size)``.

    Args:
        cfg: the shape; see the presets ``GPTConfig.tiny/small/gpt_1b4/gpt_8b5``.

    Example::

        model = GPT(GPTConfig.tiny())
        logits = model(torch.randint(0, 256, (4, 16)))  # (4, 16, 256)
    """

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.seq_len, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.tok_emb.weight  # one Parameter, registered under both names
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        # GPT-2: N(0, 0.02) everywhere; the two projections that write into the
        # residual stream get 0.02 / sqrt(2 * n_layer) so its variance stays O(1)
        # after 2 * n_layer additions. The tied head is initialised once, as tok_emb.
        if isinstance(module, nn.Linear):
            std = 0.02
            if getattr(module, "residual", False):
                std /= math.sqrt(2 * self.cfg.n_layer)
            if module is not self.head or not self.cfg.tie_embeddings:
                nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        T = idx.shape[-1]
        if T > self.cfg.seq_len:
            raise ValueError(
                f"GPT got a sequence of length {T} but cfg.seq_len={self.cfg.seq_len}; "
                "crop the input or build the model with a larger seq_len."
            )
        pos = torch.arange(T, device=idx.device)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))

    def num_params(self, non_embedding: bool = False) -> int:
        """Number of distinct parameters (a tied weight counts once).

        Args:
            non_embedding: leave out ``tok_emb`` and ``pos_emb`` (and so a tied head;
                an untied head stays), the convention of Kaplan et al.'s scaling laws.
        """
        # parameters() already yields a shared Parameter once.
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.tok_emb.weight.numel() + self.pos_emb.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token (forward + backward): ``6 N + 12 L d T``.

        The PaLM (appendix B) accounting behind the usual MFU numbers. ``N`` counts
        the parameters that take part in a matmul: every parameter except the two
        embedding tables, plus the ``vocab x d`` head (the tied weight, counted once
        here, does real work there). ``12 L d T`` is attention's QK^T and AV:
        ``2 * 2 * T * d`` multiply-adds per token per layer in the forward, x3 for
        forward + backward; the causal mask's savings are not subtracted, as usual.
        Activation recomputation is not counted either (model FLOPs, not hardware FLOPs).

        Args:
            seq_len: sequence length ``T``; defaults to ``cfg.seq_len``.
        """
        cfg = self.cfg
        T = cfg.seq_len if seq_len is None else seq_len
        n_matmul = self.num_params() - self.pos_emb.weight.numel()
        if not cfg.tie_embeddings:
            n_matmul -= self.tok_emb.weight.numel()  # a lookup, no matmul
        return 6 * n_matmul + 12 * cfg.n_layer * cfg.d_model * T


def gpt_loss(apply: Callable[..., torch.Tensor]) -> Callable[[Any, dict], torch.Tensor]:
    """Next-token cross-entropy for ``apply`` from ``fs.functional(GPT(cfg))``.

    Returns ``loss_fn(params, batch)`` with ``batch = {"x": (B, T) ids, "y": (B, T) targets}``;
    it is exactly::

        def loss_fn(params, batch):
            logits = apply(params, batch["x"])
            return F.cross_entropy(logits.flatten(0, 1), batch["y"].flatten())
    """

    def loss_fn(params: Any, batch: dict) -> torch.Tensor:
        logits = apply(params, batch["x"])
        return F.cross_entropy(logits.flatten(0, 1), batch["y"].flatten())

    return loss_fn

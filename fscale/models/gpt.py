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

With ``experts > 0`` it is an MoE GPT: every ``moe_every``-th block (the 2nd, 4th, ...
for ``moe_every=2``, DeepSpeed-MoE's "every other layer"; every block for 1) has a
``moe`` (:class:`fscale.models.moe.MoE`) instead of its ``mlp``; the routers' aux
losses reach the train step through ``fscale.aux_loss``, so ``gpt_loss`` is unchanged.

Usage::

    from fscale.models import GPT, GPTConfig, gpt_loss

    model = GPT(GPTConfig.small())          # or GPTConfig.small(experts=8, top_k=2)
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

from fscale.models import _routing
from fscale.models.moe import Experts, MoE


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

    Mixture of experts (all ignored while ``experts == 0``, the dense GPT):

    Args:
        experts: routed experts per MoE block (0: dense).
        top_k: experts per token.
        capacity_factor: training capacity per expert ``ceil(k T / E * cf)`` (at least
            ``min_capacity``) with the overflow dropped; None = dropless.
        eval_capacity_factor: the same in eval mode; None = dropless in eval.
        min_capacity: floor of the capacity.
        moe_every: block ``i`` is MoE when ``(i + 1) % moe_every == 0``: 1 = every block,
            2 = the 2nd, 4th, ... (DeepSpeed-MoE's every other layer).
        pyramid: PR-MoE: the expert count of each MoE block in order (overrides
            ``experts`` per block; one entry per MoE block).
        residual: Residual-MoE (a dense FFN beside the experts, learned 2-way mix).
        shared_experts: always-on experts added to each MoE block's output.
        gating: "softmax" or "sigmoid" (DeepSeek-V3, gates normalized over the top-k).
        normalize_gates: renormalize the top-k gates; None = when top_k > 1 or sigmoid.
        drop_policy: "position" or "score": which assignments an over-full expert keeps.
        random_token_selection: RTS, a random drop order (training only).
        noisy_std: Gaussian noise std on the selecting logits (training only).
        aux_loss_weight, z_loss_weight: weights of the load-balancing and z losses.
        expert_hidden: expert FFN width (default ``4 * d_model``).
        activation: expert activation, "gelu" or "swiglu" (dense MLPs stay GELU).
    """

    vocab_size: int
    n_layer: int
    n_head: int
    d_model: int
    seq_len: int
    tie_embeddings: bool = True
    bias: bool = True
    dropout: float = 0.0
    experts: int = 0
    top_k: int = 2
    capacity_factor: float | None = 1.25
    eval_capacity_factor: float | None = None
    min_capacity: int = 4
    moe_every: int = 1
    pyramid: tuple[int, ...] | None = None
    residual: bool = False
    shared_experts: int = 0
    gating: str = "softmax"
    normalize_gates: bool | None = None
    drop_policy: str = "position"
    random_token_selection: bool = False
    noisy_std: float = 0.0
    aux_loss_weight: float = 0.01
    z_loss_weight: float = 0.001
    expert_hidden: int | None = None
    activation: str = "gelu"

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
        self._check_moe()

    def _check_moe(self) -> None:
        if self.pyramid is not None:
            object.__setattr__(self, "pyramid", tuple(self.pyramid))  # hashable, frozen
        if not isinstance(self.experts, int) or self.experts < 0:
            raise ValueError(f"GPTConfig.experts must be an int >= 0, got {self.experts!r}.")
        if self.experts == 0:
            if self.pyramid is not None:
                raise ValueError(
                    f"GPTConfig.pyramid={self.pyramid} needs an MoE model: set experts > 0."
                )
            return
        if not isinstance(self.moe_every, int) or not 1 <= self.moe_every <= self.n_layer:
            raise ValueError(
                f"GPTConfig.moe_every={self.moe_every!r} must be in 1..n_layer={self.n_layer} "
                "so that at least one block is MoE."
            )
        n_moe = len(self.moe_layers())
        if self.pyramid is not None and len(self.pyramid) != n_moe:
            raise ValueError(
                f"GPTConfig.pyramid has {len(self.pyramid)} entries but the model has {n_moe} "
                f"MoE blocks (n_layer={self.n_layer}, moe_every={self.moe_every}); give one "
                "expert count per MoE block."
            )
        if self.expert_hidden is not None and (
            not isinstance(self.expert_hidden, int) or self.expert_hidden < 1
        ):
            raise ValueError(
                f"GPTConfig.expert_hidden must be a positive int, got {self.expert_hidden!r}."
            )
        for e in self.pyramid or (self.experts,):
            _routing.check(
                num_experts=e, top_k=self.top_k, capacity_factor=self.capacity_factor,
                eval_capacity_factor=self.eval_capacity_factor, min_capacity=self.min_capacity,
                gating=self.gating, drop_policy=self.drop_policy,
                random_token_selection=self.random_token_selection, noisy_std=self.noisy_std,
                activation=self.activation, shared_experts=self.shared_experts,
                where="GPTConfig" if self.pyramid is None else f"GPTConfig (pyramid entry {e})",
            )  # fmt: skip

    def moe_layers(self) -> list[int]:
        """Indices of the MoE blocks (empty for a dense model)."""
        if self.experts == 0:
            return []
        return [i for i in range(self.n_layer) if (i + 1) % self.moe_every == 0]

    def experts_at(self, layer: int) -> int:
        """Routed experts of block ``layer`` (0: a dense block)."""
        layers = self.moe_layers()
        if layer not in layers:
            return 0
        return self.pyramid[layers.index(layer)] if self.pyramid else self.experts

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
    def moe_tiny(cls, **changes: Any) -> GPTConfig:
        """``tiny`` with 4 experts, top-2, in both blocks: MoE unit tests."""
        return cls.tiny(**{"experts": 4, "top_k": 2, **changes})

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
        # Heads are counted from qkv's output (-1), not n_head: under tensor_parallel a
        # rank's qkv holds only its heads.
        head_dim = C // self.n_head
        q, k, v = self.qkv(x).view(B, T, 3, -1, head_dim).permute(2, 0, 3, 1, 4)
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    """``d -> 4d -> GELU -> d``."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, 4 * cfg.d_model, bias=cfg.bias)
        self.proj = nn.Linear(4 * cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.proj.residual = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))


def _moe(cfg: GPTConfig, num_experts: int) -> MoE:
    return MoE(
        cfg.d_model, num_experts, d_hidden=cfg.expert_hidden, top_k=cfg.top_k,
        capacity_factor=cfg.capacity_factor, eval_capacity_factor=cfg.eval_capacity_factor,
        min_capacity=cfg.min_capacity, gating=cfg.gating, normalize_gates=cfg.normalize_gates,
        drop_policy=cfg.drop_policy, random_token_selection=cfg.random_token_selection,
        noisy_std=cfg.noisy_std, aux_loss_weight=cfg.aux_loss_weight,
        z_loss_weight=cfg.z_loss_weight, activation=cfg.activation, residual=cfg.residual,
        shared_experts=cfg.shared_experts, bias=cfg.bias,
    )  # fmt: skip


class Block(nn.Module):
    """Pre-LayerNorm transformer block; the ZeRO-3 shard unit.

    ``layer`` (its index) decides whether an MoE model's block has a ``moe``
    (:class:`MoE`) in place of its ``mlp``.
    """

    def __init__(self, cfg: GPTConfig, layer: int = 0):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        num_experts = cfg.experts_at(layer)
        if num_experts:
            self.moe = _moe(cfg, num_experts)
        else:
            self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln1(x)))
        ffn = self.mlp if "mlp" in self._modules else self.moe
        return x + self.drop(ffn(self.ln2(x)))


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
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
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
        elif isinstance(module, Experts):  # w_out writes into the residual stream
            module.reset_parameters(0.02, 0.02 / math.sqrt(2 * self.cfg.n_layer))

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

    def num_params(self, non_embedding: bool = False, active: bool = False) -> int:
        """Number of distinct parameters (a tied weight counts once).

        Args:
            non_embedding: leave out ``tok_emb`` and ``pos_emb`` (and so a tied head;
                an untied head stays), the convention of Kaplan et al.'s scaling laws.
            active: count only what one token uses: in each MoE block the router,
                ``top_k`` of the experts and the residual / shared FFNs.
        """
        # parameters() already yields a shared Parameter once.
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.tok_emb.weight.numel() + self.pos_emb.weight.numel()
        if active:
            for block in self.blocks:
                if "moe" in block._modules:
                    moe = block.moe
                    n -= (moe.num_experts - moe.top_k) * moe.experts.params_per_expert()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token (forward + backward): ``6 N + 12 L d T``.

        For an MoE model ``N`` counts the *active* parameters (``num_params(active=True)``:
        ``top_k`` experts per MoE block; dropped tokens are not subtracted).

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
        n_matmul = self.num_params(active=True) - self.pos_emb.weight.numel()
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

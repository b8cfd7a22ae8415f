"""Mixture-of-Experts FFN layer: a router, stacked experts on grouped GEMM, aux losses.

``MoE`` replaces a transformer block's MLP. Per call it routes the local tokens
(``_routing.route``: top-k softmax or sigmoid gating, capacity or dropless, noisy
gating, random token selection), copies each kept (token, choice) into rows sorted
by expert, runs ``self.experts(rows, counts)`` and sums the rows back weighted by
their gates. The router's load-balancing loss and z-loss go to ``fscale.aux_loss``
(weighted), so a loss function written for a dense model trains it unchanged.

[Note: the contract with expert_parallel]
- ``Experts`` holds every expert's weights stacked on dim 0 (``w_in`` [E, d, h],
  ``w_gate`` [E, d, h] for SwiGLU, ``w_out`` [E, h, d]) and takes rows already sorted
  by expert with ``counts`` [E_here]; E_here is ``w_in.shape[0]``, never stored, so a
  transform can hand it a slice of the experts.
- ``MoE`` calls the *module* ``self.experts`` (a hook patching ``experts.forward``
  sees the sorted rows and the global ``counts`` [num_experts]); dropped assignments
  are absent from the rows and add nothing.
- Routing reads only the tokens' own logits (capacity: the local batch's order).

Usage::

    moe = MoE(d_model=512, num_experts=8, top_k=2, capacity_factor=1.25)
    y = moe(x)                                   # x: [..., 512] -> [..., 512]

References:
    Shazeer et al., "Outrageously Large Neural Networks" (noisy top-k), 2017.
    Lepikhin et al., "GShard", 2020; Fedus et al., "Switch Transformers", 2021.
    Rajbhandari et al., "DeepSpeed-MoE" (Residual-MoE, PR-MoE, RTS), 2022.
    Zoph et al., "ST-MoE" (router z-loss), 2022; DeepSeek-AI, "DeepSeek-V3" (sigmoid
    gating, shared experts), 2024.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fscale import aux_loss
from fscale.kernels import grouped_gemm_triton as _ggt
from fscale.kernels.grouped_gemm import grouped_mm
from fscale.models import _routing
from fscale.models._routing import Routing, capacity, route

__all__ = ["FFN", "MoE", "Experts", "Routing", "capacity", "route"]


def _act(h: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
    if gate is None:
        return F.gelu(h, approximate="tanh")
    return F.silu(gate) * h


# [Note: dispatch and combine as gathers]
# ``pos`` (``Routing.pos``) maps each (choice j, token t) to its sorted row, so both
# directions that sum over a token's k rows gather them instead of scattering:
# the combine ``y[t] = sum_j bf16(rows[pos[j, t]] * bf16(gate))`` and the dispatch's
# backward ``dx[t] = sum_j drows[pos[j, t]]`` (autograd's would be an accumulating
# index_put: a sort and atomics on CUDA). The sum runs in fp32 over j = 0..k-1 and
# rounds once: the bits of the former ``zeros().index_copy(slot, rows * gate)
# .view(k, T, d).sum(0)``, deterministic. On CUDA one Triton kernel does each (and
# one more the combine's backward, [Note: the MoE combine as a gather] in
# grouped_gemm_triton); elsewhere the same maths in torch ops.


def _fused(t: torch.Tensor) -> bool:
    return t.is_cuda and _ggt.triton is not None


def _gather_sum(rows: torch.Tensor, pos: torch.Tensor, k: int, gate=None) -> torch.Tensor:
    """``y[t] = sum_j rows[pos[j*T + t]] (* gate)``; -1 in ``pos`` adds nothing."""
    rows = rows.contiguous()
    if _fused(rows):
        return _ggt.gather_sum_triton(rows, pos, k, gate)
    if gate is not None:
        rows = rows * gate.to(rows.dtype).unsqueeze(1)
    if rows.shape[0] == pos.shape[0]:  # nothing dropped: pos is a permutation
        picked = rows.index_select(0, pos)
    else:
        picked = rows.index_select(0, pos.clamp(min=0))
        picked = torch.where(pos.ge(0).unsqueeze(1), picked, picked.new_zeros(()))
    return picked.view(k, -1, rows.shape[1]).sum(0)


class _Dispatch(torch.autograd.Function):
    """``x[token]`` whose backward gathers (``dx[t] = sum_j drows[pos[j, t]]``)."""

    @staticmethod
    def forward(ctx, x, token, pos, k):
        ctx.save_for_backward(pos)
        ctx.k = k
        return x.index_select(0, token)

    @staticmethod
    def backward(ctx, drows):
        (pos,) = ctx.saved_tensors
        return _gather_sum(drows, pos, ctx.k), None, None, None


class _Combine(torch.autograd.Function):
    """``y[t] = sum_j bf16(rows[pos[j, t]] * bf16(gate))``; rows and gate are differentiable."""

    @staticmethod
    def forward(ctx, rows, gate, token, pos, k):
        rows = rows.contiguous()
        ctx.save_for_backward(rows, gate, token)
        return _gather_sum(rows, pos, k, gate)

    @staticmethod
    def backward(ctx, dy):
        rows, gate, token = ctx.saved_tensors
        dy = dy.contiguous()
        if _fused(rows):
            drows, dgate = _ggt.combine_backward_triton(dy, rows, gate, token)
        else:
            g = dy.index_select(0, token)
            drows = g * gate.to(rows.dtype).unsqueeze(1)
            dgate = (g.float() * rows.float()).sum(1).to(gate.dtype)
        return drows, dgate, None, None, None


class Experts(nn.Module):
    """``E`` FFNs as stacked weights: ``forward(x_sorted [N, d], counts [E]) -> [N, d]``.

    Args:
        num_experts: E (dim 0 of every weight).
        d_model, d_hidden: the FFN's widths.
        activation: "gelu" (``w_out(gelu(w_in x))``) or "swiglu"
            (``w_out(silu(w_gate x) * w_in x)``).
        init_std, out_std: normal init of ``w_in``/``w_gate`` and of ``w_out``.
    """

    def __init__(
        self,
        num_experts: int,
        d_model: int,
        d_hidden: int,
        *,
        activation: str = "gelu",
        init_std: float = 0.02,
        out_std: float = 0.02,
    ):
        super().__init__()
        shape_in, shape_out = (num_experts, d_model, d_hidden), (num_experts, d_hidden, d_model)
        self.w_in = nn.Parameter(torch.empty(shape_in))
        if activation == "swiglu":
            self.w_gate = nn.Parameter(torch.empty(shape_in))
        else:
            self.w_gate = None
        self.w_out = nn.Parameter(torch.empty(shape_out))
        self.reset_parameters(init_std, out_std)

    def reset_parameters(self, std: float = 0.02, out_std: float = 0.02) -> None:
        nn.init.normal_(self.w_in, std=std)
        if self.w_gate is not None:
            nn.init.normal_(self.w_gate, std=std)
        nn.init.normal_(self.w_out, std=out_std)

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        h = grouped_mm(x, self.w_in, counts)
        gate = grouped_mm(x, self.w_gate, counts) if self.w_gate is not None else None
        return grouped_mm(_act(h, gate), self.w_out, counts)

    def params_per_expert(self) -> int:
        return sum(p[0].numel() for p in (self.w_in, self.w_gate, self.w_out) if p is not None)


class FFN(nn.Module):
    """A dense FFN (``fc``, ``gate`` for SwiGLU, ``proj``): shared experts, Residual-MoE."""

    def __init__(self, d_model: int, d_hidden: int, *, activation: str = "gelu", bias=True):
        super().__init__()
        self.fc = nn.Linear(d_model, d_hidden, bias=bias)
        self.gate = nn.Linear(d_model, d_hidden, bias=bias) if activation == "swiglu" else None
        self.proj = nn.Linear(d_hidden, d_model, bias=bias)
        self.proj.residual = True  # GPT scales the init of residual-stream writers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(_act(self.fc(x), self.gate(x) if self.gate is not None else None))


class MoE(nn.Module):
    """Top-k routed experts (+ optional Residual-MoE MLP and shared experts).

    Args:
        d_model: token width.
        num_experts: routed experts E (``self.num_experts``).
        d_hidden: each expert's hidden width (default ``4 * d_model``).
        top_k: experts per token.
        capacity_factor: capacity ``max(ceil(k T / E * cf), min_capacity)`` per expert
            in training; None = dropless.
        eval_capacity_factor: the same in eval mode; None (default) = dropless in eval.
        min_capacity: floor of the capacity.
        gating, normalize_gates, drop_policy, random_token_selection: see
            ``_routing.route``.
        noisy_std: std of the Gaussian noise on the selecting logits, training only.
        aux_loss_weight, z_loss_weight: weights of the terms added to ``fscale.aux_loss``
            as "moe_load_balance" and "moe_z_loss".
        activation: "gelu" or "swiglu" for the experts (and shared / residual FFNs).
        residual: Residual-MoE: a dense FFN beside the experts, the two outputs mixed by
            a learned per-token softmax over 2 coefficients (``residual_coef``), as
            DeepSpeed-MoE does (rather than a plain sum, so the model learns how much
            of each path to keep).
        shared_experts: always-on experts, fused into one FFN of width
            ``shared_experts * d_hidden`` and added to the output (DeepSeek).
        bias: biases in the dense FFNs (experts have none).
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        *,
        d_hidden: int | None = None,
        top_k: int = 2,
        capacity_factor: float | None = 1.25,
        eval_capacity_factor: float | None = None,
        min_capacity: int = 4,
        gating: str = "softmax",
        normalize_gates: bool | None = None,
        drop_policy: str = "position",
        random_token_selection: bool = False,
        noisy_std: float = 0.0,
        aux_loss_weight: float = 0.01,
        z_loss_weight: float = 0.001,
        activation: str = "gelu",
        residual: bool = False,
        shared_experts: int = 0,
        bias: bool = True,
        out_std: float = 0.02,
    ):
        super().__init__()
        _routing.check(
            num_experts=num_experts, top_k=top_k, capacity_factor=capacity_factor,
            eval_capacity_factor=eval_capacity_factor, min_capacity=min_capacity,
            gating=gating, drop_policy=drop_policy,
            random_token_selection=random_token_selection, noisy_std=noisy_std,
            activation=activation, shared_experts=shared_experts,
        )  # fmt: skip
        d_hidden = d_hidden or 4 * d_model
        self.num_experts = num_experts
        self.top_k = top_k
        self.capacity_factor = capacity_factor
        self.eval_capacity_factor = eval_capacity_factor
        self.min_capacity = min_capacity
        self.gating = gating
        self.normalize_gates = normalize_gates
        self.drop_policy = drop_policy
        self.random_token_selection = random_token_selection
        self.noisy_std = noisy_std
        self.aux_loss_weight = aux_loss_weight
        self.z_loss_weight = z_loss_weight
        self.router = nn.Linear(d_model, num_experts, bias=False)
        self.experts = Experts(
            num_experts, d_model, d_hidden, activation=activation, out_std=out_std
        )
        self.residual_mlp = self.residual_coef = self.shared = None
        if residual:
            self.residual_mlp = FFN(d_model, d_hidden, activation=activation, bias=bias)
            self.residual_coef = nn.Linear(d_model, 2, bias=bias)
        if shared_experts:
            self.shared = FFN(d_model, shared_experts * d_hidden, activation=activation, bias=bias)

    def capacity(self, tokens: int) -> int | None:
        """Rows per expert for a batch of ``tokens`` in the current mode (None: dropless)."""
        cf = self.capacity_factor if self.training else self.eval_capacity_factor
        return capacity(tokens, self.num_experts, self.top_k, cf, self.min_capacity)

    def route(self, x2: torch.Tensor) -> Routing:
        """Route the tokens ``x2`` [T, d] (fp32 router logits)."""
        logits = F.linear(x2.float(), self.router.weight.float())
        return route(
            logits,
            top_k=self.top_k,
            capacity=self.capacity(x2.shape[0]),
            gating=self.gating,
            normalize=self.normalize_gates,
            drop_policy=self.drop_policy,
            random_token_selection=self.random_token_selection and self.training,
            noise_std=self.noisy_std if self.training else 0.0,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        r = self.route(x2)
        aux_loss.add("moe_load_balance", self.aux_loss_weight * r.load_balance)
        aux_loss.add("moe_z_loss", self.z_loss_weight * r.z_loss)
        # [Note: dispatch and combine as gathers]: deterministic, no atomics.
        rows = self.experts(_Dispatch.apply(x2, r.token, r.pos, self.top_k), r.counts)
        y = _Combine.apply(rows, r.gate, r.token, r.pos, self.top_k)
        if self.residual_mlp is not None:
            coef = F.softmax(self.residual_coef(x2), dim=-1).to(y.dtype)
            y = y * coef[:, :1] + self.residual_mlp(x2) * coef[:, 1:]
        if self.shared is not None:
            y = y + self.shared(x2)
        return y.view(shape)

    def active_params(self) -> int:
        """Parameters one token uses: router, k experts, residual and shared FFNs."""
        total = sum(p.numel() for p in self.parameters())
        return total - (self.num_experts - self.top_k) * self.experts.params_per_expert()

    def extra_repr(self) -> str:
        cf = self.capacity_factor
        return f"experts={self.num_experts}, top_k={self.top_k}, capacity_factor={cf}, " + (
            f"gating={self.gating}"
        )

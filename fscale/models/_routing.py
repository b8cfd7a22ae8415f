"""Token routing for the MoE layer: gate scores, top-k choice, capacity, aux losses.

A pure function of the router logits of the local tokens (and, for noisy gating and
random token selection, of torch's RNG): no state, so a batch split over ranks routes
as the same batches run one after the other.

Usage::

    r = route(logits, top_k=2, capacity=capacity(T, E, 2, 1.25))   # logits: fp32 [T, E]
    y_rows = experts(x[r.token], r.counts)                          # rows sorted by expert
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

GATINGS = ("softmax", "sigmoid")
DROP_POLICIES = ("position", "score")
ACTIVATIONS = ("gelu", "swiglu")


@dataclass(frozen=True)
class Routing:
    """Where each kept (token, choice) assignment goes, sorted by expert.

    ``token``, ``slot``, ``gate`` have one entry per kept assignment (N of them):
    the token's row, its slot ``j * T + t`` (choice ``j`` of token ``t``) and its
    combine weight. ``pos`` [k * T] inverts ``slot``: the sorted row of slot ``j * T + t``,
    -1 where dropped. ``counts`` [E] sums to N. ``experts``/``gates`` [T, k] are the
    choices before dropping; ``load_balance`` and ``z_loss`` are the unweighted losses.
    """

    token: torch.Tensor
    slot: torch.Tensor
    pos: torch.Tensor
    counts: torch.Tensor
    experts: torch.Tensor
    gates: torch.Tensor
    load_balance: torch.Tensor
    z_loss: torch.Tensor

    @functools.cached_property
    def gate(self) -> torch.Tensor:
        """The combine weight of each kept assignment [N] (a gather, made when read)."""
        return self.gates.t().reshape(-1)[self.slot]


def capacity(tokens: int, num_experts: int, top_k: int, factor: float | None, minimum: int = 4):
    """Rows each expert takes: ``max(ceil(k * tokens / E * factor), minimum)``; None = all."""
    if factor is None:
        return None
    return max(math.ceil(top_k * tokens / num_experts * factor), minimum)


def route(
    logits: torch.Tensor,
    *,
    top_k: int,
    capacity: int | None = None,
    gating: str = "softmax",
    normalize: bool | None = None,
    drop_policy: str = "position",
    random_token_selection: bool = False,
    noise_std: float = 0.0,
) -> Routing:
    """Route ``T`` tokens among ``E`` experts from their router logits [T, E].

    Args:
        top_k: experts per token.
        capacity: rows per expert (``capacity()``), or None for dropless.
        gating: "softmax" (probabilities over all experts) or "sigmoid" (independent
            scores, DeepSeek-V3).
        normalize: divide each token's k gates by their sum; None = for top_k > 1 with
            softmax, always with sigmoid (top-1 softmax keeps the raw probability, else
            the gate is 1 and the router gets no gradient through it).
        drop_policy: which assignments an over-full expert keeps: "position" (every
            token's first choice before any second choice, then by position in the
            batch, as GShard) or "score" (highest gate first).
        random_token_selection: among the assignments of one choice rank, a random order
            instead of the position (RTS, DeepSpeed-MoE): a position-independent drop.
        noise_std: Gaussian noise on the logits that *select* the experts (gates and
            losses use the clean logits); pass 0 in eval.
    """
    T, E = logits.shape
    logits = logits.float()
    chooser = logits
    if noise_std:
        chooser = logits + noise_std * torch.randn_like(logits)
    # softmax and sigmoid are monotone: the top-k of the logits is the top-k of the scores.
    idx = chooser.topk(top_k, dim=-1).indices  # [T, k]
    if gating == "softmax":
        scores = logits.softmax(-1)
        density = scores
    else:
        scores = torch.sigmoid(logits)
        density = scores / scores.sum(-1, keepdim=True)
    gates = scores.gather(1, idx)
    if normalize if normalize is not None else (top_k > 1 or gating == "sigmoid"):
        gates = gates / gates.sum(-1, keepdim=True)

    # [Note: load balance over all k choices]
    # f_e counts every one of the k choices (before dropping) over T * k assignments,
    # P_e is the mean router density; E * sum_e f_e P_e is 1 when both are uniform
    # (Switch's loss for k = 1; for k > 1 GShard counts only the first choice,
    # Megatron and torchtitan all of them, as here).
    flat_e = idx.t().reshape(-1)  # assignment a = j * T + t
    # Not bincount: on CUDA it reads the max id on the host; this stays on the device.
    counts_all = torch.zeros(E, dtype=torch.int64, device=logits.device)
    counts_all.index_add_(0, flat_e, torch.ones_like(flat_e))
    f = counts_all.float() / (T * top_k)
    load_balance = E * (f * density.mean(0)).sum()
    z_loss = torch.logsumexp(logits, -1).square().mean()

    # Priority order of the assignments, then a stable sort by expert: the sorted rows
    # of each expert are in priority order, so capacity keeps a prefix of each group.
    if random_token_selection:
        perm = torch.rand(top_k, T, device=logits.device).argsort(dim=1)
        order = (perm + torch.arange(top_k, device=logits.device)[:, None] * T).reshape(-1)
    elif drop_policy == "score":
        order = torch.argsort(gates.detach().t().reshape(-1), descending=True, stable=True)
    else:
        order = torch.arange(T * top_k, device=logits.device)
    e_sorted, perm = torch.sort(flat_e[order], stable=True)
    slot = order[perm]
    counts = counts_all
    if capacity is not None:
        start = torch.cumsum(counts_all, 0) - counts_all
        rank = torch.arange(T * top_k, device=logits.device) - start[e_sorted]
        slot = slot[rank < capacity]  # a host sync: the kept count sizes the expert batch
        counts = counts_all.clamp(max=capacity)
        pos = torch.full_like(order, -1)
    else:
        pos = torch.empty_like(order)
    pos.index_copy_(0, slot, torch.arange(slot.shape[0], device=logits.device))
    return Routing(
        token=slot % T,
        slot=slot,
        pos=pos,
        counts=counts,
        experts=idx,
        gates=gates,
        load_balance=load_balance,
        z_loss=z_loss,
    )


def check(
    *,
    num_experts: int,
    top_k: int,
    capacity_factor: float | None,
    eval_capacity_factor: float | None = None,
    min_capacity: int = 0,
    gating: str = "softmax",
    drop_policy: str = "position",
    random_token_selection: bool = False,
    noisy_std: float = 0.0,
    activation: str = "gelu",
    shared_experts: int = 0,
    where: str = "MoE",
) -> None:
    """Raise a ValueError naming the bad option and the fix."""
    if not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"{where}: num_experts must be a positive int, got {num_experts!r}.")
    if not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
        raise ValueError(
            f"{where}: top_k={top_k!r} must be in 1..{num_experts} (the number of experts); "
            "lower top_k or add experts."
        )
    for name, cf in (("capacity_factor", capacity_factor), ("eval_capacity_factor",
                                                             eval_capacity_factor)):  # fmt: skip
        if cf is not None and not (isinstance(cf, (int, float)) and cf > 0):
            raise ValueError(
                f"{where}: {name}={cf!r} must be > 0 (e.g. 1.25), or None for dropless routing."
            )
    if not isinstance(min_capacity, int) or min_capacity < 0:
        raise ValueError(f"{where}: min_capacity must be an int >= 0, got {min_capacity!r}.")
    if gating not in GATINGS:
        raise ValueError(f"{where}: gating={gating!r} is not one of {GATINGS}.")
    if drop_policy not in DROP_POLICIES:
        raise ValueError(f"{where}: drop_policy={drop_policy!r} is not one of {DROP_POLICIES}.")
    if random_token_selection and drop_policy != "position":
        raise ValueError(
            f"{where}: random_token_selection replaces the drop order, so it needs "
            f"drop_policy='position', got {drop_policy!r}."
        )
    if not noisy_std >= 0:
        raise ValueError(f"{where}: noisy_std must be >= 0, got {noisy_std!r}.")
    if activation not in ACTIVATIONS:
        raise ValueError(f"{where}: activation={activation!r} is not one of {ACTIVATIONS}.")
    if not isinstance(shared_experts, int) or shared_experts < 0:
        raise ValueError(f"{where}: shared_experts must be an int >= 0, got {shared_experts!r}.")

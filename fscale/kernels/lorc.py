"""LoRC: low-rank compensation of a weight's quantization error.

The error ``E = W - deq(Q(W))`` of a quantized ``[N, K]`` weight is spread over
all its singular directions, but its top few carry a large share of it; keeping
``E ~ U_r S_r V_r^T`` at rank ``r`` in 16 bits costs ``r (N + K)`` extra values
(0.8% of a 4096 x 4096 weight at r = 8) and the linear becomes
``x @ deq(Q(W))^T + (x @ V_r) @ (U_r S_r)^T``.

Usage::

    c = lorc_factors(w, unpack(p), rank=8)     # LoRC(us [N, r], v [r, K])
    y = fpx_linear(x, p) + lorc_linear(x, c)

References:
    Yao et al., "ZeroQuant-V2: Exploring Post-training Quantization in LLMs from
    Comprehensive Study to Low Rank Compensation", 2023 (LoRC, section 5).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LoRC:
    """Rank-r factors of a quantization error: ``E ~ us @ v`` (``us [N, r]``, ``v [r, K]``)."""

    us: torch.Tensor
    v: torch.Tensor

    @property
    def rank(self) -> int:
        return self.v.shape[0]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.us, self.v))

    def to(self, device) -> LoRC:
        return LoRC(self.us.to(device), self.v.to(device))

    def error(self) -> torch.Tensor:
        """The compensation ``us @ v`` as float32 ``[N, K]``."""
        return self.us.float() @ self.v.float()


# Exact SVD up to this many rows/cols; randomized (svd_lowrank) beyond, where the
# exact one costs minutes on a CPU and r << min(N, K) anyway.
_EXACT_SVD_MAX = 2048


@torch.no_grad()
def lorc_factors(
    w: torch.Tensor, w_hat: torch.Tensor, rank: int, *, dtype: torch.dtype = torch.float16
) -> LoRC:
    """Rank-``rank`` factors of ``w - w_hat`` (both ``[N, K]``), stored in ``dtype``."""
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"lorc_factors: rank must be a positive int, got {rank!r}.")
    if w.shape != w_hat.shape or w.dim() != 2:
        raise ValueError(
            f"lorc_factors: w {tuple(w.shape)} and w_hat {tuple(w_hat.shape)} must be the "
            "same 2-D shape."
        )
    err = w.float() - w_hat.float()
    rank = min(rank, *err.shape)
    if max(err.shape) > _EXACT_SVD_MAX:
        u, s, v = torch.svd_lowrank(err, q=min(rank + 8, *err.shape), niter=4)
        vh = v.t()
    else:
        u, s, vh = torch.linalg.svd(err, full_matrices=False)
    us = u[:, :rank] * s[:rank]
    return LoRC(us.to(dtype).contiguous(), vh[:rank].to(dtype).contiguous())


def lorc_linear(x: torch.Tensor, c: LoRC) -> torch.Tensor:
    """``x @ (us @ v)^T`` as two thin matmuls, in ``x``'s dtype."""
    return (x @ c.v.to(x.dtype).t()) @ c.us.to(x.dtype).t()

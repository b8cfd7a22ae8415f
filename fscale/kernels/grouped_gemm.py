"""Grouped GEMM: one matmul per expert over rows already sorted by expert.

``y[rows of e] = x[rows of e] @ w[e]`` for ``x`` [N, K] sorted by group, ``w`` [G, K, M]
and ``counts`` [G] rows per group (``sum(counts) == N``; a group may have 0 rows). The
MoE layer's experts run on it (``fscale.models.moe.Experts``).

Two ops in the kernel table, each with a torch reference (a loop over the groups):

- ``"grouped_mm"``  ``(x [N, K], w [G, K, M], offs [G] int32) -> y [N, M]``
- ``"grouped_mm_wgrad"``  ``(x [N, K], dy [N, M], offs) -> dw [G, K, M]`` (0 for empty groups)

where ``offs`` is the inclusive cumulative sum of ``counts`` (torch's ``_grouped_mm``
convention). Lowerings: the reference everywhere; ``torch._grouped_mm`` on CUDA from
sm_90 in bf16 (where this torch has it); the Triton kernels of ``grouped_gemm_triton``
on CUDA. ``grouped_mm`` is differentiable through one ``autograd.Function`` whose
backward calls the same ops: ``dx = grouped_mm(dy, w^T)``, ``dw = grouped_mm_wgrad``.

Usage::

    y = grouped_mm(x_sorted, w, counts)       # counts: int64 [G]; differentiable in x and w
"""

from __future__ import annotations

import torch

from fscale.hw import dispatch

MM = "grouped_mm"
WGRAD = "grouped_mm_wgrad"


def offsets(counts: torch.Tensor) -> torch.Tensor:
    """Inclusive cumulative row counts as int32 (what every lowering takes)."""
    return torch.cumsum(counts, 0, dtype=torch.int32)


# ----------------------------------------------------------------------------- reference


def _bounds(offs: torch.Tensor) -> list[tuple[int, int]]:
    ends = offs.tolist()  # a host sync: fine for the reference
    return list(zip([0, *ends[:-1]], ends, strict=True))


def grouped_mm_reference(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """The per-group loop: ``y[s:t] = x[s:t] @ w[g]``."""
    y = x.new_zeros(x.shape[0], w.shape[-1])
    for g, (s, t) in enumerate(_bounds(offs)):
        if t > s:
            y[s:t] = x[s:t] @ w[g]
    return y


def grouped_mm_wgrad_reference(
    x: torch.Tensor, dy: torch.Tensor, offs: torch.Tensor
) -> torch.Tensor:
    """``dw[g] = x[s:t]^T @ dy[s:t]``; zeros for a group without rows."""
    dw = x.new_zeros(offs.shape[0], x.shape[1], dy.shape[1])
    for g, (s, t) in enumerate(_bounds(offs)):
        if t > s:
            dw[g] = x[s:t].T @ dy[s:t]
    return dw


dispatch.register(MM, grouped_mm_reference, name="grouped_mm_reference")
dispatch.register(WGRAD, grouped_mm_wgrad_reference, name="grouped_mm_wgrad_reference")


# ----------------------------------------------------------------------------- torch._grouped_mm

# [Note: torch._grouped_mm as a lowering]
# CUTLASS grouped GEMM on sm_90+, bf16 only; it needs 16-byte aligned strides (K and M
# multiples of 8 in bf16) and int32 ``offs``. It writes only rows < offs[-1] (so N must
# equal sum(counts), the contract here) and, on Hopper, zero weight grads for empty
# groups (pytorch#172439 reports garbage there on Blackwell: hence min_capability (9, 0)
# with a check of the major version below). A shape it cannot take goes to the reference.
HAS_TORCH_GROUPED_MM = hasattr(torch, "_grouped_mm")


def _torch_ok(*mats: torch.Tensor) -> bool:
    if mats[0].device.type == "cuda" and torch.cuda.get_device_capability(mats[0].device)[0] != 9:
        return False  # see the Note: only Hopper is known to zero empty groups' grads
    return all(m.dtype == torch.bfloat16 and m.shape[-1] % 8 == 0 for m in mats)


def grouped_mm_torch(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """``torch._grouped_mm(x, w, offs=offs)`` (the reference for shapes it cannot take)."""
    if x.shape[0] == 0 or not _torch_ok(x, w) or w.shape[-2] % 8:
        return grouped_mm_reference(x, w, offs)
    return torch._grouped_mm(x, w, offs=offs)


def grouped_mm_wgrad_torch(x: torch.Tensor, dy: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """``torch._grouped_mm(x^T, dy, offs=offs)``: the 2-D x 2-D form reduces over each group."""
    if x.shape[0] == 0 or not _torch_ok(x, dy):
        return grouped_mm_wgrad_reference(x, dy, offs)
    return torch._grouped_mm(x.t(), dy, offs=offs)


if HAS_TORCH_GROUPED_MM:
    _BF16 = (torch.bfloat16,)
    dispatch.register(MM, grouped_mm_torch, device="cuda", min_capability=(9, 0),
                      dtypes=_BF16, priority=20)  # fmt: skip
    dispatch.register(WGRAD, grouped_mm_wgrad_torch, device="cuda", min_capability=(9, 0),
                      dtypes=_BF16, priority=20)  # fmt: skip

# The Triton rules register themselves when that module is imported.
from fscale.kernels import grouped_gemm_triton  # noqa: E402,F401

# ----------------------------------------------------------------------------- autograd


IMPLS = ("reference", "torch", "triton")


def _impl(op: str, t: torch.Tensor, impl: str | None):
    if impl is None:
        return dispatch.resolve(op, t).impl
    if impl not in IMPLS:
        raise ValueError(f"grouped_mm: impl={impl!r} is not one of {IMPLS} (or None: the table).")
    for rule in dispatch.lowerings(op):
        if rule.name == f"{op}_{impl}":
            return rule.impl
    raise LookupError(f"grouped_mm: the {impl!r} lowering is not registered here (no triton?).")


class _GroupedMM(torch.autograd.Function):
    @staticmethod
    def forward(x, w, offs, impl):
        return _impl(MM, x, impl)(x, w, offs)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, w, offs, impl = inputs
        ctx.impl = impl
        ctx.save_for_backward(x, w, offs)

    @staticmethod
    def backward(ctx, dy):
        x, w, offs = ctx.saved_tensors
        dy = dy.contiguous()
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = _impl(MM, dy, ctx.impl)(dy, w.transpose(-1, -2), offs)
        if ctx.needs_input_grad[1]:
            dw = _impl(WGRAD, x, ctx.impl)(x, dy, offs)
        return dx, dw, None, None


def grouped_mm(
    x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor, *, impl: str | None = None
) -> torch.Tensor:
    """``y[rows of g] = x[rows of g] @ w[g]`` with the best lowering; differentiable.

    Args:
        x: [N, K] rows sorted by group (group 0's rows first).
        w: [G, K, M].
        counts: integer [G], rows per group, summing to N.
        impl: None (the kernel table's choice) or one of ``IMPLS`` (benchmarks, tests).

    Returns:
        [N, M] in ``x``'s row order and dtype.
    """
    if x.dim() != 2 or w.dim() != 3 or x.shape[1] != w.shape[1]:
        raise ValueError(
            f"grouped_mm takes x [N, K] and w [G, K, M]; got x {tuple(x.shape)}, "
            f"w {tuple(w.shape)}."
        )
    if counts.shape != (w.shape[0],):
        raise ValueError(
            f"grouped_mm: counts has shape {tuple(counts.shape)} but w has {w.shape[0]} groups; "
            "pass one row count per group (w.shape[0] of them)."
        )
    if x.dtype != w.dtype:
        raise ValueError(f"grouped_mm: x is {x.dtype} but w is {w.dtype}; cast one of them.")
    # [Note: stand-in weights] A custom autograd.Function does not go through
    # __torch_function__, so a stand-in param (ZeRO-3's LazyParam) would reach it
    # unmaterialized and its grad would stop there. The core's stand-in protocol
    # (``fscale_materialize``, see fscale.units) gives the real, graph-connected tensor.
    x, w = (getattr(t, "fscale_materialize", lambda t=t: t)() for t in (x, w))
    return _GroupedMM.apply(x.contiguous(), w, offsets(counts), impl)

"""Decode linears of one row: ``y = x @ w.T + b`` for ``x`` ``[1, K]`` (batch-1 decode).

At batch 1 a decode step streams every weight matrix once through a matrix-vector
product: reading the weights is the whole cost. cuBLAS picks split-K kernels plus a
separate reduction for the 4096-row projections of an 8B Llama and reaches ~3.1 TB/s
there (the H200 streams ~4.3). This kernel gives each program ``BN`` whole rows of
``w`` and walks K in ``BK`` chunks: one kernel per product, no partial sums in memory.
On an H200 (``bench/gemv.py``, in CUDA graphs) it is 1.04-1.29x cuBLAS on the 8B
model's qkv, o, gate_up and head products; the engine's batch-1 decode graph took
4.27 instead of 4.46 ms with it on qkv and o alone, and 4.13-4.16 instead of
4.21-4.23 ms with the down projection moved off cuBLAS too, once the decode kernels
launched with PDL (the first weight chunk streams under the previous kernel's tail).
With 2 or more rows cuBLAS's tensor-core kernels win, so the lowering takes one row.

One op in the kernel table, ``gemv(x, w, b) -> y``: the reference is
``F.linear``; the Triton lowering (CUDA) takes one row, plain contiguous 2-D float
weights with K <= ``MAX_K``, and calls ``F.linear`` for anything else (more rows,
quantized weight subclasses), so the decoder can call it for every linear::

    y = gemv_triton(x, w, b)        # x [1, K], w [N, K], b [N] or None

[Note: accumulation order of gemv]
Each program keeps fp32 partial products per (column, lane of the K chunk) and sums
the lanes once at the end: a different order from cuBLAS's, so bf16 results differ
from ``F.linear`` by rounding; the same inputs always give the same bits. K is a
compile-time constant (one compile per distinct K: two or three per model).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fscale.hw import dispatch
from fscale.kernels._triton import LazyJit, gdc_launch_dependents, gdc_wait, pdl

try:
    import triton
    import triton.language as tl
except ImportError:  # triton is a dependency on Linux x86_64 only
    triton = tl = None

OP = "gemv"
MAX_ROWS = 1
# K above this goes to cuBLAS (an 8B Llama's widest K, the down projection's 14336,
# is under it; wider ones are unmeasured).
MAX_K = 16384


def gemv_reference(x, w, b=None):
    return F.linear(x, w, b)


def _gemv_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    y_ptr,
    N,
    stride_w,
    K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    PDL: tl.constexpr,
):
    # K is a compile-time constant (a model has two or three): the loop has a fixed
    # trip count the compiler pipelines, and only a ragged chunk is masked.
    pid = tl.program_id(0)
    rn = pid * BN + tl.arange(0, BN)
    n_ok = rn < N
    w_rows = w_ptr + rn.to(tl.int64)[:, None] * stride_w
    # The first chunk is peeled: its weights load before the wait on the previous
    # kernel ([Note: programmatic dependent launch] in _triton.py), x after it.
    rk = tl.arange(0, BK)
    k_ok = rk < K
    w = tl.load(w_rows + rk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    x = tl.load(x_ptr + rk, mask=k_ok, other=0.0)
    acc = w.to(tl.float32) * x.to(tl.float32)[None, :]
    for k in tl.range(BK, K, BK):
        rk = k + tl.arange(0, BK)
        if K % BK == 0:
            x = tl.load(x_ptr + rk)
            w = tl.load(w_rows + rk[None, :], mask=n_ok[:, None], other=0.0)
        else:
            k_ok = rk < K
            x = tl.load(x_ptr + rk, mask=k_ok, other=0.0)
            w = tl.load(w_rows + rk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
    y = tl.reduce(acc, 1, tl.standard._sum_combine)
    if HAS_BIAS:
        y += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + rn, y.to(y_ptr.dtype.element_ty), mask=n_ok)


_kernel = LazyJit(_gemv_kernel)


def _config(N: int, K: int) -> tuple[int, int, int, int]:
    """(BN, BK, num_warps, num_stages): among the best of bench/gemv.py's grid for the
    8B Llama's shapes in two runs on two H200s (each within 1% of that run's best);
    the down projection's from a sweep inside the engine's decode graph (PDL on)."""
    if K > 8192:
        return (2, 512, 4, 2)  # down
    if N <= 4096:
        return (4, 512, 8, 1)  # o projection
    if N <= 8192:
        return (8, 512, 4, 3)  # qkv
    return (4, 128, 8, 2)  # gate_up, head


def covers(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether the Triton kernel takes this product (else ``F.linear`` runs)."""
    return (type(w) is torch.Tensor or type(w) is torch.nn.Parameter) and (
        w.dim() == 2
        and w.stride(-1) == 1
        and w.dtype in (torch.float16, torch.bfloat16, torch.float32)
        and x.dtype == w.dtype
        and x.dim() == 2
        and x.shape[0] == MAX_ROWS
        and x.shape[1] == w.shape[1]
        and w.shape[1] <= MAX_K
    )


def gemv_triton(x, w, b=None):
    """The Triton lowering: the kernel where it ``covers`` the product, else F.linear."""
    if not covers(x, w):
        return F.linear(x, w, b)
    return gemv_launch(x, w, b)


def gemv_launch(x, w, b=None, *, config=None):
    """One launch of the kernel for ``x`` ``[1, K]`` (any K; ``config``: (BN, BK,
    warps, stages), else ``_config``'s); the benchmark's sweep calls it directly."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    N, K = w.shape
    y = torch.empty(1, N, dtype=x.dtype, device=x.device)
    BN, BK, warps, stages = config or _config(N, K)
    kernel, _ = _kernel()
    on = pdl(x.device)
    kernel[(triton.cdiv(N, BN),)](
        x,
        w,
        b if b is not None else w,
        y,
        N,
        w.stride(0),
        K=K,
        HAS_BIAS=b is not None,
        BN=BN,
        BK=BK,
        PDL=on,
        num_warps=warps,
        num_stages=stages,
        launch_pdl=on,
    )
    return y


@torch.no_grad()
def self_check(impl, device, dtype, K: int) -> str | None:
    """None when ``impl`` agrees with ``F.linear`` on a random ``[1, K]`` product on
    ``device`` (odd N, with a bias), else what went wrong."""
    g = torch.Generator(device="cpu").manual_seed(0)
    x, w, b = (torch.randn(*s, generator=g).to(device, dtype) for s in ((1, K), (67, K), (67,)))
    try:
        got = impl(x, w, b).float()
    except Exception as e:  # noqa: BLE001  (any failure means: do not use it)
        return f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    want = F.linear(x.float(), w.float(), b.float())
    err = ((got - want).norm() / want.norm()).item()
    limit = 1e-5 if dtype == torch.float32 else 1e-2
    return None if err <= limit else f"relative error {err:.2e} > {limit:g}"


dispatch.register(OP, gemv_reference, name=f"{OP}_reference")
if triton is not None:
    dispatch.register(
        OP,
        gemv_triton,
        device="cuda",
        min_capability=(8, 0),
        dtypes=(torch.float16, torch.bfloat16, torch.float32),
        priority=10,
        name=f"{OP}_triton",
    )

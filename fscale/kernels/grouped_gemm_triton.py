"""Triton lowerings of ``grouped_mm`` and ``grouped_mm_wgrad`` (see ``grouped_gemm.py``).

Registered for CUDA (any capability from sm_80, fp16/bf16/fp32); the tests run them on
CPU under ``TRITON_INTERPRET=1`` at small sizes in fp32 (the interpreter's bf16
``tl.dot`` is wrong).

Usage::

    y = grouped_mm_triton(x, w, offs)         # offs: int32 inclusive cumsum of counts
    dw = grouped_mm_wgrad_triton(x, dy, offs)
"""

from __future__ import annotations

import torch

from fscale.hw import dispatch
from fscale.kernels._triton import LazyJit, bucket, interpreting, tune

try:
    import triton
    import triton.language as tl
except ImportError:  # triton is a dependency on Linux x86_64 only
    triton = tl = None

# [Note: grouped GEMM tiles without a host sync]
# The forward walks row tiles of BM rows that never straddle two groups: group g owns
# ceil(count_g / BM) tiles. Their table (group, first row, end row) is built on the
# device from ``offs`` with a searchsorted over the cumulative tile counts, for an
# upper bound of ceil(N / BM) + G tiles that the host knows without reading counts;
# the tiles past the last real one get an empty K loop and store nothing. So the launch
# never waits for the routing, and a CUDA graph can capture it. The weight gradient
# has one program per (group, K block, M block) looping over that group's rows with
# bounds read from ``offs`` in the kernel; a group without rows writes zeros.


def _mm_kernel(
    x_ptr, w_ptr, y_ptr, tile_group, tile_start, tile_end, n_tiles, K, M,
    sxn, sxk, swg, swk, swm, syn, sym,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    n_m = tl.cdiv(M, BN)
    # Swizzle GROUP row tiles together so they reuse a weight column block from L2.
    per_band = GROUP * n_m
    band = pid // per_band
    first = band * GROUP
    rows_in_band = tl.minimum(n_tiles - first, GROUP)
    pid_t = first + (pid % per_band) % rows_in_band
    pid_m = (pid % per_band) // rows_in_band
    g = tl.load(tile_group + pid_t)
    start = tl.load(tile_start + pid_t)
    end = tl.load(tile_end + pid_t)
    rows = start + tl.arange(0, BM)
    cols = pid_m * BN + tl.arange(0, BN)
    ks = tl.arange(0, BK)
    row_ok = rows < end
    col_ok = cols < M
    k_stop = tl.where(g >= 0, K, 0)  # a padding tile runs no iterations
    g = tl.maximum(g, 0).to(tl.int64)
    x_ptrs = x_ptr + rows[:, None].to(tl.int64) * sxn + ks[None, :] * sxk
    w_ptrs = w_ptr + g * swg + ks[:, None] * swk + cols[None, :] * swm
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k in range(0, k_stop, BK):
        k_ok = ks + k < K
        a = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc)
        x_ptrs += BK * sxk
        w_ptrs += BK * swk
    y_ptrs = y_ptr + rows[:, None].to(tl.int64) * syn + cols[None, :] * sym
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def _wgrad_kernel(
    x_ptr, dy_ptr, dw_ptr, offs_ptr, K, M,
    sxn, sxk, sdn, sdm, swg, swk, swm,
    BK: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr,
):  # fmt: skip
    g = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    start = tl.load(offs_ptr + g - 1, mask=g > 0, other=0)
    end = tl.load(offs_ptr + g)
    kk = pid_k * BK + tl.arange(0, BK)
    mm = pid_m * BN + tl.arange(0, BN)
    rr = tl.arange(0, BR)
    k_ok = kk < K
    m_ok = mm < M
    acc = tl.zeros((BK, BN), dtype=tl.float32)
    for r in range(start, end, BR):
        rows = r + rr
        r_ok = rows < end
        # x^T tile [BK, BR] loaded through its strides: no transpose in registers.
        a = tl.load(
            x_ptr + kk[:, None] * sxk + rows[None, :].to(tl.int64) * sxn,
            mask=k_ok[:, None] & r_ok[None, :],
            other=0.0,
        )
        b = tl.load(
            dy_ptr + rows[:, None].to(tl.int64) * sdn + mm[None, :] * sdm,
            mask=r_ok[:, None] & m_ok[None, :],
            other=0.0,
        )
        acc = tl.dot(a, b, acc)
    out = dw_ptr + g.to(tl.int64) * swg + kk[:, None] * swk + mm[None, :] * swm
    tl.store(out, acc.to(dw_ptr.dtype.element_ty), mask=k_ok[:, None] & m_ok[None, :])


_mm_jit = LazyJit(_mm_kernel)
_wgrad_jit = LazyJit(_wgrad_kernel)

# Launch candidates on a GPU (tuned per shape by kernel time) and the interpreter's one.
_MM_CANDIDATES = [
    {"BM": 128, "BN": 128, "BK": 64, "num_warps": 8, "num_stages": 4},
    {"BM": 128, "BN": 256, "BK": 64, "num_warps": 8, "num_stages": 3},
    {"BM": 64, "BN": 128, "BK": 64, "num_warps": 4, "num_stages": 4},
    {"BM": 128, "BN": 128, "BK": 32, "num_warps": 4, "num_stages": 4},
]
_WGRAD_CANDIDATES = [
    {"BK": 128, "BN": 128, "BR": 64, "num_warps": 8, "num_stages": 4},
    {"BK": 128, "BN": 256, "BR": 64, "num_warps": 8, "num_stages": 3},
    {"BK": 64, "BN": 128, "BR": 64, "num_warps": 4, "num_stages": 4},
]
_INTERPRETED = {"BM": 16, "BN": 16, "BK": 16, "BR": 16, "num_warps": 1, "num_stages": 1}
_TUNED: dict = {}
_TUNE_LOG: dict = {}


def _kernel(jit, t: torch.Tensor, what: str):
    if triton is None:
        raise RuntimeError(f"{what}: triton is not installed; use the reference.")
    kernel, interpret = jit()
    if t.device.type == "cpu" and not interpret:
        raise RuntimeError(
            f"{what} got CPU tensors but Triton is not interpreting; set TRITON_INTERPRET=1 "
            "(tests) or use the reference (FSCALE_KERNELS=reference)."
        )
    return kernel


def tile_table(offs: torch.Tensor, n: int, bm: int):
    """(group or -1, first row, end row) of each BM-row tile, ceil(n / bm) + G of them."""
    ends = offs.long()
    starts = ends - torch.diff(ends, prepend=ends.new_zeros(1))
    tiles = (ends - starts + bm - 1) // bm
    tile_ends = torch.cumsum(tiles, 0)
    G = offs.shape[0]
    t = torch.arange(-(-n // bm) + G, device=offs.device)
    g = torch.searchsorted(tile_ends, t, right=True)
    gc = g.clamp(max=G - 1)
    first = starts[gc] + (t - (tile_ends[gc] - tiles[gc])) * bm
    valid = g < G
    return (
        torch.where(valid, gc, -1).to(torch.int32),
        torch.where(valid, first, 0),
        torch.where(valid, ends[gc], 0),
    )


def _launch_mm(kernel, x, w, offs, y, cfg):
    groups, starts, ends = tile_table(offs, x.shape[0], cfg["BM"])
    n_tiles = groups.shape[0]
    M = w.shape[2]
    grid = (n_tiles * triton.cdiv(M, cfg["BN"]),)
    kernel[grid](
        x, w, y, groups, starts, ends, n_tiles, x.shape[1], M,
        x.stride(0), x.stride(1), w.stride(0), w.stride(1), w.stride(2), y.stride(0), y.stride(1),
        BM=cfg["BM"], BN=cfg["BN"], BK=cfg["BK"], GROUP=8,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )  # fmt: skip
    return y


def _launch_wgrad(kernel, x, dy, offs, dw, cfg):
    K, M = x.shape[1], dy.shape[1]
    grid = (offs.shape[0], triton.cdiv(K, cfg["BK"]), triton.cdiv(M, cfg["BN"]))
    kernel[grid](
        x, dy, dw, offs, K, M,
        x.stride(0), x.stride(1), dy.stride(0), dy.stride(1),
        dw.stride(0), dw.stride(1), dw.stride(2),
        BK=cfg["BK"], BN=cfg["BN"], BR=cfg["BR"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )  # fmt: skip
    return dw


def grouped_mm_triton(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor, config=None):
    """The Triton lowering of ``grouped_mm_reference``."""
    kernel = _kernel(_mm_jit, x, "grouped_mm_triton")
    y = torch.empty(x.shape[0], w.shape[2], dtype=x.dtype, device=x.device)
    if x.shape[0] == 0:
        return y
    if config is None:
        if interpreting():
            config = _INTERPRETED
        else:
            key = ("mm", x.shape[1], w.shape[2], w.shape[0], bucket(x.shape[0]), x.dtype,
                   w.stride(1) == 1, str(x.device))  # fmt: skip
            config = tune(_TUNED, _TUNE_LOG, key, lambda: _MM_CANDIDATES,
                          lambda c: _launch_mm(kernel, x, w, offs, y, c),
                          "grouped_mm_triton (K, M, G, N bucket, dtype, w^T, device)")  # fmt: skip
    return _launch_mm(kernel, x, w, offs, y, config)


def grouped_mm_wgrad_triton(x: torch.Tensor, dy: torch.Tensor, offs: torch.Tensor, config=None):
    """The Triton lowering of ``grouped_mm_wgrad_reference``."""
    kernel = _kernel(_wgrad_jit, x, "grouped_mm_wgrad_triton")
    dw = torch.empty(offs.shape[0], x.shape[1], dy.shape[1], dtype=x.dtype, device=x.device)
    if config is None:
        if interpreting():
            config = _INTERPRETED
        else:
            key = ("wgrad", x.shape[1], dy.shape[1], offs.shape[0], bucket(max(x.shape[0], 1)),
                   x.dtype, str(x.device))  # fmt: skip
            config = tune(_TUNED, _TUNE_LOG, key, lambda: _WGRAD_CANDIDATES,
                          lambda c: _launch_wgrad(kernel, x, dy, offs, dw, c),
                          "grouped_mm_wgrad_triton (K, M, G, N bucket, dtype, device)")  # fmt: skip
    return _launch_wgrad(kernel, x, dy, offs, dw, config)


if triton is not None:
    _DT = (torch.float16, torch.bfloat16, torch.float32)
    dispatch.register("grouped_mm", grouped_mm_triton, device="cuda", min_capability=(8, 0),
                      dtypes=_DT, priority=10)  # fmt: skip
    dispatch.register("grouped_mm_wgrad", grouped_mm_wgrad_triton, device="cuda",
                      min_capability=(8, 0), dtypes=_DT, priority=10)  # fmt: skip


# ----------------------------------------------------------------------------- MoE gather-sum

# [Note: the MoE combine as a gather]
# The MoE layer's rows are sorted by expert; ``pos`` [k, T] (flat, k * T) holds the
# sorted row of each (choice j, token t), -1 for a dropped one. Both the combine
# (``y[t] = sum_j bf16(rows[pos[j, t]] * bf16(gate))``) and the dispatch's backward
# (``dx[t] = sum_j drows[pos[j, t]]``) read k rows per token and write one: a gather,
# summed in fp32 in the fixed order j = 0..k-1 (deterministic, no atomics), rounded
# once, as ``stack(...).sum(0)`` would. The combine's backward reads ``dy[token[n]]``
# per sorted row: ``drows = dy[token] * gate`` and ``dgate = <dy[token], rows>`` in one
# pass. One launch each instead of the zero fill, scatter, sum, mul, gather chain.


def _gather_sum_kernel(
    rows_ptr, gate_ptr, pos_ptr, y_ptr, T, D,
    K: tl.constexpr, HAS_GATE: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0) * BT + tl.arange(0, BT)
    c = tl.program_id(1) * BD + tl.arange(0, BD)
    t_ok = t < T
    c_ok = c < D
    acc = tl.zeros((BT, BD), dtype=tl.float32)
    for j in range(K):
        p = tl.load(pos_ptr + j * T + t, mask=t_ok, other=-1)
        ok = p >= 0
        p = tl.maximum(p, 0).to(tl.int64)
        r = tl.load(rows_ptr + p[:, None] * D + c[None, :], mask=ok[:, None] & c_ok[None, :],
                    other=0.0).to(tl.float32)  # fmt: skip
        if HAS_GATE:
            g = tl.load(gate_ptr + p, mask=ok, other=0.0)
            g = g.to(y_ptr.dtype.element_ty).to(tl.float32)
            r = (r * g[:, None]).to(y_ptr.dtype.element_ty).to(tl.float32)
        acc += r
    out = y_ptr + t[:, None].to(tl.int64) * D + c[None, :]
    tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=t_ok[:, None] & c_ok[None, :])


def _combine_bwd_kernel(
    dy_ptr, rows_ptr, gate_ptr, token_ptr, drows_ptr, dgate_ptr, N, D,
    BN: tl.constexpr, BD: tl.constexpr,
):  # fmt: skip
    n = tl.program_id(0) * BN + tl.arange(0, BN)
    n_ok = n < N
    tok = tl.load(token_ptr + n, mask=n_ok, other=0).to(tl.int64)
    g = tl.load(gate_ptr + n, mask=n_ok, other=0.0)
    g = g.to(drows_ptr.dtype.element_ty).to(tl.float32)
    n64 = n.to(tl.int64)
    acc = tl.zeros((BN,), dtype=tl.float32)
    for d0 in range(0, D, BD):
        c = d0 + tl.arange(0, BD)
        m = n_ok[:, None] & (c < D)[None, :]
        gy = tl.load(dy_ptr + tok[:, None] * D + c[None, :], mask=m, other=0.0).to(tl.float32)
        r = tl.load(rows_ptr + n64[:, None] * D + c[None, :], mask=m, other=0.0).to(tl.float32)
        tl.store(drows_ptr + n64[:, None] * D + c[None, :],
                 (gy * g[:, None]).to(drows_ptr.dtype.element_ty), mask=m)  # fmt: skip
        acc += tl.sum(gy * r, axis=1)
    tl.store(dgate_ptr + n, acc.to(dgate_ptr.dtype.element_ty), mask=n_ok)


_gather_sum_jit = LazyJit(_gather_sum_kernel)
_combine_bwd_jit = LazyJit(_combine_bwd_kernel)


def gather_sum_triton(
    rows: torch.Tensor, pos: torch.Tensor, k: int, gate: torch.Tensor | None = None
) -> torch.Tensor:
    """``y[t] = sum_j rows[pos[j*T + t]] (* bf16(gate[...]))``; -1 in ``pos`` adds nothing.

    ``rows`` [N, D] contiguous, ``pos`` int [k * T], ``gate`` [N] or None.
    """
    kernel = _kernel(_gather_sum_jit, rows, "gather_sum_triton")
    T, D = pos.shape[0] // k, rows.shape[1]
    y = torch.empty(T, D, dtype=rows.dtype, device=rows.device)
    if T == 0:
        return y
    bt, bd, warps = (16, 16, 1) if interpreting() else (8, 1024, 4)
    grid = (triton.cdiv(T, bt), triton.cdiv(D, bd))
    kernel[grid](
        rows, gate if gate is not None else rows, pos, y, T, D,
        K=k, HAS_GATE=gate is not None, BT=bt, BD=bd, num_warps=warps,
    )  # fmt: skip
    return y


def combine_backward_triton(
    dy: torch.Tensor, rows: torch.Tensor, gate: torch.Tensor, token: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dy[token] * bf16(gate), <dy[token], rows>)``: the combine's two grads, one pass."""
    kernel = _kernel(_combine_bwd_jit, rows, "combine_backward_triton")
    N, D = rows.shape
    drows = torch.empty_like(rows)
    dgate = torch.empty(N, dtype=gate.dtype, device=gate.device)
    if N == 0:
        return drows, dgate
    bn, bd, warps = (16, 16, 1) if interpreting() else (16, 256, 4)
    kernel[(triton.cdiv(N, bn),)](
        dy, rows, gate, token, drows, dgate, N, D, BN=bn, BD=bd, num_warps=warps
    )
    return drows, dgate

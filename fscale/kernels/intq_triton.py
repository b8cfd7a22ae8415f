"""The Triton lowering of ``int_linear``: group-wise int8/int4 weights dequantized in
registers (weight-only: activations stay in their dtype), and the large-M path
(dequantize by a kernel, then cuBLAS).

``int_linear_triton(x, p, bias)`` takes a ``PackedInt`` from ``intq.pack_int``; on CUDA
the first call per (format, group, symmetry, N, K, M bucket) times
``candidate_configs(M)`` and keeps the fastest, as ``fpx_linear`` does; under the
interpreter ``DEQUANT_MIN_M`` decides. Measurements: README.md here.

Usage::

    p = intq.pack_int(w, bits=4, group_size=128)
    y = int_linear_triton(x, p, bias)                  # ~ F.linear(x, unpack_int(p), bias)

[Note: the weight-only int kernel]
Small-batch linear layers are bound by reading the weight: an int4 g128 weight
is 4.25 bits per element against fp16's 16, so a kernel that loads the packed
codes and dequantizes in registers moves ~3.8x fewer bytes. Each program owns a
BLOCK_M x BLOCK_N tile of y and a contiguous range of K chunks (split-K: with
M = 1 an 8192-wide layer has only 128 column tiles, too few programs to keep an
H200's 132 SMs streaming). BLOCK_K divides the group size, so one chunk needs one
scale (and one minimum) per output column. What keeps the per-weight work small:
- The codes are loaded as W^T [BLOCK_K, BLOCK_N] with K fastest, the order of the
  MMA's B registers (pairs along K), so no transpose goes through shared memory;
  int4 bytes are split into their nibbles and interleaved with tl.join (element 2j
  low, 2j + 1 high: the order pack_int writes).
- An unsigned code u ORed into the mantissa of 1024.0 (fp16) is the float 1024 + u,
  so code -> fp16 is one logic op and a paired subtraction (HADD2), not an int ->
  float conversion (bf16 int4 uses 128.0; bf16 int8 needs 8 mantissa bits and
  converts plainly).
- With 16- and 32-row tiles (mma.sync) the integer-valued weights go into the dot
  as they are and the group's scale (and minimum times the row sums of x)
  multiplies the fp32 product: a multiply per output, not per weight. 64-row tiles
  scale each weight instead (Triton's warpgroup MMA cannot accumulate a scaled
  product in place).
- Split-K partials meet in one kernel for 16-row tiles ([Note: split-K without
  extra kernels] in _fpx_triton_kernel.py), and launches are tuned per shape and M
  bucket by CUDA-graph kernel time; above 32 rows the choice is the fused kernel or
  dequantize (``dequantize_int_triton``) + cuBLAS (from M=512 the latter wins).
Called eagerly, each call costs tens of us of host time (Triton's launcher): capture
decoding in a CUDA graph. Under the CPU interpreter use fp16 or fp32 x (bf16 tl.dot
is wrong there, DESIGN section 7).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fscale.kernels._triton import (
    LazyJit,
    bucket,
    sm_count,
    split_mode,
    split_workspace,
    tune_streamed,
    tuned_launches,
)

try:
    import triton
    import triton.language as tl
except ImportError:  # triton is a dependency on Linux x86_64 only
    triton = tl = None

#: Activation dtypes the lowering is registered for (fp32 x runs the kernel's fp32 dot).
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _int_linear_kernel(
    x_ptr, q_ptr, s_ptr, lo_ptr, b_ptr, y_ptr, ws_ptr, cnt_ptr,
    M, N, K, chunks_per_prog,
    stride_xm, stride_xk, stride_qn, stride_sn, stride_ym,
    GROUP: tl.constexpr, BITS: tl.constexpr, SYMMETRIC: tl.constexpr, HAS_BIAS: tl.constexpr,
    SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < N
    # tl.full, not tl.zeros: zeros is a @jit helper, which fails under an interpreter
    # switched on after triton was imported (tests set TRITON_INTERPRET late).
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    OFFSET: tl.constexpr = (8 if BITS == 4 else 128) if SYMMETRIC else 0
    c0 = pid_k * chunks_per_prog
    c1 = tl.minimum(c0 + chunks_per_prog, K // BLOCK_K)
    for c in range(c0, c1):
        k0 = c * BLOCK_K
        rk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(
            x_ptr + rm[:, None] * stride_xm + rk[None, :] * stride_xk,
            mask=m_ok[:, None],
            other=0.0,
        )
        # The codes as W^T [BLOCK_K, BLOCK_N], K fastest: the order of the MMA's B
        # registers (pairs along K), so no transpose through shared memory. u is the
        # unsigned code (int8: the stored byte + 128) and the weight is u - OFFSET.
        if BITS == 8:
            u = tl.load(q_ptr + rn[None, :] * stride_qn + rk[:, None], mask=n_ok[None, :], other=0)
            u = u.to(tl.int32) + 128
        else:
            rb = k0 // 2 + tl.arange(0, BLOCK_K // 2)
            b = tl.load(q_ptr + rn[None, :] * stride_qn + rb[:, None], mask=n_ok[None, :], other=0)
            b = b.to(tl.int32)
            # Element 2j is byte j's low nibble, 2j + 1 its high one.
            u = tl.reshape(tl.permute(tl.join(b & 0xF, b >> 4), (0, 2, 1)), (BLOCK_K, BLOCK_N))
        # Exact in fp16/bf16 (|u - OFFSET| <= 255). u ORed into the mantissa of 1024
        # (fp16) or 128 (bf16, 4-bit codes) is the float 1024 + u (128 + u): one logic
        # op and one subtraction instead of an int -> float conversion.
        if x_ptr.dtype.element_ty == tl.float16:
            w = (u | 0x6400).to(tl.uint16).to(tl.float16, bitcast=True) - (1024.0 + OFFSET)
        elif x_ptr.dtype.element_ty == tl.bfloat16 and BITS == 4:
            w = (u | 0x4300).to(tl.uint16).to(tl.bfloat16, bitcast=True) - (128.0 + OFFSET)
        else:
            w = (u - OFFSET).to(x.dtype)
        grp = k0 // GROUP
        s = tl.load(s_ptr + rn * stride_sn + grp, mask=n_ok, other=0.0)
        if not SYMMETRIC:
            lo = tl.load(lo_ptr + rn * stride_sn + grp, mask=n_ok, other=0.0)
        if BLOCK_M < 64:
            # The group's scale and minimum apply to the product (BLOCK_K divides
            # the group): fp32, one multiply per output instead of one per weight.
            acc += tl.dot(x, w) * s[None, :]
            if not SYMMETRIC:
                acc += tl.sum(x.to(tl.float32), axis=1)[:, None] * lo[None, :]
        else:
            # 64-row tiles (warpgroup MMAs) scale each weight, so that the MMAs
            # accumulate in place (a scaled product per chunk cannot).
            w = w.to(tl.float32) * s[None, :]
            if not SYMMETRIC:
                w = w + lo[None, :]
            acc = tl.dot(x, w.to(x.dtype), acc)
    mask = m_ok[:, None] & n_ok[None, :]
    if SPLIT == 2:
        # [Note: split-K without extra kernels] (_fpx_triton_kernel.py): the partial goes to
        # the workspace; the tile's last program sums them in order and writes y.
        tl.store(ws_ptr + (pid_k * M + rm[:, None]) * N + rn[None, :], acc, mask=mask)
        tile = pid_m * tl.num_programs(1) + pid_n
        if tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel") == tl.num_programs(2) - 1:
            acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
            for part_k in tl.range(0, tl.num_programs(2), loop_unroll_factor=4):
                ws = ws_ptr + (part_k * M + rm[:, None]) * N + rn[None, :]
                acc += tl.load(ws, mask=mask, other=0.0, cache_modifier=".cg")
            if HAS_BIAS:
                acc += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            y = y_ptr + rm[:, None] * stride_ym + rn[None, :]
            tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=mask)
            tl.atomic_xchg(cnt_ptr + tile, 0)  # ready for the next launch
    else:
        if HAS_BIAS:
            if pid_k == 0:
                acc += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        out = y_ptr + rm[:, None] * stride_ym + rn[None, :]
        if SPLIT == 1:
            tl.atomic_add(out, acc, mask=mask)
        else:
            tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=mask)


def _int_dequant_kernel(
    q_ptr, s_ptr, lo_ptr, w_ptr, N, K, stride_qn, stride_sn, stride_wn,
    GROUP: tl.constexpr, BITS: tl.constexpr, SYMMETRIC: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """W [N, K] in w's dtype, as ``unpack_int`` computes it (q * scale (+ lo) in fp32)."""
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    rk = k0 + tl.arange(0, BLOCK_K)
    n_ok = rn < N
    if BITS == 8:
        q = tl.load(q_ptr + rn[:, None] * stride_qn + rk[None, :], mask=n_ok[:, None], other=0)
        q = q.to(tl.float32) + (0.0 if SYMMETRIC else 128.0)
    else:
        rb = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        b = tl.load(q_ptr + rn[:, None] * stride_qn + rb[None, :], mask=n_ok[:, None], other=0)
        b = b.to(tl.int32)
        q = tl.reshape(tl.join(b & 0xF, b >> 4), (BLOCK_N, BLOCK_K)).to(tl.float32)
        q = q - (8.0 if SYMMETRIC else 0.0)
    s = tl.load(s_ptr + rn * stride_sn + k0 // GROUP, mask=n_ok, other=0.0)
    w = q * s[:, None]
    if not SYMMETRIC:
        w = w + tl.load(lo_ptr + rn * stride_sn + k0 // GROUP, mask=n_ok, other=0.0)[:, None]
    out = w_ptr + rn[:, None] * stride_wn + rk[None, :]
    tl.store(out, w.to(w_ptr.dtype.element_ty), mask=n_ok[:, None])


_dequant_kernel = LazyJit(_int_dequant_kernel)


def dequantize_int_triton(p, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """The dense weight [N, K] in ``dtype`` (``unpack_int(p).to(dtype)``) by a kernel.

    Under the interpreter bf16 comes out truncated rather than rounded (its fp32 ->
    bf16 cast), so compare bf16 on a GPU.
    """
    kernel, interpret = _dequant_kernel()
    N, K = p.shape
    w = torch.empty(N, K, dtype=dtype, device=p.device)
    block_k = min(p.group_size, 128)
    lo = p.lo if p.lo is not None else p.scale
    kernel[(triton.cdiv(N, 32), K // block_k)](
        p.codes, p.scale, lo, w, N, K, p.codes.stride(0), p.scale.stride(0), w.stride(0),
        GROUP=p.group_size, BITS=p.bits, SYMMETRIC=p.symmetric, BLOCK_N=32, BLOCK_K=block_k,
        **({} if interpret else {"num_warps": 4}),
    )  # fmt: skip
    return w


_FUSED_MAX_M = None  # tuned: see the Note

#: Untuned (the interpreter), from this many rows the weight is dequantized by a
#: kernel and cuBLAS multiplies; on CUDA the first call per shape and M bucket tunes.
DEQUANT_MIN_M = 256
_TUNED: dict[tuple, dict] = {}
_TUNE_LOG: dict[tuple, list] = {}


def launches(p) -> dict[int, dict]:
    """{M bucket: launch} tuned so far for packed weight ``p`` (``quantize_report``)."""
    return tuned_launches(_TUNED, (p.fmt, p.group_size, p.symmetric, *p.shape))


def candidate_configs(m: int) -> list[dict]:
    """Launches ``int_linear_triton`` times for small M (``waves``: programs per SM,
    reached by splitting K): 2-warp programs over 64 columns (best on 8192-wide layers)
    and 4-warp programs over 128 (4096-wide ones); the sweep behind them is in
    README.md. Above 32 rows: the default tile, or dequantize + cuBLAS."""
    rows = [(64, 4, 3, None), (64, 2, 3, 8), (64, 2, 3, 16), (64, 2, 4, 4), (128, 4, 3, 4),
            (128, 4, 3, 8)]  # fmt: skip
    cfgs = [
        dict(block_n=bn, num_warps=nw, num_stages=ns, **({} if wv is None else {"waves": wv}))
        for bn, nw, ns, wv in rows
    ]
    if m > 32:  # the default tile, or dequantize + cuBLAS
        return [{"dequant": False}, {"dequant": True}]
    if m > 16:  # 16-row tiles too (fpx_linear's win at M=32)
        cfgs += [dict(c, block_m=16) for c in cfgs[1:] if c["num_stages"] == 3]
    return cfgs


_kernel = LazyJit(_int_linear_kernel)


def int_linear_triton(
    x: torch.Tensor,
    p,
    bias: torch.Tensor | None = None,
    *,
    split_k: int | None = None,
    fused_max_m: int | None = _FUSED_MAX_M,
    config: dict | None = None,
):
    """Fused dequantize + matmul (see [Note: the weight-only int kernel]); any M, N.

    ``split_k``: K partitions (default: the power of two giving ~4 programs per SM);
    ``fused_max_m``: above this many rows dequantize (``dequantize_int_triton``) and
    call ``F.linear`` (None: tune on CUDA, else ``DEQUANT_MIN_M`` decides);
    ``config``: launch overrides (keys block_m, block_n, block_k, num_warps, num_stages,
    waves) or ``{"dequant": True}``.
    """
    if triton is None:
        raise RuntimeError("int_linear_triton needs triton; use int_linear_reference.")
    kernel, interpret = _kernel()
    if x.device.type == "cpu" and not interpret:
        raise RuntimeError(
            "int_linear_triton got CPU tensors but Triton is not interpreting; set "
            "TRITON_INTERPRET=1 or use int_linear_reference."
        )
    N, K = p.shape
    if x.shape[-1] != K:
        raise ValueError(f"int_linear: x has {x.shape[-1]} features, the weight [N, K]={p.shape}.")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if config is None and split_k is None and x.device.type == "cuda" and fused_max_m is None:
        config = tune_streamed(
            _TUNED, _TUNE_LOG, (p.fmt, p.group_size, p.symmetric, N, K, bucket(M), str(x.device)),
            lambda: candidate_configs(M),
            lambda w, cfg: int_linear_triton(x2, w, bias, config=cfg), p,
            "int_linear_triton (fmt, group, symmetric, N, K, M bucket, device)",
        )  # fmt: skip
    config = dict(config or {})
    dequant = config.pop("dequant", M >= DEQUANT_MIN_M if fused_max_m is None else M > fused_max_m)
    if dequant and x2.dtype in (torch.float16, torch.bfloat16):
        # Large M is compute-bound: dequantize once (a memory-bound kernel), then cuBLAS.
        w = dequantize_int_triton(p, x2.dtype)
        b = None if bias is None else bias.to(x2.dtype)
        return F.linear(x2, w, b).reshape(*lead, N)
    cfg = {
        "block_m": 16 if M <= 16 else (32 if M <= 32 else 64),
        "block_n": 64 if M <= 64 else 128,
        "block_k": min(p.group_size, 128 if M <= 64 else 64),
        "num_warps": 4 if M <= 64 else 8,
        "num_stages": 3,
        **config,
    }
    block_m, block_n, block_k = cfg["block_m"], cfg["block_n"], cfg["block_k"]
    if p.group_size % block_k:
        raise ValueError(
            f"int_linear_triton: block_k={block_k} must divide the group {p.group_size}."
        )
    chunks = K // block_k
    tiles = triton.cdiv(M, block_m) * triton.cdiv(N, block_n)
    if split_k is None and "waves" in cfg:
        split_k = max(1, min(chunks, -(-int(cfg["waves"] * sm_count(x.device)) // tiles)))
    if split_k is None:
        split_k = 1
        while split_k * 2 <= chunks and tiles * split_k * 2 <= 4 * sm_count(x.device):
            split_k *= 2
    per = -(-chunks // split_k)
    split_k = -(-chunks // per)  # no empty programs
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n), split_k)
    mode = split_mode(block_m, split_k)  # as fpx_linear: one kernel for 16-row tiles
    if mode == 1:
        y = torch.zeros(M, N, dtype=torch.float32, device=x.device)
    else:
        y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    ws, counters = split_workspace(mode, y, grid)
    lo = p.lo if p.lo is not None else p.scale
    b = bias if bias is not None else y
    kernel[grid](
        x2, p.codes, p.scale, lo, b, y, ws, counters, M, N, K, per,
        x2.stride(0), x2.stride(1), p.codes.stride(0), p.scale.stride(0), y.stride(0),
        GROUP=p.group_size, BITS=p.bits, SYMMETRIC=p.symmetric, HAS_BIAS=bias is not None,
        SPLIT=mode, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        **({} if interpret else {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}),
    )  # fmt: skip
    return y.to(x.dtype).reshape(*lead, N)

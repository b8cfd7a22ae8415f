"""The Triton kernel of ``fpx_linear``: read FPx bit planes, rebuild fp16 in registers, dot.

One jitted kernel serves three uses: the fused product ``y = x @ W^T`` for a tile of
rows of x, its split-K variants (partials summed by fp32 atomics, or by the last
program of a tile: ``SPLIT``), and, with ``DEQUANT``, writing the dense W^T for the
dequantize + cuBLAS path (``_fpx_dequant``). ``launch`` makes one launch of it;
``fpx_triton`` chooses the launch (and the kernel: this one, ``fpx_gluon``'s, or
dequantize + cuBLAS) and is what callers use. On CPU the kernel runs only under
Triton's interpreter (``TRITON_INTERPRET=1``), where every ``tl.dot`` is done in fp32
(the interpreter's bf16 dot is wrong).

Small M is a memory-bound problem (an fp6 weight is 6/16 of the fp16 bytes), so the
kernel reads each plane word once per output tile, splits K across programs so that
a handful of output tiles still fills the GPU, and spends ~2.6 integer ops per
weight on the rebuild for fp6 e3m2 and fp5 (~3.3 for e2m3 and fp4; see [Note: the
FPx bit-plane layout] in fpx.py). Measurements and what was tried: README.md here.

[Note: rebuilding an fp16 from an FPx code]
An fp16 whose exponent field holds the FPx exponent in its low E bits and whose
mantissa starts with the FPx mantissa is the FPx value times 2**(bias - 15), for
normals *and* subnormals (FPx exponent 0 lands on fp16 exponent 0, whose scaling is
the same 2**(1 - 15)); so there is no branch and no rebias add, and the factor
2**(15 - bias) is folded with the per-channel scale into the epilogue. With at most
2 mantissa bits that fp16 is zero below its high byte, and the planes hold exactly
that byte (the "byte" image): the rebuild is a rotate and a mask per plane and a
mask per pair of halves. Otherwise (e2m3, fp4) the byte word holds each code at the
top of its byte, and keeping the sign bit while shifting exponent|mantissa right by
5 - E makes the same fp16. bf16 activations take the fp16 weight converted to bf16
(exact: at most 3 mantissa bits, and bf16 has fp32's exponent range).

[Note: K per dot]
Within a chunk the rebuild yields [16, C] sub-tiles of pairs, one per 16 rows of K
(s = 2q + v). With tiles of fewer than 64 rows the dot is mma.sync and its B operand
stays in registers, so each sub-tile is dotted at once (T = 1, one dot per half).
From 64 rows Triton takes Hopper's warpgroup MMA, whose B operand must sit in shared
memory: a dot per sub-tile meant, per chunk of 128 rows, 16 stores of 16-bit values,
16 barriers and 16 MMA waits. So the kernel stacks T sub-tiles, consecutive in k,
into one [16 T, C] tile (join + permute + reshape, merged the way a binary counter
carries) and makes one dot of both halves side by side (channels 2c, 2c + 1 in y's
order): one 16-byte store per 8 weights, 3 barriers, 8 MMAs and one wait per 128
rows. Triton still waits for each warpgroup MMA right after issuing it (the B buffer
is rewritten next chunk), so the rebuild and the MMA of a program take turns.
T = 2 or 4 (kdot 32, 64) compile and are tested but never won.
"""

from __future__ import annotations

import torch

from fscale.kernels import fpx as _fpx
from fscale.kernels._triton import (
    LazyJit,
    gdc_launch_dependents,
    gdc_wait,
    interpreting,
    pdl,
    split_workspace,
)

try:
    import triton
    import triton.language as tl
except ImportError:  # triton is a dependency on Linux x86_64 only
    triton = tl = None

#: Activation dtypes of the tensor-core paths (fp32 x runs an fp32 dot: tests only).
DTYPES = (torch.float16, torch.bfloat16)


def _fpx_kernel(
    x_ptr,
    hi_ptr,
    lo_ptr,
    s_ptr,
    b_ptr,
    y_ptr,
    ws_ptr,
    cnt_ptr,
    M,
    N,
    NW,
    K,
    stride_xm,
    stride_ym,
    chunks_per_prog,
    exp_scale,
    c_begin,
    c_end,
    E: tl.constexpr,
    LB: tl.constexpr,
    NQ: tl.constexpr,
    BYTE: tl.constexpr,
    HI_MASK: tl.constexpr,
    LO_MASK: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    T: tl.constexpr,
    SPLIT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DOT_FP32: tl.constexpr,
    DEQUANT: tl.constexpr,
    OUT_BF16: tl.constexpr,
    PDL: tl.constexpr,
    SWIGLU: tl.constexpr = False,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    KC: tl.constexpr = 32 * NQ
    C: tl.constexpr = BN // 2
    # Exponent|mantissa bits of a code at the top of the high byte of each 16-bit half.
    EM_MASK: tl.constexpr = (((1 << (3 + LB)) - 1) << (12 - LB)) * 0x00010001
    # NW = N // 2 words per plane row comes from the host, so that Triton specialises
    # it (divisible by 16) and the plane loads become 16-byte vectors.
    offs_r = tl.arange(0, 16)
    # Plane columns [c_begin, c_end): all of them, except when DEQUANT writes one piece.
    offs_c = c_begin + pid_n * C + tl.arange(0, C)
    mask_c = offs_c < c_end
    offs_m = pid_m * BM + tl.arange(0, BM)
    mask_m = offs_m < M
    chunk0 = pid_k * chunks_per_prog
    chunk1 = chunk0 + chunks_per_prog
    chunk1 = tl.where(chunk1 < K // KC, chunk1, K // KC)
    # Output channels 2c (even) and 2c + 1 (odd) come from the two halves of a word;
    # each half feeds its own dot and accumulator, so no interleave is needed until
    # the (strided) epilogue stores.
    scale_e = tl.load(s_ptr + 2 * offs_c, mask=mask_c, other=0.0) * exp_scale
    scale_o = tl.load(s_ptr + 2 * offs_c + 1, mask=mask_c, other=0.0) * exp_scale
    if PDL:  # the scales are weights; x, y and the workspace only after the wait
        gdc_wait()
        gdc_launch_dependents()
    acc_e = tl.full((BM, C), 0.0, tl.float32)
    acc_o = tl.full((BM, C), 0.0, tl.float32)
    acc = tl.full((BM, BN), 0.0, tl.float32)  # T > 1: channels in order
    for b in range(chunk0, chunk1):
        # Sub-tiles waiting to be stacked ([Note: K per dot]).
        part0 = None
        part1 = None
        part2 = None
        if LB > 0:
            lo_rows = b * 16 + offs_r
            lo = tl.load(lo_ptr + lo_rows[:, None] * NW + offs_c[None, :], mask=mask_c[None, :])
            lo = lo.to(tl.uint32, bitcast=True)
        for qh in tl.static_range(NQ // 2):
            hi_rows = (b * (NQ // 2) + qh) * 16 + offs_r
            hi = tl.load(hi_ptr + hi_rows[:, None] * NW + offs_c[None, :], mask=mask_c[None, :])
            hi = hi.to(tl.uint32, bitcast=True)
            for ql in tl.static_range(2):
                q = 2 * qh + ql
                # The byte word: byte j = v + 2h holds the image of the code at (k-row r,
                # sub-tile 2q + v, channel 2c + h); see [Note: the FPx bit-plane layout].
                if BYTE:
                    # Rotations (hi: 0 or 28, lo: LB * q) bring each code's bits home;
                    # the masks below keep them.
                    if ql == 0:
                        hi_part = hi
                    else:
                        hi_part = (hi << 28) | (hi >> 4)
                    if q > 0:
                        lo_part = (lo << (LB * q)) | (lo >> (32 - LB * q))
                    else:
                        lo_part = lo
                else:
                    # The code at the top of each byte; bits below it may hold other
                    # codes' bits: EM_MASK drops them below.
                    if ql == 0:
                        word = hi << 4
                    else:
                        word = hi
                    if LB > 0:
                        sh = 4 - LB - LB * q  # lo field (j, q) -> bits of byte j below hi
                        if sh > 0:
                            lo_part = lo << sh
                        elif sh < 0:
                            lo_part = lo >> (-sh)
                        else:
                            lo_part = lo
                        word = (word & 0xF0F0F0F0) | (lo_part & 0x0F0F0F0F)  # one LOP3
                for v in tl.static_range(2):
                    # Bytes (0, 2) for v = 0, (1, 3) for v = 1 become the high bytes of
                    # the two fp16 halves: channels 2c and 2c + 1.
                    if BYTE:
                        # The image is the fp16's high byte: keep bytes (0, 2) or (1, 3)
                        # only (the low bytes stay 0), then move (0, 2) up.
                        if v == 0:
                            pair = (hi_part & (HI_MASK & 0x00FF00FF)) | (
                                lo_part & (LO_MASK & 0x00FF00FF)
                            )
                            pair = pair << 8
                        else:
                            pair = (hi_part & (HI_MASK & 0xFF00FF00)) | (
                                lo_part & (LO_MASK & 0xFF00FF00)
                            )
                    else:
                        if v == 0:
                            pair = word << 8
                        else:
                            pair = word
                        pair = (pair & 0x80008000) | ((pair & EM_MASK) >> (5 - E))
                    kk = b * KC + (2 * q + v) * 16 + offs_r
                    if DEQUANT:
                        # W^T [K, N] in x's dtype, written as int32 words holding the two
                        # 16-bit weights of channels 2c, 2c + 1: the order a pair already
                        # has, so the stores are whole coalesced words (y is an int32
                        # view with stride_ym words per row, its column 0 = c_begin).
                        w_e = (pair & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True)
                        w_o = (pair >> 16).to(tl.uint16).to(tl.float16, bitcast=True)
                        w_e = w_e.to(tl.float32) * scale_e[None, :]
                        w_o = w_o.to(tl.float32) * scale_o[None, :]
                        if OUT_BF16:
                            # Round to nearest even by hand: the same bits on the GPU and
                            # under the interpreter (whose fp32 -> bf16 cast truncates).
                            # No NaN or inf can occur (finite codes, finite scales).
                            u_e = w_e.to(tl.uint32, bitcast=True)
                            u_o = w_o.to(tl.uint32, bitcast=True)
                            w_e = ((u_e + 0x7FFF + ((u_e >> 16) & 1)) >> 16).to(tl.uint16)
                            w_o = ((u_o + 0x7FFF + ((u_o >> 16) & 1)) >> 16).to(tl.uint16)
                        else:
                            w_e = w_e.to(tl.float16).to(tl.uint16, bitcast=True)
                            w_o = w_o.to(tl.float16).to(tl.uint16, bitcast=True)
                        out_word = w_e.to(tl.uint32) | (w_o.to(tl.uint32) << 16)
                        ptrs = y_ptr + kk[:, None] * stride_ym + (offs_c - c_begin)[None, :]
                        tl.store(ptrs, out_word.to(tl.int32, bitcast=True), mask=mask_c[None, :])
                    else:
                        # [Note: K per dot] Sub-tile s = 2q + v joins the stack; level
                        # l merges when the low l bits of s are all 1. (Conditions on
                        # the static loop indices only: they stay compile-time.)
                        tile = pair
                        if T >= 2 and v == 1:
                            tile = tl.reshape(tl.permute(tl.join(part0, tile), (2, 0, 1)), (32, C))
                        if T >= 4 and v == 1 and ql == 1:
                            tile = tl.reshape(tl.permute(tl.join(part1, tile), (2, 0, 1)), (64, C))
                        if T >= 8 and v == 1 and ql == 1 and qh % 2 == 1:
                            tile = tl.reshape(tl.permute(tl.join(part2, tile), (2, 0, 1)), (128, C))
                        if not (
                            T == 1
                            or (T == 2 and v == 1)
                            or (T == 4 and v == 1 and ql == 1)
                            or (T == 8 and v == 1 and ql == 1 and qh % 2 == 1)
                        ):
                            if v == 1 and ql == 1:
                                part2 = tile
                            elif v == 1:
                                part1 = tile
                            else:
                                part0 = tile
                        else:
                            kx = b * KC + (2 * q + v + 1 - T) * 16 + tl.arange(0, 16 * T)
                            xs = tl.load(
                                x_ptr + offs_m[:, None] * stride_xm + kx[None, :],
                                mask=mask_m[:, None],
                                other=0.0,
                            )
                            a = xs.to(tl.float32) if DOT_FP32 else xs
                            w_e = (tile & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True)
                            w_o = (tile >> 16).to(tl.uint16).to(tl.float16, bitcast=True)
                            if T == 1:
                                # Each half its own dot: the B operand stays in registers.
                                acc_e = tl.dot(a, w_e.to(a.dtype), acc_e, input_precision="ieee")
                                acc_o = tl.dot(a, w_o.to(a.dtype), acc_o, input_precision="ieee")
                            else:
                                # One dot over both halves: side by side they are
                                # channels 2c, 2c + 1 in order, so the tile goes to
                                # shared memory (wgmma's B) as whole words.
                                w = tl.reshape(tl.join(w_e, w_o), (16 * T, BN)).to(a.dtype)
                                acc = tl.dot(a, w, acc, input_precision="ieee")
    if not DEQUANT:
        if T > 1:
            acc_e, acc_o = tl.split(tl.reshape(acc, (BM, C, 2)))
        mask = mask_m[:, None] & mask_c[None, :]
        for h in tl.static_range(2):
            if h == 0:
                out = acc_e * scale_e[None, :]
            else:
                out = acc_o * scale_o[None, :]
            offs_n = 2 * offs_c + h
            if SPLIT == 2:
                # [Note: split-K without extra kernels] The partial goes to the
                # workspace; the last of a tile's programs to arrive sums them below.
                ws = ws_ptr + (pid_k * M + offs_m[:, None]) * N + offs_n[None, :]
                tl.store(ws, out, mask=mask)
            else:
                if HAS_BIAS:
                    bias = tl.load(b_ptr + offs_n, mask=mask_c, other=0.0).to(tl.float32)
                    out = out + tl.where(pid_k == 0, 1.0, 0.0) * bias[None, :]
                ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
                if SPLIT == 1:
                    tl.atomic_add(ptrs, out, mask=mask)  # into a zeroed fp32 y
                else:
                    tl.store(ptrs, out.to(y_ptr.dtype.element_ty), mask=mask)
        if SPLIT == 2:
            if SWIGLU:
                # [Note: the SwiGLU epilogue] (fpx_gluon.py): a gate tile and the up tile
                # of the same channels count as one; the last of both writes silu(g) u.
                half = tl.num_programs(0) // 2
                tile = pid_m * half + pid_n % half
                parts = 2 * tl.num_programs(2)
            else:
                tile = pid_m * tl.num_programs(0) + pid_n
                parts = tl.num_programs(2)
            # acq_rel: the stores above are visible before the count rises, and the
            # last program's loads below see every other program's.
            arrived = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel")
            if SWIGLU and arrived == parts - 1:
                inter = N // 2
                for h in tl.static_range(2):
                    chg = (2 * offs_c + h) % inter  # gate channels (an up tile's, less I)
                    gate = tl.full((BM, C), 0.0, tl.float32)
                    up = tl.full((BM, C), 0.0, tl.float32)
                    for part in tl.range(0, tl.num_programs(2), loop_unroll_factor=4):
                        ws = ws_ptr + (part * M + offs_m[:, None]) * N + chg[None, :]
                        gate += tl.load(ws, mask=mask, other=0.0, cache_modifier=".cg")
                        up += tl.load(ws + inter, mask=mask, other=0.0, cache_modifier=".cg")
                    if HAS_BIAS:
                        gate += tl.load(b_ptr + chg, mask=mask_c, other=0.0).to(tl.float32)[None, :]
                        up += tl.load(b_ptr + inter + chg, mask=mask_c, other=0.0).to(tl.float32)[
                            None, :
                        ]
                    act = gate / (1.0 + tl.exp(-gate)) * up
                    ptrs = y_ptr + offs_m[:, None] * stride_ym + chg[None, :]
                    tl.store(ptrs, act.to(y_ptr.dtype.element_ty), mask=mask)
                tl.atomic_xchg(cnt_ptr + tile, 0)  # ready for the next launch
            if not SWIGLU and arrived == parts - 1:
                for h in tl.static_range(2):
                    offs_n = 2 * offs_c + h
                    total = tl.full((BM, C), 0.0, tl.float32)
                    # Unrolled so that several partials' loads are in flight at once:
                    # this sum is the launch's tail.
                    for part in tl.range(0, tl.num_programs(2), loop_unroll_factor=4):
                        ws = ws_ptr + (part * M + offs_m[:, None]) * N + offs_n[None, :]
                        total += tl.load(ws, mask=mask, other=0.0, cache_modifier=".cg")
                    if HAS_BIAS:
                        bias = tl.load(b_ptr + offs_n, mask=mask_c, other=0.0).to(tl.float32)
                        total = total + bias[None, :]
                    ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
                    tl.store(ptrs, total.to(y_ptr.dtype.element_ty), mask=mask)
                tl.atomic_xchg(cnt_ptr + tile, 0)  # ready for the next launch


_kernel = LazyJit(_fpx_kernel)


def check_inputs(x: torch.Tensor, p) -> None:
    """Raise unless the kernel can take ``x`` and packed weight ``p`` here."""
    if triton is None:
        raise RuntimeError("fpx_linear_triton needs triton; use fpx_linear_reference.")
    if x.device != p.device:
        raise ValueError(
            f"fpx_linear_triton: x is on {x.device}, the packed weight on {p.device}; "
            "move them to one device (PackedFPx.to)."
        )
    if x.device.type == "cpu" and not interpreting():
        raise RuntimeError(
            "fpx_linear_triton got CPU tensors but Triton is not interpreting; set "
            "TRITON_INTERPRET=1 to run it on the CPU, or use fpx_linear_reference."
        )
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"fpx_linear_triton: x has dtype {x.dtype}; use fp16, bf16 or fp32.")
    _fpx.check_shape(p.shape, p.fmt)


def launch(
    x2, p, bias, y, *, bm, bn, split, num_warps, num_stages, kdot=16, mode=0, dequant=None,
    cols=None, swiglu=False,
):  # fmt: skip
    """One launch (returns Triton's compiled kernel, for inspection); ``mode`` is the
    caller's ``split_mode`` (y is a zeroed fp32 buffer for mode 1); ``dequant`` (a
    16-bit dtype) writes W^T plane columns ``cols`` into ``y``. ``swiglu``: ``p``
    stacks gate over up ([2I, K], I a multiple of ``bn``), ``y`` is [M, I] and gets
    silu(gate) * up from the split-K epilogue (mode 2 whatever the split).

    [Note: split-K without extra kernels]
    With ``split`` > 1 programs along K, each stores its fp32 partial tile in a workspace
    [split, M, N] and adds 1 to its tile's arrival counter (acq_rel, so the partial is
    visible first); the program that arrives last sums the partials in order 0..split-1
    (plus the bias), writes y in x's dtype and sets the counter back to 0. A split-K
    launch is then one kernel, where it used to be three (zero an fp32 y, the kernel
    with atomic adds, a cast), and the sum is deterministic. The counters are one
    buffer per stream (launches on one stream are ordered); a CUDA graph keeps the
    buffer of the stream it was captured on, so graphs captured on one stream must not
    be replayed concurrently.
    """
    if kdot not in (16, 32, 64, 128):
        raise ValueError(f"fpx_linear_triton: kdot={kdot}; use 16, 32, 64 or 128 rows per dot.")
    kernel, interpret = _kernel()
    n, k = p.shape
    lay, pl = _fpx.layout(p.fmt), _fpx.planes(p.fmt)
    e_bits, _ = _fpx.FORMATS[p.fmt]
    chunks = k // lay["k_chunk"]
    per = triton.cdiv(chunks, split)
    m = x2.shape[0] if x2 is not None else 1
    c_begin, c_end = cols if cols is not None else (0, n // 2)
    grid = (
        triton.cdiv(c_end - c_begin, bn // 2),
        triton.cdiv(m, bm) if dequant is None else 1,
        triton.cdiv(chunks, per),
    )
    x_arg = x2 if x2 is not None else y
    if swiglu:
        if (n // 2) % bn or mode == 1:
            raise ValueError(
                f"fpx_linear_triton: swiglu needs I = {n // 2} to be a multiple of bn = {bn} "
                "(gate and up tiles never share a program) and split mode 0 or 2."
            )
        mode = 2
    ws, counters = split_workspace(mode, y, grid, shape=(m, n) if swiglu else None)
    dot_fp32 = interpret or (x2 is not None and x2.dtype == torch.float32)
    on = pdl(y.device)  # [Note: programmatic dependent launch] in _triton.py
    kwargs = {} if interpret else {"num_warps": num_warps, "num_stages": num_stages}
    if on:
        kwargs["launch_pdl"] = True
    return kernel[grid](
        x_arg, p.hi, p.lo if p.lo is not None else p.hi, p.scales,
        bias if bias is not None else p.scales, y, ws, counters,
        m, n, n // 2, k, x2.stride(0) if x2 is not None else 0, y.stride(0), per,
        float(2.0 ** (15 - _fpx.bias(p.fmt))), c_begin, c_end,
        E=e_bits, LB=lay["lo_bits"], NQ=lay["nq"], BYTE=pl["byte"],
        HI_MASK=pl["hi_mask"] * 0x01010101, LO_MASK=pl["lo_mask"] * 0x01010101, BM=bm,
        BN=bn, T=kdot // 16, SPLIT=mode,
        HAS_BIAS=bias is not None, DOT_FP32=dot_fp32, DEQUANT=dequant is not None,
        OUT_BF16=dequant == torch.bfloat16, PDL=on, SWIGLU=swiglu,
        **kwargs,
    )  # fmt: skip

"""FPx weights with e4m3 activations (W6A8): the compute-bound product on FP8 tensor cores.

At large M (prefill) the weight-only FPx product is compute-bound, and its best path,
dequantize + cuBLAS (``_fpx_dequant``), pays the dense bf16 weight's memory time on top
of a bf16 GEMM: 0.70-0.75x cuBLAS at M = 512. Every fp6 e3m2, fp5 e2m2 and e3m1 value
is exactly an e4m3 value (see [Note: FPx codes as e4m3 bytes]), so the weight can
instead be rebuilt as FP8 (1 byte per weight written, not 2) and multiplied with the
activations quantized per token to e4m3 on FP8 tensor cores (``torch._scaled_mm`` with
row-wise scales), at twice the bf16 rate. The weight loses nothing; the activations
take e4m3's rounding (at most 2**-4 relative per element down to e4m3's subnormals,
about 2**-15 of the row's absmax; smaller ones lose more, as in FP8 inference), so
this is a format of its own (``fs.quantize(params, "e3m2-a8")``), not a
faster path of weight-only e3m2.

``fpx_a8_linear`` runs products of fewer than ``MIN_TOKENS`` rows weight-only
(``fpx.fpx_linear``: memory-bound decode, where the fused FPx kernel is fastest and a
dense FP8 weight would only add traffic) and the rest through op ``"fpx_a8_linear"``:
the torch reference here, or on CUDA (sm_89+) the Triton kernels below and
``torch._scaled_mm``. A token's quantization depends only on its own row, and its path
on which side of ``MIN_TOKENS`` the product's row count falls (a CUDA graph's padded
count: the engine's decode bucket of 256 runs W6A8). The GEMMs are not bitwise
batch-invariant (cuBLAS and the tuned slices change with M), as with bf16.

Usage::

    y = fpx_a8_linear(x, p, bias)           # p = fpx.pack(w, "e3m2"); x [..., K] bf16
    w8, s = weight_fp8(p)                   # [N, K] e4m3, [N] fp32: w == w8 * s[:, None]
    xq, sx = rows_fp8(x2)                   # [M, K] e4m3 and [M] fp32: x ~= xq * sx
"""

from __future__ import annotations

import functools
import warnings

import torch

from fscale.hw import dispatch
from fscale.kernels import fpx as _fpx
from fscale.kernels._triton import LazyJit, bucket, eager_time, interpreting, tune
from fscale.kernels.intq import FP8_MAX, rowwise_fp8

try:
    import triton
    import triton.language as tl
except ImportError:  # triton is a dependency on Linux x86_64 only
    triton = tl = None

OP = "fpx_a8_linear"

#: Products with fewer rows than this run weight-only (``fpx.fpx_linear``).
MIN_TOKENS = 256

#: Formats whose codes map onto e4m3 bytes by the bit shuffle of the kernel below.
FORMATS = ("e3m2", "e2m2", "e3m1")

# [Note: FPx codes as e4m3 bytes]
# The planes hold each code's "byte image" t (see [Note: the FPx bit-plane layout] in
# fpx.py): sign at bit 7, the E <= 3 exponent bits from bit 2 up, the M <= 2 mantissa
# bits ending at bit 1. Shifting t's low 7 bits up by one, (t & 0x80) | (t & 0x7F) << 1,
# gives an e4m3 byte with the FPx exponent in the low bits of e4m3's 4-bit exponent and
# its mantissa at the top of e4m3's 3 bits: the FPx value times 2**(bias - 7), for
# normals and, since e4m3's subnormals scale by the same 2**(1 - 7), subnormals too.
# Nothing rounds: e3m2's extremes 28 and 2**-4 become 1.75 and 2**-8 (e4m3 reaches
# 448 and 2**-9). The factor 2**(7 - bias) goes into the per-channel scale. Four codes
# of a plane word are shuffled at once.


def supports(fmt: str) -> bool:
    """``fmt`` (a PackedFPx format) has the byte image this path reads."""
    return fmt in FORMATS


def _check_format(fmt: str) -> None:
    if not supports(fmt):
        raise ValueError(
            f"fpx_a8: format {fmt!r} has no e4m3 byte image here; FP8 activations are "
            f"available for {list(FORMATS)} (use weight-only {fmt!r} otherwise)."
        )


def _weight_scale(p) -> torch.Tensor:
    return (p.scales.float() * 2.0 ** (7 - _fpx.bias(p.fmt))).contiguous()


def weight_fp8_reference(p) -> tuple[torch.Tensor, torch.Tensor]:
    """(w8 [N, K] float8_e4m3fn, scale [N] fp32) with ``unpack(p) == w8 * scale[:, None]``."""
    _check_format(p.fmt)
    vals = _fpx.decode(_fpx.unpack_codes(p), p.fmt) * 2.0 ** (_fpx.bias(p.fmt) - 7)
    return vals.to(torch.float8_e4m3fn), _weight_scale(p)


def _weight_fp8_kernel(
    hi_ptr,
    lo_ptr,
    w_ptr,
    NW,
    NC,
    K,
    LB: tl.constexpr,
    NQ: tl.constexpr,
    HI_MASK: tl.constexpr,
    LO_MASK: tl.constexpr,
    C: tl.constexpr,
):
    # One program: plane columns [pc*C, pc*C + C) of NC (channels 2c, 2c + 1) of chunk
    # b; NW is the planes' row stride in words. The loads and rotations are those of
    # _fpx_triton_kernel's BYTE branch ([Note: the FPx bit-plane layout]), written out
    # again: a shared @triton.jit helper would be jitted at import, and a kernel
    # interpreted after TRITON_INTERPRET was set later could not call it.
    pc = tl.program_id(0)
    b = tl.program_id(1)
    KC: tl.constexpr = 32 * NQ
    offs_r = tl.arange(0, 16)
    offs_c = pc * C + tl.arange(0, C)
    mask_c = offs_c < NC
    lo = tl.load(lo_ptr + (b * 16 + offs_r)[:, None] * NW + offs_c[None, :], mask=mask_c[None, :])
    lo = lo.to(tl.uint32, bitcast=True)
    for qh in tl.static_range(NQ // 2):
        hi_rows = (b * (NQ // 2) + qh) * 16 + offs_r
        hi = tl.load(hi_ptr + hi_rows[:, None] * NW + offs_c[None, :], mask=mask_c[None, :])
        hi = hi.to(tl.uint32, bitcast=True)
        for ql in tl.static_range(2):
            q = 2 * qh + ql
            if ql == 0:
                hi_part = hi
            else:
                hi_part = (hi << 28) | (hi >> 4)
            if q > 0:
                lo_part = (lo << (LB * q)) | (lo >> (32 - LB * q))
            else:
                lo_part = lo
            # Byte j = v + 2h: the code at k = b*KC + 16*(2q + v) + r, channel 2c + h.
            word = (hi_part & HI_MASK) | (lo_part & LO_MASK)
            # [Note: FPx codes as e4m3 bytes]
            word = (word & 0x80808080) | ((word & 0x7F7F7F7F) << 1)
            kk = b * KC + q * 32 + tl.arange(0, 32)
            for h in tl.static_range(2):
                v0 = ((word >> (16 * h)) & 0xFF).to(tl.uint8)
                v1 = ((word >> (16 * h + 8)) & 0xFF).to(tl.uint8)
                # [r, c, v] -> [c, v, r]: 32 consecutive k of one channel per row.
                rows = tl.reshape(tl.permute(tl.join(v0, v1), (1, 2, 0)), (C, 32))
                rows_n = (2 * offs_c + h).to(tl.int64)  # N * K may pass 2**31
                ptrs = w_ptr + rows_n[:, None] * K + kk[None, :]
                tl.store(ptrs, rows, mask=mask_c[:, None])


_weight_kernel = LazyJit(_weight_fp8_kernel)


def _check_triton(t: torch.Tensor) -> None:
    if triton is None:
        raise RuntimeError("fpx_a8's kernels need triton; use fpx_a8_linear_reference.")
    if t.device.type != "cuda" and not interpreting():
        raise RuntimeError(
            "fpx_a8's Triton kernels got CPU tensors but Triton is not interpreting; set "
            "TRITON_INTERPRET=1 to run them on the CPU, or use fpx_a8_linear_reference."
        )


@functools.cache
def _constants(fmt: str) -> dict:
    """The weight kernel's constexprs for ``fmt`` (computed once: they sit on every
    prefill product's host path)."""
    lay, pl = _fpx.layout(fmt), _fpx.planes(fmt)
    return {
        "LB": lay["lo_bits"],
        "NQ": lay["nq"],
        "HI_MASK": pl["hi_mask"] * 0x01010101,
        "LO_MASK": pl["lo_mask"] * 0x01010101,
    }


def weight_fp8_into(
    p, w8: torch.Tensor, cols: tuple[int, int] | None = None, *, width: int = 64, warps: int = 4
) -> None:
    """Write rows ``2*c0 .. 2*c1`` of the e4m3 weight (plane columns ``cols``) into
    ``w8`` ([2*(c1 - c0), K] float8_e4m3fn, contiguous), by the Triton kernel with
    ``width`` plane columns (2 * width channels) per program."""
    _check_format(p.fmt)
    _check_triton(p.hi)
    n, k = p.shape
    c0, c1 = cols if cols is not None else (0, n // 2)
    if not 0 <= c0 <= c1 <= n // 2:
        raise ValueError(f"weight_fp8_into: cols {cols} must lie in [0, {n // 2}] (plane columns).")
    if w8.dtype != torch.float8_e4m3fn or w8.shape != (2 * (c1 - c0), k):
        raise ValueError(f"weight_fp8_into: w8 must be [{2 * (c1 - c0)}, {k}] float8_e4m3fn.")
    kernel, interpret = _weight_kernel()
    consts = _constants(p.fmt)
    grid = (-(-(c1 - c0) // width), k // (32 * consts["NQ"]))
    hi, lo = (p.hi, p.lo) if (c0, c1) == (0, n // 2) else (p.hi[:, c0:c1], p.lo[:, c0:c1])
    kwargs = {} if interpret else {"num_warps": warps}
    kernel[grid](
        hi, lo, w8.view(torch.uint8), n // 2, c1 - c0, k, C=width, **consts, **kwargs
    )  # fmt: skip


def weight_fp8(p) -> tuple[torch.Tensor, torch.Tensor]:
    """(w8 [N, K] float8_e4m3fn, scale [N] fp32) by the Triton kernel (= the reference)."""
    n, k = p.shape
    w8 = torch.empty(n, k, dtype=torch.float8_e4m3fn, device=p.device)
    weight_fp8_into(p, w8)
    return w8, _weight_scale(p)


def _rows_fp8_kernel(
    x_ptr, q_ptr, s_ptr, K, stride_x, gain, BK: tl.constexpr, FP8_MAX: tl.constexpr
):
    # One row: its absmax, then the row scaled to e4m3 (intq.rowwise_fp8's arithmetic:
    # IEEE fp32 division, clamp, round to nearest even). A NaN element becomes e4m3's
    # NaN, so the row's product is NaN, as the reference's. (tl.reduce with triton's
    # combine and tl.full, not tl.max / tl.zeros: see fused_decoder.py.)
    row = tl.program_id(0).to(tl.int64)
    amax = tl.full((BK,), 0.0, tl.float32)
    for k0 in range(0, K, BK):
        offs = k0 + tl.arange(0, BK)
        x = tl.load(x_ptr + row * stride_x + offs, mask=offs < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    # div_rn: Triton's `/` is approximate on NVIDIA GPUs (div.full.f32); torch's is not.
    amax_row = tl.reduce(amax, 0, tl.standard._elementwise_max)
    scale = tl.maximum(tl.div_rn(amax_row, FP8_MAX), 1.1754943508222875e-38)  # fp32 tiny
    for k0 in range(0, K, BK):
        offs = k0 + tl.arange(0, BK)
        x = tl.load(x_ptr + row * stride_x + offs, mask=offs < K, other=0.0).to(tl.float32)
        v = tl.div_rn(x, scale)
        v = tl.where(v != v, v, tl.minimum(tl.maximum(v, -FP8_MAX), FP8_MAX))
        # v's e4m3 byte, rounded to nearest even by hand: the same bits compiled and
        # under the interpreter (whose fp8 cast rounds ties away from zero). Normals
        # round the fp32 mantissa to 3 bits; below 2**-6 (e4m3's subnormals, steps of
        # 2**-9) adding and taking away 2**23 rounds a * 2**9 to an integer, and 8
        # there is 2**-6's own byte.
        a = tl.abs(v)
        u = a.to(tl.uint32, bitcast=True)
        ur = u + 0x7FFFF + ((u >> 20) & 1)
        normal = (((ur >> 23) - 120) << 3) | ((ur >> 20) & 7)
        sub = ((a * 512.0 + 8388608.0) - 8388608.0).to(tl.uint32)
        sign = (v.to(tl.uint32, bitcast=True) >> 24) & 0x80
        byte = tl.where(v != v, 0x7F, tl.where(a < 0.015625, sub, normal) | sign)
        tl.store(q_ptr + row * K + offs, byte.to(tl.uint8), mask=offs < K)
    tl.store(s_ptr + row, scale * gain)


_rows_kernel = LazyJit(_rows_fp8_kernel)


def rows_fp8(x2: torch.Tensor, gain: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(xq [M, K] float8_e4m3fn, scale [M] fp32 times ``gain``): each row's absmax maps
    to 448; one kernel, the same bits as ``intq.rowwise_fp8`` (the reference). A power
    of two ``gain`` is exact: the product folds the weight's 2**(7 - bias) in here,
    rather than in a kernel of its own over the weight's scales."""
    _check_triton(x2)
    m, k = x2.shape
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    xq = torch.empty(m, k, dtype=torch.float8_e4m3fn, device=x2.device)
    scale = torch.empty(m, dtype=torch.float32, device=x2.device)
    if m:
        kernel, _ = _rows_kernel()
        bk = min(1 << (k - 1).bit_length(), 2048)  # plain ints: triton's helpers are slow
        kernel[(m,)](x2, xq.view(torch.uint8), scale, k, x2.stride(0), gain, BK=bk, FP8_MAX=FP8_MAX)
    return xq, scale


def _check_linear(x: torch.Tensor, p, bias) -> None:
    _check_format(p.fmt)
    _fpx._check_linear(x, p, bias)


def fpx_a8_linear_reference(x: torch.Tensor, p, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token e4m3 activations times the exact e4m3 weight, product in fp32 (torch)."""
    _check_linear(x, p, bias)
    n, k = p.shape
    xq, sx = rowwise_fp8(x.reshape(-1, k))
    w8, sw = weight_fp8_reference(p)
    y = (xq.float() @ w8.float().t()) * sx[:, None] * sw.to(x.device)[None, :]
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], n)


#: Launches ``fpx_a8_linear_scaled_mm`` times on first use per (format, N, K, M
#: bucket, device): the weight kernel's program width and warps, and how many slices of
#: output channels pipeline the weight kernel against the GEMM (see
#: [Note: pipelined W6A8]). Every candidate computes the same function. They are timed
#: eagerly, host launch time included: prefill products run uncaptured, and slices
#: that save GPU time can cost more on the host than they save.
CANDIDATES = (
    {"width": 64, "warps": 4, "pieces": 1},
    {"width": 32, "warps": 2, "pieces": 1},
    {"width": 128, "warps": 8, "pieces": 1},
    {"width": 64, "warps": 4, "pieces": 2},
    {"width": 64, "warps": 4, "pieces": 4},
    {"width": 128, "warps": 8, "pieces": 4},
)
DEFAULT = CANDIDATES[0]
_TUNED: dict[tuple, dict] = {}
_TUNE_LOG: dict[tuple, list] = {}
_SIDE_STREAMS: dict = {}


def tuned() -> dict:
    """{(fmt, N, K, M bucket, device): launch} chosen so far (for benchmarks)."""
    return dict(_TUNED)


def fpx_a8_linear_scaled_mm(
    x: torch.Tensor, p, bias: torch.Tensor | None = None, *, config: dict | None = None
) -> torch.Tensor:
    """The Triton kernels (weight to e4m3, rows to e4m3) and ``torch._scaled_mm`` with
    row-wise scales (bf16 out, as Hopper's row-wise FP8 GEMM writes). ``config`` (one
    of ``CANDIDATES``) fixes the launch; by default it is tuned on first use on CUDA."""
    _check_linear(x, p, bias)
    n, k = p.shape
    if n % 16:  # _scaled_mm wants N and K multiples of 16 (K is, by the packing)
        return fpx_a8_linear_reference(x, p, bias)
    x2 = x.reshape(-1, k)
    if config is None:
        config = DEFAULT
        if x2.device.type == "cuda":
            key = (p.fmt, n, k, bucket(x2.shape[0]), str(x2.device))
            config = tune(
                _TUNED, _TUNE_LOG, key, lambda: CANDIDATES,
                lambda cfg: fpx_a8_linear_scaled_mm(x, p, bias, config=cfg),
                "fpx_a8_linear (fmt, N, K, M bucket, device)", timer=eager_time,
            )  # fmt: skip
    # The weight's 2**(7 - bias) ([Note: FPx codes as e4m3 bytes]) rides on the rows' scales.
    xq, sx = rows_fp8(x2, gain=2.0 ** (7 - _fpx.bias(p.fmt)))
    y = _product(xq, sx, p, **config)
    y = y.to(x.dtype)
    if bias is not None:
        y = y + bias.to(x.dtype)
    return y.reshape(*x.shape[:-1], n)


def _product(xq, sx, p, *, width: int, warps: int, pieces: int) -> torch.Tensor:
    """``(xq * sx) @ W.t()`` in bf16, the weight rebuilt as e4m3 in ``pieces`` slices
    (``sx`` carries the weight's 2**(7 - bias), so the GEMM takes p.scales as they are).

    [Note: pipelined W6A8]
    With one piece the whole e4m3 weight is written, then multiplied. With ``pieces``
    > 1 on CUDA the weight kernel writes a slice of output channels at a time on a side
    stream into two rotating buffers while the current stream multiplies the previous
    slice, so the memory-bound rebuild overlaps the compute-bound GEMM, and only two
    slices of e4m3 weight exist at once. The slices' outputs are then joined (one
    copy of y: Hopper's row-wise FP8 GEMM writes a whole, contiguous output). Ordering
    as in [Note: pipelined dequantize + cuBLAS] (_fpx_dequant.py): the side stream
    starts after what the current stream queued, a buffer is rewritten only after the
    GEMM that read it, each GEMM waits for its slice.
    """
    n, k = p.shape
    sw = p.scales if p.scales.dtype == torch.float32 else p.scales.float()
    words = n // 2
    if pieces <= 1 or xq.device.type != "cuda":
        w8 = torch.empty(n, k, dtype=torch.float8_e4m3fn, device=xq.device)
        weight_fp8_into(p, w8, width=width, warps=warps)
        return torch._scaled_mm(
            xq, w8.t(), scale_a=sx[:, None], scale_b=sw[None, :], out_dtype=torch.bfloat16
        )  # w8.t(): the column-major B the FP8 GEMM wants
    span = -(-words // pieces)
    span = -(-span // width) * width  # whole programs per slice
    bufs = [torch.empty(2 * span, k, dtype=torch.float8_e4m3fn, device=xq.device) for _ in "ab"]
    main = torch.cuda.current_stream(xq.device)
    side = _SIDE_STREAMS.get(xq.device)
    if side is None:
        side = _SIDE_STREAMS[xq.device] = torch.cuda.Stream(xq.device)
    side.wait_stream(main)
    consumed: list = [None, None]
    outs = []
    for j, c0 in enumerate(range(0, words, span)):
        c1 = min(c0 + span, words)
        buf = bufs[j % 2][: 2 * (c1 - c0)]
        with torch.cuda.stream(side):
            if consumed[j % 2] is not None:
                side.wait_event(consumed[j % 2])
            weight_fp8_into(p, buf, (c0, c1), width=width, warps=warps)
            ready = torch.cuda.Event()
            ready.record(side)
        main.wait_event(ready)
        outs.append(
            torch._scaled_mm(
                xq, buf.t(), scale_a=sx[:, None], scale_b=sw[None, 2 * c0 : 2 * c1],
                out_dtype=torch.bfloat16,
            )
        )  # fmt: skip
        consumed[j % 2] = torch.cuda.Event()
        consumed[j % 2].record(main)
    return torch.cat(outs, dim=1)


def fpx_a8_linear(x: torch.Tensor, p, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.t() (+ bias)`` for packed FPx ``p``: e4m3 activations from ``MIN_TOKENS``
    rows on (op ``"fpx_a8_linear"``), weight-only below (``fpx.fpx_linear``). Shapes
    are checked by the op it calls."""
    _check_format(p.fmt)
    if x.numel() // max(x.shape[-1], 1) < MIN_TOKENS:
        return _fpx.fpx_linear(x, p, bias)
    rule = dispatch.resolve(OP, x)
    if rule.is_reference and x.device.type == "cuda" and x.device not in _WARNED:
        _WARNED.add(x.device)
        warnings.warn(
            f"fpx_a8_linear on {x.device}: no FP8 lowering here (it needs sm_89+ and "
            "triton), so products of many tokens run the fp32 torch reference, far slower "
            "than weight-only FPx; quantize with the weight-only format instead (e.g. "
            "'e3m2' for 'e3m2-a8').",
            stacklevel=2,
        )
    return rule.impl(x, p, bias)


_WARNED: set = set()


def available(device: torch.device | str) -> bool:
    """FP8 tensor cores (sm_89+) and a triton to build the kernels."""
    from fscale.kernels.intq import fp8_capable

    return triton is not None and fp8_capable(device)

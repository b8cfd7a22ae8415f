"""Symmetric block quantization of a flat tensor to int8 or int4, and back.

ZeRO++'s wire formats (Wang et al., "ZeRO++: Extremely Efficient Collective
Communication for Giant Model Training", 2023): a flat tensor is cut into blocks of
``block`` consecutive elements, each with one scale ``s = absmax / qmax`` (qmax 127
for int8, 7 for int4), stored in ``scale_dtype`` (fp32 or fp16). Codes are
``q = round_half_away(x / s)`` clamped to ``[-qmax, qmax]``, computed with the
*stored* scale so that dequantization (``q * s``) is within ``s / 2`` of ``x``.
A block of zeros has scale 0 and codes 0. int8 codes are one signed byte each;
int4 codes are biased by 8 and packed two per byte, element ``2j`` in the low
nibble of byte ``j`` and ``2j + 1`` in the high one (``intq.pack_int``'s order).
The last block is zero-padded: codes cover ``ceil(n / block) * block`` elements.

Registered in the kernel table as ops ``"blockq_quantize"`` and
``"blockq_dequantize"``: the torch reference everywhere, the Triton kernels on
CUDA (and on CPU under ``TRITON_INTERPRET=1``, how the tests compare them).

Usage::

    codes, scales = quantize(x, bits=4, block=256)          # x: any float tensor
    y = dequantize(codes, scales, bits=4, block=256, numel=x.numel(), dtype=x.dtype)
"""

from __future__ import annotations

import torch

from fscale.hw import dispatch
from fscale.kernels._triton import LazyJit

try:
    import triton
    import triton.language as tl
except ImportError:  # triton is a dependency on Linux x86_64 only
    triton = tl = None

QUANTIZE = "blockq_quantize"
DEQUANTIZE = "blockq_dequantize"
BITS = (8, 4)
SCALE_DTYPES = (torch.float32, torch.float16)
_QMAX = {8: 127, 4: 7}


def check(bits: int, block: int, scale_dtype: torch.dtype = torch.float32) -> None:
    """Raise a ValueError naming the fix for an unsupported format."""
    if bits not in BITS:
        raise ValueError(f"block quantization takes bits=8 or bits=4, got {bits!r}.")
    if not isinstance(block, int) or isinstance(block, bool) or block < 16 or block & (block - 1):
        raise ValueError(
            f"block size must be a power of two >= 16 (e.g. 256), got {block!r}: one scale "
            "per block, and the Triton kernels tile by powers of two."
        )
    if scale_dtype not in SCALE_DTYPES:
        raise ValueError(f"scale_dtype must be torch.float32 or torch.float16, got {scale_dtype}.")


def num_blocks(numel: int, block: int) -> int:
    return -(-numel // block)


def code_bytes(numel: int, bits: int, block: int) -> int:
    """Bytes of the codes of ``numel`` elements (the padded last block included)."""
    return num_blocks(numel, block) * block * bits // 8


# ----------------------------------------------------------------------------- reference


def _round_half_away(y: torch.Tensor) -> torch.Tensor:
    # Not torch.round (half to even): the kernels round the same way without a libdevice call.
    return torch.sign(y) * torch.floor(y.abs() + 0.5)


@torch.no_grad()
def quantize_reference(x: torch.Tensor, bits: int, block: int, scale_dtype=torch.float32):
    """``(codes, scales)`` of flat ``x``: int8 codes (int8) or packed int4 (uint8)."""
    qmax = _QMAX[bits]
    flat = x.reshape(-1).float()
    nb = num_blocks(flat.numel(), block)
    rows = torch.zeros(nb * block, dtype=torch.float32, device=x.device)
    rows[: flat.numel()] = flat
    rows = rows.view(nb, block)
    scales = (rows.abs().amax(dim=1) / qmax).to(scale_dtype)
    s = scales.float()
    inv = torch.where(s > 0, 1.0 / s, torch.zeros_like(s))
    q = _round_half_away(rows * inv[:, None]).clamp_(-qmax, qmax).to(torch.int32)
    if bits == 8:
        return q.to(torch.int8).view(-1), scales
    u = (q + 8).view(nb, block // 2, 2)
    return (u[..., 0] | (u[..., 1] << 4)).to(torch.uint8).view(-1), scales


@torch.no_grad()
def dequantize_reference(codes, scales, bits: int, block: int, numel: int, dtype=torch.float32):
    """The flat ``numel`` values ``codes * scale`` of each block, in ``dtype``."""
    if bits == 8:
        q = codes.view(-1, block).float()
    else:
        b = codes.view(-1, block // 2).to(torch.int32)
        q = torch.stack(((b & 15) - 8, (b >> 4) - 8), dim=-1).view(-1, block).float()
    return (q * scales.float()[:, None]).view(-1)[:numel].to(dtype)


dispatch.register(QUANTIZE, quantize_reference, name="blockq_quantize_reference")
dispatch.register(DEQUANTIZE, dequantize_reference, name="blockq_dequantize_reference")


# ----------------------------------------------------------------------------- Triton

# [Note: block quantization tiles]
# A program owns ROWS blocks as a [ROWS, BLOCK] tile (int4: two [ROWS, BLOCK/2]
# tiles of the even and odd elements, so a byte's two nibbles are made in registers
# and stored once). The absmax is a row reduction; the scale is rounded to its
# storage dtype *before* the codes are computed, as in the reference, and x is
# multiplied by the IEEE reciprocal (div_rn) so both give the same codes bit for bit.
# The bandwidth is one read of x and a write of 1/2 (int8) or 1/4 (int4) of bf16's
# bytes; ROWS=8 keeps a 256-wide tile at 2048 elements per program.
_ROWS = 8


def _quantize_kernel(
    x_ptr, codes_ptr, scales_ptr, n, n_blocks,
    BLOCK: tl.constexpr, ROWS: tl.constexpr, QMAX: tl.constexpr, INT4: tl.constexpr,
    SCALE_DTYPE: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * ROWS + tl.arange(0, ROWS)
    row_ok = rows < n_blocks
    if INT4:
        half = tl.arange(0, BLOCK // 2)
        even = rows[:, None] * BLOCK + 2 * half[None, :]
        lo = tl.load(x_ptr + even, mask=even < n, other=0.0).to(tl.float32)
        hi = tl.load(x_ptr + even + 1, mask=even + 1 < n, other=0.0).to(tl.float32)
        absmax = tl.maximum(tl.max(tl.abs(lo), axis=1), tl.max(tl.abs(hi), axis=1))
    else:
        cols = tl.arange(0, BLOCK)
        offs = rows[:, None] * BLOCK + cols[None, :]
        x = tl.load(x_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
        absmax = tl.max(tl.abs(x), axis=1)
    scale = tl.div_rn(absmax, QMAX * 1.0).to(SCALE_DTYPE)
    tl.store(scales_ptr + rows, scale, mask=row_ok)
    s = scale.to(tl.float32)
    safe = tl.where(s > 0, s, 1.0)  # no 1/0 even in the lanes the where drops
    inv = tl.where(s > 0, tl.div_rn(tl.full(s.shape, 1.0, tl.float32), safe), 0.0)
    if INT4:
        ylo = lo * inv[:, None]
        yhi = hi * inv[:, None]
        # round half away from zero, clamped (inlined: helpers would need their own jit)
        rlo = tl.minimum(tl.floor(tl.abs(ylo) + 0.5), QMAX * 1.0)
        rhi = tl.minimum(tl.floor(tl.abs(yhi) + 0.5), QMAX * 1.0)
        qlo = tl.where(ylo < 0, -rlo, rlo).to(tl.int32) + 8
        qhi = tl.where(yhi < 0, -rhi, rhi).to(tl.int32) + 8
        byte = (qlo | (qhi << 4)).to(tl.uint8)
        boffs = rows[:, None] * (BLOCK // 2) + half[None, :]
        tl.store(codes_ptr + boffs, byte, mask=row_ok[:, None])
    else:
        y = x * inv[:, None]
        r = tl.minimum(tl.floor(tl.abs(y) + 0.5), QMAX * 1.0)
        q = tl.where(y < 0, -r, r).to(tl.int8)
        tl.store(codes_ptr + offs, q, mask=row_ok[:, None])


def _dequantize_kernel(
    codes_ptr, scales_ptr, out_ptr, n, n_blocks,
    BLOCK: tl.constexpr, ROWS: tl.constexpr, INT4: tl.constexpr, OUT_DTYPE: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * ROWS + tl.arange(0, ROWS)
    row_ok = rows < n_blocks
    s = tl.load(scales_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    if INT4:
        half = tl.arange(0, BLOCK // 2)
        boffs = rows[:, None] * (BLOCK // 2) + half[None, :]
        b = tl.load(codes_ptr + boffs, mask=row_ok[:, None], other=0).to(tl.int32)
        lo = ((b & 15) - 8).to(tl.float32) * s[:, None]
        hi = ((b >> 4) - 8).to(tl.float32) * s[:, None]
        even = rows[:, None] * BLOCK + 2 * half[None, :]
        tl.store(out_ptr + even, lo.to(OUT_DTYPE), mask=even < n)
        tl.store(out_ptr + even + 1, hi.to(OUT_DTYPE), mask=even + 1 < n)
    else:
        cols = tl.arange(0, BLOCK)
        offs = rows[:, None] * BLOCK + cols[None, :]
        q = tl.load(codes_ptr + offs, mask=row_ok[:, None], other=0).to(tl.float32)
        tl.store(out_ptr + offs, (q * s[:, None]).to(OUT_DTYPE), mask=offs < n)


_quantize_jit = LazyJit(_quantize_kernel)
_dequantize_jit = LazyJit(_dequantize_kernel)


def _tl_dtype(dtype: torch.dtype):
    return {
        torch.float32: tl.float32,
        torch.float16: tl.float16,
        torch.bfloat16: tl.bfloat16,
        torch.float64: tl.float64,
    }[dtype]


def _launchable(kernel_jit, t: torch.Tensor, what: str):
    if triton is None:
        raise RuntimeError(f"{what}: triton is not installed; use the reference.")
    kernel, interpret = kernel_jit()
    if t.device.type == "cpu" and not interpret:
        raise RuntimeError(
            f"{what} got CPU tensors but Triton is not interpreting; set TRITON_INTERPRET=1 "
            "(tests) or use the reference (FSCALE_KERNELS=reference)."
        )
    return kernel


@torch.no_grad()
def quantize_triton(x: torch.Tensor, bits: int, block: int, scale_dtype=torch.float32):
    """The Triton lowering of ``quantize_reference`` (same codes and scales)."""
    kernel = _launchable(_quantize_jit, x, "quantize_triton")
    flat = x.reshape(-1).contiguous()
    n = flat.numel()
    nb = num_blocks(n, block)
    codes = torch.empty(
        nb * block * bits // 8, dtype=torch.int8 if bits == 8 else torch.uint8, device=x.device
    )
    scales = torch.empty(nb, dtype=scale_dtype, device=x.device)
    if nb:
        grid = (triton.cdiv(nb, _ROWS),)
        kernel[grid](
            flat, codes, scales, n, nb,
            BLOCK=block, ROWS=_ROWS, QMAX=_QMAX[bits], INT4=bits == 4,
            SCALE_DTYPE=_tl_dtype(scale_dtype),
        )  # fmt: skip
    return codes, scales


@torch.no_grad()
def dequantize_triton(codes, scales, bits: int, block: int, numel: int, dtype=torch.float32):
    """The Triton lowering of ``dequantize_reference``."""
    kernel = _launchable(_dequantize_jit, codes, "dequantize_triton")
    out = torch.empty(numel, dtype=dtype, device=codes.device)
    nb = scales.numel()
    if nb and numel:
        grid = (triton.cdiv(nb, _ROWS),)
        kernel[grid](
            codes.contiguous(), scales.contiguous(), out, numel, nb,
            BLOCK=block, ROWS=_ROWS, INT4=bits == 4, OUT_DTYPE=_tl_dtype(dtype),
        )  # fmt: skip
    return out


if triton is not None:
    dispatch.register(QUANTIZE, quantize_triton, device="cuda", priority=10)
    dispatch.register(DEQUANTIZE, dequantize_triton, device="cuda", priority=10)


# ----------------------------------------------------------------------------- entry points


def quantize(x: torch.Tensor, bits: int = 8, block: int = 256, scale_dtype=torch.float32):
    """Block-quantize flat ``x`` with the best lowering in the kernel table."""
    check(bits, block, scale_dtype)
    return dispatch.resolve(QUANTIZE, x).impl(x, bits, block, scale_dtype)


def dequantize(codes, scales, *, bits: int, block: int, numel: int, dtype=torch.float32):
    """Invert ``quantize`` (to within half a step per element) with the best lowering."""
    check(bits, block, scales.dtype)
    return dispatch.resolve(DEQUANTIZE, codes).impl(codes, scales, bits, block, numel, dtype)

"""FPx weight formats (fp6, fp5, fp4): exact encode/decode, 4+2 bit-plane packing, linear.

The formats are the small floats of FP6-LLM: a sign bit, E exponent bits with bias
``2**(E-1) - 1`` and M mantissa bits; exponent field 0 holds the subnormals and, unlike
IEEE, every other exponent value is a finite number (no inf, no NaN). ``e3m2`` spans
+-28 with 1/16 as its smallest subnormal.

Weights are quantized per output channel (scale = absmax / max_finite) and stored as bit
planes: each code's high 4 bits in one plane, its low 2 (fp6) or 1 (fp5) bits in
another, so every load of either plane is a whole aligned word (the "4+2" layout of
FP6-LLM). ``fpx_linear`` runs ``x @ W.t()`` on the packed weight through the kernel
table (op ``"fpx_linear"``): the torch reference dequantizes, the Triton lowering
(``fscale.kernels.fpx_triton``) rebuilds fp16/bf16 weights in registers.

Example::

    p = pack(w, "e3m2")                  # w: [out_features, in_features]
    y = fpx_linear(x, p, bias)           # x: [..., in_features] fp16/bf16/fp32

References:
  Xia et al., "FP6-LLM: Efficiently Serving Large Language Models Through FP6-Centric
  Algorithm-System Co-Design", 2024 (arXiv:2401.14112).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import torch

from fscale.hw import dispatch

OP = "fpx_linear"

#: format name -> (exponent bits E, mantissa bits M); one sign bit besides.
FORMATS: dict[str, tuple[int, int]] = {
    "e3m2": (3, 2),
    "e2m3": (2, 3),
    "e2m2": (2, 2),
    "e3m1": (3, 1),
    "e2m1": (2, 1),
}


def _bits(fmt: str) -> tuple[int, int]:
    try:
        return FORMATS[fmt]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown FPx format {fmt!r}; known formats: {sorted(FORMATS)} "
            "(fp6: e3m2, e2m3; fp5: e2m2, e3m1; fp4: e2m1)."
        ) from None


def nbits(fmt: str) -> int:
    """Bits per code: 1 + E + M."""
    e, m = _bits(fmt)
    return 1 + e + m


def bias(fmt: str) -> int:
    e, _ = _bits(fmt)
    return 2 ** (e - 1) - 1


@cache
def _magnitudes(fmt: str) -> tuple[float, ...]:
    """Value of every non-negative code 0 .. 2**(E+M) - 1, increasing with the code."""
    e_bits, m_bits = _bits(fmt)
    b = bias(fmt)
    out = []
    for code in range(2 ** (e_bits + m_bits)):
        e, m = code >> m_bits, code & ((1 << m_bits) - 1)
        if e == 0:
            out.append(m / 2**m_bits * 2.0 ** (1 - b))
        else:
            out.append((1 + m / 2**m_bits) * 2.0 ** (e - b))
    return tuple(out)


def max_finite(fmt: str) -> float:
    """The largest finite magnitude of ``fmt`` (28.0 for e3m2)."""
    return _magnitudes(fmt)[-1]


def values(fmt: str) -> torch.Tensor:
    """float32 value of every code 0 .. 2**(1+E+M) - 1 (the decode table)."""
    mags = torch.tensor(_magnitudes(fmt), dtype=torch.float32)
    return torch.cat([mags, -mags])


def encode(x: torch.Tensor, fmt: str) -> torch.Tensor:
    """Round ``x`` to the nearest ``fmt`` value (ties to even), saturating; one uint8 code each.

    Codes hold sign | exponent | mantissa in their low 1+E+M bits. Magnitudes beyond
    ``max_finite(fmt)`` saturate to it (there is no inf). The sign is kept for zeros
    and for values that round to zero (-0.0 -> the negative-zero code), so
    ``encode(decode(c)) == c`` for every code ``c``.

    Raises:
      ValueError: ``x`` holds NaN (there is no NaN code), or ``fmt`` is unknown.
    """
    e_bits, m_bits = _bits(fmt)
    if not x.is_floating_point():
        raise ValueError(f"encode: x has dtype {x.dtype}; pass a floating-point tensor.")
    x = x.detach()
    if torch.isnan(x).any():
        raise ValueError(
            f"encode: x ({tuple(x.shape)}) holds NaN, which {fmt} cannot represent; "
            "fix the weights (torch.nan_to_num, or find where they diverged) before quantizing."
        )
    mags = torch.tensor(_magnitudes(fmt), dtype=torch.float64, device=x.device)
    # float64 is exact for fp32/fp16/bf16 inputs; clamping is the saturation (inf too).
    a = x.abs().to(torch.float64).clamp_(max=mags[-1].item())
    # hi: index of the first table value >= a (clamped to the largest); lo = hi - 1.
    hi = torch.searchsorted(mags, a).clamp_(max=mags.numel() - 1)
    lo = (hi - 1).clamp_(min=0)
    d_hi = (mags[hi] - a).abs()
    d_lo = (a - mags[lo]).abs()
    # Nearest; on a tie the even code (its mantissa LSB is the code's LSB).
    take_lo = (d_lo < d_hi) | ((d_lo == d_hi) & (lo % 2 == 0))
    mag_code = torch.where(take_lo, lo, hi)
    sign = torch.signbit(x).to(torch.int64) << (e_bits + m_bits)
    return (mag_code | sign).to(torch.uint8)


def decode(codes: torch.Tensor, fmt: str) -> torch.Tensor:
    """float32 values of ``fmt`` codes (uint8, low 1+E+M bits used)."""
    n = nbits(fmt)
    if codes.dtype not in (torch.uint8, torch.int16, torch.int32, torch.int64):
        raise ValueError(f"decode: codes have dtype {codes.dtype}; pass the uint8 from encode.")
    idx = codes.to(torch.int64)
    if codes.numel() and (int(idx.min()) < 0 or int(idx.max()) >= 2**n):
        raise ValueError(f"decode: codes must lie in [0, {2**n}) for {fmt} ({n}-bit codes).")
    return values(fmt).to(codes.device)[idx]


# [Note: the FPx bit-plane layout]
#
# A code of 4 + L bits (L = 2 for fp6, 1 for fp5, 0 for fp4) is split into its high 4
# bits ("hi plane") and its low L bits ("lo plane"); each plane is an int32 array
# whose rows run along K and whose columns are pairs of output channels (n = 2c, 2c+1),
# so a tile of rows is a coalesced, 16-byte-vectorisable load along N for the kernel.
# K is cut into chunks of KC = 32 * NQ (NQ = 32 / (4 L) "byte words" per lo word:
# fp6 4 -> KC 128, fp5 8 -> KC 256; fp4, with no lo plane, 4 -> KC 128). Inside chunk b,
#   k = b*KC + 16*(2q + v) + r,  q < NQ, v < 2, r < 16;  n = 2c + h,  h < 2,
# and with j = v + 2h (a byte of a 32-bit word),
#   hi plane [K/4, N/2]:   row (b*NQ/2 + q//2)*16 + r, column c, nibble 2j + q%2,
#   lo plane [K/(2*NQ), N/2] = [16 rows per chunk]: row b*16 + r, column c, field NQ*j + q.
# This is the order in which the kernel needs the bits: one shift and mask of a hi
# word and of a lo word puts four codes at the tops of the four bytes of a register
# ("byte word"); bytes (0, 2) and (1, 3) become two fp16 pairs with one shift and
# two masks (sign stays, exponent|mantissa move down 5 - E bits), i.e. adjacent
# output channels n = 2c, 2c+1 of one k. So the rebuild costs ~3.5 integer ops per
# weight, with no per-element shifts by variable amounts. See fpx_triton.py.


def layout(fmt: str) -> dict:
    """Constants of the plane layout of ``fmt`` (see [Note: the FPx bit-plane layout])."""
    n = nbits(fmt)
    lo_bits = n - 4
    # fp4 has no lo plane; 4 byte words per chunk (two hi tiles) keep its loads as
    # large as fp6's per loop iteration.
    nq = 4 if lo_bits == 0 else 8 // lo_bits
    return {"lo_bits": lo_bits, "nq": nq, "k_chunk": 32 * nq, "n_multiple": 2}


@dataclass
class PackedFPx:
    """An [N, K] weight in ``fmt`` as bit planes plus per-output-channel scales.

    Fields:
      fmt: the format name (a key of ``FORMATS``).
      shape: (N, K) = (out_features, in_features) of the weight.
      scales: float32 [N]; the weight is ``decode(codes) * scales[:, None]``.
      hi: int32 [K/4, N/2], the high 4 bits of each code.
      lo: int32 [K*L/16, N/2], the low L bits (None for fp4).
    """

    fmt: str
    shape: tuple[int, int]
    scales: torch.Tensor
    hi: torch.Tensor
    lo: torch.Tensor | None

    @property
    def nbytes(self) -> int:
        planes = [t for t in (self.hi, self.lo) if t is not None]
        return sum(t.numel() * t.element_size() for t in planes) + (
            self.scales.numel() * self.scales.element_size()
        )

    @property
    def device(self) -> torch.device:
        return self.hi.device

    def to(self, device) -> PackedFPx:
        mv = lambda t: None if t is None else t.to(device)
        return PackedFPx(self.fmt, self.shape, mv(self.scales), mv(self.hi), mv(self.lo))


def check_shape(shape, fmt: str) -> None:
    """Raise ValueError unless an [N, K] weight fits the plane layout of ``fmt``."""
    if len(shape) != 2:
        raise ValueError(
            f"pack: the weight must be 2-D [out_features, in_features], got shape {tuple(shape)}."
        )
    n, k = shape
    lay = layout(fmt)
    if n % lay["n_multiple"] or n == 0:
        raise ValueError(
            f"pack({fmt}): out_features N={n} must be a positive multiple of 2 (output "
            "channels are packed in pairs); pad the weight with zero rows."
        )
    if k % lay["k_chunk"] or k == 0:
        raise ValueError(
            f"pack({fmt}): in_features K={k} must be a positive multiple of {lay['k_chunk']} "
            f"(the {fmt} packing group); pad the weight with zero columns (and x likewise), "
            "or keep this layer unquantized."
        )


def _split_k(t: torch.Tensor, n: int, k: int, nq: int) -> torch.Tensor:
    # codes [N, K] -> [B, NQ, 2(v), 16(r), C, 2(h)] with k = b*KC + 16*(2q + v) + r.
    return t.t().reshape(k // (32 * nq), nq, 2, 16, n // 2, 2)


def pack_codes(codes: torch.Tensor, fmt: str, scales: torch.Tensor) -> PackedFPx:
    """Lay out uint8 codes [N, K] as planes (no rounding); ``pack`` = scales + encode + this."""
    check_shape(codes.shape, fmt)
    n, k = codes.shape
    lay = layout(fmt)
    lb, nq = lay["lo_bits"], lay["nq"]
    c = codes.to(torch.int64)
    # hi: [B, NQ/2 (qh), 2 (ql), 2 (v), 16 (r), C, 2 (h)] -> [B, qh, r, c, (h, v, ql)].
    hi = _split_k(c >> lb, n, k, nq).reshape(k // (32 * nq), nq // 2, 2, 2, 16, n // 2, 2)
    hi = hi.permute(0, 1, 4, 5, 6, 3, 2).reshape(-1, n // 2, 8)
    hi = (hi << (4 * torch.arange(8, device=c.device))).sum(-1)
    lo = None
    if lb:
        lo = _split_k(c & ((1 << lb) - 1), n, k, nq)  # [B, q, v, r, C, h]
        lo = lo.permute(0, 3, 4, 5, 2, 1).reshape(-1, n // 2, 4 * nq)  # field (h, v, q)
        lo = (lo << (lb * torch.arange(4 * nq, device=c.device))).sum(-1)
        lo = _to_int32(lo)
    return PackedFPx(fmt, (n, k), scales, _to_int32(hi), lo)


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    # int64 holding 32-bit patterns -> int32 with the same bits.
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32).contiguous()


def unpack_codes(p: PackedFPx) -> torch.Tensor:
    """The uint8 codes [N, K] held by ``p`` (inverse of ``pack_codes``)."""
    n, k = p.shape
    lay = layout(p.fmt)
    lb, nq = lay["lo_bits"], lay["nq"]
    nb = k // (32 * nq)
    hi = p.hi.to(torch.int64) & 0xFFFFFFFF
    hi = (hi[..., None] >> (4 * torch.arange(8, device=hi.device))) & 0xF
    hi = hi.reshape(nb, nq // 2, 16, n // 2, 2, 2, 2).permute(0, 1, 6, 5, 2, 3, 4)
    codes = hi.reshape(nb, nq, 2, 16, n // 2, 2) << lb
    if lb:
        lo = p.lo.to(torch.int64) & 0xFFFFFFFF
        lo = (lo[..., None] >> (lb * torch.arange(4 * nq, device=lo.device))) & ((1 << lb) - 1)
        lo = lo.reshape(nb, 16, n // 2, 2, 2, nq).permute(0, 5, 4, 1, 2, 3)
        codes = codes | lo
    return codes.reshape(k, n).t().to(torch.uint8).contiguous()


def pack(w: torch.Tensor, fmt: str) -> PackedFPx:
    """Quantize an [N, K] weight to ``fmt`` with one fp32 scale per output channel (row).

    scale = absmax(row) / max_finite(fmt) (1 for an all-zero row); codes =
    encode(w / scale). Raises ValueError for an unknown format, NaN weights, or a shape
    the layout cannot take (N odd, K not a multiple of the packing group).
    """
    _bits(fmt)
    check_shape(w.shape, fmt)
    w = w.detach().float()
    if torch.isnan(w).any():
        raise ValueError(
            f"pack({fmt}): the weight {tuple(w.shape)} holds NaN; fix it (torch.nan_to_num, or "
            "the step that diverged) before quantizing."
        )
    absmax = w.abs().amax(dim=1)
    scales = torch.where(absmax > 0, absmax / max_finite(fmt), torch.ones_like(absmax))
    scales = torch.where(torch.isfinite(scales), scales, torch.ones_like(scales))
    codes = encode(w / scales[:, None], fmt)
    return pack_codes(codes, fmt, scales.contiguous())


def unpack(p: PackedFPx) -> torch.Tensor:
    """The dequantized float32 weight [N, K] = decode(codes) * scales[:, None]."""
    return decode(unpack_codes(p), p.fmt) * p.scales.float()[:, None]


def fpx_linear_reference(
    x: torch.Tensor, p: PackedFPx, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``x @ unpack(p).t() (+ bias)`` in x's dtype: the torch reference."""
    _check_linear(x, p, bias)
    y = x @ unpack(p).to(x.dtype).t()
    if bias is not None:
        y = y + bias.to(x.dtype)
    return y


def _check_linear(x: torch.Tensor, p: PackedFPx, bias: torch.Tensor | None) -> None:
    n, k = p.shape
    if x.shape[-1] != k:
        raise ValueError(
            f"fpx_linear: x has {x.shape[-1]} features (shape {tuple(x.shape)}), the packed "
            f"weight takes in_features K={k}; pass x of shape [..., {k}]."
        )
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"fpx_linear: bias has shape {tuple(bias.shape)}, expected ({n},).")


dispatch.register(OP, fpx_linear_reference, name="fpx_linear_reference")


def fpx_linear(x: torch.Tensor, p: PackedFPx, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.t() (+ bias)`` with W held packed in ``p``: [..., K] -> [..., N], x's dtype.

    Resolves op ``"fpx_linear"`` for x's device and dtype (the Triton kernel on CUDA
    sm_80+ for fp16/bf16, the torch reference otherwise) and calls it.
    """
    _check_linear(x, p, bias)
    return dispatch.resolve(OP, x).impl(x, p, bias)


# The Triton lowering registers itself beside the reference.
from fscale.kernels import fpx_triton as _fpx_triton  # noqa: E402, F401

"""FPx weight formats (fp6, fp5, fp4): exact encode/decode, 4+2 bit-plane packing, linear.

The formats are the small floats of FP6-LLM: a sign bit, E exponent bits with bias
``2**(E-1) - 1`` and M mantissa bits; exponent field 0 holds the subnormals and, unlike
IEEE, every other exponent value is a finite number (no inf, no NaN). ``e3m2`` spans
+-28 with 1/16 as its smallest subnormal.

Weights are quantized per output channel (scale = absmax / max_finite) and stored as bit
planes: each code's high 4 bits in one plane, its low 2 (fp6) or 1 (fp5) bits in
another, so every load of either plane is a whole aligned word (the "4+2" layout of
FP6-LLM). ``fpx_linear`` runs ``x @ W.t()`` on the packed weight through the kernel
table (op ``"fpx_linear"``): the torch reference here dequantizes; on CUDA the Triton
lowering (``fpx_triton``) and on Hopper the Gluon one (``fpx_gluon``) rebuild fp16/bf16
weights in registers. This module imports no kernel: ``fscale.kernels._lowerings``
registers all three, and importing any ``fscale.kernels`` module runs it.

Example::

    p = pack(w, "e3m2")                  # w: [out_features, in_features]
    y = fpx_linear(x, p, bias)           # x: [..., in_features] fp16/bf16/fp32

References:
  Xia et al., "FP6-LLM: Efficiently Serving Large Language Models Through FP6-Centric
  Algorithm-System Co-Design", 2024 (arXiv:2401.14112).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from functools import cache, reduce

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
# A code of 4 + L bits (L = 2 for fp6, 1 for fp5, 0 for fp4) is stored as 4 bits in a
# "hi plane" and L bits in a "lo plane"; each plane is an int32 array whose rows run
# along K and whose columns are pairs of output channels (n = 2c, 2c+1), so a tile of
# rows is a coalesced, 16-byte-vectorisable load along N for the kernel. K is cut into
# chunks of KC = 32 * NQ (NQ = 8 / L fields per lo-plane byte: fp6 4 -> KC 128, fp5
# 8 -> KC 256; fp4, with no lo plane, 4 -> KC 128). Inside chunk b,
#   k = b*KC + 16*(2q + v) + r,  q < NQ, v < 2, r < 16;  n = 2c + h,  h < 2,
# and j = v + 2h names a byte of a 32-bit word. The kernel wants, for each (b, q, r, c),
# a "byte word": a register whose byte j is the code's *image* t (below). It gets it
# with one rotate and mask per plane:
#   byte word = rotl(hi word, hi_rot[q % 2]) & HI_MASK | rotl(lo word, lo_rot[q]) & LO_MASK
# where the hi word is row (b*NQ/2 + q//2)*16 + r of the hi plane and the lo word row
# b*16 + r of the lo plane, both at column c. Packing stores each code's masked image
# rotated the other way, so a hi word holds the codes of q = 2*(q//2) and 2*(q//2) + 1
# and a lo word all NQ of them, with no bit shared (``planes`` checks this).
#
# Two images, by format (``planes(fmt)["byte"]``):
# - "byte" (e3m2, e2m2, e3m1: at most 2 mantissa bits): t is the high byte of an fp16
#   equal to the FPx value times 2**(bias - 15): sign at bit 7, exponent at bits
#   2 .. 1+E, mantissa from bit 1 down. Bytes (0, 2) and (1, 3) of the byte word then
#   become the two fp16 halves of a word (channels 2c, 2c+1 of one k) with one shift
#   and one mask, or one mask: ~1.6 integer ops per weight.
# - "shift" (e2m3, e2m1): t is the code at the top of the byte; the rebuild moves
#   exponent|mantissa down 5 - E bits and keeps the sign (two masks and a shift per
#   pair of halves, ~2.7 ops per weight). e2m3's third mantissa
#   bit falls below the fp16's high byte, and e2m1's four image bits leave no room
#   for a second code at a rotation of 4 in the hi word, so neither can take the
#   byte image.
# See [Note: rebuilding an fp16 from an FPx code] in _fpx_triton_kernel.py.


def layout(fmt: str) -> dict:
    """Constants of the plane layout of ``fmt`` (see [Note: the FPx bit-plane layout])."""
    n = nbits(fmt)
    lo_bits = n - 4
    # fp4 has no lo plane; 4 byte words per chunk (two hi tiles) keep its loads as
    # large as fp6's per loop iteration.
    nq = 4 if lo_bits == 0 else 8 // lo_bits
    return {"lo_bits": lo_bits, "nq": nq, "k_chunk": 32 * nq, "n_multiple": 2}


@cache
def planes(fmt: str) -> dict:
    """How codes become byte words (see [Note: the FPx bit-plane layout]).

    Keys: ``byte`` (the image is an fp16 high byte), ``hi_mask`` / ``lo_mask`` (image
    bits from each plane, per byte), ``hi_rot`` (left rotation of a hi word, by q % 2)
    and ``lo_rot`` (of a lo word, by q), in bits.
    """
    e_bits, m_bits = _bits(fmt)
    lay = layout(fmt)
    lb, nq = lay["lo_bits"], lay["nq"]
    if lb and m_bits <= 2:
        em = ((1 << (e_bits + m_bits)) - 1) << (2 - m_bits)  # exponent|mantissa bits of t
        hi_mask = 0x0F << (e_bits - 2)  # the top 4 of them
        out = {
            "byte": True,
            "hi_mask": hi_mask,
            "lo_mask": 0x80 | (em & ~hi_mask & 0xFF),  # the sign and what is left
            "hi_rot": (0, 28),  # the second code sits 4 bits up, wrapping
            "lo_rot": tuple(lb * q for q in range(nq)),
        }
    else:
        out = {
            "byte": False,
            "hi_mask": 0xF0,
            "lo_mask": ((1 << lb) - 1) << (4 - lb),
            "hi_rot": (4, 0),  # nibbles 2j (q even) and 2j + 1 (q odd)
            "lo_rot": tuple((4 - lb - lb * q) % 32 for q in range(nq)),
        }
    for mask, rots in ((out["hi_mask"], out["hi_rot"]), (out["lo_mask"], out["lo_rot"])):
        held = [_rotl(mask * 0x01010101, -r) for r in rots]
        # Each code's bits of a word are where no other code's are.
        assert sum(map(int.bit_count, held)) == reduce(operator.or_, held, 0).bit_count(), fmt
    return out


def _rotl(x, r: int):
    """Rotate 32-bit words left by ``r`` (mod 32): ints or int64 tensors."""
    r %= 32
    return ((x << r) | (x >> (32 - r))) & 0xFFFFFFFF if r else x & 0xFFFFFFFF


def image(codes: torch.Tensor, fmt: str) -> torch.Tensor:
    """The byte image t of each code (int64), as the kernel's byte words hold it."""
    e_bits, m_bits = _bits(fmt)
    c = codes.to(torch.int64)
    if not planes(fmt)["byte"]:
        return c << (8 - nbits(fmt))
    em = e_bits + m_bits
    return ((c >> em) << 7) | ((c & ((1 << em) - 1)) << (2 - m_bits))


def from_image(t: torch.Tensor, fmt: str) -> torch.Tensor:
    """Inverse of ``image``."""
    e_bits, m_bits = _bits(fmt)
    if not planes(fmt)["byte"]:
        return t >> (8 - nbits(fmt))
    return ((t >> 7) << (e_bits + m_bits)) | ((t & 0x7F) >> (2 - m_bits))


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

    def clone(self) -> PackedFPx:
        """A copy with its own planes and scales (``streamed_copies`` times launches on them)."""
        cp = lambda t: None if t is None else t.clone()
        return PackedFPx(self.fmt, self.shape, cp(self.scales), cp(self.hi), cp(self.lo))


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


def _byte_shifts(device) -> torch.Tensor:
    # 8 * j for (v, h), j = v + 2h: where each code's image sits in a word.
    return 8 * (torch.arange(2, device=device)[:, None] + 2 * torch.arange(2, device=device))


def pack_codes(codes: torch.Tensor, fmt: str, scales: torch.Tensor) -> PackedFPx:
    """Lay out uint8 codes [N, K] as planes (no rounding); ``pack`` = scales + encode + this."""
    check_shape(codes.shape, fmt)
    n, k = codes.shape
    lay, pl = layout(fmt), planes(fmt)
    nb, nq = k // lay["k_chunk"], lay["nq"]
    t = image(codes, fmt)
    at = _byte_shifts(t.device)
    # hi: [B, qh, ql, v, r, C, h] -> [B, qh, r, C, ql, v, h], rotated right by hi_rot[ql].
    hi = _split_k(t & pl["hi_mask"], n, k, nq).reshape(nb, nq // 2, 2, 2, 16, n // 2, 2)
    hi = hi.permute(0, 1, 4, 5, 2, 3, 6) << at
    hi = sum(_rotl(hi[..., ql, :, :], -pl["hi_rot"][ql]).sum((-1, -2)) for ql in range(2))
    lo = None
    if lay["lo_bits"]:
        # lo: [B, q, v, r, C, h] -> [B, r, C, q, v, h], rotated right by lo_rot[q].
        lo = _split_k(t & pl["lo_mask"], n, k, nq).permute(0, 3, 4, 1, 2, 5) << at
        lo = sum(_rotl(lo[..., q, :, :], -pl["lo_rot"][q]).sum((-1, -2)) for q in range(nq))
        lo = _to_int32(lo.reshape(-1, n // 2))
    return PackedFPx(fmt, (n, k), scales, _to_int32(hi.reshape(-1, n // 2)), lo)


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    # int64 holding 32-bit patterns -> int32 with the same bits.
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32).contiguous()


def unpack_codes(p: PackedFPx) -> torch.Tensor:
    """The uint8 codes [N, K] held by ``p`` (inverse of ``pack_codes``)."""
    n, k = p.shape
    lay, pl = layout(p.fmt), planes(p.fmt)
    nb, nq = k // lay["k_chunk"], lay["nq"]
    at = _byte_shifts(p.device)
    hi = (p.hi.to(torch.int64) & 0xFFFFFFFF).reshape(nb, nq // 2, 1, 16, n // 2, 1, 1)
    # [B, qh, ql, r, C, v, h] -> [B, q, v, r, C, h]
    t = torch.cat([(_rotl(hi, pl["hi_rot"][ql]) >> at) & pl["hi_mask"] for ql in range(2)], 2)
    t = t.reshape(nb, nq, 16, n // 2, 2, 2).permute(0, 1, 4, 2, 3, 5)
    if lay["lo_bits"]:
        lo = (p.lo.to(torch.int64) & 0xFFFFFFFF).reshape(nb, 16, n // 2, 1, 1)
        # [B, q, r, C, v, h] -> [B, q, v, r, C, h]
        lo = torch.stack([(_rotl(lo, r) >> at) & pl["lo_mask"] for r in pl["lo_rot"]], 1)
        t = t | lo.permute(0, 1, 4, 2, 3, 5)
    return from_image(t, p.fmt).reshape(k, n).t().to(torch.uint8).contiguous()


def pack(w: torch.Tensor, fmt: str, *, absmax: torch.Tensor | None = None) -> PackedFPx:
    """Quantize an [N, K] weight to ``fmt`` with one fp32 scale per output channel (row).

    scale = absmax(row) / max_finite(fmt) (1 for an all-zero row); codes =
    encode(w / scale). ``absmax`` ([N], at least each row's own): scale by it instead,
    e.g. the absmax of whole rows that ``w`` holds a K slice of (tensor parallelism),
    so the slice packs as that slice of the whole weight. Raises ValueError for an
    unknown format, NaN weights, a shape the layout cannot take (N odd, K not a multiple
    of the packing group) or an ``absmax`` below a row's own.
    """
    _bits(fmt)
    check_shape(w.shape, fmt)
    w = w.detach().float()
    if torch.isnan(w).any():
        raise ValueError(
            f"pack({fmt}): the weight {tuple(w.shape)} holds NaN; fix it (torch.nan_to_num, or "
            "the step that diverged) before quantizing."
        )
    absmax = row_absmax(w, absmax, f"pack({fmt})")
    scales = torch.where(absmax > 0, absmax / max_finite(fmt), torch.ones_like(absmax))
    scales = torch.where(torch.isfinite(scales), scales, torch.ones_like(scales))
    codes = encode(w / scales[:, None], fmt)
    return pack_codes(codes, fmt, scales.contiguous())


def row_absmax(t: torch.Tensor, absmax: torch.Tensor | None, what: str) -> torch.Tensor:
    """Each row's absmax (fp32), or ``absmax`` (e.g. the whole rows' of a K slice)
    checked to hold one value per row, each at least the row's own. Shared by the
    per-channel packers (this module's and ``intq``'s)."""
    own = t.abs().amax(dim=-1).float()
    if absmax is None:
        return own
    absmax = absmax.detach().to(own.device, torch.float32)
    if absmax.shape != own.shape or bool((absmax < own).any()):
        raise ValueError(
            f"{what}: absmax must hold one value per row {tuple(own.shape)}, each at least "
            "that row's own absmax (codes would overflow)."
        )
    return absmax


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


def fpx_linear(x: torch.Tensor, p: PackedFPx, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.t() (+ bias)`` with W held packed in ``p``: [..., K] -> [..., N], x's dtype.

    Resolves op ``"fpx_linear"`` for x's device and dtype (for fp16/bf16 x the Gluon
    lowering on sm_90, the Triton one on other CUDA GPUs from sm_80; the torch
    reference otherwise) and calls it.
    """
    _check_linear(x, p, bias)
    return dispatch.resolve(OP, x).impl(x, p, bias)

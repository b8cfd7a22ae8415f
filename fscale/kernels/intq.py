"""ZeroQuant-style integer and FP8 linear layers: group-wise INT8/INT4 weights, W8A8, FP8.

Three families, each a ``pack`` function (float weight ``[N, K]`` -> a packed
dataclass with ``.nbytes``, ``.shape``, ``.fmt``), an exact ``unpack`` back to
float32, and a linear ``y = x @ W^T + b`` that runs the best lowering of its op in the
kernel table (``fscale.kernels._lowerings`` registers them all):

- ``pack_int(w, bits=8|4, group_size=32|64|128, symmetric=True)``: every row is cut
  into groups of ``group_size`` consecutive input features, each with its own fp32
  scale (and, asymmetric, its own fp32 minimum). Symmetric: ``q = round(w / s)``,
  ``s = absmax / (2**(bits-1) - 1)``, ``w ~ q * s``. Asymmetric:
  ``q = round((w - lo) / s)``, ``s = (hi - lo) / (2**bits - 1)``, ``w ~ q * s + lo``.
  Either way each element is within half a step (``s / 2``) of its group's grid.
  INT4 codes are stored two per byte (element ``2j`` in the low nibble of byte
  ``j``, ``2j + 1`` in the high one), biased to be unsigned. Op ``"int_linear"``:
  the reference dequantizes and calls ``F.linear``; on CUDA the Triton kernel of
  ``intq_triton`` (its names are re-exported here) reads the packed codes and
  dequantizes in registers (weight-only: activations stay in their dtype).
- ``pack_w8a8(w)``: int8 weights, one scale per output channel; the linear
  quantizes the activations per token (row of ``x``) on the fly, multiplies int8 x
  int8 -> int32 (``torch._int_mm`` on CUDA, op ``"w8a8_linear"``) and rescales
  by ``s_x[m] * s_w[n]``. The reference computes the same integer product exactly
  (fp32 matmuls over K-chunks of 1024, summed in float64).
- ``pack_fp8(w)``: e4m3 weights with one scale per output channel, activations
  quantized per token to e4m3 as well; op ``"fp8_linear"`` runs
  ``torch._scaled_mm`` on CUDA capability >= (8, 9) and the same maths
  (dequantize both, fp32 matmul) elsewhere.

Usage::

    p = pack_int(w, bits=4, group_size=128)        # w: [N, K], K % 128 == 0
    y = int_linear(x, p, bias)                      # ~ F.linear(x, w, bias)

References:
    Yao et al., "ZeroQuant: Efficient and Affordable Post-Training Quantization for
    Large-Scale Transformers", NeurIPS 2022 (group-wise weights, token-wise activations).
    Micikevicius et al., "FP8 Formats for Deep Learning", 2022 (e4m3).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fscale.hw import dispatch
from fscale.hw.device import capability
from fscale.kernels.fpx import row_absmax

# The Triton lowering of int_linear, importable from here as before the split.
from fscale.kernels.intq_triton import _TUNE_LOG as _TUNE_LOG  # noqa: F401
from fscale.kernels.intq_triton import _TUNED as _TUNED  # noqa: F401
from fscale.kernels.intq_triton import (  # noqa: F401
    DEQUANT_MIN_M,
    candidate_configs,
    dequantize_int_triton,
    int_linear_triton,
    launches,
)

INT_OP = "int_linear"
W8A8_OP = "w8a8_linear"
FP8_OP = "fp8_linear"
GROUP_SIZES = (32, 64, 128)
FP8_MAX = 448.0  # largest finite float8_e4m3fn


def _check_weight(w: torch.Tensor, what: str) -> None:
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        shape = tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__
        raise ValueError(f"{what}: expected a 2-D weight [N, K], got {shape}.")
    if not w.is_floating_point():
        raise ValueError(f"{what}: expected a floating-point weight, got {w.dtype}.")
    if torch.isnan(w).any():
        raise ValueError(f"{what}: the weight holds NaN; quantizing it would hide the NaN.")


# ----------------------------------------------------------------------------- INT8 / INT4


@dataclass(frozen=True)
class PackedInt:
    """Group-wise quantized weight ``[N, K]``.

    ``codes``: int8 ``[N, K]`` (bits=8) or uint8 ``[N, K // 2]`` (bits=4, two per byte).
    ``scale``: fp32 ``[N, K // group_size]``; ``lo``: fp32 like ``scale`` (asymmetric) or None.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    lo: torch.Tensor | None
    bits: int
    group_size: int
    shape: tuple[int, int]

    @property
    def symmetric(self) -> bool:
        return self.lo is None

    @property
    def fmt(self) -> str:
        return f"int{self.bits}"

    @property
    def nbytes(self) -> int:
        ts = [self.codes, self.scale] + ([self.lo] if self.lo is not None else [])
        return sum(t.numel() * t.element_size() for t in ts)

    @property
    def device(self) -> torch.device:
        return self.codes.device

    def to(self, device) -> PackedInt:
        lo = None if self.lo is None else self.lo.to(device)
        return PackedInt(
            self.codes.to(device), self.scale.to(device), lo, self.bits, self.group_size, self.shape
        )

    def clone(self) -> PackedInt:
        """A copy with its own codes and scales (``streamed_copies`` times launches on them)."""
        lo = None if self.lo is None else self.lo.clone()
        return PackedInt(
            self.codes.clone(), self.scale.clone(), lo, self.bits, self.group_size, self.shape
        )


def pack_int(
    w: torch.Tensor, *, bits: int = 8, group_size: int = 128, symmetric: bool = True
) -> PackedInt:
    """Quantize ``w [N, K]`` group-wise to ``bits`` (8 or 4); see the module doc."""
    _check_weight(w, f"pack_int(bits={bits})")
    if bits not in (4, 8):
        raise ValueError(f"pack_int: bits must be 8 or 4, got {bits!r}.")
    if group_size not in GROUP_SIZES:
        raise ValueError(f"pack_int: group_size must be one of {GROUP_SIZES}, got {group_size!r}.")
    N, K = w.shape
    if K % group_size:
        raise ValueError(
            f"pack_int: K={K} (input features of a [{N}, {K}] weight) is not a multiple of "
            f"group_size={group_size}; pick a group size dividing K "
            f"({[g for g in GROUP_SIZES if K % g == 0] or 'none of ' + str(GROUP_SIZES)}) "
            "or leave this weight out with select=."
        )
    g = w.detach().float().reshape(N, K // group_size, group_size)
    tiny = torch.finfo(torch.float32).tiny
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        scale = (g.abs().amax(-1) / qmax).clamp_min(tiny)
        q = torch.round(g / scale[..., None]).clamp_(-qmax - 1, qmax)
        lo = None
    else:
        qmax = 2**bits - 1
        lo = g.amin(-1)
        scale = ((g.amax(-1) - lo) / qmax).clamp_min(tiny)
        q = torch.round((g - lo[..., None]) / scale[..., None]).clamp_(0, qmax)
    q = q.reshape(N, K)
    if bits == 8:
        codes = (q if symmetric else q - 128).to(torch.int8)
    else:
        u = (q + 8 if symmetric else q).to(torch.uint8)
        codes = u[:, 0::2] | (u[:, 1::2] << 4)
    return PackedInt(codes.contiguous(), scale.contiguous(), lo, bits, group_size, (N, K))


def int_codes(p: PackedInt) -> torch.Tensor:
    """The integer grid values ``q`` as float32 ``[N, K]`` (symmetric: signed; else 0..2**b-1)."""
    if p.bits == 8:
        q = p.codes.float()
        return q if p.symmetric else q + 128
    lo, hi = p.codes & 0xF, p.codes >> 4
    q = torch.stack((lo, hi), -1).reshape(p.shape).float()
    return q - 8 if p.symmetric else q


def unpack_int(p: PackedInt) -> torch.Tensor:
    """Dequantized float32 ``[N, K]`` (exactly what every lowering of ``int_linear`` uses)."""
    N, K = p.shape
    q = int_codes(p).reshape(N, K // p.group_size, p.group_size)
    w = q * p.scale[..., None]
    if p.lo is not None:
        w = w + p.lo[..., None]
    return w.reshape(N, K)


def int_linear_reference(x: torch.Tensor, p: PackedInt, bias: torch.Tensor | None = None):
    """Dequantize, then ``F.linear`` in ``x``'s dtype."""
    w = unpack_int(p).to(x.dtype)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))


def int_linear(x: torch.Tensor, p: PackedInt, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ unpack_int(p)^T + bias`` through the best lowering of ``"int_linear"``."""
    return dispatch.resolve(INT_OP, x).impl(x, p, bias)


# ----------------------------------------------------------------------------- W8A8


@dataclass(frozen=True)
class PackedRowScaled:
    """8-bit weight codes ``[N, K]`` with one fp32 scale per output channel (``scale [N]``)."""

    codes: torch.Tensor
    scale: torch.Tensor
    shape: tuple[int, int]
    fmt: str

    @property
    def nbytes(self) -> int:
        return self.codes.numel() + self.scale.numel() * 4

    @property
    def device(self) -> torch.device:
        return self.codes.device

    def to(self, device) -> PackedRowScaled:
        return dataclasses.replace(self, codes=self.codes.to(device), scale=self.scale.to(device))


@dataclass(frozen=True)
class PackedW8A8(PackedRowScaled):
    """int8 weight codes, for W8A8 (activations quantized per token at run time)."""

    fmt: str = "w8a8"


def _rowwise_int8(t: torch.Tensor, absmax: torch.Tensor | None = None):
    t = t.float()
    amax = row_absmax(t, absmax, "pack_w8a8")
    scale = (amax / 127.0).clamp_min(torch.finfo(torch.float32).tiny)
    q = torch.round(t / scale[..., None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def pack_w8a8(w: torch.Tensor, *, absmax: torch.Tensor | None = None) -> PackedW8A8:
    """Symmetric per-output-channel int8 weights for ``w8a8_linear``; ``absmax`` as in
    ``fpx.pack`` (scale by whole rows' absmax, at least each row's own)."""
    _check_weight(w, "pack_w8a8")
    q, scale = _rowwise_int8(w.detach(), absmax)
    return PackedW8A8(q.contiguous(), scale, tuple(w.shape))


def unpack_w8a8(p: PackedW8A8) -> torch.Tensor:
    return p.codes.float() * p.scale[:, None]


def quantize_tokens(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token (per-row) symmetric int8: ``x ~ q * scale[:, None]``."""
    return _rowwise_int8(x)


# Partial sums of up to this many int8 x int8 products are below 2**24 in magnitude
# (1024 * 127 * 127 < 16.6M), so an fp32 matmul of a K-chunk this long is exact.
_EXACT_FP32_K = 1024


def _int8_matmul_exact(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a [M, K] int8 @ b [N, K]^T int8`` exactly, as float64, via fp32 matmuls."""
    acc = None
    for k0 in range(0, a.shape[1], _EXACT_FP32_K):
        part = a[:, k0 : k0 + _EXACT_FP32_K].float() @ b[:, k0 : k0 + _EXACT_FP32_K].float().t()
        acc = part.double() if acc is None else acc + part.double()
    return acc


def w8a8_linear_reference(x: torch.Tensor, p: PackedW8A8, bias: torch.Tensor | None = None):
    """Token-wise int8 activations x per-channel int8 weights; the integer product is exact."""
    N, K = p.shape
    x2 = x.reshape(-1, K)
    xq, xs = quantize_tokens(x2)
    acc = _int8_matmul_exact(xq, p.codes)
    y = (acc * xs.double()[:, None] * p.scale.double()[None, :]).float()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], N)


def w8a8_linear_int_mm(x: torch.Tensor, p: PackedW8A8, bias: torch.Tensor | None = None):
    """The same maths through ``torch._int_mm`` (int8 x int8 -> int32)."""
    N, K = p.shape
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    xq, xs = quantize_tokens(x2)
    if x.device.type == "cuda":
        # cuBLASLt's int8 GEMM wants M > 16 and K, N multiples of 8.
        if K % 8 or N % 8:
            return w8a8_linear_reference(x, p, bias)
        if M <= 16:
            xq = F.pad(xq, (0, 0, 0, 17 - M))
    acc = torch._int_mm(xq, p.codes.t())[:M]
    y = acc.float() * xs[:, None] * p.scale[None, :]
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], N)


def w8a8_linear(x: torch.Tensor, p: PackedW8A8, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W^T + bias`` with int8 weights and dynamic per-token int8 activations."""
    return dispatch.resolve(W8A8_OP, x).impl(x, p, bias)


# ----------------------------------------------------------------------------- FP8 e4m3


@dataclass(frozen=True)
class PackedFP8(PackedRowScaled):
    """float8_e4m3fn weight codes, for FP8 weights and activations."""

    fmt: str = "fp8"


def rowwise_fp8(
    t: torch.Tensor, absmax: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(q float8_e4m3fn, scale fp32 [...]): each row of ``t`` scaled so that its absmax
    (or ``absmax``) maps to 448, rounded to nearest even (``fpx_a8.rows_fp8`` gives the
    same bits)."""
    t = t.float()
    amax = row_absmax(t, absmax, "rowwise_fp8")
    scale = (amax / FP8_MAX).clamp_min(torch.finfo(torch.float32).tiny)
    q = (t / scale[..., None]).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale


def pack_fp8(w: torch.Tensor, *, absmax: torch.Tensor | None = None) -> PackedFP8:
    """Per-output-channel scaled e4m3 weights (absmax, or ``absmax`` as in
    ``fpx.pack``, maps to 448)."""
    _check_weight(w, "pack_fp8")
    q, scale = rowwise_fp8(w.detach(), absmax)
    return PackedFP8(q.contiguous(), scale, tuple(w.shape))


def unpack_fp8(p: PackedFP8) -> torch.Tensor:
    return p.codes.float() * p.scale[:, None]


def fp8_linear_reference(x: torch.Tensor, p: PackedFP8, bias: torch.Tensor | None = None):
    """Per-token e4m3 activations x per-channel e4m3 weights, product in fp32."""
    N, K = p.shape
    x2 = x.reshape(-1, K)
    xq, xs = rowwise_fp8(x2)
    y = (xq.float() @ p.codes.float().t()) * xs[:, None] * p.scale[None, :]
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], N)


def fp8_linear_scaled_mm(x: torch.Tensor, p: PackedFP8, bias: torch.Tensor | None = None):
    """``torch._scaled_mm`` with row-wise scales (needs K, N multiples of 16)."""
    N, K = p.shape
    if K % 16 or N % 16:
        return fp8_linear_reference(x, p, bias)
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    xq, xs = rowwise_fp8(x2)
    y = torch._scaled_mm(
        xq,
        p.codes.t(),  # column-major B, as cuBLASLt wants
        scale_a=xs[:, None].contiguous(),
        scale_b=p.scale[None, :].contiguous(),
        out_dtype=torch.bfloat16 if x.dtype == torch.float32 else x.dtype,
    )
    y = y[:M].to(x.dtype)
    if bias is not None:
        y = y + bias.to(x.dtype)
    return y.reshape(*x.shape[:-1], N)


def fp8_linear(x: torch.Tensor, p: PackedFP8, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W^T + bias`` with e4m3 weights and per-token e4m3 activations."""
    return dispatch.resolve(FP8_OP, x).impl(x, p, bias)


def fp8_capable(device: torch.device | str) -> bool:
    cap = capability(device)
    return cap is not None and tuple(cap) >= (8, 9)

"""The quantization formats: how each packs ``[N, K]`` weights and runs its linear.

Usage::

    c = codec("int4", group_size=128)           # a Codec; FORMATS lists the formats
    packed = c.pack(w)                           # w: [out, in]
    y = c.linear(x, packed, bias)                # the op c.op resolves in the kernel table
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from fscale.hw import dispatch
from fscale.kernels import intq

FP_FORMATS = ("e3m2", "e2m3", "e2m2", "e3m1", "e2m1")
# FPx weights with per-token e4m3 activations in products of many tokens (fpx_a8).
FP_A8_FORMATS = ("e3m2-a8", "e2m2-a8", "e3m1-a8")
FORMATS = (*FP_FORMATS, *FP_A8_FORMATS, "int8", "int4", "w8a8", "fp8")
ALIASES = {"fp6": "e3m2", "fp5": "e2m2", "fp4": "e2m1", "fp6-a8": "e3m2-a8", "fp5-a8": "e2m2-a8"}


@dataclass(frozen=True)
class Codec:
    """How one format packs ``[N, K]`` weights and runs its linear."""

    fmt: str
    op: str  # the kernel-table op its linear resolves (for reports)
    pack: Callable[[torch.Tensor], Any]
    unpack: Callable[[Any], torch.Tensor]  # packed -> float32 [N, K]
    linear: Callable[..., torch.Tensor]  # (x, packed, bias) -> y
    multiples: tuple[int, int] = (1, 1)  # (N, K) must be multiples of these (pad=True pads)
    options: tuple = ()  # (name, value) pairs given to codec(), to rebuild it (pickling)
    # One scale per output channel from its absmax: pack(w, absmax=...) takes the rows'.
    row_scaled: bool = False

    def __reduce__(self):
        return (_codec_from, (self.fmt, self.options))

    def kernel(self, device: torch.device, dtype: torch.dtype) -> str:
        try:
            return dispatch.resolve(self.op, device, dtype).name
        except (KeyError, LookupError):
            return "(none registered)"


def _fpx():
    try:
        from fscale.kernels import fpx
    except ImportError as e:  # pragma: no cover - fpx ships beside this file
        raise ImportError(f"the fp6/fp5/fp4 formats need fscale.kernels.fpx: {e}") from e
    return fpx


def codec(fmt: str, *, group_size: int = 128, symmetric: bool = True) -> Codec:
    """The :class:`Codec` of ``fmt`` (see the module doc for the formats)."""
    if not isinstance(fmt, str) or ALIASES.get(fmt, fmt) not in FORMATS:
        raise ValueError(
            f"quantize: unknown format {fmt!r}; valid formats are {list(FORMATS)} "
            f"(aliases {ALIASES})."
        )
    fmt = ALIASES.get(fmt, fmt)
    if fmt in FP_FORMATS:
        fpx = _fpx()
        return Codec(
            fmt,
            getattr(fpx, "OP", "fpx_linear"),
            lambda w, absmax=None: fpx.pack(w, fmt, absmax=absmax),
            fpx.unpack,
            fpx.fpx_linear,
            (fpx.layout(fmt)["n_multiple"], fpx.layout(fmt)["k_chunk"]),
            row_scaled=True,
        )
    if fmt in FP_A8_FORMATS:
        fpx = _fpx()
        from fscale.kernels import fpx_a8

        weights = fmt.removesuffix("-a8")
        return Codec(
            fmt,
            fpx_a8.OP,
            lambda w, absmax=None: fpx.pack(w, weights, absmax=absmax),
            fpx.unpack,
            fpx_a8.fpx_a8_linear,
            # N a multiple of 16 too: the FP8 GEMM's, so that pad=True keeps every
            # layer off fpx_a8's slow fp32 fallback.
            (16, fpx.layout(weights)["k_chunk"]),
            row_scaled=True,
        )
    if fmt in ("int8", "int4"):
        if group_size not in intq.GROUP_SIZES:
            raise ValueError(
                f"quantize({fmt!r}): group_size must be one of {intq.GROUP_SIZES}, "
                f"got {group_size!r}."
            )
        bits = int(fmt[3:])
        return Codec(
            fmt,
            intq.INT_OP,
            lambda w: intq.pack_int(w, bits=bits, group_size=group_size, symmetric=symmetric),
            intq.unpack_int,
            intq.int_linear,
            (1, group_size),
            (("group_size", group_size), ("symmetric", symmetric)),
        )
    if fmt == "w8a8":
        return Codec(
            fmt, intq.W8A8_OP, intq.pack_w8a8, intq.unpack_w8a8, intq.w8a8_linear,
            row_scaled=True,
        )  # fmt: skip
    return Codec(fmt, intq.FP8_OP, intq.pack_fp8, intq.unpack_fp8, intq.fp8_linear, row_scaled=True)


def _codec_from(fmt: str, options: tuple) -> Codec:
    return codec(fmt, **dict(options))

"""``quantize(params, fmt)``: low-bit linear weights that the unchanged ``apply`` runs on.

The transform maps a params dict to one with the same keys in which the
selected linear weights are :class:`QuantizedWeight` tensors: wrapper tensors
of the original shape and dtype that hold only the packed weight (codes and
scales, plus optional LoRC factors). Their ``__torch_function__`` sends
``F.linear(x, w, b)`` -- and ``x @ w.t()``, ``torch.addmm(b, x, w)`` for
weights stored ``[in, out]`` like Hugging Face's GPT-2 ``Conv1D`` -- to the
format's fused kernel from the dispatch table; any other op sees the
dequantized weight (correct, just not fast). So ``fs.functional``'s ``apply``
needs no change, for any ``nn.Module``::

    params, apply = fs.functional(model)
    qparams = quantize(params, "e3m2")                      # fp6 weight-only
    logits = apply(qparams, tokens)                         # through fpx_linear
    print(quantize_report(qparams))                         # bytes and kernel per layer

Formats (``FORMATS``):

==========  ================================================  ======================
fmt         weights / activations                             op in the kernel table
==========  ================================================  ======================
e3m2 e2m3   fp6 weights (per-channel scale), weight-only      fscale.kernels.fpx
e2m2 e3m1   fp5 weights, weight-only                          fscale.kernels.fpx
e2m1        fp4 weights, weight-only                          fscale.kernels.fpx
e3m2-a8     fp6 / fp5 weights (e2m2-a8, e3m1-a8); from        fscale.kernels.fpx_a8
            ``fpx_a8.MIN_TOKENS`` rows (prefill) per-token
            e4m3 acts on FP8 tensor cores, weight-only below
int8 int4   group-wise ints (group_size, symmetric or not)    int_linear
w8a8        int8 per-channel weights, int8 per-token acts     w8a8_linear
fp8         e4m3 per-channel weights, e4m3 per-token acts     fp8_linear
==========  ================================================  ======================

``fp6``, ``fp5`` and ``fp4`` are accepted as ``e3m2``, ``e2m2`` and ``e2m1``, ``fp6-a8`` and
``fp5-a8`` as ``e3m2-a8`` and ``e2m2-a8``.

[Note: which weights are quantized by default]
Only the params dict is given, so the default selection is by name and shape:
a 2-D floating-point tensor whose name ends in ``.weight``, unless a component
of its module path names an embedding or an output head -- it contains
``emb``, is ``wte``/``wpe``, is ``head``/``heads``/``lm_head``/``embed_out`` or
ends in ``_head`` -- or it shares storage with such a tensor (a head tied to
the embedding). Embeddings are gathered, not multiplied, and the head is
the layer most sensitive to quantization (ZeroQuant keeps both in 16 bits).
Pass ``module=`` (the model, or ``apply``) to select exactly the weights of
``nn.Linear`` and ``Conv1D`` modules (still minus heads and tied embeddings),
and to pack ``Conv1D``'s ``[in, out]`` weights along the right axis; or pass
``select(name, tensor) -> bool`` to choose yourself.

Quantized weights are for inference: the fallback path is differentiable with
respect to the activations, the weights themselves are constants. ``.to(device)``
moves the packed data; ``torch.save``/``copy.deepcopy`` keep it packed (load with
``torch.load(..., weights_only=False)``); ``dequantize(params)`` gives plain tensors.

References:
    Xia et al., "FP6-LLM: Efficiently Serving Large Language Models Through
    FP6-Centric Algorithm-System Co-Design", 2024.
    Yao et al., "ZeroQuant" (2022) and "ZeroQuant-V2" (2023, LoRC).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fscale.kernels.lorc import lorc_factors

# _codec_from and _rebuild stay importable here: pickles written before the split name them.
from fscale.transforms._quantize.codec import (  # noqa: F401
    FORMATS,
    FP_A8_FORMATS,
    FP_FORMATS,
    Codec,
    _codec_from,
    codec,
)
from fscale.transforms._quantize.report import quantize_report
from fscale.transforms._quantize.select import _selection
from fscale.transforms._quantize.weight import QuantizedWeight, _rebuild  # noqa: F401

__all__ = [
    "FORMATS",
    "Codec",
    "QuantizedWeight",
    "codec",
    "dequantize",
    "quantize",
    "quantize_report",
]


def quantize(
    params: dict[str, torch.Tensor],
    fmt: str,
    *,
    select: Callable[[str, torch.Tensor], bool] | None = None,
    group_size: int = 128,
    symmetric: bool = True,
    lorc_rank: int = 0,
    module: nn.Module | Any | None = None,
    pad: bool = False,
    row_absmax: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Quantize the linear weights of a params dict (see the module doc).

    Args:
      params: ``{name: tensor}``, e.g. from ``fs.functional(model)``.
      fmt: one of ``FORMATS`` (or an alias ``fp6``/``fp5``/``fp4``).
      select: ``select(name, tensor) -> bool`` picks the weights (``[out, in]``
        2-D tensors used through ``F.linear``); default: see
        [Note: which weights are quantized by default].
      group_size: int8/int4 only: input features per scale (32, 64 or 128).
      symmetric: int8/int4 only: ``False`` adds a per-group minimum (asymmetric).
      lorc_rank: ``r > 0`` adds LoRC, rank-r fp16 factors of the quantization error.
      module: optional model (or ``apply``) to select exactly its ``nn.Linear`` /
        ``Conv1D`` weights and pack ``Conv1D``'s ``[in, out]`` weights correctly.
      pad: pad a weight whose shape the format's layout cannot take (fp5 packs K
        in chunks of 256, int4 g128 needs K % 128 == 0, ...) with zero rows and
        columns, and the activations with zero columns at run time, instead of
        raising. Costs the padding's bytes and a copy of ``x`` per call.
      row_absmax: FPx, w8a8 and fp8 (one scale per output channel): ``row_absmax(name,
        absmax)`` gets each selected weight's per-row absmax ([out], fp32) and returns
        the absmax to scale by, at least as large: e.g. the max over the ranks that
        each hold a K slice of the rows, so that every slice packs as the whole
        weight's slice would (tensor-parallel serving).

    Returns:
      A new dict with the same keys; selected weights are :class:`QuantizedWeight`.

    Example::

        qparams = quantize(params, "int4", group_size=128, lorc_rank=8)
        logits = apply(qparams, tokens)
    """
    c = codec(fmt, group_size=group_size, symmetric=symmetric)
    if not isinstance(params, dict):
        raise TypeError(
            f"quantize expects the params dict from fs.functional, got {type(params).__name__}."
        )
    if not isinstance(lorc_rank, int) or lorc_rank < 0:
        raise ValueError(f"quantize: lorc_rank must be an int >= 0, got {lorc_rank!r}.")
    if row_absmax is not None and not c.row_scaled:
        raise ValueError(
            f"quantize({c.fmt!r}): row_absmax applies to formats with one scale per output "
            f"channel ({', '.join((*FP_FORMATS, *FP_A8_FORMATS, 'w8a8', 'fp8'))}); "
            f"{c.fmt!r} scales groups of K."
        )
    chosen, conv1d = _selection(params, select, module)
    out: dict[str, torch.Tensor] = {}
    for name, t in params.items():
        if not chosen[name]:
            out[name] = t
            continue
        out[name] = _quantize_one(
            name, t, c, lorc_rank, transposed=name in conv1d, pad=pad, row_absmax=row_absmax
        )
    if not any(chosen.values()):
        warnings.warn(
            f"quantize({c.fmt!r}): no param was selected; pass select= or module=.", stacklevel=2
        )
    return out


@torch.no_grad()
def _quantize_one(
    name: str,
    t: torch.Tensor,
    c: Codec,
    lorc_rank: int,
    *,
    transposed: bool,
    pad: bool,
    row_absmax: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
):
    where = f"quantize({c.fmt!r}): param {name!r} of shape {tuple(t.shape)}"
    if t.dim() != 2 or not t.is_floating_point():
        raise ValueError(
            f"{where}, dtype {t.dtype}: only 2-D floating-point linear weights can be "
            "quantized; leave it out with select=."
        )
    if torch.isnan(t).any():
        raise ValueError(f"{where} holds NaN weights; fix the checkpoint or leave it out.")
    w = t.detach().t() if transposed else t.detach()  # the [out, in] weight
    N, K = w.shape
    padded = w
    if pad:
        (mn, mk) = c.multiples
        padded = F.pad(w, (0, -K % mk, 0, -N % mn))
    extra = {}
    if row_absmax is not None:  # padded rows are zeros: absmax 0
        absmax = row_absmax(name, w.float().abs().amax(dim=1))
        extra["absmax"] = F.pad(absmax.float(), (0, padded.shape[0] - N))
    try:
        packed = c.pack(padded.contiguous(), **extra)
    except (ValueError, RuntimeError) as e:
        raise ValueError(f"{where} cannot be packed ({e}); or pass pad=True.") from e
    lorc = None
    if lorc_rank:
        lorc_dtype = torch.bfloat16 if t.dtype == torch.bfloat16 else torch.float16
        w_hat = c.unpack(packed)[:N, :K]
        lorc = lorc_factors(w, w_hat, lorc_rank, dtype=lorc_dtype)
    return QuantizedWeight(
        packed, c, dtype=t.dtype, lorc=lorc, transposed=transposed, name=name, shape=(N, K)
    )


def dequantize(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Plain tensors again (each :class:`QuantizedWeight` dequantized)."""
    return {k: v.dequantize() if isinstance(v, QuantizedWeight) else v for k, v in params.items()}

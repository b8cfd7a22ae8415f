"""``fpx_linear`` on CUDA: the Triton and Gluon lowerings' entry points and launch tuning.

Two lowerings of op ``"fpx_linear"`` live here (registered by ``_lowerings``):

- ``fpx_linear_triton`` (sm_80+, fp16/bf16 x): the Triton kernel
  (``_fpx_triton_kernel``) for small M, dequantize + cuBLAS (``_fpx_dequant``) for
  large M;
- ``fpx_linear_hopper`` (registered as ``"fpx_linear_gluon"``, sm_90): the same, plus
  the Hopper kernel of ``fpx_gluon`` for the formats it takes (fp6 e3m2, fp5).

Small M is memory-bound (the planes are 6/16 of the fp16 weight's bytes for fp6), so a
kernel that rebuilds fp16 weights in registers can beat cuBLAS by up to 16/6; large M
is compute-bound, and there the weight is dequantized once to x's dtype and handed to
cuBLAS. Which launch wins depends on the shape and the GPU, so the first CUDA call per
(format, N, K, M rounded up to a power of two) times the candidates of
``_fpx_configs`` on these tensors and keeps the fastest, as ``triton.autotune`` would;
``launches(p)`` lists the choices for ``quantize_report``. Measurements: README.md.

Usage::

    y = fpx_linear_triton(x, p, bias)                      # tuned on first use
    y = fpx_linear_triton(x, p, bias, config=dict(bm=16, bn=64, split=4))
"""

from __future__ import annotations

import torch

from fscale.kernels import fpx as _fpx
from fscale.kernels import fpx_gluon
from fscale.kernels._fpx_configs import (
    DEQUANT_MIN_M,
    DEQUANT_PIECES,
    candidate_configs,
    default_config,
    gluon_configs,
    kdot_for,
    programs_along_k,
)
from fscale.kernels._fpx_dequant import dequantize_matmul, dequantize_triton
from fscale.kernels._fpx_triton_kernel import DTYPES, check_inputs, launch, triton
from fscale.kernels._triton import (
    bucket,
    interpreting,
    split_mode,
    tune_streamed,
    tuned_launches,
)

__all__ = [
    "DEQUANT_MIN_M",
    "DEQUANT_PIECES",
    "DTYPES",
    "candidate_configs",
    "clear_tuned",
    "default_config",
    "dequantize_matmul",
    "dequantize_triton",
    "fpx_linear_hopper",
    "fpx_linear_triton",
    "gluon_configs",
    "kdot_for",
    "launches",
    "triton",
    "tuned",
]

# (fmt, N, K, M bucket, device) -> the fastest candidate, measured on first use;
# _TUNE_LOG keeps every candidate's time for the benchmark's record.
_TUNED: dict[tuple, dict] = {}
_TUNE_LOG: dict[tuple, list] = {}


def tuned() -> dict:
    """{(fmt, N, K, M bucket, device): config} chosen so far (for bench and explain)."""
    return dict(_TUNED)


def clear_tuned() -> None:
    """Forget every launch tuned so far: the next call per key tunes again (a benchmark
    comparing tuning policies in one process)."""
    _TUNED.clear()
    _TUNE_LOG.clear()


def launches(p) -> dict[int, dict]:
    """{M bucket: launch} tuned so far for packed weight ``p`` (``quantize_report``)."""
    return tuned_launches(_TUNED, (p.fmt, *p.shape))


def _tune(x2, p, bias, gluon: bool = False) -> dict:
    """The fastest of ``candidate_configs`` on these tensors (the fused kernels' over
    copies of ``p`` past the L2, as a decode step reads it), once per key; ``gluon``
    (the Hopper lowering) adds ``fpx_gluon``'s launches where that kernel can run.

    Both lowerings keep their choices in one table, so a key is tuned by whichever
    runs it first; on a given GPU the kernel table resolves one of them for every call.
    """
    n, k = p.shape
    m = x2.shape[0]
    # The fused kernels' launches are timed on copies of p past the L2, as a decode
    # step reads it ([Note: tuning on streamed weights] in _triton.py).
    return tune_streamed(
        _TUNED, _TUNE_LOG, (p.fmt, n, k, bucket(m), str(x2.device)),
        lambda: candidate_configs(m, gluon and fpx_gluon.available(x2, p.fmt)),
        lambda w, cfg: _linear(x2, w, bias, cfg), p,
        "fpx_linear_triton (fmt, N, K, M bucket, device)",
    )  # fmt: skip


def fpx_linear_triton(
    x: torch.Tensor, p, bias: torch.Tensor | None = None, *, config: dict | None = None
) -> torch.Tensor:
    """``x @ unpack(p).t() (+ bias)`` in x's dtype: the Triton lowering of ``fpx_linear``.

    ``config`` overrides the launch parameters (keys bm, bn, waves or split,
    num_warps, num_stages, kdot) or, with ``{"dequant": True}`` (key pieces), takes the
    dequantize + cuBLAS path, or with ``{"gluon": True}`` (keys split, stages, warps)
    runs ``fpx_gluon``'s Hopper kernel. Without it, on a GPU the first call per
    (format, N, K, M bucket) times ``candidate_configs(M)`` and keeps the fastest;
    under the interpreter ``default_config`` and ``DEQUANT_MIN_M`` decide.
    """
    return _linear(x, p, bias, config)


def fpx_linear_hopper(
    x: torch.Tensor, p, bias: torch.Tensor | None = None, *, config: dict | None = None
) -> torch.Tensor:
    """``fpx_linear_triton`` whose tuning also times ``fpx_gluon``'s launches: the
    lowering registered as ``"fpx_linear_gluon"`` for sm_90.

    The Gluon kernel takes fp6 e3m2 and fp5 weights with fp16/bf16 x on Hopper
    (``fpx_gluon.available``); for other formats, or a newer GPU without Hopper's
    warpgroup MMA, tuning has only the Triton and dequantize candidates to time.
    """
    return _linear(x, p, bias, config, gluon=True)


def fused_swiglu(x: torch.Tensor, p, bias: torch.Tensor | None = None) -> torch.Tensor | None:
    """silu(x Wg^T) * (x Wu^T) ``[..., I]`` for a packed stacked [gate; up] weight ``p``
    ``[2I, K]`` in one launch whose split-K epilogue applies the SiLU ([Note: the SwiGLU
    epilogue] in fpx_gluon.py): the launch ``fpx_linear_triton`` would make for this M
    (tuned on a GPU, the default under the interpreter), of ``fpx_gluon``'s kernel or
    the Triton one (its programs narrowed to 1/2 or 1/4 of their channels where I
    needs it), so that no program holds both gate and up channels; None where it
    cannot (the dequantize + cuBLAS path of large M, I not a multiple of 32 channels
    or of the Gluon kernel's): then run the product and the SiLU as before.

    Usage: ``act = fused_swiglu(h, gate_up) or silu_mul(fpx_linear_hopper(h, gate_up))``.
    """
    if getattr(p, "fmt", None) not in _fpx.FORMATS:  # any packed weight: FPx ones qualify
        return None
    if x.device.type != "cuda" and not interpreting():
        return None
    x2 = _rows(x, p, bias)
    m, (n, k) = x2.shape[0], p.shape
    if m == 0:
        return None
    gluon = fpx_gluon.available(x2, p.fmt) and not interpreting()
    config = _tune(x2, p, bias, gluon) if x.device.type == "cuda" and not interpreting() else None
    cfg = dict(config) if config is not None else {}
    if cfg.pop("dequant", config is None and m >= DEQUANT_MIN_M):
        return None
    if cfg.pop("gluon", False):
        if not fpx_gluon.swiglu_fits(p, cfg.get("warps", 4)):
            return None
        y = fpx_gluon.fpx_linear_gluon(x2, p, bias, swiglu=True, **cfg)
        return y.reshape(*x.shape[:-1], n // 2)
    cfg = _triton_launch(cfg, m, n, k, p.fmt, x.device)
    # Programs of bn channels must not straddle gate and up: narrower ones where needed.
    bn = next((b for b in (cfg["bn"], cfg["bn"] // 2, cfg["bn"] // 4) if (n // 2) % b == 0), 0)
    if bn < 32:
        return None
    cfg["bn"] = bn
    y = torch.empty(m, n // 2, dtype=x.dtype, device=x.device)
    bias_c = bias.contiguous() if bias is not None else None
    launch(x2, p, bias_c, y, mode=2, swiglu=True, **cfg)
    return y.reshape(*x.shape[:-1], n // 2)


def _triton_launch(cfg: dict, m: int, n: int, k: int, fmt: str, device) -> dict:
    """``launch``'s parameters: ``cfg`` (tuned or given) over the defaults for this M."""
    cfg = {**default_config(m, n, k, fmt, device), **cfg}
    cfg.setdefault("kdot", kdot_for(cfg["bm"]))
    split = programs_along_k(cfg, m, n, k, fmt, device)
    cfg = {key: cfg[key] for key in ("bm", "bn", "kdot", "num_warps", "num_stages")}
    cfg["split"] = split
    return cfg


def _rows(x, p, bias) -> torch.Tensor:
    """``x`` checked against ``p`` and ``bias``, as ``[M, K]`` rows with unit stride."""
    check_inputs(x, p)
    _fpx._check_linear(x, p, bias)
    x2 = x.reshape(-1, p.shape[1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _linear(x, p, bias, config, gluon: bool = False):
    x2 = _rows(x, p, bias)
    n, k = p.shape
    lead = x.shape[:-1]
    m = x2.shape[0]
    if m == 0:
        return x.new_empty(*lead, n)
    if config is None and x.device.type == "cuda" and not interpreting():
        config = _tune(x2, p, bias, gluon)  # once per (fmt, N, K, M bucket, device)
    cfg = dict(config) if config is not None else None
    if cfg is not None:
        use_dequant = cfg.pop("dequant", False)
    else:
        use_dequant = m >= DEQUANT_MIN_M
    use_dequant = use_dequant and x2.dtype in DTYPES  # fp32 x: the fused kernel's fp32 dot
    if use_dequant:
        y = dequantize_matmul(x2, p, bias, pieces=(cfg or {}).get("pieces", DEQUANT_PIECES))
        return y.reshape(*lead, n)
    if cfg is not None and cfg.pop("gluon", False):
        if not fpx_gluon.available(x2, p.fmt):
            raise ValueError(
                f"fpx_linear_triton: config {config} asks for the Gluon kernel, which runs "
                f"{fpx_gluon.FORMATS} weights with fp16/bf16 x on sm_90; drop 'gluon'."
            )
        return fpx_gluon.fpx_linear_gluon(x2, p, bias, **cfg).reshape(*lead, n)
    cfg = _triton_launch(cfg or {}, m, n, k, p.fmt, x.device)
    bias_c = bias.contiguous() if bias is not None else None
    mode = split_mode(cfg["bm"], cfg["split"])  # split is the program count along K
    if mode == 1:
        y = torch.zeros(m, n, dtype=torch.float32, device=x.device)
        launch(x2, p, bias_c, y, mode=mode, **cfg)
        y = y.to(x.dtype)
    else:
        y = torch.empty(m, n, dtype=x.dtype, device=x.device)
        launch(x2, p, bias_c, y, mode=mode, **cfg)
    return y.reshape(*lead, n)

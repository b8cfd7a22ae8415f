"""``quantize_report``: bytes before/after and the kernel each quantized layer resolves to.

``fs.explain`` prints it for params holding ``QuantizedWeight`` leaves (through
``QuantizedWeight.fscale_report``).

Usage::

    print(quantize_report(qparams))  # one row per quantized weight, then the totals
"""

from __future__ import annotations

import importlib

import torch

from fscale.transforms._quantize.codec import codec
from fscale.transforms._quantize.weight import QuantizedWeight


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def _launches_text(packed) -> str:
    """`` [M<=1: gluon split4 w4; ...]``: the launches tuned so far for this weight."""
    from fscale.kernels import _triton

    module = _TUNED_BY.get(type(packed).__name__)
    if module is None:
        return ""
    found = importlib.import_module(module).launches(packed)
    if not found:
        return ""
    parts = [f"M<={m}: {_triton.describe_launch(cfg)}" for m, cfg in sorted(found.items())]
    return "  [" + "; ".join(parts) + "]"


# Packed weight types whose kernels tune launches per M bucket, and where.
_TUNED_BY = {"PackedFPx": "fscale.kernels.fpx_triton", "PackedInt": "fscale.kernels.intq"}


def quantize_report(
    params: dict[str, torch.Tensor], *, activation_dtype: torch.dtype | None = None
) -> str:
    """Bytes before/after and the kernel each quantized layer resolves to, as text.

    ``activation_dtype`` (default: each weight's dtype) picks the kernel rule, as
    the activations' dtype does at run time.
    """
    rows = []
    before = after = 0
    for name, t in params.items():
        if not isinstance(t, torch.Tensor):
            continue
        orig = t.numel() * t.element_size()
        before += orig
        if isinstance(t, QuantizedWeight):
            dtype = activation_dtype or t.dtype
            kernel = t._codec.kernel(t.device, dtype)
            if t._codec.op == "fpx_a8_linear":  # two ops, by the product's row count
                from fscale.kernels import fpx_a8

                below = codec(t.fmt.removesuffix("-a8")).kernel(t.device, dtype)
                kernel = f"{kernel} from {fpx_a8.MIN_TOKENS} rows, {below} below"
            kernel += _launches_text(t.packed)
            now = t.packed_nbytes
            bits = 8 * now / t.numel()
            extra = f"+lorc{t._lorc.rank}" if t._lorc is not None else ""
            rows.append((name, "x".join(map(str, t.shape)), t.fmt + extra, orig, now, bits, kernel))
            after += now
        else:
            after += orig
    head = (
        f"{'param':<36} {'shape':>11} {'format':<10} {'before':>10} {'after':>10} "
        f"{'bits/w':>6}  kernel"
    )
    lines = ["quantized linear weights:", head]
    q_before = sum(r[3] for r in rows)
    q_after = sum(r[4] for r in rows)
    for name, shape, fmt, b, a, bits, kernel in rows:
        lines.append(
            f"{name:<36} {shape:>11} {fmt:<10} {_size(b):>10} {_size(a):>10} {bits:>6.2f}  {kernel}"
        )
    if not rows:
        lines.append("  (none)")
    else:
        lines.append(
            f"quantized layers: {len(rows)}, {_size(q_before)} -> {_size(q_after)} "
            f"({q_after / q_before:.3f}x)"
        )
    ratio = after / before if before else 1.0
    lines.append(f"all params: {_size(before)} -> {_size(after)} ({ratio:.3f}x)")
    return "\n".join(lines)

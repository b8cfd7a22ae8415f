"""Dtype casts of many tensors at once: ``torch._foreach_copy_`` grouped by dtype pair.

Mixed precision casts every param to the compute dtype each step and every grad back
in backward: a few hundred tensors. ``t.to(dtype)`` is a launch per tensor, and a cast
from a narrower float (bf16 -> fp32, the grads) takes TensorIterator's dynamic-cast
path, which does not vectorise: ~1.1 TB/s on an H200, 7.8 ms per step for the grads of
a 1.4B GPT (``bench/results/compile-profile-1b4-nvidia-h200.json``). torch's
``_foreach_copy_`` casts on its multi-tensor fast path when every source shares one
dtype and every destination another (and each pair has the same sizes and strides):
one launch per ~100 tensors, vectorised loads, the same rounding as ``.to`` (round to
nearest even; widening is exact). On the CPU it copies tensor by tensor, as ``.to``.

Usage::

    from fscale.casts import cast_all, cast_each
    halves = cast_all(params, torch.bfloat16)     # new tensors, one launch per dtype pair
    masters = cast_each(grads, [p.dtype for p in params])   # each to its own dtype
"""

from __future__ import annotations

import torch


def cast_all(tensors, dtype: torch.dtype) -> list:
    """``[t.to(dtype) for t in tensors]`` in as few launches as the device allows.

    A tensor already of ``dtype`` comes back as is (as ``.to`` returns it); ``None``
    stays ``None``; a non-contiguous tensor goes through ``.to`` (its own layout).
    """
    out = list(tensors)
    groups: dict[tuple, tuple[list, list]] = {}
    for i, t in enumerate(out):
        if t is None or t.dtype == dtype:
            continue
        if t.is_contiguous():
            out[i] = torch.empty(t.shape, dtype=dtype, device=t.device)
            pair = groups.setdefault((t.device, t.dtype), ([], []))
            pair[0].append(out[i])
            pair[1].append(t)
        else:
            out[i] = t.to(dtype)
    for dsts, srcs in groups.values():  # same sizes and strides pairwise, by construction
        torch._foreach_copy_(dsts, srcs)
    return out


def cast_each(tensors, dtypes) -> list:
    """``[t.to(d) for t, d in zip(tensors, dtypes)]`` (``None`` stays ``None``), a
    ``cast_all`` per target dtype."""
    out = list(tensors)
    by_dtype: dict[torch.dtype, list[int]] = {}
    for i, (t, d) in enumerate(zip(out, dtypes, strict=True)):
        if t is not None:
            by_dtype.setdefault(d, []).append(i)
    for d, idx in by_dtype.items():
        for i, t in zip(idx, cast_all([out[i] for i in idx], d), strict=True):
            out[i] = t
    return out

"""Leaf plumbing shared by the optimizers: flatten once, work on lists, rebuild.

Optimizers run ``torch._foreach_*`` ops over the leaves that have a gradient
(``None`` updates pass through untouched and their state is left as is).
"""

from __future__ import annotations

from typing import Any

import torch

from fscale import tree


def split(updates: Any) -> tuple[list, Any, list[int]]:
    """``(leaves, spec, idx)``: all leaves, the tree spec, positions of the non-``None`` ones."""
    leaves, spec = tree.flatten(updates)
    return leaves, spec, [i for i, leaf in enumerate(leaves) if leaf is not None]


def gather(source: Any, updates: Any, idx: list[int], *, what: str) -> list:
    """The leaves of ``source`` at ``idx``, after checking it has the structure of ``updates``."""
    tree.assert_same_structure(source, updates, what=what)
    leaves = tree.leaves(source)
    picked = [leaves[i] for i in idx]
    if any(x is None for x in picked):
        missing = [p for i, p in zip(idx, tree.paths(source), strict=False) if leaves[i] is None]
        raise ValueError(
            f"{what}: a gradient was given for leaves whose entry is None ({missing[:5]}); "
            "build the optimizer state with init(params) on params that include them."
        )
    return picked


def scatter(spec: Any, leaves: list, idx: list[int], new: list) -> Any:
    """``leaves`` with the entries at ``idx`` replaced by ``new``, as a tree."""
    out = list(leaves)
    for i, x in zip(idx, new, strict=True):
        out[i] = x
    return tree.unflatten(spec, out)


def moment_dtype(dtype: torch.dtype) -> torch.dtype:
    """Optimizer moments are kept in fp32 at least (bf16/fp16 params), fp64 stays fp64."""
    return torch.promote_types(dtype, torch.float32)


def zeros_moments(params: Any) -> Any:
    """fp32-or-wider zero buffers shaped like ``params``; ``None`` leaves stay ``None``."""
    return tree.map(
        lambda p: None if p is None else torch.zeros_like(p, dtype=moment_dtype(p.dtype)),
        params,
    )


def as_dtypes(tensors: list, like: list) -> list:
    """``tensors[i]`` cast to ``like[i].dtype`` (no copy when it already matches)."""
    pairs = zip(tensors, like, strict=True)
    return [t if t.dtype == ref.dtype else t.to(ref.dtype) for t, ref in pairs]


def subset(values: list, positions: list[int]) -> list:
    return [values[j] for j in positions]


def norms(tensors: list) -> list:
    """Per-tensor 2-norms (0-d tensors, fp32 for half-precision inputs), in input order."""
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for k, t in enumerate(tensors):
        groups.setdefault((t.device, t.dtype), []).append(k)
    out: list = [None] * len(tensors)
    for (_, dtype), ks in groups.items():
        kw = {"dtype": torch.float32} if dtype in (torch.float16, torch.bfloat16) else {}
        for k, n in zip(ks, torch._foreach_norm([tensors[k] for k in ks], 2, **kw), strict=True):
            out[k] = n
    return out

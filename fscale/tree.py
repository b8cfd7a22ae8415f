"""The one optree wrapper: every pytree operation in fscale goes through here.

optree's defaults (``none_is_leaf=False``, the global namespace) differ from
torch's pytree, so fscale fixes both once: ``None`` is a leaf (a frozen or
absent gradient keeps its slot) and custom nodes live in the ``"fscale"``
namespace.

Usage::

    from fscale import tree
    doubled = tree.map(lambda t: 2 * t, params)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import optree

NAMESPACE = "fscale"
_KW = {"none_is_leaf": True, "namespace": NAMESPACE}

PyTree = Any


def map(fn: Callable, tree: PyTree, *rest: PyTree) -> PyTree:  # noqa: A001 - mirrors tree_map
    """``fn`` applied leaf-wise over ``tree`` and any trees of the same structure."""
    for i, other in enumerate(rest):
        assert_same_structure(tree, other, what=f"tree argument {i + 1}")
    return optree.tree_map(fn, tree, *rest, **_KW)


def leaves(tree: PyTree) -> list:
    """The leaves of ``tree`` in a fixed (sorted-key) order."""
    return optree.tree_leaves(tree, **_KW)


def flatten(tree: PyTree) -> tuple[list, optree.PyTreeSpec]:
    """``(leaves, spec)``; ``unflatten(spec, leaves)`` rebuilds the tree."""
    return optree.tree_flatten(tree, **_KW)


def unflatten(spec: optree.PyTreeSpec, leaves: list) -> PyTree:
    return optree.tree_unflatten(spec, leaves)


def structure(tree: PyTree) -> optree.PyTreeSpec:
    return optree.tree_structure(tree, **_KW)


def paths(tree: PyTree) -> list[str]:
    """Dotted path of each leaf, in ``leaves`` order (``"blocks.0.attn.weight"``)."""
    return [".".join(str(k) for k in p) for p in optree.tree_paths(tree, **_KW)]


def assert_same_structure(a: PyTree, b: PyTree, *, what: str = "tree") -> None:
    """Raise a readable ``ValueError`` naming the first differing path."""
    sa, sb = structure(a), structure(b)
    if sa == sb:
        return
    pa, pb = set(paths(a)), set(paths(b))
    missing, extra = sorted(pa - pb), sorted(pb - pa)
    detail = []
    if missing:
        detail.append(f"missing {missing[:5]}")
    if extra:
        detail.append(f"unexpected {extra[:5]}")
    if not detail:
        detail.append(f"expected structure {sa}, got {sb}")
    raise ValueError(
        f"{what} does not match the expected pytree structure: {'; '.join(detail)}. "
        "Pass the params/state returned by step.init (or by the previous step call)."
    )

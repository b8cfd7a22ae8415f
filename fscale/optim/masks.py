"""Weight-decay masks: which params get decayed.

A mask is a pytree of Python bools with the structure of the params (``True``:
decay this leaf), or a callable ``params -> such a pytree``, evaluated at each
update on the params the optimizer is given. ``mask=None`` decays every leaf.

The usual GPT recipe decays matrices and embeddings but not biases or norm
gains: ``decay_mask_default``. Under a transform that re-lays params out (a
flat ZeRO shard is 1-D whatever the original shape), evaluate the callable on
the full params first and pass the resulting bool pytree, which does not depend
on the layout.

Usage::

    tx = adamw(lr=3e-4, weight_decay=0.1, mask=decay_mask_default)
    mask = decay_mask_default(params)              # {"fc.weight": True, "fc.bias": False}
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from fscale import tree

Mask = Any  # pytree of bools, or Callable[[params], pytree of bools]


def decay_mask_default(params: Any) -> Any:
    """``True`` for leaves with ``ndim >= 2`` (weights, embeddings), ``False`` for biases and norms.

    Args:
      params: a pytree of tensors (``None`` leaves get ``False``).

    Returns:
      A pytree of bools with the structure of ``params``.

    Example::

        decay_mask_default({"w": torch.ones(3, 4), "b": torch.ones(4)})   # {"w": True, "b": False}
    """
    return tree.map(lambda p: p is not None and p.ndim >= 2, params)


def mask_leaves(mask: Mask | Callable | None, like: Any, *, owner: str) -> list[bool] | None:
    """The mask as a list of bools in ``tree.leaves(like)`` order; ``None`` for "every leaf".

    Raises a ``ValueError`` naming the offending paths when the mask's structure
    differs from ``like`` or a leaf is not a bool.
    """
    if mask is None:
        return None
    resolved = mask(like) if callable(mask) else mask
    tree.assert_same_structure(like, resolved, what=f"{owner}: the weight-decay mask")
    leaves = tree.leaves(resolved)
    bad = [
        f"{path}={leaf!r}"
        for path, leaf in zip(tree.paths(resolved), leaves, strict=True)
        if not isinstance(leaf, (bool, np.bool_))
    ]
    if bad:
        raise ValueError(
            f"{owner}: mask leaves must be Python bools (True: apply weight decay), got {bad[:3]}; "
            "build one with tree.map(lambda p: ..., params) or use decay_mask_default."
        )
    return [bool(leaf) for leaf in leaves]


def decayed_positions(mask, params: Any, idx: list[int], *, owner: str, wd: float) -> list[int]:
    """Positions ``j`` into ``idx`` (the leaves with grads) whose leaf gets weight decay."""
    if params is None:
        raise ValueError(
            f"{owner}(weight_decay={wd}) needs the params: call update(grads, state, params)."
        )
    keep = mask_leaves(mask, params, owner=owner)
    return [j for j, i in enumerate(idx) if keep is None or keep[i]]

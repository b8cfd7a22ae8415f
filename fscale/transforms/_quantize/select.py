"""Which params ``quantize`` packs: by name and shape, by module type, or by ``select=``.

The default is [Note: which weights are quantized by default] in
``fscale/transforms/quantize.py``.

Usage::

    chosen, conv1d = _selection(params, select, module)  # {name: bool}, names stored [in, out]
"""

from __future__ import annotations

import torch
from torch import nn

from fscale.transforms._quantize.weight import QuantizedWeight

_SKIP_PARTS = {"wte", "wpe", "head", "heads", "lm_head", "embed_out"}


def _skipped_by_name(name: str) -> bool:
    for part in name.lower().split(".")[:-1]:
        if "emb" in part or part in _SKIP_PARTS or part.endswith("_head"):
            return True
    return False


def _ptr(t: torch.Tensor) -> int | None:
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return None


def _module_layout(module: nn.Module) -> tuple[set[str], set[str], set[int]]:
    """``(linear weight names, Conv1D weight names, embedding storage ptrs)``."""
    linear, conv1d, emb = set(), set(), set()
    for mod_name, mod in module.named_modules(remove_duplicate=False):
        prefix = f"{mod_name}." if mod_name else ""
        if isinstance(mod, nn.Linear):
            linear.add(prefix + "weight")
        elif type(mod).__name__ == "Conv1D" and hasattr(mod, "nf"):  # transformers' GPT-2
            linear.add(prefix + "weight")
            conv1d.add(prefix + "weight")
        elif isinstance(mod, nn.Embedding):
            emb.add(_ptr(mod.weight))
    return linear, conv1d, emb


def _selection(params, select, module) -> tuple[dict[str, bool], set[str]]:
    """``{name: chosen}`` and the names stored ``[in, out]``."""
    linear = conv1d = None
    emb_ptrs: set = set()
    if module is not None:
        module = getattr(module, "module", module)  # fs.functional's Apply carries it
        if not isinstance(module, nn.Module):
            raise TypeError(
                f"quantize: module= takes the nn.Module (or the apply from fs.functional), "
                f"got {type(module).__name__}."
            )
        linear, conv1d, emb_ptrs = _module_layout(module)
    if select is not None and not callable(select):
        raise TypeError(
            f"quantize: select must be a callable select(name, tensor) -> bool, got {select!r}."
        )
    for name, t in params.items():
        if isinstance(t, torch.Tensor) and _skipped_by_name(name):
            emb_ptrs.add(_ptr(t))
    emb_ptrs.discard(None)
    chosen = {}
    for name, t in params.items():
        if not isinstance(t, torch.Tensor) or isinstance(t, QuantizedWeight):
            chosen[name] = False
        elif select is not None:
            chosen[name] = bool(select(name, t))
        else:
            chosen[name] = (
                t.dim() == 2
                and t.is_floating_point()
                and (name.endswith(".weight") if linear is None else name in linear)
                and not _skipped_by_name(name)
                and _ptr(t) not in emb_ptrs
            )
    return chosen, conv1d or set()

"""``nn.Module`` -> ``(params, apply)``: a pure view of any module.

``params`` is a flat dict ``{qualified name: tensor}`` of the module's trainable
parameters. Tied weights (one ``Parameter`` reachable under several names, as in a
GPT whose output head shares the token embedding) appear once, under their first
name, and stay tied: ``apply`` feeds the one tensor to every place that uses it.
Buffers and frozen parameters are not in ``params``; ``apply`` reads them from the
module, so they follow the module's device.

The returned tensors alias the module's parameters (no copy: a 1.4B model is not
held twice). Steps donate their inputs, so after training starts the module's own
weights are stale or updated in place: train through ``apply``, and use
``fs.load_params(module, params)`` to write results back into a module.

Usage::

    params, apply = fs.functional(model)
    logits = apply(params, tokens)          # same as model(tokens), differentiable in params
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn


class Apply:
    """The pure forward of a module: ``apply(params, *args, **kwargs)``.

    [Note: swapping params in]
    ``torch.func.functional_call`` swaps each given tensor into its module's
    ``_parameters`` for the call and back after, finding the owning submodule by its
    dotted name every time: ~6 us per param each way, 3.5 ms of host time per step on
    a 24-layer GPT that the GPU waits for at the start of forward. ``apply`` does the
    same swap with the owners looked up once; names that are not plain parameter slots
    (buffers, attributes) still go through ``functional_call``.
    """

    def __init__(self, module: nn.Module, names: tuple[str, ...], aliases: dict[str, list[str]]):
        self.module = module
        self.names = names
        # name kept in params -> every other name the same Parameter is reachable under
        self.aliases = aliases
        self.tied = tuple((name, tuple(others)) for name, others in aliases.items() if others)
        self._slots: dict[str, tuple[dict, str]] | None = None

    def slots(self) -> dict[str, tuple[dict, str]]:
        """Each param name (aliases included) -> ``(owner._parameters, attribute)``,
        found once: the module's structure does not change between calls."""
        if self._slots is None:
            slots = {}
            for name in (*self.names, *(o for _, others in self.tied for o in others)):
                owner, _, attr = name.rpartition(".")
                sub = self.module.get_submodule(owner) if owner else self.module
                if attr not in sub._parameters:
                    slots = {}  # not a plain Parameter slot: leave it to functional_call
                    break
                slots[name] = (sub._parameters, attr)
            self._slots = slots  # kept when empty too: the walk is not redone per call
        return self._slots

    def __call__(self, params: dict[str, torch.Tensor], *args: Any, **kwargs: Any) -> Any:
        if not isinstance(params, dict):
            raise TypeError(
                f"apply expects the params dict from fs.functional, got {type(params).__name__}."
            )
        # A tied Parameter given under one name feeds all its names. The ties are known
        # from the start, so they are spelled out here rather than found again on every
        # call (functional_call's tie_weights=True walks every submodule per call: ~2 ms
        # of host time per step on a 12-layer GPT, with the GPU idle behind it).
        if self.tied:
            params = dict(params)
            for name, others in self.tied:
                if name in params:
                    for other in others:
                        params.setdefault(other, params[name])
        slots = self.slots()
        if not slots or not all(name in slots for name in params):
            return torch.func.functional_call(
                self.module, params, args, kwargs, tie_weights=False, strict=False
            )
        # functional_call's swap, with the owners found once ([Note: swapping params in]).
        saved = []
        try:
            for name, tensor in params.items():
                owner, attr = slots[name]
                saved.append((owner, attr, owner[attr]))
                owner[attr] = tensor
            return self.module(*args, **kwargs)
        finally:
            for owner, attr, original in reversed(saved):
                owner[attr] = original

    def __repr__(self) -> str:
        return f"Apply({type(self.module).__name__}, {len(self.names)} params)"


def functional(module: nn.Module) -> tuple[dict[str, torch.Tensor], Callable[..., Any]]:
    """Split ``module`` into a params dict and a pure ``apply``.

    Args:
      module: any ``nn.Module`` (Hugging Face transformers models included).

    Returns:
      ``(params, apply)``: trainable tensors by qualified name (tied weights once),
      and ``apply(params, *args, **kwargs)`` that runs ``module.forward`` with them.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"fs.functional expects an nn.Module, got {type(module).__name__}.")
    first_name: dict[int, str] = {}
    aliases: dict[str, list[str]] = {}
    params: dict[str, torch.Tensor] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        if not p.requires_grad:
            continue
        key = id(p)
        if key in first_name:
            aliases[first_name[key]].append(name)
            continue
        first_name[key] = name
        aliases[name] = []
        params[name] = p.detach()
    return params, Apply(module, tuple(params), aliases)


@torch.no_grad()
def load_params(module: nn.Module, params: dict[str, torch.Tensor]) -> nn.Module:
    """Copy a (full, unsharded) params dict back into ``module``'s parameters."""
    own = dict(module.named_parameters(remove_duplicate=False))
    unknown = sorted(set(params) - set(own))
    if unknown:
        raise KeyError(f"params not in {type(module).__name__}: {unknown[:5]}")
    for name, value in params.items():
        if own[name].shape != value.shape:
            raise ValueError(
                f"param {name!r} has shape {tuple(value.shape)}, the module expects "
                f"{tuple(own[name].shape)}; pass full params (fs.gather_params) not shards."
            )
        if own[name].data_ptr() != value.data_ptr():
            own[name].copy_(value)
    return module

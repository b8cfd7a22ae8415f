"""How tensor_parallel splits one module: which params shard along which dim, and
which collectives go around its forward (Megatron's column/row-parallel pair).

A style has ``shards(module) -> {param name: (dim, chunks, granularity)}`` (params
left out stay whole on every rank) and ``wrap(module, forward, call) -> forward``.
``call`` carries the step call's collectives, the tensor-parallel group and its size.

- ``Colwise``: ``y = x W^T + b`` with W's rows (outputs) split: the input is
  replicated (``copy_to``: its grad is summed over the group in backward), the
  output stays split along its last dim.
- ``Rowwise``: W's columns (inputs) split: each rank's partial product is summed
  over the group (``reduce_from``), then the whole bias is added once.
- ``ExpertBank``: an expert bank (``fscale.models.moe.Experts``) whose hidden dim is
  split: the ``colwise`` weights ``[E, d, h]`` along h, the ``rowwise`` ``[E, h, d]``
  along h; a colwise/rowwise pair around the bank's forward.

Usage::

    plan = {"blocks.*.attn.qkv": Colwise(chunks=3, granularity=64),
            "blocks.*.attn.proj": Rowwise()}
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch.nn.functional as F
from torch import nn

from fscale.hw import grad_comm

TAG = "tp.activations"


@dataclass(frozen=True)
class Colwise:
    """Split the outputs: ``weight`` (and ``bias``) along dim 0.

    ``chunks``: the outputs are that many fused blocks (qkv: 3), each split.
    ``granularity``: each rank's rows per block must be a multiple of it (a head).
    """

    chunks: int = 1
    granularity: int = 1

    def shards(self, module: nn.Module) -> dict:
        out = {"weight": (0, self.chunks, self.granularity)}
        if getattr(module, "bias", None) is not None:
            out["bias"] = (0, self.chunks, self.granularity)
        return out

    def wrap(self, module: nn.Module, forward: Callable, call) -> Callable:
        def colwise(x, *args, **kwargs):
            return forward(grad_comm.copy_to(call.comm, TAG, call.group, x), *args, **kwargs)

        return colwise


@dataclass(frozen=True)
class Rowwise:
    """Split the inputs: ``weight`` along dim 1; the bias stays whole, added once."""

    granularity: int = 1

    def shards(self, module: nn.Module) -> dict:
        if (
            not isinstance(getattr(module, "weight", None), nn.Parameter)
            or module.weight.dim() != 2
        ):
            raise ValueError(
                f"tensor_parallel: Rowwise needs a Linear-like module with a 2-D weight, got "
                f"{type(module).__name__}."
            )
        return {"weight": (1, 1, self.granularity)}

    def wrap(self, module: nn.Module, forward: Callable, call) -> Callable:
        def rowwise(x):
            partial = F.linear(x, module.weight)
            y = grad_comm.reduce_from(call.comm, TAG, call.group, partial)
            return y if module.bias is None else y + module.bias

        return rowwise


@dataclass(frozen=True)
class ExpertBank:
    """An expert bank's hidden dim split: ``colwise`` ``[E, d, h]`` weights along dim 2,
    ``rowwise`` ``[E, h, d]`` along dim 1; every param of the bank must be named."""

    colwise: tuple[str, ...] = ("w_in", "w_gate")
    rowwise: tuple[str, ...] = ("w_out",)

    def shards(self, module: nn.Module) -> dict:
        out = {}
        for name, _ in module.named_parameters(recurse=False):
            if name in self.colwise:
                out[name] = (2, 1, 1)
            elif name in self.rowwise:
                out[name] = (1, 1, 1)
            else:
                raise ValueError(
                    f"tensor_parallel: ExpertBank does not know how to split the bank's param "
                    f"{name!r}; name it in ExpertBank(colwise=..., rowwise=...)."
                )
        return out

    def wrap(self, module: nn.Module, forward: Callable, call) -> Callable:
        def bank(x, counts):
            y = forward(grad_comm.copy_to(call.comm, TAG, call.group, x), counts)
            return grad_comm.reduce_from(call.comm, TAG, call.group, y)

        return bank

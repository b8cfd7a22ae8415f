"""``checkpoint_activations(step, policy)``: recompute each unit's activations in backward.

Backward needs the activations forward made; a transformer keeps tens of them per
block (LayerNorm outputs, the qkv projection, the MLP's 4x-wide hidden layer, the
dropout masks ...). Checkpointing keeps only each unit's (block's) input and runs
the unit's forward again in backward, just before its gradients are computed
(Chen et al.): activation memory falls from ``L x block`` to ``L x input + one
block``, for one extra forward of the units.

- ``policy="unit"``: recompute the whole unit.
- ``policy="selective"``: keep the outputs of the matmuls and of attention
  (``aten.mm/addmm/bmm/baddbmm``, ``linear``, the ``scaled_dot_product_attention``
  kernels) and recompute the cheap pointwise ops between them (LayerNorm, GELU,
  residual adds, dropout): most of the memory back for a few percent of the FLOPs
  (Korthikanti et al.; torchtitan's "selective op" policy).

It is a unit transform: ``train_step(..., model=model)`` gives the step the model's
units (by default the children of the first ``ModuleList``) and this transform wraps
each unit's forward in ``torch.utils.checkpoint.checkpoint(use_reentrant=False)``;
no stage of the step changes, so it goes anywhere in a stack (inside or outside
``shard_zero``, ``mixed_precision`` and ``offload``). Dropout draws the same masks
in the recompute (the RNG state is stashed and restored, ``preserve_rng_state``): a
checkpointed step computes exactly what the plain one does.

Usage::

    params, apply = fs.functional(model)
    step = fs.train_step(loss_fn, fs.optim.adamw(3e-4), model=apply)
    step = fs.checkpoint_activations(fs.mixed_precision(step, "bf16"), policy="selective")
    step = fs.shard_zero(step, 3)            # any order: the hook is on the units

[Note: recompute under functional params]
``fs.functional``'s apply installs the params into the module only while the loss's
forward runs (``torch.func.functional_call``); backward runs after it has put the
module's own tensors back. The recompute must see the tensors the forward saw (the
step's params, mixed precision's casts, ZeRO-3's lazy params), so the wrapper takes
a snapshot of the unit's params and buffers when the unit is called and installs it
again around the recompute.

[Note: random ops under selective checkpointing]
A kept op is not run again in the recompute. If it drew random numbers (attention
with ``dropout_p > 0``), every random op after it in the unit would draw from a
different RNG offset than in forward and the dropout masks would differ. So a
matmul/attention op that draws random numbers is recomputed, not kept, and every
other random op (dropout) is recomputed as well: the recompute then draws the same
numbers in the same order from the restored RNG state. Attention without dropout
is kept.

[Note: checkpointing under ZeRO-3]
Non-reentrant checkpointing replaces each tensor saved inside a unit by a holder
(its saved-tensor hooks are innermost, so ZeRO-3's pack hook does not see them):
the unit's gathered weights are not kept for backward at all, and ZeRO-3 frees
them when the next unit is gathered. In backward the unit's first unpack runs the
recompute; its ``LazyParam``s ask ZeRO-3 for the unit from inside backward, where
ZeRO-3 gathers it on its backward path (the backward prefetch order, the previous
backward unit released; [Note: recompute] in ``_zero/stage3.py``) instead of its
forward one, and leaves the forward's unit order alone; the recomputed weights live
until the unit's backward has used them, as without checkpointing. At most ``1 +
prefetch`` units stay gathered, in forward and in backward. ZeRO-3 gathers with
Python dispatch off, so the selective policy's caching modes, which replay the
forward's ops in the recompute by their order, see the same ops in both ([Note:
gathers unseen by dispatch modes]).

References: Chen et al., "Training Deep Nets with Sublinear Memory Cost", 2016;
Korthikanti et al., "Reducing Activation Recomputation in Large Transformer
Models", MLSys 2023.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable

import torch
from torch.utils.checkpoint import (
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
)

from fscale.step import Step, Transform

NAME = "checkpoint_activations"
POLICIES = ("unit", "selective")

_aten = torch.ops.aten
# Ops whose outputs "selective" keeps: the FLOP-heavy ones (every overload but out=).
_KEEP = tuple(
    getattr(_aten, name)
    for name in (
        "mm",
        "addmm",
        "bmm",
        "baddbmm",
        "linear",
        "scaled_dot_product_attention",
        "_scaled_dot_product_attention_math",
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
        "_scaled_dot_product_fused_attention_overrideable",
        "_flash_attention_forward",
        "_efficient_attention_forward",
    )
    if hasattr(_aten, name)
)


def checkpoint_activations(step: Step, policy: str = "unit") -> Step:
    """Recompute each unit's activations in backward instead of keeping them.

    Args:
      step: the step to transform; it must know the model's units
        (``fs.train_step(loss_fn, opt, model=model)``, or ``model=apply`` from
        ``fs.functional``; ``units=`` picks other modules than the first
        ``ModuleList``'s children).
      policy: ``"unit"`` keeps only each unit's inputs and recomputes the whole unit;
        ``"selective"`` also keeps the matmul and attention outputs and recomputes
        the pointwise ops between them.

    Returns:
      A ``Step`` whose units run under ``torch.utils.checkpoint``; its results equal
      the unchecked step's exactly.
    """
    if policy not in POLICIES:
        raise ValueError(
            f"checkpoint_activations: unknown policy {policy!r}; use 'unit' (recompute "
            "each unit whole) or 'selective' (keep matmul/attention outputs, recompute "
            "the rest)."
        )
    record = Transform(
        NAME,
        options={"policy": policy},
        plan=functools.partial(_plan, policy),
    )
    units = step.units  # with_transform raises, naming this transform, if it is None/empty
    context_fn = _selective_contexts if policy == "selective" else None

    def hook(name: str, forward: Callable) -> Callable:
        return _checkpointed(units.module.get_submodule(name), forward, context_fn)

    return step.with_transform(record, unit_hook=hook)


def _checkpointed(module: torch.nn.Module, forward: Callable, context_fn) -> Callable:
    kwargs_ckpt = {} if context_fn is None else {"context_fn": context_fn}

    def wrapped(*args, **kwargs):
        # [Note: recompute under functional params]
        tensors = _tensors_of(module)

        def run(*args, **kwargs):
            with _installed(tensors):
                return forward(*args, **kwargs)

        return checkpoint(
            run, *args, use_reentrant=False, preserve_rng_state=True, **kwargs_ckpt, **kwargs
        )

    return wrapped


def _tensors_of(module: torch.nn.Module) -> list[tuple[dict, str, torch.Tensor]]:
    """The unit's params and buffers as they are now: (owning dict, name, tensor)."""
    out = []
    for m in module.modules():
        for table in (m._parameters, m._buffers):
            out.extend((table, name, t) for name, t in table.items() if t is not None)
    return out


@contextlib.contextmanager
def _installed(tensors: list[tuple[dict, str, torch.Tensor]]):
    """``tensors`` in their modules for the block, the modules' own ones put back after."""
    swapped = []
    try:
        for table, name, t in tensors:
            current = table.get(name)
            if current is not t:
                swapped.append((table, name, current))
                table[name] = t
        yield
    finally:
        for table, name, before in reversed(swapped):
            table[name] = before


def _selective_contexts():
    return create_selective_checkpoint_contexts(_keep_matmuls)


def _keep_matmuls(ctx, func, *args, **kwargs) -> CheckpointPolicy:
    """Keep matmul/attention outputs, unless they drew random numbers ([Note: random
    ops under selective checkpointing]); recompute everything else."""
    # An out= overload writes into a caller's buffer: nothing of its own to keep.
    # (torch.Tag.out is newer than torch 2.11: read the overload name.)
    if func.overloadpacket in _KEEP and func._overloadname != "out":
        if _dropout_p(func, args, kwargs) == 0.0:
            return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def _dropout_p(func, args, kwargs) -> float:
    for i, arg in enumerate(func._schema.arguments):
        if arg.name == "dropout_p":
            value = kwargs.get("dropout_p", args[i] if i < len(args) else arg.default_value)
            return float(value or 0.0)
    return 0.0


def _plan(policy: str, plan) -> None:
    if policy == "unit":
        plan.notes.append(
            "checkpoint_activations(unit): each unit keeps only its inputs; backward runs "
            "its forward again (one more forward of the units), so activation memory is "
            "the units' inputs plus one unit's activations."
        )
    else:
        plan.notes.append(
            "checkpoint_activations(selective): units keep their inputs and their matmul / "
            "attention outputs; backward recomputes the pointwise ops between them."
        )

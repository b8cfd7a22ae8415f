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

- ``offload="cpu"`` (issue 19): what backward keeps goes to pinned host memory
  during forward, on a side CUDA stream, and comes back just before it is used,
  the next unit's prefetched while a unit's backward runs ([Note: activation
  offload] in ``_checkpoint_offload.py``). With ``"unit"``: each unit's inputs
  (DeepSpeed's ``cpu_checkpointing``); with ``"selective"``: the inputs and the kept
  matmul / attention outputs; with ``policy="none"`` (offload only): nothing is
  recomputed and every tensor a unit saves for backward is offloaded. Params, their
  casts and ZeRO-3's gathered weights never are ([Note: offload under ZeRO-3]); nor
  storages under ``min_offload_bytes``. ``metrics["activation_offload_bytes"]``
  counts the bytes copied to the host in a step, ``"activation_reload_bytes"``
  those copied back (the last unit's are used where they are).

It is a unit transform: ``train_step(..., model=model)`` gives the step the model's
units (by default the children of the first ``ModuleList``) and this transform wraps
each unit's forward in ``torch.utils.checkpoint.checkpoint(use_reentrant=False)``;
no stage of the step changes (with ``offload``, ``loss_and_grad`` is wrapped: it owns
one call's offloaded tensors and reports them), so it goes anywhere in a stack
(inside or outside ``shard_zero``, ``mixed_precision`` and ``offload``). Dropout
draws the same masks in the recompute (the RNG state is stashed and restored,
``preserve_rng_state``): a checkpointed step computes exactly what the plain one does.

Usage::

    params, apply = fs.functional(model)
    step = fs.train_step(loss_fn, fs.optim.adamw(3e-4), model=apply)
    step = fs.checkpoint_activations(fs.mixed_precision(step, "bf16"), policy="selective")
    step = fs.shard_zero(step, 3)            # any order: the hook is on the units
    # or: fs.checkpoint_activations(step, "unit", offload="cpu") -- inputs to the host

[Note: offload under ZeRO-3]
Only the innermost saved-tensor hooks run, and ours are pushed around each unit's
forward, inside ZeRO-3's (pushed around the whole loss). So ours call the hooks they
found on the stack first: ZeRO-3's pack turns a gathered weight into its token,
which is kept as it is (only a tensor its pack returns unchanged is offloaded), and
in backward ZeRO-3's unpack runs last, on what we restored. Under ``"unit"`` and
``"selective"`` the unit's weights never reach either hook: checkpoint's own hooks
are innermost inside the unit ([Note: checkpointing under ZeRO-3]).

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

from fscale import tree
from fscale.step import Step, Transform
from fscale.transforms import _checkpoint_offload

NAME = "checkpoint_activations"
POLICIES = ("unit", "selective", "none")
OFFLOADS = (None, "cpu")
# Smaller storages stay on the device: a copy's fixed cost (a launch, an event, a
# pinned block) is not worth it (Megatron's min_offloaded_tensor_size).
MIN_OFFLOAD_BYTES = 2**20

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


def checkpoint_activations(
    step: Step,
    policy: str = "unit",
    *,
    offload: str | None = None,
    min_offload_bytes: int = MIN_OFFLOAD_BYTES,
) -> Step:
    """Recompute each unit's activations in backward instead of keeping them.

    Args:
      step: the step to transform; it must know the model's units
        (``fs.train_step(loss_fn, opt, model=model)``, or ``model=apply`` from
        ``fs.functional``; ``units=`` picks other modules than the first
        ``ModuleList``'s children).
      policy: ``"unit"`` keeps only each unit's inputs and recomputes the whole unit;
        ``"selective"`` also keeps the matmul and attention outputs and recomputes
        the pointwise ops between them; ``"none"`` recomputes nothing (only with
        ``offload``).
      offload: ``None`` keeps what the policy keeps on the device; ``"cpu"`` moves it
        to pinned host memory in forward and back in backward: the units' inputs
        (``"unit"``), also the kept matmul outputs (``"selective"``), or everything
        the units save for backward (``"none"``). Params are never moved.
      min_offload_bytes: tensors whose storage is smaller stay on the device.

    Returns:
      A ``Step`` whose units run under ``torch.utils.checkpoint`` (and offload); its
      results equal the plain step's exactly.

    Usage::

        step = fs.checkpoint_activations(step, "selective", offload="cpu")
    """
    if policy not in POLICIES:
        raise ValueError(
            f"checkpoint_activations: unknown policy {policy!r}; use 'unit' (recompute "
            "each unit whole) or 'selective' (keep matmul/attention outputs, recompute "
            "the rest), or 'none' with offload='cpu' (recompute nothing, offload all)."
        )
    if offload not in OFFLOADS or isinstance(offload, bool):
        raise ValueError(
            f"checkpoint_activations: unknown offload {offload!r}; use offload='cpu' "
            "(activations to pinned host memory) or offload=None (keep them on the device)."
        )
    if policy == "none" and offload is None:
        raise ValueError(
            "checkpoint_activations(policy='none') without offload does nothing; pass "
            "offload='cpu' to offload every activation the units keep, or leave the "
            "transform out."
        )
    if isinstance(min_offload_bytes, bool) or not isinstance(min_offload_bytes, int):
        raise TypeError(
            f"checkpoint_activations: min_offload_bytes must be an int, got "
            f"{type(min_offload_bytes).__name__}."
        )
    if min_offload_bytes < 0:
        raise ValueError(
            f"checkpoint_activations: min_offload_bytes must be >= 0, got {min_offload_bytes}."
        )
    options = {"policy": policy}
    if offload is not None:
        options.update(offload=offload, min_offload_bytes=min_offload_bytes)
    record = Transform(
        NAME,
        options=options,
        plan=functools.partial(_plan, policy, offload),
    )
    units = step.units  # with_transform raises, naming this transform, if it is None/empty
    context_fn = _selective_contexts if policy == "selective" else None
    if offload is not None and context_fn is not None:
        _checkpoint_offload.check_selective(context_fn)

    def hook(name: str, forward: Callable) -> Callable:
        module = units.module.get_submodule(name)
        # Bound when the units are hooked, inside the loss_and_grad call below.
        offloader = _checkpoint_offload.current() if offload else None
        if policy == "none":
            return forward if offloader is None else _offloaded(offloader, module, forward)
        return _checkpointed(module, forward, context_fn, offloader)

    if offload is None:
        return step.with_transform(record, unit_hook=hook)
    inner = step.stages

    def loss_and_grad(ctx, params, batch):
        return _offloading_loss_and_grad(min_offload_bytes, inner, ctx, params, batch)

    return step.with_transform(record, unit_hook=hook, loss_and_grad=loss_and_grad)


def _offloading_loss_and_grad(min_bytes: int, inner, ctx, params, batch):
    """One call (micro-batch): its offloaded tensors, finished after its backward."""
    offloader = _checkpoint_offload.Offloader(min_bytes, keep=tree.leaves(params))
    with _checkpoint_offload.running(offloader):
        loss, grads = inner.loss_and_grad(ctx, params, batch)
    m = ctx.metrics  # summed over micro-batches
    m["activation_offload_bytes"] = m.get("activation_offload_bytes", 0) + offloader.bytes_to_host
    m["activation_reload_bytes"] = m.get("activation_reload_bytes", 0) + offloader.bytes_to_device
    return loss, grads


def _offloaded(offloader, module: torch.nn.Module, forward: Callable) -> Callable:
    """``forward`` with everything the unit saves for backward offloaded (policy "none")."""

    def wrapped(*args, **kwargs):
        with offloader.unit(_all_tensors(_tensors_of(module))):
            return forward(*args, **kwargs)

    return wrapped


def _checkpointed(module: torch.nn.Module, forward: Callable, context_fn, offloader) -> Callable:
    def wrapped(*args, **kwargs):
        # [Note: recompute under functional params]
        tensors = _tensors_of(module)

        def run(*args, **kwargs):
            with _installed(tensors):
                return forward(*args, **kwargs)

        def call(context_fn):
            extra = {} if context_fn is None else {"context_fn": context_fn}
            return checkpoint(
                run, *args, use_reentrant=False, preserve_rng_state=True, **extra, **kwargs
            )

        if offloader is None:
            return call(context_fn)
        # checkpoint saves the unit's inputs through the saved-tensor hooks around it
        # (ours); selective's kept outputs go to its cache, which we wrap.
        with offloader.unit(_all_tensors(tensors)) as group:
            if context_fn is None:
                return call(None)
            return call(
                functools.partial(
                    _checkpoint_offload.offloading_contexts, offloader, group, context_fn
                )
            )

    return wrapped


def _all_tensors(tensors: list[tuple[dict, str, torch.Tensor]]) -> list[torch.Tensor]:
    return [t for _, _, t in tensors]


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


def _plan(policy: str, offload: str | None, plan) -> None:
    if policy == "unit":
        plan.notes.append(
            "checkpoint_activations(unit): each unit keeps only its inputs; backward runs "
            "its forward again (one more forward of the units), so activation memory is "
            "the units' inputs plus one unit's activations."
        )
    elif policy == "selective":
        plan.notes.append(
            "checkpoint_activations(selective): units keep their inputs and their matmul / "
            "attention outputs; backward recomputes the pointwise ops between them."
        )
    if offload is not None:
        kept = {
            "unit": "the units' inputs",
            "selective": "the units' inputs and kept matmul/attention outputs",
            "none": "every activation the units save for backward (nothing recomputed)",
        }[policy]
        plan.notes.append(
            f"checkpoint_activations(offload={offload!r}): {kept} go to pinned host memory "
            "on a side stream in forward and are prefetched back one unit ahead in "
            "backward; on the device stay about two units' worth plus what is outside the "
            "units (params are never offloaded)."
        )

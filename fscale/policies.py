"""Typed policies and capabilities: what one transform publishes for the others.

A transform that others must know about publishes a frozen dataclass with
``step.with_transform(record, policy=...)``; the others read it by type,
``step.policy(PrecisionPolicy)`` (FSDP2's ``MixedPrecisionPolicy`` /
``OffloadPolicy``), never by the transform's name or its option strings. What a
transform *does* to the step that others must plan around is a capability flag on
its record (``Transform(capabilities={CHANGES_GRADS_AFTER_BACKWARD})``), read with
``step.has(capability)``, instead of lists of transform names.

The policies live here, below every transform, so that no transform imports
another's module to read them.

Usage::

    mp = step.policy(PrecisionPolicy)        # None without mixed_precision
    dtype = mp.param_dtype if mp else None
    if step.has(CHANGES_GRADS_AFTER_BACKWARD): ...
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# ----------------------------------------------------------------------------- capabilities

#: Something between backward and the update changes the grads (a reduction after
#: backward, unscaling, a dtype round trip): grads are not final when backward makes them.
CHANGES_GRADS_AFTER_BACKWARD = "changes_grads_after_backward"
#: The transform wants ``ctx.grad_ready(index, grad, leaf)`` for each grad as it becomes
#: final in backward ([Note: final grads in backward] in ``fscale/_accumulate.py``).
WANTS_FINAL_GRADS = "wants_final_grads"
#: The params ``step.init`` returns are shards (a gather runs inside ``materialize``).
SHARDS_PARAMS = "shards_params"
#: The step's optimizer runs somewhere other than on the params' device.
MOVES_OPTIMIZER = "moves_optimizer"
#: The ``update`` / ``apply`` stages the transform replaces change no state and no
#: param when the step is skipped on the device: they reach the optimizer only
#: through the inner stages (which run it inside ``optim.base.skipping``), and
#: whatever else they write is recomputed from unchanged values. Without it, a
#: transform replacing ``update`` or ``apply`` makes the non-finite guard read its
#: verdict on the host before the update ([Note: skipping on the device]).
SKIP_SAFE_UPDATE = "skip_safe_update"

CAPABILITIES = frozenset(
    {
        CHANGES_GRADS_AFTER_BACKWARD,
        WANTS_FINAL_GRADS,
        SHARDS_PARAMS,
        MOVES_OPTIMIZER,
        SKIP_SAFE_UPDATE,
    }
)


# ----------------------------------------------------------------------------- policies


@dataclass(frozen=True)
class PrecisionPolicy:
    """Published by ``mixed_precision``: compute in ``param_dtype``, reduce grads in
    ``reduce_dtype``; the params (masters) keep their own dtype. ``loss_scaling``:
    fp16's dynamic loss scale multiplies the loss and is undone in ``finish_grads``."""

    param_dtype: torch.dtype
    reduce_dtype: torch.dtype
    loss_scaling: bool = False


@dataclass(frozen=True)
class ZeroPolicy:
    """Published by ``shard_zero``: the stage, and the mesh dims it shards over and
    replicates over (HSDP: a shard dim inside a replicate dim)."""

    stage: int
    shard_dim: str
    replicate_dims: tuple[str, ...] = ()


@dataclass(frozen=True)
class OffloadPolicy:
    """Published by ``offload``: where the optimizer state (and maybe params) live."""

    tier: str
    what: tuple[str, ...]
    delayed_update: bool = False


@dataclass(frozen=True)
class ParamSourcePolicy:
    """Published by a transform that keeps ZeRO-3's param shards elsewhere (``offload``).

    ``factory(device=..., gather_dtype=...)`` builds the ``ParamSource``
    (``fscale.param_source``) that ``shard_zero(3)`` asks, at ``init``, to place each
    unit's flat shard and, at every gather, for a device copy of it.
    """

    factory: type
    options: tuple = ()


@dataclass(frozen=True)
class ModelParallelDims:
    """Published by a transform whose mesh dims split the *model*, not the batch
    (``tensor_parallel``): the ranks along ``dims`` see the same batch, so grads are
    not averaged over them, and the step's data dims are the mesh's other dims.

    [Note: which dims a grad is averaged over]
    The global loss is the mean of the data ranks' losses (``D`` = the product of the
    data dims' sizes). A replicated leaf's grad is the mean over every data dim. A
    leaf sharded over a data dim (an expert bank over ``"ep"``) already summed, in
    its backward, the contributions of the ranks along that dim (the tokens they sent
    it): it is averaged over the other data dims and divided by the sharded dims'
    size, which gives the same ``1/D`` (DeepSpeed's expert grads were ``ep`` times too
    large, #5618). A leaf sharded over a model dim is not reduced over it.
    """

    dims: tuple[str, ...]


@dataclass(frozen=True)
class LocalGradsPolicy:
    """Published by a transform that, on some calls, exchanges something made from the
    grads itself instead of the grads (``compress_comm``'s 1-bit optimizers over
    ``shard_zero`` 1/2 exchange the momentum, compressed, after the non-finite vote).

    On a call where ``local(ctx)`` is True, a transform under it that would reduce
    the grads in backward (``shard_zero`` 1/2's reduce-scatter) runs its inner
    ``loss_and_grad`` and ``grad_norm`` instead, handing the full *local* grads up
    unreduced; its ``update`` and ``apply`` run as usual on whatever the publisher
    passes down (shard_zero: row-shaped "grads" for its master rows). ``local`` must
    give the same answer on every rank.
    """

    local: object  # Callable[[StepContext], bool]

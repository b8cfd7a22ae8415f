"""The train step: a frozen record of named stages that transforms rewrite.

A ``Step`` maps ``(params, state, batch) -> (params, state, metrics)``. It is built
from a loss function and a pure optimizer, then transformed: every capability of
fscale (ZeRO, offload, compressed communication, mixed precision) is a function
``Step -> Step`` that replaces the stages it owns. The stages and their defaults:

=================  ==================================================================
``init``           lay params out, build the state dict (``optimizer``, ``count``, ...)
``materialize``    the params the loss sees (identity; ZeRO-3 gathers, quantize
                   dequantizes) -- runs *inside* differentiation
``loss_and_grad``  ``torch.autograd.grad`` of the loss w.r.t. the laid-out params
``reduce_grads``   data-parallel mean all-reduce (no-op in a world of one)
``finish_grads``   last touch before clipping and the update (identity; mixed
                   precision unscales fp16 grads and checks them for overflow)
``grad_norm``      global 2-norm of the reduced grads (sharded grads sum partial norms)
``update``         the optimizer step on what this rank owns (the params, or shards)
``apply``          lay the updated params out for the next call (identity; ZeRO-1/2
                   all-gather the updated shards, tag ``"zero.params"``)
=================  ==================================================================

State is a dict keyed by owner (optax ``named_chain`` style): ``"optimizer"``,
``"count"``, ``"layout"`` and one slot per transform that needs one; every slot
describes itself for a checkpoint (``fscale.state.describe``).

What transforms share goes through the step, never through each other's modules:
typed policies (``step.policy(PrecisionPolicy)``), capability flags
(``step.has(CHANGES_GRADS_AFTER_BACKWARD)``, see ``fscale/policies.py``), tagged
collectives (``ctx.comm.reduce_scatter("zero.grads", ...)``; a transform replaces
one tag's lowering for its own step, ``fscale/hw/tagged.py``), declared per-call
scratch (``ctx.scratch(owner)``), unit hooks that wrap each unit's forward
(``fscale/units.py``) and the mesh (``step.mesh``, ``fscale/hw/mesh.py``).

The default stages live in ``fscale/stages.py``, micro-batch accumulation in
``fscale/_accumulate.py``.

Usage::

    step = fs.train_step(loss_fn, fs.optim.adamw(lr=3e-4), accumulate=4, clip_norm=1.0)
    params, state = step.init(params)
    params, state, metrics = step(params, state, batch)   # always rebind: inputs are donated
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from fscale import _guard, tree
from fscale._accumulate import accumulated_loss_and_grad
from fscale.hw import comm
from fscale.hw import mesh as meshes
from fscale.hw.tagged import Collectives, TaggedLowering
from fscale.optim import schedules
from fscale.optim.base import GradientTransformation, skipping
from fscale.optim.sharded import sharded_as
from fscale.placement import MeshLayout, Placement, placement_of, replicated
from fscale.policies import (
    CAPABILITIES,
    SKIP_SAFE_UPDATE,
    ModelParallelDims,
)
from fscale.stages import DEFAULT_STAGES, Stages, clip_, leaf_shards
from fscale.units import UnitHook, Units, find_units

Params = Any
Batch = Any
State = dict


# ----------------------------------------------------------------------------- records


@dataclass(frozen=True)
class Transform:
    """What one applied transform declares about itself.

    ``options`` are for display (``fs.explain``) only: other transforms read a typed
    policy (``step.policy(T)``), never these. ``capabilities`` are flags from
    ``fscale.policies`` others plan around. ``scratch``: the transform keeps per-call
    scratch in ``ctx.scratch(name)``. ``requires`` names transforms that must already
    be applied (inside this one). The other three map a transform's name to the fix
    the error message suggests: ``conflicts`` may not share a stack with this one in
    either order, ``refuses_inner`` may not be applied inside it, ``refuses_outer``
    may not be applied over it. All are checked when a transform is applied, so an
    illegal stack fails before any tensor moves.
    """

    name: str
    options: Mapping[str, Any] = field(default_factory=dict)
    requires: tuple[str, ...] = ()
    conflicts: Mapping[str, str] = field(default_factory=dict)
    refuses_inner: Mapping[str, str] = field(default_factory=dict)
    refuses_outer: Mapping[str, str] = field(default_factory=dict)
    unique: bool = True
    plan: Callable[[Any], None] | None = None  # plan(Plan): adjusts fs.explain's estimate
    capabilities: frozenset[str] = frozenset()
    scratch: bool = False

    def __post_init__(self):
        unknown = sorted(set(self.capabilities) - CAPABILITIES)
        if unknown:
            raise ValueError(
                f"transform {self.name!r} declares unknown capabilities {unknown}; the "
                f"known ones are {sorted(CAPABILITIES)} (fscale/policies.py)."
            )

    def __str__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return f"{self.name}({opts})"


@dataclass(frozen=True)
class ParamLayout:
    """Structure, shapes and dtypes of params as ``init`` laid them out.

    Kept in the state so a call with params that did not come from ``step.init``
    (or from the previous call) fails with a readable error instead of a wrong step.
    """

    spec: Any
    shapes: tuple[tuple[int, ...] | None, ...]
    dtypes: tuple[torch.dtype | None, ...]
    placements: tuple[Placement | None, ...] = ()
    paths: tuple[str, ...] = ()
    #: The mesh the placements name ([Note: the mesh in the layout] in fscale/placement.py).
    mesh: MeshLayout | None = None

    @classmethod
    def of(cls, params: Params, dp_dims: tuple[str, ...] = (), mesh=None) -> ParamLayout:
        leaves, spec = tree.flatten(params)
        return cls(
            spec,
            tuple(None if t is None else tuple(t.shape) for t in leaves),
            tuple(None if t is None else t.dtype for t in leaves),
            tuple(None if t is None else placement_of(t) or replicated(t, dp_dims) for t in leaves),
            tuple(tree.paths(params)),
            None if mesh is None else MeshLayout.of(mesh),
        )

    def describe_state(self) -> dict:
        """The state protocol: each param's shape, dtype and placement, by path."""
        return {
            path: None
            if shape is None
            else {"shape": list(shape), "dtype": dtype, "placement": p.describe()}
            for path, shape, dtype, p in zip(
                self.paths, self.shapes, self.dtypes, self.placements, strict=True
            )
        }

    def check(self, params: Params) -> None:
        leaves, spec = tree.flatten(params)
        if spec != self.spec:
            raise ValueError(
                "params do not have the structure step.init produced "
                f"({spec.num_leaves} leaves vs {self.spec.num_leaves} expected). Call "
                "`params, state = step.init(params)` and pass the params it returns."
            )
        # Paths only for the message: finding them costs more than the check (every call).
        for i, (leaf, shape, dtype) in enumerate(
            zip(leaves, self.shapes, self.dtypes, strict=True)
        ):
            got = None if leaf is None else tuple(leaf.shape)
            if got != shape or (leaf is not None and leaf.dtype != dtype):
                path = tree.paths(params)[i]
                raise ValueError(
                    f"param {path!r} has shape {got} and dtype "
                    f"{None if leaf is None else leaf.dtype}; step.init laid it out as {shape} "
                    f"{dtype}. Pass the params returned by step.init / the previous step "
                    "call, not the original ones."
                )


class StepContext:
    """What the stages of one call share: the state being built, the metrics, the
    tagged collectives (``comm``), declared per-transform scratch, and three hooks of
    the grad protocol any transform may set for the stages inside it."""

    def __init__(self, step: Step, state: State):
        self.step = step
        self.state = dict(state)
        self.metrics: dict[str, Any] = {}
        self.comm = Collectives(step.lowerings, self)
        self._scratch = {t.name: {} for t in step.transforms if t.scratch}
        # Multiplies the loss before differentiation (loss scaling sets it); the
        # returned loss is unscaled.
        self.loss_scale: torch.Tensor | None = None
        # Takes each grad as backward produces it (see _backward_into_sink).
        self.grad_sink = None
        # Called with each final grad in backward ([Note: final grads in backward]).
        self.grad_ready = None
        # [Note: a loss vote before streamed updates]
        # A transform that updates from grads during the last backward (offload's
        # streaming) acts before the step's vote on loss and grads. So the core hands
        # it the loss (the micro-batches' sum, the last one's included) right before
        # that backward (``before_final_backward(loss)``, set by the transform); the
        # transform votes on its finiteness across the mesh and applies no update when
        # any rank's is not. When the step's vote then skips the step, the core calls
        # ``streamed_updates()``: it waits for the transform's work and says whether
        # any update ran. None ran (a NaN batch): the skip changes nothing, as without
        # streaming. Some ran (a finite loss, an overflow in backward): it raises.
        self.before_final_backward = None
        self.streamed_updates = None
        # The non-finite guard ([Note: the non-finite guard] in fscale/_guard.py): a
        # stage that already checked every grad for inf/nan (fp16's unscale) puts its
        # local flag here (a 0-d tensor, > 0 when found) so the grads are not read
        # again; ``on_verdict`` callbacks get the voted decision, ``fn(nonfinite)``,
        # and return True when the skip is expected (fp16's scale can still drop).
        self.nonfinite: torch.Tensor | None = None
        self.on_verdict: list[Callable[[bool], bool]] = []

    def flag_nonfinite(self, found: torch.Tensor) -> None:
        """Add this rank's flag (0-d, > 0: a grad is inf/nan) to the step's one vote."""
        self.nonfinite = found if self.nonfinite is None else torch.maximum(self.nonfinite, found)

    def scratch(self, owner: str) -> dict:
        """The per-call scratch dict of transform ``owner`` (declared ``scratch=True``)."""
        if owner not in self._scratch:
            raise RuntimeError(
                f"{owner} uses per-call scratch but did not declare it; build its record "
                "with Transform(..., scratch=True)."
            )
        return self._scratch[owner]


# ----------------------------------------------------------------------------- the step


@dataclass(frozen=True)
class Step:
    """A train step of named stages; build with ``train_step``, change with transforms."""

    loss_fn: Callable[..., Any]
    optimizer: GradientTransformation
    accumulate: int = 1
    clip_norm: float | None = None
    has_aux: bool = False
    mesh: meshes.Mesh = field(default_factory=meshes.resolve)
    units: Units | None = None
    nonfinite: str = "skip"
    max_nonfinite_skips: int | None = 10
    sync_init: str = "check"
    stages: Stages = DEFAULT_STAGES
    transforms: tuple[Transform, ...] = ()
    policies: tuple[Any, ...] = ()
    lowerings: tuple[TaggedLowering, ...] = ()
    unit_hooks: tuple[tuple[str, UnitHook], ...] = ()
    # Transforms that replaced ``update`` or ``apply`` without declaring SKIP_SAFE_UPDATE.
    unsafe_to_skip: tuple[str, ...] = ()

    # -- building -------------------------------------------------------------------

    def applied(self, name: str) -> Transform | None:
        """The record of transform ``name`` if it is in the stack (for display and tests;
        transforms read each other through ``policy`` and ``has``)."""
        return next((t for t in self.transforms if t.name == name), None)

    def policy(self, kind: type):
        """The policy of type ``kind`` a transform in the stack published, or None."""
        return next((p for p in reversed(self.policies) if isinstance(p, kind)), None)

    def has(self, capability: str) -> bool:
        """Whether a transform in the stack declares ``capability`` (fscale.policies)."""
        if capability not in CAPABILITIES:
            raise ValueError(
                f"unknown capability {capability!r}; the known ones are {sorted(CAPABILITIES)}."
            )
        return any(capability in t.capabilities for t in self.transforms)

    def data_dims(self) -> tuple[str, ...]:
        """The mesh dims that split the batch: every dim but those a transform declared
        model-parallel (``ModelParallelDims``, e.g. tensor parallel's ``"tp"``)."""
        model = {d for p in self.policies if isinstance(p, ModelParallelDims) for d in p.dims}
        return tuple(d for d in self.mesh.dims if d not in model)

    def skips_on_device(self) -> bool:
        """Whether a non-finite step is skipped by a device flag, with no host read
        before the update ([Note: skipping on the device] in fscale/optim/base.py)."""
        return (
            self.nonfinite in _guard.SKIPPING
            and self.optimizer.skips_on_device
            and not self.unsafe_to_skip
        )

    def with_transform(
        self,
        record: Transform,
        *,
        policy: Any = None,
        lowerings: Mapping[str, Callable] | None = None,
        unit_hook: UnitHook | None = None,
        **stages: Callable,
    ) -> Step:
        """A new step with ``record`` appended and ``stages`` replaced (checked first).

        Args:
          record: the transform's ``Transform`` record.
          policy: a frozen dataclass others read with ``step.policy(type(policy))``.
          lowerings: ``{tag: fn}``: replace the lowering of these tagged collectives for
            this step ([Note] in ``fscale/hw/tagged.py``); ``fn`` keeps state in the
            ``record.name`` slot.
          unit_hook: ``hook(unit_name, forward) -> forward`` wrapping every unit's
            forward (needs ``train_step(..., model=...)``).
          **stages: replaced stages, by name.
        """
        _check_stack(self, record)
        unknown = sorted(set(stages) - {f.name for f in dataclasses.fields(Stages)})
        if unknown:
            raise ValueError(
                f"{record.name} rewrites unknown stages {unknown}; the stages are "
                f"{[f.name for f in dataclasses.fields(Stages)]}."
            )
        new_lowerings = tuple(self.lowerings)
        for tag, fn in (lowerings or {}).items():
            taken = next((e for e in self.lowerings if e.tag == tag), None)
            if taken is not None:
                raise ValueError(
                    f"{record.name} replaces the lowering of {tag!r}, which {taken.owner} "
                    f"already replaced; {record.name} and {taken.owner} cannot share a stack "
                    "(apply only one of them)."
                )
            if not callable(fn):
                raise TypeError(f"{record.name}: the lowering of {tag!r} must be callable.")
            new_lowerings += (TaggedLowering(tag, record.name, fn),)
        hooks = self.unit_hooks
        if unit_hook is not None:
            if self.units is None:
                raise ValueError(
                    f"{record.name} wraps the model's units, but the step does not know the "
                    "model: build it with fs.train_step(loss_fn, opt, model=model) (or "
                    "model=apply from fs.functional)."
                )
            if not self.units.names:
                raise ValueError(
                    f"{record.name} wraps the model's units, but "
                    f"{type(self.units.module).__name__} has none (no ModuleList); pass "
                    "train_step(..., units=...) naming its blocks."
                )
            hooks = (*hooks, (record.name, unit_hook))
        unsafe = self.unsafe_to_skip
        if {"update", "apply"} & set(stages) and SKIP_SAFE_UPDATE not in record.capabilities:
            unsafe = (*unsafe, record.name)
        return dataclasses.replace(
            self,
            stages=dataclasses.replace(self.stages, **stages),
            transforms=(*self.transforms, record),
            policies=self.policies if policy is None else (*self.policies, policy),
            lowerings=new_lowerings,
            unit_hooks=hooks,
            unsafe_to_skip=unsafe,
        )

    def hooked_units(self):
        """A context in which every unit's forward runs through the stack's unit hooks."""
        if self.units is None or not self.unit_hooks:
            return contextlib.nullcontext()
        return self.units.hooked([hook for _, hook in self.unit_hooks])

    # -- running --------------------------------------------------------------------

    def init(self, params: Params) -> tuple[Params, State]:
        """Lay ``params`` out as the stack says and build the state.

        With ``sync_init="check"`` (the default) it first checks that every rank of the
        mesh holds the same params, ``"broadcast"`` copies rank 0's into the others
        ([Note: same params on every rank] in ``fscale/_guard.py``).
        """
        _check_params(params)
        if self.sync_init == "check":
            _guard.check_init(self.mesh, params)
        elif self.sync_init == "broadcast":
            _guard.broadcast_init(self.mesh, params)
        params, state = self.stages.init(self, params)
        state["layout"] = ParamLayout.of(params, self.mesh.dims, self.mesh)
        state["guard"] = {"skipped_steps": 0, "consecutive": 0}
        state["generation"] = _guard.Generation.start()
        state["generation"].mark(params)
        return params, state

    def __call__(self, params: Params, state: State, batch: Batch):
        if not isinstance(state, dict) or "layout" not in state:
            raise ValueError(
                "state was not produced by step.init; call `params, state = step.init(params)` "
                "first and pass the state each step call returns."
            )
        state["layout"].check(params)
        generation = state.get("generation")
        if generation is not None:  # [Note: stale state] in fscale/_guard.py
            generation.check(params)
        ctx = StepContext(self, state)
        old_params = params
        with comm.counting() as traffic:
            loss, grads = accumulated_loss_and_grad(self, ctx, params, batch)
            grads = self.stages.reduce_grads(ctx, grads)
            grads = self.stages.finish_grads(ctx, grads)
            norm = None
            if self.clip_norm is not None:
                norm = self.stages.grad_norm(ctx, grads)
                ctx.metrics["grad_norm"] = norm
            # One vote: the global mean loss and whether any rank saw inf/nan.
            voted = _guard.vote(ctx, loss, grads, norm)
            # The previous call's verdict, if it was left to read now (forward and
            # backward are queued: [Note: reading the verdict a step late]).
            _guard.settle(ctx.state)
            guarded = self.nonfinite in _guard.SKIPPING
            late = guarded and not ctx.on_verdict and self._reads_late(params)
            if late:
                before = dict(ctx.state)
                params, hparams = self._update_and_apply(ctx, grads, params, norm, voted)
                skip, expected = False, []
            elif guarded and not ctx.on_verdict and self.skips_on_device():
                # [Note: skipping on the device]: the update is queued with the verdict
                # as a device flag, then the host reads it (the backward has had the
                # whole update's launch to finish); a skip returns the old slots.
                before = dict(ctx.state)
                params, hparams = self._update_and_apply(ctx, grads, params, norm, voted)
                skip = not bool(torch.isfinite(voted))
                if skip:
                    ctx.state = before
                expected = []
            else:
                # The one host read of the step; fp16 (on_verdict) skips overflows even
                # with the guard off, as it always did.
                skip = not bool(torch.isfinite(voted)) if guarded or ctx.on_verdict else False
                expected = [fn(skip) for fn in ctx.on_verdict]
                hparams = {}
                if not skip:
                    params, hparams = self._update_and_apply(ctx, grads, params, norm, None)
            if not skip and "lr" in hparams:
                ctx.metrics["lr"] = hparams["lr"]
        guard = dict(ctx.state.get("guard") or {"skipped_steps": 0, "consecutive": 0})
        if skip and ctx.streamed_updates is not None and ctx.streamed_updates():
            # A transform updated from the grads during backward (offload streaming):
            # the loss was finite on every rank, a grad was not. The step cannot be
            # undone, so it must not pass silently ([Note: a loss vote before streamed
            # updates]; a non-finite loss skips those updates and lands below).
            raise FloatingPointError(
                "a non-finite grad with a finite loss on some rank, but the optimizer already "
                "ran on the grads during backward (offload streams them to the host update), "
                "so the state holds this step's non-finite values. Load the last checkpoint; "
                "to make such steps skippable, keep the update after backward (train_step("
                "clip_norm=...) or offload(..., overlap=False))."
            )
        if skip:
            # No update ran: params and the optimizer state (its count, its schedule)
            # are those that came in; only the counters (and the fp16 loss scale) move.
            params = old_params
            guard["skipped_steps"] += 1
            if not any(expected):
                guard["consecutive"] += 1
            limit = self.max_nonfinite_skips
            if guarded and limit is not None and guard["consecutive"] >= limit:
                raise _guard.too_many_skips(guard["consecutive"], limit, ctx.loss_scale is not None)
        elif not late:
            guard["consecutive"] = 0
        if late:
            guard["pending"] = _guard.PendingVerdict.queue(
                voted, before, ctx.state, self.max_nonfinite_skips, ctx.loss_scale is not None
            )
        ctx.state["count"] = state["count"] + 1  # calls of the step, skipped ones included
        ctx.state["guard"] = guard
        if generation is not None:
            ctx.state["generation"] = generation.advance(params)
        ctx.metrics["loss"] = voted if self.mesh.size() > 1 else loss
        ctx.metrics["local_loss"] = loss
        known = (guarded or ctx.on_verdict) and not late
        ctx.metrics["nonfinite"] = skip if known else ~torch.isfinite(voted)
        ctx.metrics["skipped_steps"] = guard["skipped_steps"]
        ctx.metrics["comm_bytes"] = {op: s.bytes for op, s in traffic.ops.items()}
        ctx.metrics["comm_bytes_by_tag"] = {tag: s.bytes for tag, s in traffic.tags.items()}
        return params, ctx.state, ctx.metrics

    def _reads_late(self, params) -> bool:
        """Whether this call leaves its verdict to the next ([Note: reading the verdict
        a step late] in fscale/_guard.py)."""
        if self.nonfinite == "skip_now":
            return False
        if not self.skips_on_device():
            if self.nonfinite == "skip_late":
                raise ValueError(
                    "train_step(nonfinite='skip_late') needs an update that skips on the "
                    "device ([Note: skipping on the device]: adam/adamw, with every transform "
                    "replacing update/apply declaring SKIP_SAFE_UPDATE; this stack's "
                    f"{', '.join(self.unsafe_to_skip) or 'optimizer'} does not); use "
                    "nonfinite='skip'."
                )
            return False
        if self.nonfinite == "skip_late":
            return True
        return any(
            isinstance(t, torch.Tensor) and t.device.type != "cpu" for t in tree.leaves(params)
        )

    def _update_and_apply(self, ctx, grads, params, norm, voted):
        """Clip, ``update`` and ``apply``; with ``voted`` given, the optimizer skips on
        the device when it is non-finite. Returns the params and the reported hparams."""
        if norm is not None:
            clip_(grads, norm, self.clip_norm)
        flag = None if voted is None else ~torch.isfinite(voted)
        # Optimizer norms over leaves split across ranks sum their shards ([Note: norms of
        # sharded leaves]); a transform that re-lays the leaves says so inside its update.
        with schedules.reporting() as hparams, skipping(flag), sharded_as(leaf_shards(ctx, params)):
            params = self.stages.update(ctx, grads, params)
        params = self.stages.apply(ctx, params)
        return params, hparams


def _check_params(params: Params) -> None:
    if isinstance(params, torch.nn.Module):
        raise TypeError(
            "step.init got an nn.Module; pass its params: `params, apply = fs.functional(model)`."
        )
    leaves = tree.leaves(params)
    if not any(isinstance(t, torch.Tensor) for t in leaves):
        raise ValueError("step.init got no tensors; pass the params dict from fs.functional.")
    for path, leaf in zip(tree.paths(params), leaves, strict=True):
        if leaf is None:
            continue
        if not isinstance(leaf, torch.Tensor):
            raise TypeError(
                f"param {path!r} is a {type(leaf).__name__}; params must be tensors (or None)."
            )
        _guard.check_trainable(path, leaf)
        if not leaf.dtype.is_floating_point:
            raise TypeError(
                f"param {path!r} has dtype {leaf.dtype}; only floating tensors can be trained. "
                "Keep integer tensors as module buffers or freeze them (requires_grad=False)."
            )


def _check_stack(step: Step, record: Transform) -> None:
    inner = [t.name for t in step.transforms]
    if record.unique and record.name in inner:
        raise ValueError(
            f"{record.name} is applied twice; apply it once (use its options to change "
            "what it does)."
        )
    for earlier in step.transforms:
        fix = (
            record.conflicts.get(earlier.name)
            or record.refuses_inner.get(earlier.name)
            or earlier.conflicts.get(record.name)
            or earlier.refuses_outer.get(record.name)
        )
        if fix:
            raise ValueError(f"{record.name} cannot be applied over {earlier.name}: {fix}")
    for needed in record.requires:
        if needed not in inner:
            raise ValueError(
                f"{record.name} requires {needed} to be applied first (inside it), e.g. "
                f"{record.name}({needed}(step, ...), ...)."
            )


def train_step(
    loss_fn: Callable[..., Any],
    optimizer: GradientTransformation,
    *,
    accumulate: int = 1,
    clip_norm: float | None = None,
    has_aux: bool = False,
    mesh: Any = None,
    model: Any = None,
    units: Any = None,
    nonfinite: str = "skip",
    max_nonfinite_skips: int | None = 10,
    sync_init: str = "check",
) -> Step:
    """Build the plain step: grads of ``loss_fn``, data-parallel mean, ``optimizer``.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar`` (or ``(scalar, dict)`` with ``has_aux``).
      optimizer: a ``GradientTransformation`` from ``fs.optim``.
      accumulate: split each batch into this many micro-batches along dim 0 and
        average their grads (equals one batch that many times larger).
      clip_norm: clip the reduced grads to this global 2-norm (``clip_grad_norm_``).
      has_aux: ``loss_fn`` returns ``(loss, metrics)``; the metrics are returned too.
      mesh: the data-parallel mesh (a ``DeviceMesh`` or sub-mesh; default: the whole
        world as one dim). Grads are averaged over every dim of it.
      model: the ``nn.Module`` (or ``fs.functional``'s apply) the loss runs, so the
        step knows its units and transforms can wrap them (checkpoint_activations).
      units: which modules are units (``fscale.units.find_units``'s policy): default
        the children of the first ``ModuleList``. Needs ``model``.
      nonfinite: ``"skip"``: a step whose loss or grads are inf/nan on any rank changes
        nothing on any rank (``metrics["nonfinite"]``, ``metrics["skipped_steps"]``);
        on an accelerator, where the whole update skips on the device, the verdict is
        read during the next call (``metrics["nonfinite"]`` is then a device bool and
        the counters lag one call); otherwise one host read per call. ``"skip_now"``:
        always read in the call; ``"skip_late"``: always read a call late. ``"off"``:
        no skip and no host read ([Note: the non-finite guard] and [Note: reading the
        verdict a step late] in ``fscale/_guard.py``).
      max_nonfinite_skips: raise ``FloatingPointError`` after this many skipped steps in
        a row (None: never). fp16 overflows count only at the loss scale's floor.
      sync_init: ``"check"``: ``step.init`` raises if ranks hold different params;
        ``"broadcast"``: it copies rank 0's params to every rank (as DDP); ``"off"``.

    Returns:
      A ``Step``; ``params, state = step.init(params)``, then
      ``params, state, metrics = step(params, state, batch)``.
    """
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}.")
    if not isinstance(optimizer, GradientTransformation):
        raise TypeError(
            f"optimizer must be a GradientTransformation (e.g. fs.optim.adamw(lr=3e-4)), got "
            f"{type(optimizer).__name__}; torch.optim optimizers are stateful and cannot be used."
        )
    if not isinstance(accumulate, int) or accumulate < 1:
        raise ValueError(f"accumulate must be a positive int, got {accumulate!r}.")
    if clip_norm is not None and not clip_norm > 0:
        raise ValueError(f"clip_norm must be > 0 (or None to disable), got {clip_norm!r}.")
    if nonfinite not in _guard.NONFINITE_MODES:
        raise ValueError(f"nonfinite must be one of {_guard.NONFINITE_MODES}, got {nonfinite!r}.")
    if max_nonfinite_skips is not None and (
        isinstance(max_nonfinite_skips, bool)
        or not isinstance(max_nonfinite_skips, int)
        or max_nonfinite_skips < 1
    ):
        raise ValueError(
            f"max_nonfinite_skips must be an int >= 1 (or None: never raise), got "
            f"{max_nonfinite_skips!r}."
        )
    if sync_init not in _guard.SYNC_INIT_MODES:
        raise ValueError(f"sync_init must be one of {_guard.SYNC_INIT_MODES}, got {sync_init!r}.")
    if units is not None and model is None:
        raise ValueError(
            "train_step(units=...) names modules of the model, but no model was given; pass "
            "model=model (or model=apply from fs.functional) too."
        )
    return Step(
        loss_fn=loss_fn,
        optimizer=optimizer,
        accumulate=accumulate,
        clip_norm=clip_norm,
        has_aux=has_aux,
        mesh=meshes.resolve(mesh),
        units=None if model is None else find_units(model, units),
        nonfinite=nonfinite,
        max_nonfinite_skips=max_nonfinite_skips,
        sync_init=sync_init,
    )

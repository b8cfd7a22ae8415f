"""Random transform stacks: every legal one equals the reference, every illegal one fails to build.

Hypothesis draws stacks from {mixed_precision bf16/fp16, shard_zero 1/2/3 on a 1-D mesh
or a (2, 2) ("replicate", "shard") mesh, offload cpu/nvme, checkpoint_activations (when
fscale has it)} in random orders, with accumulate 1/2 and clip_norm None/1.0, on gloo
worlds of 2 and 4. Each drawn stack is built here first: an illegal order must raise
``ValueError`` at build time, naming both transforms. The legal ones are collected and
then trained together, one ``run_world`` per world size (a world per example would cost
seconds each), and compared with references computed in this process:

- fp32 stacks: the plain single-process step on the same global batch;
- bf16/fp16 stacks: the world-of-one step with the same ``mixed_precision`` on the same
  micro-batch split (``accumulate * world`` micro-batches: each micro-batch's grads are
  rounded to the compute dtype once, as on each rank). The maths is then the same and
  the results agree to fp32 rounding, as in ``tests/transforms/test_precision.py``. With
  another split the roundings differ, and on a GPT Adam turns them into full-size steps
  on near-zero grads (measured 3e-2 to 2e-1 max relative error after 3 steps): no bound
  there would catch a bug.
"""

from __future__ import annotations

import copy
import functools
import os

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import fscale as fs
from fscale.models.gpt import GPT, GPTConfig
from tests.dist import run_world
from tests.helpers import lm_batches, lm_loss, max_rel_error

STEPS = 3
GLOBAL_BATCH = 8  # world 4 x accumulate 2: one sequence per micro-batch
SEQ = 6
# Uneven everywhere: vocab 37 and d_model 10 split into padded rows over 2 and 4 ranks.
CFG = GPTConfig(vocab_size=37, n_layer=2, n_head=2, d_model=10, seq_len=SEQ)
# Untied, no biases: ZeRO-3 gathers a tied unit twice (its two grad contributions then
# sum in another order), and a qkv bias's key part has an exactly-zero true gradient
# that Adam turns into full-size steps of rounding noise (see tests/transforms/test_zero.py).
CFG = CFG.replace(tie_embeddings=False, bias=False)
FP16 = {"init_scale": 1024.0}  # no overflow in the first steps (test_precision.py's _FP16)

# Tolerances (max_rel_error over params): shard_zero's 1e-5 against the plain step
# (measured <= 6e-6: the reduction order under Adam); mixed precision against the same
# maths, the reference's 1e-5 too (measured: bf16 exact, fp16 <= 3e-7).
FP32_TOL = 1e-5
SAME_SPLIT_TOL = 1e-5
EXAMPLES = 30

checkpoint_activations = getattr(fs, "checkpoint_activations", None)
KINDS = ("mixed_precision", "shard_zero", "offload") + (
    ("checkpoint_activations",) if checkpoint_activations is not None else ()
)


# ----------------------------------------------------------------------------- stacks
# A stack is plain picklable data: (world, accumulate, clip_norm, layers), layers
# innermost first, each (name, options).


def _legal_over(outer: str, inner: str) -> bool:
    """Whether ``outer`` may be applied over ``inner`` (DESIGN: mixed_precision inside
    shard_zero, offload last, i.e. over both)."""
    if (outer, inner) == ("mixed_precision", "shard_zero"):
        return False
    return not (inner == "offload" and outer in ("shard_zero", "mixed_precision"))


def _first_violation(layers) -> tuple[str, str] | None:
    """(outer, inner) of the first application the order rules refuse, or None."""
    names = [name for name, _ in layers]
    for i, outer in enumerate(names):
        for inner in names[:i]:
            if not _legal_over(outer, inner):
                return outer, inner
    return None


@st.composite
def stacks(draw):
    world = draw(st.sampled_from([2, 4]))
    order = draw(st.permutations(KINDS))
    names = order[: draw(st.integers(1, len(KINDS)))]
    layers = []
    for name in names:
        if name == "mixed_precision":
            dtype = draw(st.sampled_from(["bf16", "fp16"]))
            layers.append((name, {"dtype": dtype, **(FP16 if dtype == "fp16" else {})}))
        elif name == "shard_zero":
            mesh = draw(st.sampled_from(["1d", "2d"] if world == 4 else ["1d"]))
            layers.append((name, {"stage": draw(st.sampled_from([1, 2, 3])), "mesh": mesh}))
        elif name == "offload":
            layers.append((name, {"tier": draw(st.sampled_from(["cpu", "nvme"]))}))
        else:
            layers.append((name, {"policy": draw(st.sampled_from(["unit", "selective"]))}))
    accumulate = draw(st.sampled_from([1, 2]))
    clip = draw(st.sampled_from([None, 1.0]))
    return world, accumulate, clip, tuple(layers)


def _model():
    torch.manual_seed(11)
    return GPT(CFG)


def _build(stack, path, mesh2d=None):
    """The step of ``stack`` (raises as its transforms do) and the model's params."""
    world, accumulate, clip, layers = stack
    model = _model()
    params, apply = fs.functional(copy.deepcopy(model))
    step = fs.train_step(
        lm_loss(apply),
        fs.optim.adamw(lr=1e-2, weight_decay=0.1),
        accumulate=accumulate,
        clip_norm=clip,
        model=apply,
    )
    for name, opts in layers:
        opts = dict(opts)
        if name == "mixed_precision":
            step = fs.mixed_precision(step, opts.pop("dtype"), **opts)
        elif name == "shard_zero":
            mesh = mesh2d if opts.pop("mesh") == "2d" else None
            step = fs.shard_zero(step, opts.pop("stage"), mesh=mesh)
        elif name == "offload":
            tier = opts.pop("tier")
            kw = {"path": path} if tier == "nvme" else {}
            step = fs.offload(step, tier, subgroup_mb=2e-3, **kw)
        else:
            step = checkpoint_activations(step, **opts)
    return step, params


def _train(stack, rank, path, mesh2d=None, threads_of_one=False):
    """Full fp32 params after STEPS AdamW steps of ``stack`` on this rank's slice."""
    world = stack[0]
    step, params = _build(stack, path, mesh2d)
    params, state = step.init(params)
    per = GLOBAL_BATCH // world
    for batch in _batches():
        local = {k: v[rank * per : (rank + 1) * per] for k, v in batch.items()}
        params, state, _ = step(params, state, local)
    full = {k: v.detach().clone() for k, v in fs.gather_params(params, state).items()}
    if hasattr(state.get("offload"), "close"):
        state["offload"].close()
    return full


@functools.cache
def _batches():
    return lm_batches(STEPS, GLOBAL_BATCH, SEQ, vocab=CFG.vocab_size, seed=3)


def _world_fn(rank, world, stacks_, path):
    mesh2d = None
    if world == 4:
        from torch.distributed.device_mesh import init_device_mesh

        mesh2d = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    return [_train(s, rank, path, mesh2d) for s in stacks_]


# ----------------------------------------------------------------------------- references


@functools.cache
def _reference(clip, accumulate, precision):
    """Params of the world-of-one step with no transform but ``precision`` (a frozen
    ``(name, options)`` or None), on the whole global batch."""
    # Ranks run one thread; the matmul summation order (hence bf16 roundings) follows it.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        layers = () if precision is None else ((precision[0], dict(precision[1])),)
        return _train((1, accumulate, clip, layers), 0, None)
    finally:
        torch.set_num_threads(threads)


def _expected(stack):
    """The reference params of ``stack`` and the tolerance it is held to."""
    world, accumulate, clip, layers = stack
    mp = next(((n, tuple(sorted(o.items()))) for n, o in layers if n == "mixed_precision"), None)
    if mp is None:
        return _reference(clip, 1, None), FP32_TOL
    return _reference(clip, accumulate * world, mp), SAME_SPLIT_TOL


def _show(stack) -> str:
    world, accumulate, clip, layers = stack
    text = "step"
    for name, opts in layers:
        args = ", ".join(f"{k}={v!r}" for k, v in opts.items() if k != "init_scale")
        text = f"{name}({text}, {args})"
    return f"world {world}, accumulate {accumulate}, clip_norm {clip}: {text}"


# ----------------------------------------------------------------------------- the test

# The stack of DESIGN.md section 1 (less checkpoint_activations when fscale lacks it),
# always among the examples: HSDP stage 3 over bf16, offloaded to NVMe.
_DESIGN_STACK = (
    4,
    2,
    1.0,
    (
        ("mixed_precision", {"dtype": "bf16"}),
        *((("checkpoint_activations", {"policy": "selective"}),) if checkpoint_activations else ()),
        ("shard_zero", {"stage": 3, "mesh": "2d"}),
        ("offload", {"tier": "nvme"}),
    ),
)


# ZeRO-2 over fp16 (loss scaling) offloaded to the host, with accumulation and clipping.
_FP16_STACK = (
    2,
    2,
    1.0,
    (
        ("mixed_precision", {"dtype": "fp16", **FP16}),
        ("shard_zero", {"stage": 2, "mesh": "1d"}),
        ("offload", {"tier": "cpu"}),
    ),
)


def test_random_stacks_equal_the_reference_or_fail_to_build(tmp_path):
    path = str(tmp_path)
    legal, illegal = [], []

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None)
    @example(_DESIGN_STACK)
    @example(_FP16_STACK)
    @given(stacks())
    def build(stack):
        # Built in this world of one (the 2-D mesh is a 1-D one here): legality
        # depends on the order of the transforms, not on the world.
        violation = _first_violation(stack[3])
        if violation is None:
            _build(stack, path)
            if stack not in legal:
                legal.append(stack)
            return
        outer, inner = violation
        with pytest.raises(ValueError) as info:
            _build(stack, path)
        message = str(info.value)
        assert outer in message and inner in message, (_show(stack), message)
        illegal.append(stack)

    build()
    assert illegal, "no illegal stack drawn"
    failures = []
    for world in (2, 4):
        group = [s for s in legal if s[0] == world]
        assert group, f"no legal stack drawn for world {world}"
        results = run_world(_world_fn, world, group, path)
        for rank, per_stack in enumerate(results):
            for stack, got in zip(group, per_stack, strict=True):
                want, tol = _expected(stack)
                err = max_rel_error(got, want)
                if not err <= tol or any(t.dtype != torch.float32 for t in got.values()):
                    failures.append(f"rank {rank}, {_show(stack)}: {err:.2e} > {tol:.0e}")
    assert not failures, "\n".join(failures)
    assert os.listdir(path) == []  # every swap file removed at close

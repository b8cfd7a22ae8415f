"""checkpoint_activations: exactly the unchecked step in every stack; fewer saved bytes, counted."""

from __future__ import annotations

import functools
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import CheckpointPolicy

import fscale as fs
from fscale.models.gpt import GPT, Block, GPTConfig
from fscale.transforms import checkpoint
from tests.dist import run_world
from tests.helpers import lm_batches, lm_loss, mlp, regression_loss

STEPS = 3
GLOBAL_BATCH = 4
SEQ = 16
# Dropout everywhere (embeddings, attention, residuals): the recompute must draw the
# same masks as the forward, or the grads differ.
CFG = GPTConfig.tiny(n_layer=3, dropout=0.1)
CK = "checkpoint_activations"
aten = torch.ops.aten


def _build(layers):
    """The step of ``layers`` (innermost first) and its params, cloned from the module.

    The module's own weights are zeroed after the clone: a recompute that ran on them
    instead of the step's params ([Note: recompute under functional params]) would
    give other grads.
    """
    torch.manual_seed(5)
    model = GPT(CFG).train()
    params, apply = fs.functional(model)
    params = {k: v.clone() for k, v in params.items()}
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    opt = fs.optim.adamw(lr=1e-2, weight_decay=0.1, mask=fs.optim.decay_mask_default)
    step = fs.train_step(lm_loss(apply), opt, model=apply)
    for name, opts in layers:
        opts = dict(opts)
        if name == CK:
            step = fs.checkpoint_activations(step, **opts)
        elif name == "mixed_precision":
            step = fs.mixed_precision(step, opts.pop("dtype"), **opts)
        elif name == "shard_zero":
            step = fs.shard_zero(step, opts.pop("stage"), **opts)
        else:
            step = fs.offload(step, opts.pop("tier"), subgroup_mb=2e-3, **opts)
    return step, params, model


def _train(layers, rank=0, world=1):
    """Full params, last metrics and ZeRO-3's recorded unit order after STEPS steps."""
    step, params, model = _build(layers)
    params, state = step.init(params)
    torch.manual_seed(100 + rank)  # the dropout masks: per rank, the same with or without ck
    per = GLOBAL_BATCH // world
    for batch in lm_batches(STEPS, GLOBAL_BATCH, SEQ, vocab=CFG.vocab_size, seed=3):
        local = {k: v[rank * per : (rank + 1) * per] for k, v in batch.items()}
        params, state, metrics = step(params, state, local)
    full = {k: v.detach().clone() for k, v in fs.gather_params(params, state).items()}
    order = state.get("shard_zero", {}).get("order")
    if hasattr(state.get("offload"), "close"):
        state["offload"].close()
    # The hook put the module's own tensors back (they were zeroed in _build).
    assert all(not p.any() for p in model.parameters())
    return full, metrics, order


def _without_ck(layers):
    return tuple((n, o) for n, o in layers if n != CK)


def _assert_equal(got: dict, want: dict, what) -> None:
    assert got.keys() == want.keys()
    bad = [k for k in want if not torch.equal(got[k], want[k])]
    assert not bad, f"{what}: {bad[:3]} differ"


# ----------------------------------------------------------------------------- world of one


@pytest.mark.parametrize("policy", ["unit", "selective"])
def test_equals_no_checkpointing_exactly(policy):
    want, _, _ = _train(())
    got, _, _ = _train(((CK, (("policy", policy),)),))
    _assert_equal(got, want, policy)


def test_default_policy_is_unit_and_explain_says_so():
    step, params, _ = _build(((CK, ()),))
    assert step.applied(CK).options == {"policy": "unit"}
    assert "checkpoint_activations(unit)" in fs.explain(step, params)


# ----------------------------------------------------------------------------- stacks, world 2

Z3 = ("shard_zero", (("stage", 3),))
BF16 = ("mixed_precision", (("dtype", "bf16"),))
FP16 = ("mixed_precision", (("dtype", "fp16"), ("init_scale", 1024.0)))
UNIT = (CK, (("policy", "unit"),))
SELECTIVE = (CK, (("policy", "selective"),))
OFFLOAD = ("offload", (("tier", "cpu"),))

# Layers (name, options as pairs), innermost first; each stack is compared with the
# same stack without checkpoint_activations.
STACKS = (
    (Z3, UNIT),  # over shard_zero
    (SELECTIVE, Z3),  # under it
    (BF16, UNIT, Z3),
    (BF16, Z3, SELECTIVE),
    (FP16, ("shard_zero", (("stage", 1),)), UNIT),
    (SELECTIVE, ("shard_zero", (("stage", 2),)), OFFLOAD),
    (BF16, ("shard_zero", (("stage", 3), ("prefetch", 0))), OFFLOAD, UNIT),  # over offload
    (UNIT, ("shard_zero", (("stage", 3), ("prefetch", 2)))),
)


def _show(stack) -> str:
    return " > ".join(f"{n}({','.join(str(v) for _, v in o)})" for n, o in stack)


def _stacks_fn(rank, world, stacks):
    runs = {s: _train(s, rank, world) for s in {*stacks, *map(_without_ck, stacks)}}
    return {s: (params, _zero3_metrics(m), order) for s, (params, m, order) in runs.items()}


def _zero3_metrics(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k.startswith("zero3_peak")}


@functools.cache
def _stack_results():
    return run_world(_stacks_fn, 2, STACKS)


@pytest.mark.parametrize("stack", STACKS, ids=_show)
def test_stacks_equal_the_same_stack_without_checkpointing_exactly(stack):
    for rank, results in enumerate(_stack_results()):
        got, _, order = results[stack]
        want, _, want_order = results[_without_ck(stack)]
        _assert_equal(got, want, f"rank {rank}")
        # Recomputes gather on ZeRO-3's backward path: the forward's order is its own.
        assert order == want_order


def _largest_unit_bytes(dtype_bytes: int) -> int:
    params, _ = fs.functional(GPT(CFG))
    units: dict[str, int] = {}
    for name, t in params.items():
        key = ".".join(name.split(".")[:2]) if name.startswith("blocks.") else ""
        units[key] = units.get(key, 0) + t.numel() * dtype_bytes
    return max(units.values())


def _zero3_options(stack) -> dict | None:
    opts = dict(next((o for n, o in stack if n == "shard_zero"), ()))
    return opts if opts.get("stage") == 3 else None


@pytest.mark.parametrize("stack", [s for s in STACKS if _zero3_options(s)], ids=_show)
def test_zero3_under_checkpointing_holds_one_unit_plus_prefetch(stack):
    prefetch = _zero3_options(stack).get("prefetch", 1)
    unit = _largest_unit_bytes(2 if BF16 in stack else 4)
    for results in _stack_results():
        _, metrics, _ = results[stack]
        # As test_zero.py's bound ([Note: ZeRO-3 lifetime]): the unit in use, plus
        # the all-gathers in flight and one being copied out. Gathered in a recompute
        # while the previous backward unit is still held, the peak would be 2 units.
        assert metrics["zero3_peak_gathered_params_bytes"] <= unit, metrics
        assert metrics["zero3_peak_gathered_total_bytes"] <= (2 + prefetch) * unit * 1.05, metrics


# ----------------------------------------------------------------------------- saved bytes


class _ActivationBytes(TorchDispatchMode):
    """Live bytes of the tensors that forward ops (and recomputes) created, and the peak.

    Counted: outputs of ops run with grad enabled (the step's forward and checkpoint's
    recompute; run the step under ``torch.no_grad()`` so that backward's ops and the
    optimizer's are not). An output aliasing an input (a view, an in-place op) is not
    new memory. Each storage leaves the count when it is freed.
    """

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._ptrs: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if torch.is_grad_enabled():
            tensors = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
            inputs = {t.untyped_storage().data_ptr() for t in tensors}
            for t in pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    self._count(t.untyped_storage(), inputs)
        return out

    def _count(self, storage, inputs: set[int]) -> None:
        ptr, n = storage.data_ptr(), storage.nbytes()
        if n == 0 or ptr in inputs or ptr in self._ptrs:
            return
        self._ptrs.add(ptr)
        self.live += n
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, ptr, n)

    def _free(self, ptr: int, n: int) -> None:
        self._ptrs.discard(ptr)
        self.live -= n


SAVED_CFG = GPTConfig.tiny(n_layer=4, seq_len=32, dropout=0.1)
SAVED_BATCH = 4


def _saved_bytes(policy):
    """(bytes held for backward when the loss is made, peak of them during backward)."""
    torch.manual_seed(5)
    params, apply = fs.functional(GPT(SAVED_CFG))
    seen = {}

    def loss_fn(p, batch):
        logits = apply(p, batch["x"])
        loss = F.cross_entropy(logits.flatten(0, 1), batch["y"].flatten())
        seen["saved"] = tally.live
        tally.peak = tally.live  # from here on: backward
        return loss

    step = fs.train_step(loss_fn, fs.optim.adamw(1e-2), model=apply)
    if policy is not None:
        step = fs.checkpoint_activations(step, policy=policy)
    params, state = step.init(params)
    batch = lm_batches(1, SAVED_BATCH, SAVED_CFG.seq_len, vocab=SAVED_CFG.vocab_size)[0]
    tally = _ActivationBytes()
    with torch.no_grad(), tally:
        step(params, state, batch)
    return seen["saved"], tally.peak


def _one_block_bytes() -> int:
    """What one Block keeps for backward (and its output), run alone without checkpointing."""
    torch.manual_seed(5)
    block = Block(SAVED_CFG).train()
    x = torch.randn(SAVED_BATCH, SAVED_CFG.seq_len, SAVED_CFG.d_model, requires_grad=True)
    tally = _ActivationBytes()
    with tally:
        y = block(x)
    assert y.requires_grad
    return tally.live


def test_saved_activation_bytes_unit_below_selective_below_none():
    none, none_peak = _saved_bytes(None)
    selective, _ = _saved_bytes("selective")
    unit, unit_peak = _saved_bytes("unit")
    assert unit < selective < none, (unit, selective, none)
    # Analytic: without checkpointing each of the L blocks keeps what one block alone
    # keeps; the rest (embeddings, head, loss) is the same under every policy. "unit"
    # keeps only each block's input (its output is the next block's input) and, in
    # backward, one block's activations on top while it is recomputed.
    layers, block = SAVED_CFG.n_layer, _one_block_bytes()
    x = SAVED_BATCH * SAVED_CFG.seq_len * SAVED_CFG.d_model * 4
    rest = none - layers * block
    assert 0 < rest < block, (none, block)
    assert unit <= rest + layers * x, (unit, rest, x)
    assert unit_peak <= rest + layers * x + block, (unit_peak, rest, x, block)
    # The bound must be able to fail: without checkpointing, backward starts above it.
    assert none_peak > rest + layers * x + block


# ----------------------------------------------------------------------------- bad input


def test_without_a_model_names_the_fix():
    params, apply = fs.functional(GPT(CFG))
    step = fs.train_step(lm_loss(apply), fs.optim.sgd(0.1))
    with pytest.raises(ValueError, match=r"checkpoint_activations wraps the model's units.*model="):
        fs.checkpoint_activations(step)


def test_a_model_without_units_names_the_fix():
    params, apply = fs.functional(mlp([3, 4, 2]))  # a Sequential: no ModuleList
    step = fs.train_step(regression_loss(apply), fs.optim.sgd(0.1), model=apply)
    with pytest.raises(ValueError, match=r"checkpoint_activations .* has none.*units="):
        fs.checkpoint_activations(step)


def test_selective_policy_keeps_matmuls_and_attention_without_dropout():
    keep, again = CheckpointPolicy.MUST_SAVE, CheckpointPolicy.PREFER_RECOMPUTE
    policy = functools.partial(checkpoint._keep_matmuls, None)
    a, q = torch.ones(2, 2), torch.ones(1, 1, 2, 2)
    assert policy(aten.mm.default, a, a) == keep
    assert policy(aten.addmm.default, a, a, a) == keep
    assert policy(aten.mm.out, a, a, out=a) == again  # writes into a tensor it was given
    assert policy(aten.gelu.default, a) == again
    assert policy(aten.native_dropout.default, a, 0.1, True) == again
    # [Note: random ops under selective checkpointing]: attention that draws dropout
    # masks (the CUDA kernels; on CPU dropout takes the decomposed math path) is
    # recomputed, or the dropouts after it would draw other masks.
    flash = aten._scaled_dot_product_flash_attention.default
    assert policy(flash, q, q, q) == keep
    assert policy(flash, q, q, q, 0.0, True) == keep
    assert policy(flash, q, q, q, 0.1, True) == again
    efficient = aten._scaled_dot_product_efficient_attention.default
    assert policy(efficient, q, q, q, None, True, 0.1) == again
    assert policy(efficient, q, q, q, None, True, dropout_p=0.0) == keep
    assert policy(aten._scaled_dot_product_flash_attention_for_cpu.default, q, q, q) == keep


@pytest.mark.parametrize("policy", ["full", "Unit", None])
def test_unknown_policy(policy):
    params, apply = fs.functional(GPT(CFG))
    step = fs.train_step(lm_loss(apply), fs.optim.sgd(0.1), model=apply)
    with pytest.raises(ValueError, match=r"unknown policy .*'unit'.*'selective'"):
        fs.checkpoint_activations(step, policy=policy)


def test_applied_twice():
    step, _, _ = _build((UNIT,))
    with pytest.raises(ValueError, match="checkpoint_activations is applied twice"):
        fs.checkpoint_activations(step, policy="selective")

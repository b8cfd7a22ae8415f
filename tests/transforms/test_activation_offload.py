"""checkpoint_activations(offload="cpu"): exactly the plain step in every stack; bytes counted."""

from __future__ import annotations

import contextlib
import functools
from collections import defaultdict

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import _VersionWrapper

import fscale as fs
from fscale.models.gpt import GPT, GPTConfig
from fscale.transforms import _checkpoint_offload
from fscale.transforms.checkpoint import MIN_OFFLOAD_BYTES
from tests.helpers import lm_batches, lm_loss

STEPS = 3
BATCH = 4
SEQ = 16
CFG = GPTConfig.tiny(n_layer=3, dropout=0.1)  # dropout: the recompute must draw the same masks
CK = "checkpoint_activations"


def _build(layers, *, accumulate=1, loss=None):
    """The step of ``layers`` (innermost first: (name, options) pairs) and its params."""
    torch.manual_seed(5)
    model = GPT(CFG).train()
    params, apply = fs.functional(model)
    params = {k: v.clone() for k, v in params.items()}
    opt = fs.optim.adamw(lr=1e-2, weight_decay=0.1, mask=fs.optim.decay_mask_default)
    loss_fn = (loss or lm_loss)(apply)
    step = fs.train_step(loss_fn, opt, model=apply, accumulate=accumulate)
    for name, opts in layers:
        opts = dict(opts)
        if name == CK:
            step = fs.checkpoint_activations(step, **opts)
        elif name == "mixed_precision":
            step = fs.mixed_precision(step, "bf16")
        elif name == "offload":
            step = fs.offload(step, "cpu", subgroup_mb=2e-3)
        else:
            step = fs.shard_zero(step, opts["stage"])
    return step, params


@functools.cache
def _train(layers, accumulate=1):
    """Full params and the last metrics after STEPS AdamW steps (cached: references repeat)."""
    step, params = _build(layers, accumulate=accumulate)
    params, state = step.init(params)
    torch.manual_seed(100)  # the dropout masks
    for batch in lm_batches(STEPS, BATCH, SEQ, vocab=CFG.vocab_size, seed=3):
        params, state, metrics = step(params, state, batch)
    full = {k: v.detach().clone() for k, v in fs.gather_params(params, state).items()}
    if hasattr(state.get("offload"), "close"):
        state["offload"].close()
    return full, metrics


def _ck(policy, offload="cpu", min_offload_bytes=0):
    opts = (("policy", policy),)
    if offload is not None:
        opts += (("offload", offload), ("min_offload_bytes", min_offload_bytes))
    return (CK, opts)


def _assert_equal(got: dict, want: dict, what) -> None:
    assert got.keys() == want.keys()
    bad = [k for k in want if not torch.equal(got[k], want[k])]
    assert not bad, f"{what}: {bad[:3]} differ"


BF16 = ("mixed_precision", ())
Z1, Z2, Z3 = (("shard_zero", (("stage", s),)) for s in (1, 2, 3))


# ----------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("policy", ["unit", "selective", "none"])
def test_equals_the_plain_step_exactly(policy):
    want, _ = _train(())
    got, metrics = _train((_ck(policy),))
    _assert_equal(got, want, policy)
    assert metrics["activation_offload_bytes"] > 0
    # On CPU every group is copied back: as many bytes come back as went out.
    assert metrics["activation_reload_bytes"] == metrics["activation_offload_bytes"]


# Layers innermost first; each run is compared with the plain step of the same
# stack without checkpoint_activations.
STACKS = (
    (BF16, _ck("unit")),
    (BF16, _ck("selective")),
    (BF16, _ck("none")),
    (Z3, _ck("unit")),  # over shard_zero(3)
    (_ck("selective"), Z3),  # under it
    (_ck("none"), Z3),
    (BF16, Z3, _ck("selective")),
    (BF16, _ck("none"), Z3),
    (BF16, Z1, _ck("unit")),
    (_ck("selective"), Z2),
    (_ck("unit"), BF16),  # under mixed_precision
    (BF16, Z3, ("offload", ()), _ck("unit")),  # over the optimizer's offload
    (_ck("none"), Z2, ("offload", ())),
)


def _show(stack) -> str:
    return " > ".join(f"{n}({','.join(str(v) for _, v in o)})" for n, o in stack)


def _without_ck(layers):
    return tuple(layer for layer in layers if layer[0] != CK)


@pytest.mark.parametrize("stack", STACKS, ids=_show)
def test_stacks_equal_the_same_stack_without_checkpointing(stack):
    want, _ = _train(_without_ck(stack))
    got, metrics = _train(stack)
    _assert_equal(got, want, _show(stack))
    assert metrics["activation_offload_bytes"] > 0


@pytest.mark.parametrize("stack", [(), (BF16, Z3)], ids=_show)
@pytest.mark.parametrize("policy", ["unit", "selective"])
def test_accumulate_two(stack, policy):
    want, _ = _train(stack, accumulate=2)
    got, metrics = _train((*stack, _ck(policy)), accumulate=2)
    _assert_equal(got, want, policy)
    # Summed over the two micro-batches (half the batch each): the bytes of one batch.
    _, whole = _train((*stack, _ck(policy)))
    assert metrics["activation_offload_bytes"] == whole["activation_offload_bytes"]


def test_default_keeps_small_tensors_on_the_device():
    want, _ = _train(())
    got, metrics = _train((_ck("none", min_offload_bytes=MIN_OFFLOAD_BYTES),))
    _assert_equal(got, want, "none, default min_offload_bytes")
    assert metrics["activation_offload_bytes"] == 0  # the tiny GPT's tensors are < 1 MiB


# ----------------------------------------------------------------------------- what moves


@pytest.mark.parametrize("stack", [(), (BF16,), (Z3,), (BF16, Z3)], ids=_show)
def test_unit_offloads_exactly_the_units_inputs(stack):
    """Under "unit" a unit saves only its input: any weight offloaded would add bytes."""
    _, metrics = _train((*stack, _ck("unit")))
    per_step = CFG.n_layer * BATCH * SEQ * CFG.d_model * (2 if BF16 in stack else 4)
    assert metrics["activation_offload_bytes"] == per_step


def test_zero3_weights_stay_with_zero3():
    """ZeRO-3's hooks pack its gathered weights into tokens: ours only see activations."""
    for dtype in ((), (BF16,)):
        plain = _train((*dtype, _ck("none")))[1]["activation_offload_bytes"]
        zero3 = _train((*dtype, Z3, _ck("none")))[1]["activation_offload_bytes"]
        assert plain == zero3


@pytest.mark.parametrize("stack", [(), (BF16,)], ids=_show)
@pytest.mark.parametrize("policy", ["none", "selective"])
def test_params_and_their_casts_are_never_offloaded(monkeypatch, stack, policy):
    moved: list[int] = []
    to_host = _checkpoint_offload.Offloader._to_host

    def spy(self, group, t):
        moved.append(t.untyped_storage().data_ptr())
        return to_host(self, group, t)

    monkeypatch.setattr(_checkpoint_offload.Offloader, "_to_host", spy)
    params_seen: set[int] = set()

    def loss(apply):
        def loss_fn(p, batch):
            # The params the loss sees: the leaves, or mixed precision's casts.
            params_seen.update(t.untyped_storage().data_ptr() for t in p.values())
            logits = apply(p, batch["x"])
            out = F.cross_entropy(logits.flatten(0, 1), batch["y"].flatten())
            assert moved and not params_seen & set(moved)  # checked while all are alive
            return out

        return loss_fn

    step, params = _build((*stack, _ck(policy)), loss=loss)
    params, state = step.init(params)
    batch = lm_batches(1, BATCH, SEQ, vocab=CFG.vocab_size)[0]
    _, _, metrics = step(params, state, batch)
    assert metrics["activation_offload_bytes"] > 0


# ----------------------------------------------------------------------------- the engine


def test_outer_hooks_pack_first_and_unpack_last():
    """An outer hook's own packing (ZeRO-3's tokens) is left alone; leaves never move."""
    log = []
    w = torch.randn(64, 64, requires_grad=True)
    x = torch.randn(8, 64, requires_grad=True)

    def outer_pack(t):
        log.append(("pack", tuple(t.shape)))
        return ("token", t) if t is w else t

    def outer_unpack(p):
        log.append(("unpack", type(p).__name__))
        return p[1] if isinstance(p, tuple) else p

    offloader = _checkpoint_offload.Offloader(0)
    with torch.autograd.graph.saved_tensors_hooks(outer_pack, outer_unpack):
        with offloader.unit(()):
            y = (x.tanh() @ w).sum()
    y.backward()
    offloader.finish()
    xr, wr = x.detach().requires_grad_(), w.detach().requires_grad_()
    want_x, want_w = torch.autograd.grad((xr.tanh() @ wr).sum(), [xr, wr])
    assert torch.equal(x.grad, want_x) and torch.equal(w.grad, want_w)
    assert ("pack", (64, 64)) in log
    # tanh's output (saved by tanh and by mm) moved once: one storage, one copy.
    assert offloader.bytes_to_host == 8 * 64 * 4
    assert offloader.tensors == 2


def test_a_second_backward_sees_the_same_values():
    offloader = _checkpoint_offload.Offloader(0)
    x = torch.randn(16, 16, requires_grad=True)
    with offloader.unit(()):
        y = x.sin().exp().sum()
    (g1,) = torch.autograd.grad(y, x, retain_graph=True)
    (g2,) = torch.autograd.grad(y, x)
    offloader.finish()
    assert torch.equal(g1, g2)
    assert torch.equal(g1, x.cos() * x.sin().exp())


class _Mode:
    storage = None


@pytest.mark.parametrize("kind", [list, dict])
def test_selective_cache_either_form_is_offloaded(kind):
    """torch up to 2.12 keeps a list per op (append / pop(0)), 2.13 a dict (by index)."""
    forward_mode, recompute_mode = _Mode(), _Mode()
    forward_mode.storage = recompute_mode.storage = defaultdict(kind)
    offloader = _checkpoint_offload.Offloader(0)
    t = torch.randn(8, 8)
    with offloader.unit(()) as group:
        fwd, rec = _checkpoint_offload.offloading_contexts(
            offloader, group, lambda: (forward_mode, recompute_mode)
        )
        entry = [_VersionWrapper(t), 3]
        if kind is list:
            fwd.storage["op"].append(entry)
        else:
            fwd.storage["op"][0] = entry
    kept = rec.storage["op"].pop(0) if kind is list else rec.storage["op"][0]
    assert kept[1] == 3
    val = kept[0].get_val(False)
    assert torch.equal(val, t) and val.data_ptr() != t.data_ptr()
    assert offloader.bytes_to_host == offloader.bytes_to_device == t.numel() * 4


def test_an_unknown_selective_cache_names_the_fix():
    forward_mode, recompute_mode = _Mode(), _Mode()
    forward_mode.storage = recompute_mode.storage = {}
    with pytest.raises(NotImplementedError, match="use policy='unit' with offload"):
        _checkpoint_offload.check_selective(lambda: (forward_mode, recompute_mode))


# ----------------------------------------------------------------------------- the protocol


class _FakeStream:
    """Logs the stream calls of [Note: activation offload]; CPU copies finish at once."""

    def __init__(self, name: str, log: list):
        self.name, self.log = name, log

    def wait_stream(self, other) -> None:
        self.log.append((self.name, "waits for", other.name))

    def wait_event(self, event) -> None:
        self.log.append((self.name, "waits", event))

    def record_event(self) -> str:
        event = f"E{sum(k == 'records' for _, k, _ in self.log)}"
        self.log.append((self.name, "records", event))
        return event


@pytest.fixture
def fake_gpu(monkeypatch):
    """The CPU taken for a GPU: copies go through the stream protocol, streams are fakes."""
    log: list = []
    compute, side = _FakeStream("S", log), _FakeStream("D", log)
    monkeypatch.setattr(_checkpoint_offload, "_ASYNC", ("cuda", "cpu"))
    monkeypatch.setattr(_checkpoint_offload, "_side_stream", lambda device: side)
    monkeypatch.setattr(_checkpoint_offload, "_current_stream", lambda device: compute)
    monkeypatch.setattr(_checkpoint_offload, "_on", lambda stream: contextlib.nullcontext())
    return log


@pytest.mark.parametrize("policy", ["unit", "selective", "none"])
def test_stream_protocol(fake_gpu, policy):
    want, _ = _train(())
    got, metrics = _train.__wrapped__((_ck(policy),))  # not cached: it runs under the fakes
    _assert_equal(got, want, policy)
    # The last unit's tensors are used where they are, not copied back.
    assert 0 < metrics["activation_reload_bytes"] < metrics["activation_offload_bytes"]
    log = fake_gpu
    recorded = [e for who, what, e in log if what == "records"]
    waited = [e for who, what, e in log if who == "S" and what == "waits"]
    assert all(who == "D" for who, what, _ in log if what == "records")
    # S waits once for every copy event before the memory is freed or used.
    assert sorted(recorded) == sorted(waited)
    # Forward of the first step: S waits for unit g-1's copies to the host when unit g
    # ends (one unit in flight), so D records E0, E1, then S waits E0, ...
    events = [(who, e) for who, what, e in log if what in ("records", "waits")]
    n = CFG.n_layer
    forward = [("D", "E0")] + [x for g in range(1, n) for x in (("D", f"E{g}"), ("S", f"E{g - 1}"))]
    assert events[: len(forward)] == forward
    # Every copy is ordered after the compute that produced its source (or last read
    # its buffer): D waits for S before it.
    assert ("D", "waits for", "S") in log


# ----------------------------------------------------------------------------- API


def test_options_and_explain_show_offload():
    step, params = _build((_ck("selective"),))
    assert step.applied(CK).options == {
        "policy": "selective",
        "offload": "cpu",
        "min_offload_bytes": 0,
    }
    text = fs.explain(step, params)
    assert "offload='cpu'" in text and "prefetched back" in text


def test_offload_none_changes_no_stage():
    step, _ = _build(())
    plain = step.stages.loss_and_grad
    ck = fs.checkpoint_activations(step)
    assert ck.applied(CK).options == {"policy": "unit"}
    assert ck.stages.loss_and_grad is plain
    assert fs.checkpoint_activations(step, offload="cpu").stages.loss_and_grad is not plain


@pytest.mark.parametrize("offload", ["gpu", "nvme", True, "CPU"])
def test_unknown_offload_names_the_fix(offload):
    step, _ = _build(())
    with pytest.raises(ValueError, match=r"unknown offload .*offload='cpu'.*offload=None"):
        fs.checkpoint_activations(step, offload=offload)


def test_policy_none_without_offload_names_the_fix():
    step, _ = _build(())
    with pytest.raises(ValueError, match=r"policy='none'\) without offload.*offload='cpu'"):
        fs.checkpoint_activations(step, policy="none")


def test_unknown_policy_lists_none_too():
    step, _ = _build(())
    with pytest.raises(ValueError, match=r"unknown policy 'full'.*'unit'.*'selective'.*'none'"):
        fs.checkpoint_activations(step, policy="full", offload="cpu")


@pytest.mark.parametrize("bad, err", [(-1, ValueError), (1.5, TypeError), (True, TypeError)])
def test_bad_min_offload_bytes(bad, err):
    step, _ = _build(())
    with pytest.raises(err, match="min_offload_bytes must be"):
        fs.checkpoint_activations(step, offload="cpu", min_offload_bytes=bad)


# ----------------------------------------------------------------------------- GPU

# Activations dominate the peak: 8 layers, 8k tokens, attention scores materialized.
CUDA_CFG = GPTConfig.tiny(n_layer=8, n_head=4, d_model=256, seq_len=512, dropout=0.1)
CUDA_BATCH = 16


def _cuda_run(policy, offload, steps=2):
    """Params after ``steps`` bf16 AdamW steps on CUDA, and the peak allocated bytes."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(5)
    model = GPT(CUDA_CFG).cuda().train()
    params, apply = fs.functional(model)
    params = {k: v.detach().clone() for k, v in params.items()}
    step = fs.train_step(lm_loss(apply), fs.optim.adamw(1e-3), model=apply)
    step = fs.mixed_precision(step, "bf16")
    if policy is not None:
        step = fs.checkpoint_activations(step, policy, offload=offload, min_offload_bytes=0)
    params, state = step.init(params)
    batches = lm_batches(steps, CUDA_BATCH, CUDA_CFG.seq_len, vocab=CUDA_CFG.vocab_size, seed=3)
    torch.manual_seed(100)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    # The math attention: its backward has no atomics, so two runs can agree bit for bit.
    with sdpa_kernel(SDPBackend.MATH):
        for b in batches:
            b = {k: v.cuda() for k, v in b.items()}
            params, state, metrics = step(params, state, b)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    if offload is not None:
        assert metrics["activation_offload_bytes"] > 0
    return {k: v.detach().cpu() for k, v in params.items()}, peak


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("policy", ["unit", "selective", "none"])
def test_cuda_exact_and_lower_peak(policy):
    ck = None if policy == "none" else policy
    want, peak_plain = _cuda_run(ck, None)
    got, peak_offload = _cuda_run(policy, "cpu")
    _assert_equal(got, want, f"cuda {policy}")
    assert peak_offload < peak_plain, (peak_offload, peak_plain)

"""curriculum: lengths follow the schedule, a cut step is the plain step on the cut batch
(bit for bit, alone and under mixed_precision, shard_zero(3) and accumulation), at most
8 shapes, resume from a checkpoint, and errors that name the fix."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import fscale as fs
from fscale.models.gpt import GPT, GPTConfig
from fscale.state import describe
from fscale.transforms import mixed_precision, shard_zero
from fscale.transforms.curriculum import (
    MAX_SHAPES,
    curriculum,
    seqlen_discrete,
    seqlen_root,
    seqlen_warmup,
)
from tests.helpers import error_text, lm_batches, lm_loss

B, T, VOCAB = 4, 32, 64
CFG = GPTConfig.tiny(vocab_size=VOCAB, n_layer=1, d_model=16, seq_len=T, bias=False)
WARMUP = seqlen_warmup(8, T, steps=4, bucket=8)  # 8, 8+6=14 -> 8, 20 -> 16, 26 -> 24, 32


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny models gain nothing from intra-op threads, and on a busy 2-core box the
    # spinning threads made each step ~100x slower; restored for the other modules.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _model():
    torch.manual_seed(0)
    return GPT(CFG)


def _batches(n: int, batch: int = B):
    return lm_batches(n, batch, T, VOCAB, seed=3)


def _cut(batch: dict, length: int) -> dict:
    return {k: v[:, :length] for k, v in batch.items()}


def _build(wrap=lambda s: s, *, accumulate: int = 1, seen: list | None = None):
    params, apply = fs.functional(_model())
    loss = lm_loss(apply)

    def loss_fn(p, batch):
        if seen is not None:
            seen.append(tuple(batch["x"].shape))
        return loss(p, batch)

    step = fs.train_step(loss_fn, fs.optim.adamw(lr=1e-2), accumulate=accumulate, clip_norm=1.0)
    step = wrap(step)
    params, state = step.init(params)
    return step, params, state


def _run(step, params, state, batches):
    metrics = []
    for batch in batches:
        params, state, m = step(params, state, batch)
        metrics.append(m)
    return fs.gather_params(params, state), state, metrics


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ----------------------------------------------------------------------------- lengths


def test_lengths_follow_the_schedule_and_the_loss_sees_them():
    seen: list = []
    step, params, state = _build(lambda s: curriculum(s, WARMUP), seen=seen)
    _, state, metrics = _run(step, params, state, _batches(6))
    expected = [8, 8, 16, 24, 32, 32]
    assert [WARMUP(i) for i in range(6)] == expected
    assert [m["seqlen"] for m in metrics] == expected
    assert seen == [(B, n) for n in expected]
    assert state["count"] == 6


def test_accumulation_cuts_every_micro_batch():
    seen: list = []
    step, params, state = _build(lambda s: curriculum(s, WARMUP), accumulate=2, seen=seen)
    _, _, metrics = _run(step, params, state, _batches(3))
    assert [m["seqlen"] for m in metrics] == [8, 8, 16]
    assert seen == [(B // 2, n) for n in (8, 8, 8, 8, 16, 16)]


# ----------------------------------------------------------------------------- equivalence


def test_full_length_equals_the_plain_step_exactly():
    batches = _batches(3)
    full = _run(*_build(lambda s: curriculum(s, seqlen_discrete([T], []))), batches)
    plain = _run(*_build(), batches)
    _same(full[0], plain[0])
    assert [m["loss"] for m in full[2]] == [m["loss"] for m in plain[2]]


STACKS = {
    "plain": lambda s: s,
    "bf16": lambda s: mixed_precision(s, "bf16"),
    "zero3": lambda s: shard_zero(s, 3),
    "bf16+zero3": lambda s: shard_zero(mixed_precision(s, "bf16"), 3),
}


@pytest.mark.parametrize("accumulate", [1, 2])
@pytest.mark.parametrize("stack", sorted(STACKS))
def test_cut_step_equals_the_plain_step_on_the_cut_batch(stack, accumulate):
    # The curriculum goes over the stack here and under it below: both wrap loss_and_grad.
    wrap = STACKS[stack]
    batches = _batches(5)
    got = _run(*_build(lambda s: curriculum(wrap(s), WARMUP), accumulate=accumulate), batches)
    by_hand = [_cut(b, WARMUP(i)) for i, b in enumerate(batches)]
    want = _run(*_build(wrap, accumulate=accumulate), by_hand)
    _same(got[0], want[0])
    assert [m["loss"] for m in got[2]] == [m["loss"] for m in want[2]]


def test_curriculum_inside_zero3_and_mixed_precision_is_the_same_step():
    batches = _batches(4)
    outer = _run(
        *_build(lambda s: curriculum(shard_zero(mixed_precision(s, "bf16"), 3), WARMUP)), batches
    )
    inner = _run(
        *_build(lambda s: shard_zero(mixed_precision(curriculum(s, WARMUP), "bf16"), 3)), batches
    )
    _same(outer[0], inner[0])


def test_keys_and_dims_cut_only_what_they_name():
    seen: list = []

    def loss_fn(p, batch):
        seen.append({k: tuple(v.shape) for k, v in batch.items()})
        return (p["w"] * batch["x"].float().mean()).sum()

    step = curriculum(
        fs.train_step(loss_fn, fs.optim.sgd(0.1)),
        seqlen_discrete([4], []),
        keys={"x": 1, "mask": (1, 2)},
    )
    params, state = step.init({"w": torch.ones(2)})
    batch = {"x": torch.ones(2, 8), "mask": torch.ones(2, 8, 8), "meta": torch.ones(2, 8)}
    step(params, state, batch)
    assert seen == [{"x": (2, 4), "mask": (2, 4, 4), "meta": (2, 8)}]


# ----------------------------------------------------------------------------- positions


class _RopeLM(torch.nn.Module):
    """One causal attention layer with rotary positions (cos/sin tables sliced to [:T])."""

    def __init__(self, dim: int = 16, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.emb = torch.nn.Embedding(VOCAB, dim)
        self.qkv = torch.nn.Linear(dim, 3 * dim, bias=False)
        self.head = torch.nn.Linear(dim, VOCAB, bias=False)
        half = dim // heads // 2
        angles = torch.outer(torch.arange(T).float(), 10000.0 ** (-torch.arange(half) / half))
        self.register_buffer("cos", angles.cos())
        self.register_buffer("sin", angles.sin())

    def _rotate(self, x):
        n = x.shape[-2]
        a, b = x[..., ::2], x[..., 1::2]
        cos, sin = self.cos[:n], self.sin[:n]
        return torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2)

    def forward(self, idx):
        (batch, n), x = idx.shape, self.emb(idx)
        q, k, v = self.qkv(x).view(batch, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(self._rotate(q), self._rotate(k), v, is_causal=True)
        return self.head(x + y.transpose(1, 2).reshape(batch, n, -1))


@pytest.mark.parametrize("kind", ["learned", "rope"])
def test_a_cut_sequence_keeps_every_tokens_position_and_context(kind):
    # [Note: truncation keeps positions right]: the cut forward is the full forward's
    # first L outputs, for a learned position table and for RoPE alike.
    torch.manual_seed(0)
    model = _model() if kind == "learned" else _RopeLM()
    x = _batches(1)[0]["x"]
    with torch.no_grad():
        full = model(x)
        for length in (1, 8, 16, 24):
            torch.testing.assert_close(model(x[:, :length]), full[:, :length], rtol=0, atol=1e-6)
        # A window from the middle moves tokens to other positions: not the same outputs.
        assert not torch.allclose(model(x[:, 8:16]), full[:, 8:16], atol=1e-3)


# ----------------------------------------------------------------------------- resume


def test_resume_from_a_checkpoint_continues_the_schedule(tmp_path):
    batches = _batches(6)
    whole = _run(*_build(lambda s: curriculum(s, WARMUP)), batches)
    step, params, state = _build(lambda s: curriculum(s, WARMUP))
    for batch in batches[:3]:
        params, state, _ = step(params, state, batch)
    # The curriculum keeps no slot: the step count is all it needs, and it is saved.
    assert "curriculum" not in state
    assert describe(state)["count"] == 3
    fs.save(tmp_path / "ckpt", params, state)
    step2 = curriculum(
        fs.train_step(lm_loss(fs.functional(_model())[1]), fs.optim.adamw(lr=1e-2), clip_norm=1.0),
        WARMUP,
    )
    params2, state2 = fs.load(tmp_path / "ckpt", step2, fs.functional(copy.deepcopy(_model()))[0])
    assert state2["count"] == 3
    got = _run(step2, params2, state2, batches[3:])
    assert [m["seqlen"] for m in got[2]] == [m["seqlen"] for m in whole[2][3:]] == [24, 32, 32]
    _same(got[0], whole[0])


# ----------------------------------------------------------------------------- schedules


def _ramps():
    return st.tuples(
        st.integers(1, 600),  # start
        st.integers(0, 3000),  # end - start
        st.integers(1, 400),  # steps
        st.sampled_from([1, 1.5, 2, 3]),  # degree
        st.one_of(st.none(), st.integers(1, 300)),  # bucket
    )


def _make(start, span, steps, degree, bucket, max_shapes=MAX_SHAPES):
    end = start + span
    if degree == 1:
        return seqlen_warmup(start, end, steps, bucket=bucket, max_shapes=max_shapes)
    return seqlen_root(start, end, steps, degree=degree, bucket=bucket, max_shapes=max_shapes)


@settings(max_examples=150, deadline=None)
@given(_ramps())
def test_seqlen_schedules_are_monotone_bounded_bucketed_and_few(args):
    start, span, steps, degree, bucket = args
    end = start + span
    try:
        s = _make(*args)
    except ValueError as e:  # only an explicit bucket with too many lengths is refused
        assert bucket is not None and "distinct lengths" in str(e), e
        return
    trace = [s(t) for t in range(steps + 3)]
    assert trace[0] == start and trace[steps:] == [end] * 3
    assert all(a <= b for a, b in zip(trace, trace[1:], strict=False))
    assert all(start <= v <= end for v in trace)
    assert all(v in (start, end) or v % s.bucket == 0 for v in trace)
    assert set(trace) == set(s.values()) and len(s.values()) <= MAX_SHAPES
    if bucket is None:  # the smallest multiple of 8 that fits
        assert s.bucket % 8 == 0
        smaller = s.bucket - 8
        assert smaller == 0 or len(_make(start, span, steps, degree, smaller, 10**9).values()) > 8


def test_distinct_lengths_over_a_long_schedule_are_at_most_eight():
    for s in (seqlen_warmup(64, 2048, 100_000), seqlen_root(8, 4096, 50_000, degree=3)):
        assert len(s.values()) <= 8
        assert len({s(t) for t in range(0, s.steps + 1, 7)} | {s(s.steps)}) <= 8


def test_a_plain_callable_may_not_exceed_max_shapes():
    step, params, state = _build(lambda s: curriculum(s, lambda count: 8 + 8 * count, max_shapes=2))
    batches = _batches(3)
    params, state, _ = step(params, state, batches[0])
    params, state, _ = step(params, state, batches[1])
    msg = error_text(lambda: step(params, state, batches[2]))
    assert "max_shapes=2" in msg and "bucket" in msg, msg


# ----------------------------------------------------------------------------- errors


def _step_error(schedule, batch=None, **kw):
    step, params, state = _build(lambda s: curriculum(s, schedule, **kw))
    return error_text(lambda: step(params, state, batch or _batches(1)[0]))


def test_build_time_errors_name_the_fix():
    _ten_lengths = seqlen_discrete(list(range(1, 11)), list(range(1, 10)), max_shapes=10)
    base = fs.train_step(lambda p, b: p["w"].sum(), fs.optim.sgd(0.1))
    cases = {
        lambda: curriculum(base, 128): "must be callable",
        lambda: curriculum(base, WARMUP, dim=0): "dim 0 is the batch",
        lambda: curriculum(base, WARMUP, keys={"x": 0}): "dim 0 is the batch",
        lambda: curriculum(base, WARMUP, keys=[]): "keys is empty",
        lambda: curriculum(base, WARMUP, max_shapes=0): "max_shapes must be an int >= 1",
        lambda: curriculum(base, _ten_lengths): "more than max_shapes=8",
        lambda: curriculum(curriculum(base, WARMUP), WARMUP): "applied twice",
        lambda: seqlen_warmup(0, 64, 10): "start must be >= 1",
        lambda: seqlen_warmup(64, 32, 10): "start=64 is above end=32",
        lambda: seqlen_warmup(8, 64, 0): "steps must be an int >= 1",
        lambda: seqlen_warmup(8, 64, 10, bucket=0): "bucket must be an int >= 1",
        lambda: seqlen_warmup(8, 64, 10, bucket=True): "bucket must be an int >= 1",
        lambda: seqlen_warmup(8, 64, 10, bucket=2.5): "bucket must be an int >= 1",
        lambda: seqlen_warmup(8, 2048, 1000, bucket=8): "Use bucket=",
        lambda: seqlen_warmup(8, 64, 10, max_shapes=1): "max_shapes=1 allows one length",
        lambda: seqlen_root(8, 64, 10, degree=0.5): "degree must be a number >= 1",
        lambda: seqlen_discrete([0, 8], [5]): "lengths must be >= 1",
        lambda: seqlen_discrete([8, 16], []): "2 values need 1 boundaries",
        lambda: seqlen_discrete([8, 16, 32], [5, 5]): "strictly increasing",
        lambda: seqlen_discrete(list(range(1, 10)), list(range(1, 9))): "more than max_shapes=8",
    }
    for fn, text in cases.items():
        msg = error_text(fn)
        assert text in msg, (text, msg)


def test_call_time_errors_name_the_fix():
    too_long = _step_error(seqlen_discrete([T + 1], []))
    assert f"only {T} along dim 1" in too_long and f"<= {T}" in too_long, too_long
    assert "lengths must be >= 1" in _step_error(lambda count: 0)
    assert "must return an int length" in _step_error(lambda count: 8.0)
    assert "must return an int length" in _step_error(lambda count: torch.tensor(8.0))
    assert _step_error(lambda count: np.int64(8)) == "ok"  # numpy and 0-d int tensors pass
    assert _step_error(lambda count: torch.tensor(8)) == "ok"
    missing = _step_error(WARMUP, keys=["tokens"])
    assert "['tokens'] are not in the batch" in missing and "['x', 'y']" in missing, missing
    ragged = {
        "x": torch.zeros(B, T, dtype=torch.long),
        "y": torch.zeros(B, T // 2, dtype=torch.long),
    }
    msg = _step_error(WARMUP, batch=ragged)
    assert "sizes there differ" in msg and "keys=" in msg, msg
    flat = _step_error(WARMUP, keys={"x": 2})
    assert "no dim 2 to cut" in flat, flat


def test_explain_names_the_schedule():
    step, params, _ = _build(lambda s: curriculum(s, WARMUP))
    text = fs.explain(step, fs.functional(_model())[0])
    assert "curriculum" in text and "fixed_linear(8->32 over 4 steps, bucket=8)" in text, text

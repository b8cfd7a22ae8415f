"""curriculum: lengths follow the schedule, a cut step is the plain step on the cut batch
(bit for bit, alone and under mixed_precision, shard_zero(3) and accumulation), in both
modes (truncate; reshape: the plain step on a batch of windows written out by hand, also
under random_ltd), the tokens fed, at most 8 shapes, divisor lengths, resume from a
checkpoint, and errors that name the fix."""

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
from fscale.transforms import mixed_precision, random_ltd, shard_zero
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
# For reshape: 12 and 20 leave remainders (2 windows of 12: 8 tokens a row dropped; one of
# 20), 8 splits each row into 4, 32 is the full length.
UNEVEN = seqlen_discrete([12, 8, 20, 32], [1, 2, 3])


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


def _windows(batch: dict, length: int) -> dict:
    """DeepSpeed's seqlen_reshape written out: row b's window j (tokens j*L..j*L+L-1) is
    row b * (T // L) + j; the last T % L tokens of each row are not fed."""
    out = {}
    for k, v in batch.items():
        rows = [r for b in range(v.shape[0]) for r in _split_row(v[b], length)]
        out[k] = torch.stack(rows)
    return out


def _split_row(row: torch.Tensor, length: int) -> list[torch.Tensor]:
    starts = range(0, row.shape[0] - length + 1, length)
    return [row[s : s + length] for s in starts]


def _build(wrap=lambda s: s, *, accumulate: int = 1, seen: list | None = None, cfg=CFG):
    torch.manual_seed(0)
    params, apply = fs.functional(GPT(cfg))
    loss = lm_loss(apply)

    def loss_fn(p, batch):
        if seen is not None:
            seen.append(tuple(batch["x"].shape))
        return loss(p, batch)

    step = fs.train_step(
        loss_fn, fs.optim.adamw(lr=1e-2), accumulate=accumulate, clip_norm=1.0, model=apply
    )
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
    assert [m["tokens"] for m in metrics] == [B * n for n in expected]
    assert state["count"] == 6


def test_accumulation_cuts_every_micro_batch():
    seen: list = []
    step, params, state = _build(lambda s: curriculum(s, WARMUP), accumulate=2, seen=seen)
    _, _, metrics = _run(step, params, state, _batches(3))
    assert [m["seqlen"] for m in metrics] == [8, 8, 16]
    assert seen == [(B // 2, n) for n in (8, 8, 8, 8, 16, 16)]
    assert [m["tokens"] for m in metrics] == [B * 8, B * 8, B * 16]  # both micro-batches


@pytest.mark.parametrize("accumulate", [1, 2])
def test_reshape_feeds_windows_of_the_scheduled_length(accumulate):
    seen: list = []
    wrap = lambda s: curriculum(s, UNEVEN, mode="reshape")  # noqa: E731
    step, params, state = _build(wrap, accumulate=accumulate, seen=seen)
    _, _, metrics = _run(step, params, state, _batches(5))
    lengths = [12, 8, 20, 32, 32]
    assert [UNEVEN(i) for i in range(5)] == lengths
    assert [m["seqlen"] for m in metrics] == lengths
    rows = [B * (T // n) for n in lengths]  # 8, 16, 4, 4, 4
    assert seen == [
        (r // accumulate, n) for r, n in zip(rows, lengths, strict=True) for _ in range(accumulate)
    ]
    # The same tokens as a full step where L divides T; the remainder is not counted.
    assert [m["tokens"] for m in metrics] == [B * 24, B * T, B * 20, B * T, B * T]


def test_reshape_with_divisor_lengths_feeds_every_token_every_step():
    seen: list = []
    schedule = seqlen_warmup(8, T, steps=4, bucket=8, divides=T)
    step, params, state = _build(lambda s: curriculum(s, schedule, mode="reshape"), seen=seen)
    _, _, metrics = _run(step, params, state, _batches(5))
    assert [m["seqlen"] for m in metrics] == [8, 8, 16, 16, 32]  # 24 rounded down to 16
    assert [m["tokens"] for m in metrics] == [B * T] * 5
    assert seen == [(B * 4, 8), (B * 4, 8), (B * 2, 16), (B * 2, 16), (B, 32)]


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


@pytest.mark.parametrize("accumulate", [1, 2])
@pytest.mark.parametrize("stack", sorted(STACKS))
def test_reshaped_step_equals_the_plain_step_on_the_windows(stack, accumulate):
    wrap = STACKS[stack]
    batches = _batches(5)
    mode = lambda s: curriculum(wrap(s), UNEVEN, mode="reshape")  # noqa: E731
    got = _run(*_build(mode, accumulate=accumulate), batches)
    by_hand = [_windows(b, UNEVEN(i)) for i, b in enumerate(batches)]
    assert [tuple(b["x"].shape) for b in by_hand] == [(8, 12), (16, 8), (4, 20), (4, 32), (4, 32)]
    want = _run(*_build(wrap, accumulate=accumulate), by_hand)
    _same(got[0], want[0])
    assert [m["loss"] for m in got[2]] == [m["loss"] for m in want[2]]
    # Not vacuous: truncation to the same lengths trains other params.
    cut = _run(*_build(lambda s: curriculum(wrap(s), UNEVEN), accumulate=accumulate), batches)
    assert not torch.equal(got[0]["tok_emb.weight"], cut[0]["tok_emb.weight"])


def test_reshape_repeats_per_sample_leaves_for_each_window():
    seen: list = []

    def loss_fn(p, batch):
        seen.append({k: v.clone() for k, v in batch.items()})
        return (p["w"] * (batch["x"].float().mean(1) * batch["weight"]).mean()).sum()

    step = curriculum(
        fs.train_step(loss_fn, fs.optim.sgd(0.1)), seqlen_discrete([3], []), mode="reshape"
    )
    params, state = step.init({"w": torch.ones(2)})
    x = torch.arange(20).view(2, 10)
    step(params, state, {"x": x, "weight": torch.tensor([1.0, 2.0]), "scale": torch.ones(3)})
    (got,) = seen
    # Row 0's windows, then row 1's; tokens 9 and 19 (10 % 3 of each row) are dropped.
    windows = [[0, 1, 2], [3, 4, 5], [6, 7, 8], [10, 11, 12], [13, 14, 15], [16, 17, 18]]
    assert torch.equal(got["x"], torch.tensor(windows))
    assert torch.equal(got["weight"], torch.tensor([1.0, 1.0, 1.0, 2.0, 2.0, 2.0]))
    assert torch.equal(got["scale"], torch.ones(3))  # not the batch's rows: as it is


LTD_CFG = GPTConfig.tiny(vocab_size=VOCAB, n_layer=3, d_model=16, seq_len=T, bias=False)


@pytest.mark.parametrize("accumulate", [1, 2])
def test_reshape_under_random_ltd_is_random_ltd_on_the_windows(accumulate):
    # keep 6 < every length: the middle unit drops tokens of each window; the draw is
    # keyed by (count, micro-batch, unit) and sized by the rows it sees, so the same
    # seed on the hand-made windows draws the same positions.
    batches = _batches(4)
    ltd = lambda s: random_ltd(s, keep=6, seed=5)  # noqa: E731
    both = lambda s: curriculum(ltd(s), UNEVEN, mode="reshape")  # noqa: E731
    got = _run(*_build(both, accumulate=accumulate, cfg=LTD_CFG), batches)
    by_hand = [_windows(b, UNEVEN(i)) for i, b in enumerate(batches)]
    want = _run(*_build(ltd, accumulate=accumulate, cfg=LTD_CFG), by_hand)
    assert [m["random_ltd_keep"] for m in got[2]] == [6] * 4
    _same(got[0], want[0])
    assert [m["loss"] for m in got[2]] == [m["loss"] for m in want[2]]
    other_seed = _run(
        *_build(lambda s: random_ltd(s, keep=6, seed=6), accumulate=accumulate, cfg=LTD_CFG),
        by_hand,
    )
    assert not torch.equal(got[0]["tok_emb.weight"], other_seed[0]["tok_emb.weight"])


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


def _make(start, span, steps, degree, bucket, max_shapes=MAX_SHAPES, divides=None):
    end = start + span
    kw = dict(bucket=bucket, max_shapes=max_shapes, divides=divides)
    if degree == 1:
        return seqlen_warmup(start, end, steps, **kw)
    return seqlen_root(start, end, steps, degree=degree, **kw)


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


def _floor_divisor(value: int, n: int) -> int:
    return max(d for d in range(1, n + 1) if n % d == 0 and d <= value)


@settings(max_examples=100, deadline=None)
@given(st.data(), st.integers(1, 3000), st.integers(1, 400), st.sampled_from([1, 2]))
def test_divisor_lengths_are_the_ramp_rounded_down_to_divisors(data, end, steps, degree):
    divisors = [d for d in range(1, end + 1) if end % d == 0]
    start = data.draw(st.sampled_from(divisors))
    bucket = data.draw(st.one_of(st.none(), st.integers(1, 300)))
    span = end - start
    try:
        s = _make(start, span, steps, degree, bucket, divides=end)
    except ValueError as e:
        assert bucket is not None and "distinct lengths" in str(e), e
        return
    trace = [s(t) for t in range(steps + 3)]
    assert trace[0] == start and trace[steps:] == [end] * 3
    assert all(end % v == 0 for v in trace)
    assert all(a <= b for a, b in zip(trace, trace[1:], strict=False))
    assert set(trace) == set(s.values()) and len(s.values()) <= MAX_SHAPES
    plain = _make(start, span, steps, degree, s.bucket, max_shapes=10**9)  # same bucket
    assert trace == [_floor_divisor(plain(t), end) for t in range(steps + 3)]


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
        lambda: curriculum(base, WARMUP, mode="pack"): "mode must be 'truncate'",
        lambda: curriculum(
            base, WARMUP, mode="reshape", keys={"x": 1, "mask": (1, 2)}
        ): "keys['mask'] cuts dims (1, 2)",
        lambda: seqlen_warmup(48, 1024, 10, divides=1024): "start=48 is not one; use 32 or 64",
        lambda: seqlen_warmup(64, 1000, 10, divides=1024): "end=1000 is not one; use 512 or",
        lambda: seqlen_warmup(8, 64, 10, divides=0): "divides must be an int >= 1",
        lambda: seqlen_warmup(8, 64, 10, divides=32): "end=64 is above it",
        lambda: seqlen_discrete([8, 12], [5], divides=32): "length=12 is not one; use 8 or 16",
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
    too_long = _step_error(seqlen_discrete([T + 1], []), mode="reshape")
    assert f"only {T} along dim 1" in too_long, too_long
    msg = _step_error(WARMUP, batch=ragged, keys=["x", "y"], mode="reshape")
    assert "share the batch size and sequence length" in msg and "mode='truncate'" in msg, msg


def test_reshape_refuses_a_mask_cut_on_two_dims_naming_the_fix():
    base = fs.train_step(lambda p, b: p["w"].sum(), fs.optim.sgd(0.1))
    msg = error_text(
        lambda: curriculum(base, WARMUP, mode="reshape", keys={"x": 1, "mask": (1, 2)})
    )
    assert msg.startswith("ValueError") and "(B, T, T) mask" in msg, msg
    assert "is_causal=True" in msg and "mode='truncate'" in msg, msg
    # The same keys truncate fine (test_keys_and_dims_cut_only_what_they_name).
    curriculum(base, WARMUP, keys={"x": 1, "mask": (1, 2)})


def test_explain_names_the_schedule():
    step, params, _ = _build(lambda s: curriculum(s, WARMUP))
    text = fs.explain(step, fs.functional(_model())[0])
    assert "curriculum" in text and "fixed_linear(8->32 over 4 steps, bucket=8)" in text, text
    assert "(truncate)" in text, text
    divisors = seqlen_warmup(8, T, steps=4, bucket=8, divides=T)
    step, params, _ = _build(lambda s: curriculum(s, divisors, mode="reshape"))
    text = fs.explain(step, fs.functional(_model())[0])
    assert "curriculum (reshape)" in text and "bucket=8, divides=32)" in text, text
    assert "(lengths [8, 16, 32])" in text, text

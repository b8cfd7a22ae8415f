"""random_ltd: the plain step when nothing is dropped; a hand-written masked model otherwise."""

from __future__ import annotations

import importlib
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call

import fscale as fs
from fscale.models.gpt import GPT, GPTConfig
from fscale.transforms.random_ltd import layer_token_lr, random_ltd
from tests.dist import run_world
from tests.helpers import error_text, lm_batches, lm_loss

# The module (fscale.transforms re-exports the function under the module's name).
ltd_module = importlib.import_module("fscale.transforms.random_ltd")

SEQ = 16
BATCH = 4
CFG = GPTConfig.tiny(n_layer=4)  # units blocks.0..3; by default 1 and 2 drop tokens


@pytest.fixture(autouse=True)
def _one_thread():
    # The models are tiny: a second intra-op thread only adds contention (a 3-step run
    # takes seconds instead of ~40 ms on a busy 2-core box).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _gpt(cfg=CFG):
    torch.manual_seed(5)
    model = GPT(cfg).train()
    params, apply = fs.functional(model)
    return model, {k: v.clone() for k, v in params.items()}, apply


def _adamw():
    return fs.optim.adamw(lr=1e-2, weight_decay=0.1, mask=fs.optim.decay_mask_default)


def _train(step, params, steps=3, seq=SEQ, rank=0, world=1):
    params, state = step.init({k: v.clone() for k, v in params.items()})  # inputs are donated
    seen = []
    per = BATCH // world
    for batch in lm_batches(steps, BATCH, seq, vocab=CFG.vocab_size, seed=3):
        local = {k: v[rank * per : (rank + 1) * per] for k, v in batch.items()}
        params, state, metrics = step(params, state, local)
        seen.append(metrics)
    return {k: v.detach().clone() for k, v in fs.gather_params(params, state).items()}, seen


def _assert_close(got, want, atol=0.0):
    assert got.keys() == want.keys()
    for k in want:
        if atol == 0.0:
            assert torch.equal(got[k], want[k]), k
        else:
            torch.testing.assert_close(got[k], want[k], atol=atol, rtol=0, msg=k)


def _positions(seed, count, micro, unit, batch, seq, keep):
    """The draw as the module docstring writes it ([Note: the draw]), by hand."""
    p = 1_000_003
    g = torch.Generator().manual_seed((((seed * p + count) * p + micro) * p + unit) % 2**63)
    noise = torch.rand(batch, seq, generator=g)
    return noise.argsort(dim=1, stable=True)[:, :keep].sort(dim=1).values


# ----------------------------------------------------------------------------- no dropping


@pytest.mark.parametrize("keep", [SEQ, SEQ + 7])
def test_keep_all_tokens_is_the_plain_step_exactly_and_draws_nothing(keep, monkeypatch):
    model, params, apply = _gpt()
    plain = fs.train_step(lm_loss(apply), _adamw(), model=apply)
    want, _ = _train(plain, dict(params))
    draws = []
    real = ltd_module.kept_positions
    monkeypatch.setattr(
        ltd_module, "kept_positions", lambda *a, **k: draws.append(a) or real(*a, **k)
    )
    got, metrics = _train(random_ltd(plain, keep=keep), dict(params))
    _assert_close(got, want)
    assert draws == []  # the hook skipped: no draw, no gather
    assert [m["random_ltd_keep"] for m in metrics] == [SEQ] * 3


# ----------------------------------------------------------------------------- the reference


def _reference_loss(model, apply, selected, keep, seed, calls):
    """GPT's forward written out: selected blocks run on the drawn tokens, put back by index."""
    blocks = list(model.blocks)

    def loss_fn(params, batch):
        count, micro = calls.pop(0)
        x, y = batch["x"], batch["y"]
        B, T = x.shape
        h = params["tok_emb.weight"][x] + params["pos_emb.weight"][:T]
        for i, block in enumerate(blocks):
            own = {
                k[len(f"blocks.{i}.") :]: v
                for k, v in params.items()
                if k.startswith(f"blocks.{i}.")
            }
            if i in selected:
                idx = _positions(seed, count, micro, i, B, T, keep)
                rows = torch.arange(B)[:, None]
                out = functional_call(block, own, (h[rows, idx],))
                h = h.clone()
                h[rows, idx] = out  # dropped tokens: h as it came in
            else:
                h = functional_call(block, own, (h,))
        h = F.layer_norm(h, (CFG.d_model,), params["ln_f.weight"], params["ln_f.bias"])
        logits = h @ params["tok_emb.weight"].T  # the tied head
        return F.cross_entropy(logits.flatten(0, 1), y.flatten())

    return loss_fn


@pytest.mark.parametrize(
    ("layers", "selected", "accumulate"),
    [(None, {1, 2}, 1), ([0, "blocks.3"], {0, 3}, 1), (range(1, 3), {1, 2}, 2)],
)
def test_equals_a_hand_written_masked_model(layers, selected, accumulate):
    model, params, apply = _gpt()
    plain = fs.train_step(lm_loss(apply), _adamw(), model=apply, accumulate=accumulate)
    step = random_ltd(plain, keep=5, layers=layers, seed=7)
    got, metrics = _train(step, dict(params), steps=2)
    calls = [(count, micro) for count in range(2) for micro in range(accumulate)]
    ref_loss = _reference_loss(model, apply, selected, 5, 7, calls)
    want, ref_metrics = _train(fs.train_step(ref_loss, _adamw(), accumulate=accumulate), params, 2)
    assert calls == []
    _assert_close(got, want, atol=1e-6)
    assert [m["random_ltd_keep"] for m in metrics] == [5, 5]
    torch.testing.assert_close(metrics[0]["loss"], ref_metrics[0]["loss"], atol=1e-6, rtol=0)
    # And it is not the plain step.
    plain, _ = _train(plain, params, 2)
    assert not torch.allclose(got["blocks.1.attn.qkv.weight"], plain["blocks.1.attn.qkv.weight"])


# ----------------------------------------------------------------------------- drawn shapes


class _Mix(nn.Module):
    """A residual unit whose tokens interact causally (cumsum), recording what it ran on."""

    def __init__(self, d, log):
        super().__init__()
        self.lin = nn.Linear(d, d)
        self.log = log

    def forward(self, x):
        out = x + torch.tanh(self.lin(x.cumsum(dim=1)))
        self.log.append((self, x.detach(), out.detach()))
        return out


class _Stack(nn.Module):
    def __init__(self, d, n, log):
        super().__init__()
        self.units = nn.ModuleList(_Mix(d, log) for _ in range(n))

    def forward(self, x):
        for unit in self.units:
            x = unit(x)
        return x


@settings(max_examples=25, deadline=None)
@given(
    batch=st.integers(1, 3),
    seq=st.integers(1, 9),
    d=st.integers(1, 4),
    keep=st.integers(1, 10),
    layers=st.sets(st.integers(0, 2), min_size=1),
    seed=st.integers(0, 2**40),
)
def test_each_unit_runs_on_the_drawn_tokens_and_dropped_ones_pass(
    batch, seq, d, keep, layers, seed
):
    log = []
    torch.manual_seed(0)
    model = _Stack(d, 3, log)
    params, apply = fs.functional(model)
    full = {}  # unit -> (its full input, its full output), from module hooks outside the wrap
    for i, unit in enumerate(model.units):
        unit.register_forward_hook(
            lambda m, a, o, i=i: full.__setitem__(i, (a[0].detach(), o.detach()))
        )

    def loss_fn(params, batch):
        return apply(params, batch["x"]).square().mean()

    step = random_ltd(
        fs.train_step(loss_fn, fs.optim.sgd(lr=0.1), model=apply),
        keep=keep,
        layers=layers,
        seed=seed,
    )
    start = {k: v.clone() for k, v in params.items()}  # the step updates params in place
    state_params, state = step.init(params)
    x = torch.randn(batch, seq, d)
    _, _, metrics = step(state_params, state, {"x": x})
    assert metrics["random_ltd_keep"] == min(keep, seq)
    ran = {i: (inp, out) for i, unit in enumerate(model.units) for m, inp, out in log if m is unit}
    for i in range(3):
        inp, out = full[i]
        assert out.shape == inp.shape == (batch, seq, d)
        if i not in layers or keep >= seq:
            assert ran[i][0].shape == (batch, seq, d)
            continue
        idx = _positions(seed, 0, 0, i, batch, seq, keep)
        rows = torch.arange(batch)[:, None]
        dropped = torch.ones(batch, seq, dtype=torch.bool)
        dropped[rows, idx] = False
        assert torch.equal(out[dropped], inp[dropped])  # bypassed, bit for bit
        assert torch.equal(ran[i][0], inp[rows, idx])  # the unit saw the kept tokens, in order
        assert torch.equal(out[rows, idx], ran[i][1])
        with torch.no_grad():  # = the unit applied to the gathered sequence
            mine = {
                "lin.weight": start[f"units.{i}.lin.weight"],
                "lin.bias": start[f"units.{i}.lin.bias"],
            }
            torch.testing.assert_close(
                functional_call(model.units[i], mine, (inp[rows, idx],)), ran[i][1]
            )


# ----------------------------------------------------------------------------- stacks

Z3_BF16 = "zero3+bf16"


def _stacked(order, rank=0, world=1):
    model, params, apply = _gpt()
    step = fs.train_step(lm_loss(apply), _adamw(), model=apply)
    for name in order:
        if name == "ltd":
            step = random_ltd(step, keep=6, seed=3)
        elif name == "ck":
            step = fs.checkpoint_activations(step, policy="selective")
        elif name == "bf16":
            step = fs.mixed_precision(step, "bf16")
        elif name == "z3":
            step = fs.shard_zero(step, 3)
    return _train(step, params, steps=2, rank=rank, world=world)[0]


@pytest.mark.parametrize(
    "orders",
    [
        (("bf16", "z3", "ltd"), ("ltd", "bf16", "z3"), ("bf16", "ltd", "z3")),
        (("ltd", "ck"), ("ck", "ltd"), ("ltd",)),
        (("bf16", "z3", "ck", "ltd"), ("ltd", "bf16", "z3", "ck")),
    ],
    ids=["zero3-bf16", "checkpoint", "all"],
)
def test_stacks_in_any_order_give_the_same_params(orders):
    first, *rest = [_stacked(o) for o in orders]
    for other in rest:
        _assert_close(other, first)
    plain = _stacked(("bf16", "z3") if "z3" in orders[0] else ())
    assert not torch.equal(first["blocks.1.attn.qkv.weight"], plain["blocks.1.attn.qkv.weight"])


def test_under_zero3_it_is_the_same_transform():
    _assert_close(_stacked(("z3", "ltd")), _stacked(("ltd",)))  # fp32: exactly
    # bf16: ZeRO-3 + bf16 is not bit for bit bf16 alone, with or without random_ltd
    # (~3e-5 here); random_ltd adds nothing to the difference.
    _assert_close(_stacked(("bf16", "z3", "ltd")), _stacked(("bf16", "ltd")), atol=1e-4)


WORLD_ORDERS = (("ltd",), ("z3", "ltd"), ("ltd", "ck", "z3"))


def _in_world(rank, world, orders):
    torch.set_num_threads(1)
    return [_stacked(order, rank, world) for order in orders]


def test_a_gloo_world_of_two_under_zero3_and_checkpointing():
    # Each rank draws from the same seed for its own rows ([Note: the draw]). ZeRO-3's
    # reduce-scatter sums in another order than DDP's all-reduce (~6e-6 apart here with
    # or without random_ltd); among ZeRO-3 stacks and across ranks it is bit for bit.
    ranks = run_world(_in_world, 2, WORLD_ORDERS)
    ddp, zero3, zero3_ck = ranks[0]
    _assert_close(zero3, ddp, atol=1e-5)
    _assert_close(zero3_ck, zero3)
    for results in ranks[1:]:
        for got, want in zip(results, ranks[0], strict=True):
            _assert_close(got, want)


# ----------------------------------------------------------------------------- schedules


def test_a_keep_schedule_is_followed():
    model, params, apply = _gpt()
    lengths = []
    model.blocks[1].ln1.register_forward_hook(lambda m, a, o: lengths.append(a[0].shape[1]))
    model.blocks[0].ln1.register_forward_hook(lambda m, a, o: lengths.append(-a[0].shape[1]))
    step = random_ltd(
        fs.train_step(lm_loss(apply), _adamw(), model=apply), keep=lambda c: 4 + 6 * c
    )
    _, metrics = _train(step, params, steps=4)
    assert [m["random_ltd_keep"] for m in metrics] == [4, 10, 16, 16]
    assert lengths == [-16, 4, -16, 10, -16, 16, -16, 16]  # unit 0 always sees all 16


def test_layer_token_lr_is_the_written_formula():
    peak, end, seq, n, dropped, warm, total = 1e-3, 1e-4, 64, 6, 4, 2, 10
    keep = lambda c: min(16 + 8 * c, seq)  # noqa: E731
    lr = layer_token_lr(
        peak,
        keep=keep,
        seq_len=seq,
        n_layers=n,
        n_dropped=dropped,
        warmup_steps=warm,
        total_steps=total,
        end=end,
    )

    def lt(c):  # layer-tokens per sequence consumed by the first c steps
        return sum(dropped * keep(s) + (n - dropped) * seq for s in range(c))

    budget = total * n * seq
    assert lr(0) == 0.0 and lr(1) == peak / 2
    for c in (2, 5, 9, 14, 40):
        u = min((lt(c) - lt(warm)) / (budget - lt(warm)), 1.0)
        assert lr(c) == pytest.approx(end + (peak - end) * 0.5 * (1 + math.cos(math.pi * u)))
        assert lr.layer_tokens(c) == lt(c)
    assert lr(2) == pytest.approx(peak)
    assert lr(total) > end  # fewer layer-tokens per step: still decaying at the baseline's end
    assert lr(40) == pytest.approx(end)
    # Nothing dropped: the step-based warmup-cosine.
    full = layer_token_lr(
        peak,
        keep=seq,
        seq_len=seq,
        n_layers=n,
        n_dropped=dropped,
        warmup_steps=warm,
        total_steps=total,
        end=end,
    )
    base = fs.optim.schedules.warmup_cosine(peak, warm, total, end)
    assert [full(c) for c in range(13)] == pytest.approx([base(c) for c in range(13)])
    # Usable as adamw's lr: metrics["lr"] follows it.
    model, params, apply = _gpt()
    step = random_ltd(fs.train_step(lm_loss(apply), fs.optim.adamw(lr=lr), model=apply), keep=keep)
    _, metrics = _train(step, params, steps=3)
    assert [m["lr"] for m in metrics] == [lr(0), lr(1), lr(2)]


# ----------------------------------------------------------------------------- errors


def _plain():
    model, params, apply = _gpt()
    return fs.train_step(lm_loss(apply), _adamw(), model=apply)


def test_build_errors_say_what_to_do():
    step = _plain()
    assert "keep must be >= 1" in error_text(lambda: random_ltd(step, keep=0))
    assert "got -3" in error_text(lambda: random_ltd(step, keep=-3))
    assert error_text(lambda: random_ltd(step, keep=2.5)).startswith("TypeError: random_ltd: keep")
    assert error_text(lambda: random_ltd(step, keep=True)).startswith("TypeError")
    assert "layers names no unit" in error_text(lambda: random_ltd(step, keep=4, layers=[]))
    assert "index 4, but the model has 4 units" in error_text(
        lambda: random_ltd(step, keep=4, layers=[4])
    )
    assert "'blocks.9', which is not a unit" in error_text(
        lambda: random_ltd(step, keep=4, layers=["blocks.9"])
    )
    assert "unit indices or unit names" in error_text(
        lambda: random_ltd(step, keep=4, layers=[1.0])
    )
    _, _, apply = _gpt()
    no_model = fs.train_step(lm_loss(apply), _adamw())
    assert "does not know the model" in error_text(lambda: random_ltd(no_model, keep=4))
    _, _, apply2 = _gpt(GPTConfig.tiny(n_layer=2))
    two = fs.train_step(lm_loss(apply2), _adamw(), model=apply2)
    assert "has 2 units" in error_text(lambda: random_ltd(two, keep=4))
    assert error_text(lambda: random_ltd(two, keep=4, layers=[-1])) == "ok"
    assert "applied twice" in error_text(lambda: random_ltd(random_ltd(step, keep=4), keep=2))
    assert "seed must be an int" in error_text(lambda: random_ltd(step, keep=4, seed="a"))


def test_layers_forms_and_explain():
    step = _plain()
    for layers, names in (
        ("blocks.2", ["blocks.2"]),
        (-1, ["blocks.3"]),
        (range(1, 3), ["blocks.1", "blocks.2"]),
        ([1, "blocks.1"], ["blocks.1"]),
    ):
        assert (
            random_ltd(step, keep=4, layers=layers).applied("random_ltd").options["layers"] == names
        )
    _, params, _ = _gpt()
    text = fs.explain(random_ltd(step, keep=4, seed=2), params)
    assert "random_ltd(keep=4, layers=['blocks.1', 'blocks.2'], seed=2)" in text
    assert "2 of 4 units run on `keep` random tokens" in text


def test_run_errors_name_the_count_or_the_unit():
    model, params, apply = _gpt()
    step = random_ltd(fs.train_step(lm_loss(apply), _adamw(), model=apply), keep=lambda c: 0)
    assert "returned 0 at count 0" in error_text(lambda: _train(step, dict(params), 1))
    step = random_ltd(fs.train_step(lm_loss(apply), _adamw(), model=apply), keep=lambda c: 2.5)
    assert "must return an int" in error_text(lambda: _train(step, dict(params), 1))

    class Pool(nn.Module):  # not a residual unit: halves the sequence
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(()))

        def forward(self, x):
            return x[:, ::2] * self.w

    class Pools(nn.Module):
        def __init__(self):
            super().__init__()
            self.units = nn.ModuleList([Pool(), Pool(), Pool()])

        def forward(self, x):
            return sum(u(x).sum() for u in self.units)

    seq = Pools()
    p, apply = fs.functional(seq)
    step = random_ltd(
        fs.train_step(lambda p, b: apply(p, b["x"]), fs.optim.sgd(lr=0.1), model=apply),
        keep=3,
    )
    p, state = step.init(p)
    text = error_text(lambda: step(p, state, {"x": torch.ones(2, 8, 4)}))
    assert "unit 'units.1' returned (2, 2, 4) for a (2, 3, 4) input" in text


# ----------------------------------------------------------------------------- Hugging Face Llama


@pytest.mark.parametrize("attention", ["eager", "sdpa"])  # a 4-D mask; no mask (is_causal)
def test_hf_llama_layers_get_their_positions_and_mask_gathered(attention):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
        attn_implementation=attention,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).train()
    params, apply = fs.functional(model)

    def loss_fn(params, batch):
        logits = apply(params, input_ids=batch["x"], use_cache=False).logits
        return F.cross_entropy(logits.flatten(0, 1), batch["y"].flatten())

    step = random_ltd(fs.train_step(loss_fn, fs.optim.sgd(lr=0.1), model=apply), keep=5, seed=1)
    p, state = step.init({k: v.clone() for k, v in params.items()})
    batch = lm_batches(1, 2, 12, vocab=64, seed=4)[0]
    _, _, metrics = step(p, state, batch)

    # By hand: layer 1 runs on the drawn tokens with their RoPE angles and causal mask.
    with torch.no_grad():
        inner = model.model
        h = inner.embed_tokens(batch["x"])
        pos = torch.arange(12)[None]
        cos, sin = inner.rotary_emb(h, position_ids=pos)
        causal = torch.full((12, 12), float("-inf")).triu(1)[None, None]
        for i, layer in enumerate(inner.layers):
            if i == 1:
                idx = _positions(1, 0, 0, 1, 2, 12, 5)
                rows = torch.arange(2)[:, None]
                sub = causal[0, 0][idx[:, :, None], idx[:, None, :]][:, None]
                out = layer(
                    h[rows, idx],
                    attention_mask=sub,
                    position_ids=idx,
                    position_embeddings=(
                        cos.expand(2, -1, -1)[rows, idx],
                        sin.expand(2, -1, -1)[rows, idx],
                    ),
                )
                h = h.clone()
                h[rows, idx] = out
            else:
                h = layer(
                    h, attention_mask=causal, position_ids=pos, position_embeddings=(cos, sin)
                )
        logits = model.lm_head(inner.norm(h))
        want = F.cross_entropy(logits.flatten(0, 1), batch["y"].flatten())
    torch.testing.assert_close(metrics["loss"], want, atol=1e-6, rtol=0)
    assert metrics["random_ltd_keep"] == 5

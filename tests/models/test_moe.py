"""The MoE layer against loops written out here: routing, capacity, aux losses, the
layer's output; the Experts contract; the MoE GPT under the train step and transforms."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import fscale as fs
from fscale import aux_loss
from fscale.models import GPT, GPTConfig, MoE, gpt_loss
from fscale.models.moe import Experts, capacity, route


def _moe(**kw):
    torch.manual_seed(0)
    kw = {"d_model": 8, "num_experts": 4, "d_hidden": 12, **kw}
    return MoE(kw.pop("d_model"), kw.pop("num_experts"), **kw)


def _x(T=10, d=8, seed=1):
    return torch.randn(T, d, generator=torch.Generator().manual_seed(seed))


def _choices(logits, k, gating="softmax", normalize=None):
    """Per token: its k experts (largest score first) and their gates, by hand."""
    out = []
    for row in logits.tolist():
        if gating == "softmax":
            z = sum(math.exp(v) for v in row)
            scores = [math.exp(v) / z for v in row]
        else:
            scores = [1 / (1 + math.exp(-v)) for v in row]
        top = sorted(range(len(row)), key=lambda e: -scores[e])[:k]
        g = [scores[e] for e in top]
        if normalize if normalize is not None else (k > 1 or gating == "sigmoid"):
            g = [v / sum(g) for v in g]
        out.append((top, g))
    return out


def _kept(choices, E, cap):
    """{(t, j)} kept: every token's 1st choice before any 2nd, then by position."""
    used, kept = [0] * E, set()
    k = len(choices[0][0])
    for j in range(k):
        for t, (top, _) in enumerate(choices):
            if cap is None or used[top[j]] < cap:
                used[top[j]] += 1
                kept.add((t, j))
    return kept


def _loop_moe(moe, x2, cap=None):
    """The layer token by token, expert by expert (no residual / shared FFNs)."""
    logits = x2 @ moe.router.weight.T
    choices = _choices(logits, moe.top_k, moe.gating, moe.normalize_gates)
    kept = _kept(choices, moe.num_experts, cap)
    ex = moe.experts
    out = torch.zeros_like(x2)
    for t, (top, g) in enumerate(choices):
        for j, e in enumerate(top):
            if (t, j) not in kept:
                continue
            h = x2[t] @ ex.w_in[e]
            if ex.w_gate is not None:
                h = F.silu(x2[t] @ ex.w_gate[e]) * h
            else:
                h = F.gelu(h, approximate="tanh")
            out[t] += g[j] * (h @ ex.w_out[e])
    return out


# ----------------------------------------------------------------------------- routing


def test_load_balance_and_z_loss_equal_the_formulas():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 1.5, 0.0], [3.0, -2.0, 1.0], [0.0, 0.1, 0.2]])
    r = route(logits, top_k=2)
    T, E, k = 4, 3, 2
    choices = _choices(logits, k)
    f = [sum(e in top for top, _ in choices) / (T * k) for e in range(E)]
    P = [sum(logits[t].softmax(0)[e].item() for t in range(T)) / T for e in range(E)]
    by_hand = E * sum(f[e] * P[e] for e in range(E))
    assert r.load_balance.item() == pytest.approx(by_hand)
    z = sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in logits.tolist()) / T
    assert r.z_loss.item() == pytest.approx(z)
    # sigmoid gating balances the normalized scores
    rs = route(logits, top_k=1, gating="sigmoid")
    s = torch.sigmoid(logits)
    P = (s / s.sum(1, keepdim=True)).mean(0)
    f = torch.bincount(s.argmax(1), minlength=E) / T
    assert rs.load_balance.item() == pytest.approx((E * f * P).sum().item())


@pytest.mark.parametrize("gating", ["softmax", "sigmoid"])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_topk_choices_and_gates_equal_a_reference(gating, k):
    logits = _x(T=9, d=5, seed=k)
    r = route(logits, top_k=k, gating=gating)
    for t, (top, g) in enumerate(_choices(logits, k, gating)):
        assert r.experts[t].tolist() == top
        torch.testing.assert_close(r.gates[t], torch.tensor(g))
    assert r.counts.sum() == 9 * k and r.token.numel() == 9 * k  # dropless
    assert (torch.diff(r.experts.t().reshape(-1)[r.slot]) >= 0).all()  # sorted by expert


def test_capacity_formula_and_dropping_by_position():
    assert capacity(10, 4, 2, 1.25) == math.ceil(2 * 10 / 4 * 1.25) == 7
    assert capacity(3, 8, 1, 1.0, minimum=4) == 4
    assert capacity(10, 4, 2, None) is None
    logits = torch.zeros(8, 3)
    logits[:, 0] = 5.0  # everyone's first choice is expert 0
    logits[::2, 1] = 1.0
    logits[1::2, 2] = 1.0
    r = route(logits, top_k=2, capacity=3)
    kept = _kept(_choices(logits, 2), 3, 3)
    got = {(s % 8, s // 8) for s in r.slot.tolist()}
    assert got == kept
    assert r.counts.tolist() == [3, 3, 3]
    assert sorted(t for t, j in got if j == 0) == [0, 1, 2]  # earliest positions win


def test_drop_by_score_keeps_the_highest_gates():
    logits = torch.zeros(6, 2)
    logits[:, 0] = torch.tensor([1.0, 3.0, 2.0, 5.0, 0.5, 4.0])
    r = route(logits, top_k=1, capacity=2, drop_policy="score")
    assert sorted(r.token.tolist()) == [3, 5]


def test_random_token_selection_changes_who_drops_not_how_many():
    logits = _x(T=40, d=4, seed=3)
    base = route(logits, top_k=2, capacity=12)
    seen = set()
    for seed in range(4):
        torch.manual_seed(seed)
        r = route(logits, top_k=2, capacity=12, random_token_selection=True)
        assert torch.equal(r.counts, base.counts)
        seen.add(frozenset(r.slot.tolist()))
    assert len(seen) > 1 or frozenset(base.slot.tolist()) not in seen


def test_noisy_gating_only_in_training():
    moe, x2 = _moe(noisy_std=5.0, capacity_factor=None), _x(T=30)
    clean = moe.route(x2)
    moe.train()
    torch.manual_seed(0)
    noisy = moe.route(x2)
    assert not torch.equal(noisy.experts, clean.experts)
    torch.testing.assert_close(noisy.z_loss, clean.z_loss)  # losses use the clean logits
    moe.eval()
    assert torch.equal(moe.route(x2).experts, route(x2 @ moe.router.weight.T, top_k=2).experts)


# ----------------------------------------------------------------------------- layer


@pytest.mark.parametrize(
    "kw",
    [
        {"top_k": 1},
        {"top_k": 2},
        {"top_k": 3, "activation": "swiglu"},
        {"top_k": 2, "gating": "sigmoid"},
        {"top_k": 1, "normalize_gates": True},
    ],
)
def test_dropless_layer_equals_the_token_loop(kw):
    moe, x2 = _moe(capacity_factor=None, **kw), _x()
    torch.testing.assert_close(moe(x2), _loop_moe(moe, x2), atol=1e-5, rtol=1e-5)


def test_capacity_layer_equals_the_loop_with_drops():
    moe, x2 = _moe(capacity_factor=0.5, min_capacity=1), _x(T=16)
    cap = moe.capacity(16)
    assert cap == math.ceil(2 * 16 / 4 * 0.5) == 4
    y = moe(x2)
    torch.testing.assert_close(y, _loop_moe(moe, x2, cap), atol=1e-5, rtol=1e-5)
    moe.eval()  # eval_capacity_factor None: dropless
    torch.testing.assert_close(moe(x2), _loop_moe(moe, x2), atol=1e-5, rtol=1e-5)


def _layer_grads(moe, x2):
    x2 = x2.clone().requires_grad_()
    y = moe(x2)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(3))
    grads = torch.autograd.grad(y, (x2, *moe.parameters()), dy)
    return y, grads


@pytest.mark.parametrize("cf", [None, 0.5])
def test_fused_dispatch_and_combine_equal_the_torch_path(monkeypatch, cf):
    """The Triton gather-sum kernels (interpreted, fp32) against the torch ops."""
    from fscale.kernels import grouped_gemm_triton as ggt
    from fscale.kernels._triton import interpreting
    from fscale.models import moe as moe_mod

    if ggt.triton is None or not interpreting():
        pytest.skip("needs triton under TRITON_INTERPRET=1")
    moe, x2 = _moe(capacity_factor=cf, min_capacity=1), _x(T=16)
    want = _layer_grads(moe, x2)
    monkeypatch.setattr(moe_mod, "_fused", lambda t: True)
    got = _layer_grads(moe, x2)
    torch.testing.assert_close(got[0], want[0], atol=0, rtol=0)
    for a, b in zip(got[1], want[1], strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_dispatch_and_combine_grads_equal_the_loop():
    """The experts' grads (the loop's gates are constants, so not the router's)."""
    moe, x2 = _moe(capacity_factor=0.5, min_capacity=1), _x(T=16)
    dy = torch.randn(16, 8, generator=torch.Generator().manual_seed(3))
    ws = (moe.experts.w_in, moe.experts.w_out)
    got = torch.autograd.grad(moe(x2), ws, dy)
    want = torch.autograd.grad(_loop_moe(moe, x2, moe.capacity(16)), ws, dy)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_aux_losses_are_added_with_their_weights():
    moe, x2 = _moe(aux_loss_weight=0.1, z_loss_weight=0.01), _x()
    with aux_loss.collecting() as aux:
        moe(x2)
    r = moe.route(x2)
    m = aux.metrics()
    torch.testing.assert_close(m["aux/moe_load_balance"], 0.1 * r.load_balance)
    torch.testing.assert_close(m["aux/moe_z_loss"], 0.01 * r.z_loss)


def test_dropless_rows_are_independent_of_the_batch_split():
    moe, x2 = _moe(capacity_factor=None), _x(T=12)
    whole = moe(x2)
    torch.testing.assert_close(whole, torch.cat([moe(x2[:5]), moe(x2[5:])]))


def test_residual_and_shared_experts():
    moe, x2 = _moe(residual=True, shared_experts=2), _x()
    assert moe.residual_coef.weight.shape == (2, 8)
    assert moe.shared.fc.weight.shape == (24, 8)  # 2 shared experts of width 12, fused
    plain = _moe(capacity_factor=None)
    moe.load_state_dict(plain.state_dict(), strict=False)
    moe.capacity_factor = None
    coef = F.softmax(moe.residual_coef(x2), -1)
    want = _loop_moe(moe, x2) * coef[:, :1] + moe.residual_mlp(x2) * coef[:, 1:] + moe.shared(x2)
    torch.testing.assert_close(moe(x2), want, atol=1e-5, rtol=1e-5)


def test_experts_hook_sees_sorted_rows_and_global_counts():
    moe, x2 = _moe(num_experts=6), _x(T=20)
    seen = {}
    inner = moe.experts.forward

    def hook(x, counts):
        seen["x"], seen["counts"] = x, counts
        return inner(x, counts)

    moe.experts.forward = hook
    moe(x2)
    assert seen["counts"].shape == (6,) and seen["counts"].dtype == torch.int64
    assert seen["x"].shape[0] == int(seen["counts"].sum())


def test_experts_take_a_slice_of_the_experts():
    ex = Experts(4, 8, 12, activation="swiglu")
    local = Experts(2, 8, 12, activation="swiglu")
    with torch.no_grad():
        for name in ("w_in", "w_gate", "w_out"):
            getattr(local, name).copy_(getattr(ex, name)[2:])
    x, counts = _x(T=9), torch.tensor([2, 3, 0, 4])
    torch.testing.assert_close(local(x[5:], counts[2:]), ex(x, counts)[5:])


def test_experts_grads_under_checkpoint():
    ex, x, counts = Experts(3, 8, 12), _x(T=7).requires_grad_(), torch.tensor([3, 0, 4])
    params = (x, ex.w_in, ex.w_out)
    plain = torch.autograd.grad(ex(x, counts).square().sum(), params)
    y = torch.utils.checkpoint.checkpoint(ex, x, counts, use_reentrant=False)
    torch.testing.assert_close(torch.autograd.grad(y.square().sum(), params), plain)


# ----------------------------------------------------------------------------- GPT


def test_config_errors_are_clear():
    with pytest.raises(ValueError, match="top_k=5"):
        GPTConfig.moe_tiny(top_k=5)
    with pytest.raises(ValueError, match="capacity_factor=0"):
        GPTConfig.moe_tiny(capacity_factor=0)
    with pytest.raises(ValueError, match="pyramid has 1 entries"):
        GPTConfig.moe_tiny(pyramid=(4,))
    with pytest.raises(ValueError, match="experts > 0"):
        GPTConfig.tiny(pyramid=(4, 8))
    with pytest.raises(ValueError, match="moe_every=3"):
        GPTConfig.moe_tiny(moe_every=3)
    with pytest.raises(ValueError, match="gating="):
        GPTConfig.moe_tiny(gating="relu")
    with pytest.raises(ValueError, match="pyramid entry 1"):
        GPTConfig.moe_tiny(pyramid=(4, 1))  # top_k=2 > 1 expert


def test_moe_every_and_pyramid_and_residual_shapes():
    cfg = GPTConfig.tiny(n_layer=4, experts=2, moe_every=2, pyramid=[2, 4], residual=True)
    model = GPT(cfg)
    assert cfg.pyramid == (2, 4) and cfg.moe_layers() == [1, 3]
    kinds = ["moe" if "moe" in b._modules else "mlp" for b in model.blocks]
    assert kinds == ["mlp", "moe", "mlp", "moe"]
    assert model.blocks[1].moe.experts.w_in.shape == (2, 32, 128)
    assert model.blocks[3].moe.experts.w_out.shape == (4, 128, 32)
    assert model.blocks[3].moe.residual_mlp is not None
    assert model(torch.randint(0, 256, (2, 8))).shape == (2, 8, 256)


def test_flops_count_active_parameters():
    model = GPT(GPTConfig.moe_tiny(experts=4, top_k=1))
    d, per_expert = 32, 2 * 32 * 128
    assert model.num_params() - model.num_params(active=True) == 2 * 3 * per_expert
    dense = GPT(GPTConfig.tiny())
    router = 2 * 4 * d
    mlp_biases = 2 * (4 * d + d)  # the dense MLPs' biases; experts have none
    assert model.num_params(active=True) == dense.num_params() + router - mlp_biases
    diff = 6 * (router - mlp_biases)
    assert model.flops_per_token() == dense.flops_per_token() + diff


def _batch(cfg, B=4, T=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.vocab_size, (B, T + 1), generator=g)
    return {"x": tokens[:, :-1], "y": tokens[:, 1:]}


def test_moe_gpt_trains_with_the_dense_loss():
    cfg = GPTConfig.moe_tiny()
    torch.manual_seed(0)
    model = GPT(cfg)
    params, apply = fs.functional(model)
    step = fs.train_step(gpt_loss(apply), fs.optim.adamw(1e-2), model=model)
    params, state = step.init(params)
    batch, losses = _batch(cfg), []
    for _ in range(6):
        params, state, metrics = step(params, state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0] - 0.3, losses
    assert "aux/moe_load_balance" in metrics and "aux/moe_z_loss" in metrics
    # two MoE layers, each near 1 when balanced, weighted by 0.01
    assert 0.01 < float(metrics["aux/moe_load_balance"]) < 0.2


@pytest.mark.parametrize(
    "wrap,changes",
    [
        ("checkpoint", {"residual": True}),
        ("zero3", {"residual": True}),
        # the recomputed forward must draw the same noise and RTS order
        ("checkpoint", {"noisy_std": 1.0, "random_token_selection": True, "capacity_factor": 0.5}),
    ],
)
def test_moe_gpt_under_transforms_equals_plain(wrap, changes):
    cfg = GPTConfig.moe_tiny(**changes)
    batch = _batch(cfg, seed=1)
    results = []
    for wrapped in (False, True):
        torch.manual_seed(0)
        model = GPT(cfg)
        params, apply = fs.functional(model)
        step = fs.train_step(gpt_loss(apply), fs.optim.sgd(0.1), model=model)
        if wrapped:
            wrapper = fs.checkpoint_activations if wrap == "checkpoint" else fs.shard_zero
            step = wrapper(step) if wrap == "checkpoint" else wrapper(step, 3)
        params, state = step.init(params)
        torch.manual_seed(5)
        params, state, metrics = step(params, state, batch)
        results.append(({k: v.detach().clone() for k, v in params.items()}, metrics))
    (p0, m0), (p1, m1) = results
    torch.testing.assert_close(m1["loss"], m0["loss"])
    torch.testing.assert_close(m1["aux/moe_load_balance"], m0["aux/moe_load_balance"])
    for name in p0:
        torch.testing.assert_close(p1[name], p0[name], atol=1e-6, rtol=1e-5, msg=name)

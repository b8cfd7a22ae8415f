"""The small transformations (scale, clip, decay, masked) and chains against by-hand runs."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fscale import tree
from fscale.optim import (
    ClipByGlobalNormState,
    ScheduleState,
    adamw,
    add_decayed_weights,
    apply_gradients,
    apply_updates,
    chain,
    clip_by_global_norm,
    decay_mask_default,
    global_norm,
    linear_warmup,
    masked,
    scale,
    scale_by_learning_rate,
    sgd,
)

from ._helpers import TOL, clone, make_grads, make_params, rel_err, seeds, shapes


@settings(max_examples=25, deadline=None)
@given(shape_list=shapes, seed=seeds, max_norm=st.floats(0.01, 20.0), with_none=st.booleans())
def test_clip_by_global_norm_equals_torch(shape_list, seed, max_norm, with_none):
    params = make_params(shape_list, seed)
    grads = make_grads(params, seed, steps=1)[0]
    if with_none:
        grads["frozen"], params["frozen"] = None, torch.ones(2)
    tparams = [torch.nn.Parameter(p.clone()) for k, p in params.items() if grads[k] is not None]
    for p, g in zip(tparams, [g for g in grads.values() if g is not None], strict=True):
        p.grad = g.clone()
    want_norm = torch.nn.utils.clip_grad_norm_(tparams, max_norm)
    tx = clip_by_global_norm(max_norm)
    got, state = tx.update(clone(grads), tx.init(params))
    assert isinstance(state, ClipByGlobalNormState)
    assert torch.equal(state.norm, want_norm)
    live = [k for k in grads if grads[k] is not None]
    assert all(torch.equal(got[k], p.grad) for k, p in zip(live, tparams, strict=True))
    if with_none:
        assert got["frozen"] is None


def test_clip_reports_pre_clip_norm_and_leaves_small_grads_alone():
    grads = {"a": torch.tensor([3.0, 4.0]), "b": torch.zeros(3)}
    tx = clip_by_global_norm(1.0)
    out, state = tx.update(clone(grads), tx.init(grads))
    assert state.norm.item() == pytest.approx(5.0)
    assert torch.allclose(out["a"], torch.tensor([0.6, 0.8]), rtol=1e-5)
    out, state = clip_by_global_norm(10.0).update(clone(grads), state)
    assert torch.equal(out["a"], grads["a"])
    assert global_norm({"x": None}).item() == 0.0
    assert global_norm({"h": torch.full((4,), 0.5, dtype=torch.bfloat16)}).dtype == torch.float32


def test_scale_and_scale_by_learning_rate_schedule():
    g = {"a": torch.ones(2), "none": None}
    out, _ = scale(-2.0).update(clone(g), ())
    assert torch.equal(out["a"], torch.full((2,), -2.0)) and out["none"] is None
    tx = scale_by_learning_rate(linear_warmup(1.0, 4))
    state = tx.init(g)
    assert state == ScheduleState(count=0)
    seen = []
    for _ in range(6):
        out, state = tx.update(clone(g), state)
        seen.append(out["a"][0].item())
    assert seen == [-0.0, -0.25, -0.5, -0.75, -1.0, -1.0] and state.count == 6


def test_add_decayed_weights_with_mask():
    params = {"w": torch.full((2, 2), 2.0), "b": torch.full((2,), 2.0)}
    tx = add_decayed_weights(0.5, mask=decay_mask_default)
    out, _ = tx.update({"w": torch.ones(2, 2), "b": torch.ones(2)}, tx.init(params), params)
    assert torch.equal(out["w"], torch.full((2, 2), 2.0))
    assert torch.equal(out["b"], torch.ones(2))
    with pytest.raises(ValueError, match="add_decayed_weights needs the params"):
        tx.update({"w": torch.ones(2, 2), "b": torch.ones(2)}, tx.init(params))


def test_sgd_as_a_chain_equals_sgd():
    params = make_params([(3, 2), (2,)], 2)
    grads = make_grads(params, 2, steps=3)
    a = chain(add_decayed_weights(0.01), scale_by_learning_rate(0.1))
    b = sgd(0.1, weight_decay=0.01)
    pa, pb = clone(params), clone(params)
    sa, sb = a.init(pa), b.init(pb)
    for g in grads:
        ua, sa = a.update(clone(g), sa, pa)
        ub, sb = b.update(clone(g), sb, pb)
        pa, pb = apply_updates(pa, ua), apply_updates(pb, ub)
    assert rel_err(pa, pb) == 0.0


def test_masked_only_touches_selected_leaves():
    params = {"w": torch.ones(2, 2), "b": torch.ones(2)}
    grads = {"w": torch.ones(2, 2), "b": torch.ones(2)}
    tx = masked(sgd(0.1, momentum=0.9), decay_mask_default)
    state = tx.init(params)
    assert state.momentum_buffer["b"] is None  # no state kept for masked-out leaves
    out, state = tx.update(clone(grads), state, params)
    assert torch.allclose(out["w"], torch.full((2, 2), -0.1))
    assert torch.equal(out["b"], grads["b"])


@settings(max_examples=15, deadline=None)
@given(shape_list=shapes, seed=seeds, max_norm=st.floats(0.1, 5.0))
def test_chain_clip_adamw_equals_the_two_by_hand(shape_list, seed, max_norm):
    params = make_params(shape_list, seed)
    grads_seq = make_grads(params, seed, steps=4)
    clip, opt = clip_by_global_norm(max_norm), adamw(1e-2, weight_decay=0.1)
    tx = chain(clip, opt)
    assert tx.update_params is not None  # the chain is fused through adamw's kernel path

    by_hand = clone(params)
    s_clip, s_opt = clip.init(by_hand), opt.init(by_hand)
    unfused, fused = clone(params), clone(params)
    s_unfused, s_fused = tx.init(unfused), tx.init(fused)
    for grads in grads_seq:
        g, s_clip = clip.update(clone(grads), s_clip)
        u, s_opt = opt.update(g, s_opt, by_hand)
        by_hand = apply_updates(by_hand, u)

        u, s_unfused = tx.update(clone(grads), s_unfused, unfused)
        unfused = apply_updates(unfused, u)
        fused, s_fused = apply_gradients(tx, clone(grads), s_fused, fused)

        assert torch.equal(s_unfused[0].norm, s_clip.norm)
        assert torch.equal(s_fused[0].norm, s_clip.norm)
    assert rel_err(unfused, by_hand) == 0.0
    assert rel_err(fused, by_hand, params) <= TOL
    assert tree.structure(s_fused) == tree.structure(s_unfused)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: clip_by_global_norm(0.0), r"max_norm must be a float > 0, got 0\.0"),
        (lambda: clip_by_global_norm(-1.0), r"max_norm must be a float > 0, got -1\.0"),
        (lambda: scale(float("nan")), r"scale: factor must be a finite float, got nan"),
        (lambda: scale_by_learning_rate(-0.1), r"lr must be a float >= 0 or a schedule.*-0\.1"),
        (lambda: add_decayed_weights(-1e-4), r"weight_decay must be a float >= 0.*-0\.0001"),
        (lambda: masked(sgd(0.1), None), r"masked\(inner, mask\) needs a mask"),
    ],
)
def test_bad_arguments_raise(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_masked_needs_a_transformation():
    with pytest.raises(TypeError, match="needs a GradientTransformation, got function"):
        masked(lambda g: g, decay_mask_default)


def test_step_count_reads_the_count_without_describing_offloaded_moments():
    import fscale as fs
    from fscale.optim.base import step_count
    from tests.helpers import mlp, regression_batches, regression_loss

    model = mlp([3, 5, 2])
    params, apply = fs.functional(model)
    step = fs.offload(fs.train_step(regression_loss(apply), fs.optim.adamw(1e-2)), "cpu")
    params, state = step.init(params)
    opt = state["optimizer"]
    assert step_count(opt) == 0
    for batch in regression_batches(2, 4, 3, 2):
        params, state, _ = step(params, state, batch)
    assert step_count(state["optimizer"]) == 2 == state["optimizer"].describe_state().count
    assert step_count(fs.optim.adamw(1e-2).init(params)) == 0
    with pytest.raises(TypeError, match="has no step count"):
        step_count(())

"""Bad input gets a clear error that names the fix, raised when the step is built."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fscale as fs
from tests.helpers import mlp, regression_batches, regression_loss


@pytest.fixture
def setup():
    params, apply = fs.functional(mlp([3, 4, 2]))
    step = fs.train_step(regression_loss(apply), fs.optim.sgd(0.1))
    return step, params, apply


def _toy(name, **kw):
    """A transform that rewrites nothing: enough to exercise the stack checks."""

    def transform(step):
        return step.with_transform(fs.Transform(name, **kw))

    return transform


def test_params_not_from_init(setup):
    step, params, _ = setup
    _, state = step.init(dict(params))
    bad = {k: v for k, v in params.items() if k != "0.bias"}
    with pytest.raises(ValueError, match="structure step.init produced"):
        step(bad, state, regression_batches(1, 2, 3, 2)[0])


def test_params_with_other_shapes_than_init(setup):
    step, params, _ = setup
    params, state = step.init(params)
    bad = dict(params, **{"0.weight": torch.zeros(5, 5)})
    with pytest.raises(ValueError, match=r"param '0.weight' has shape \(5, 5\)"):
        step(bad, state, regression_batches(1, 2, 3, 2)[0])


def test_state_not_from_init(setup):
    step, params, _ = setup
    with pytest.raises(ValueError, match="state was not produced by step.init"):
        step(params, {}, regression_batches(1, 2, 3, 2)[0])


def test_integer_params(setup):
    step, params, _ = setup
    with pytest.raises(TypeError, match="dtype torch.int64; only floating tensors"):
        step.init({**params, "counter": torch.zeros(3, dtype=torch.int64)})


def test_module_instead_of_params(setup):
    step, _, _ = setup
    with pytest.raises(TypeError, match="pass its params"):
        step.init(mlp([2, 2]))


def test_torch_optimizer_is_refused(setup):
    _, params, apply = setup
    with pytest.raises(TypeError, match="must be a GradientTransformation"):
        fs.train_step(regression_loss(apply), torch.optim.SGD(list(params.values()), lr=0.1))


def test_unknown_hyperparameter():
    with pytest.raises(TypeError, match="unexpected keyword argument 'betas'"):
        fs.optim.adamw(lr=1e-3, betas=(0.9, 0.99))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"accumulate": 0}, "accumulate must be a positive int"), ({"clip_norm": -1.0}, "clip_norm")],
)
def test_bad_step_options(setup, kwargs, match):
    _, _, apply = setup
    with pytest.raises(ValueError, match=match):
        fs.train_step(regression_loss(apply), fs.optim.sgd(0.1), **kwargs)


def test_batch_not_divisible_by_accumulate(setup):
    _, params, apply = setup
    step = fs.train_step(regression_loss(apply), fs.optim.sgd(0.1), accumulate=3)
    params, state = step.init(params)
    with pytest.raises(ValueError, match="use a batch size divisible by 3"):
        step(params, state, regression_batches(1, 4, 3, 2)[0])


def test_non_scalar_loss(setup):
    _, params, apply = setup
    step = fs.train_step(
        lambda p, b: F.mse_loss(apply(p, b["x"]), b["y"], reduction="none"), fs.optim.sgd(0.1)
    )
    params, state = step.init(params)
    with pytest.raises(ValueError, match=r"must return a scalar tensor, got \(4, 2\)"):
        step(params, state, regression_batches(1, 4, 3, 2)[0])


def test_transform_applied_twice(setup):
    step, _, _ = setup
    twice = _toy("shard_zero")
    with pytest.raises(ValueError, match="shard_zero is applied twice"):
        twice(twice(step))


def test_illegal_stack_names_both_transforms_and_the_fix(setup):
    step, _, _ = setup
    inner = _toy("shard_zero")
    outer = _toy(
        "mixed_precision",
        refuses_inner={"shard_zero": "apply it first: shard_zero(mixed_precision(step))."},
    )
    with pytest.raises(
        ValueError, match=r"mixed_precision cannot be applied over shard_zero: apply it first"
    ):
        outer(inner(step))
    # The other order is legal.
    assert [t.name for t in inner(outer(step)).transforms] == ["mixed_precision", "shard_zero"]


def test_conflict_declared_by_the_inner_transform(setup):
    step, _, _ = setup
    inner = _toy("offload", refuses_outer={"shard_zero": "apply shard_zero inside offload."})
    with pytest.raises(ValueError, match="shard_zero cannot be applied over offload"):
        _toy("shard_zero")(inner(step))


def test_symmetric_conflict(setup):
    step, _, _ = setup
    a = _toy("expert_parallel", conflicts={"compress_comm": "not supported together yet."})
    with pytest.raises(ValueError, match="expert_parallel cannot be applied over compress_comm"):
        a(_toy("compress_comm")(step))
    with pytest.raises(ValueError, match="compress_comm cannot be applied over expert_parallel"):
        _toy("compress_comm")(a(step))


def test_missing_required_transform(setup):
    step, _, _ = setup
    with pytest.raises(ValueError, match="offload requires shard_zero to be applied first"):
        _toy("offload", requires=("shard_zero",))(step)


def test_unknown_stage(setup):
    step, _, _ = setup
    with pytest.raises(ValueError, match="rewrites unknown stages"):
        step.with_transform(fs.Transform("x"), forward=lambda *a: None)


def test_functional_needs_a_module():
    with pytest.raises(TypeError, match="expects an nn.Module"):
        fs.functional(lambda x: x)

"""fscale.hw.tagged: collectives called by tag, a replaced lowering per tag, scoped to a step."""

from __future__ import annotations

import types

import pytest
import torch

import fscale as fs
from fscale.hw import comm
from fscale.hw.tagged import Call, Collectives, TaggedLowering
from fscale.step import StepContext
from tests.dist import run_world


def _ctx(**state):
    return types.SimpleNamespace(state=dict(state))  # Collectives only reads ctx.state


def _recording(log: list, result=None):
    """A lowering that records what it gets and runs the default lowering."""

    def fn(call, t, **kwargs):
        log.append((call.tag, call.op, call.owner, kwargs))
        return call.default(t, **kwargs) if result is None else result(t)

    return fn


# ----------------------------------------------------------------------------- default path


def test_an_unreplaced_tag_runs_the_comm_table_and_is_counted_under_its_tag():
    c = Collectives((), _ctx())
    t = torch.arange(4.0)
    with comm.counting() as counts:
        out = c.all_reduce("dp.grads", t, op="avg")
        gathered = c.all_gather("zero.params", t)
    assert out is t and torch.equal(t, torch.arange(4.0))  # a world of one
    assert torch.equal(gathered, t)
    assert counts.tags["dp.grads"].calls == 1 and counts.tags["dp.grads"].bytes == 16
    assert counts.tags["zero.params"].calls == 1
    assert not c.replaced("dp.grads")


@pytest.mark.parametrize("tag", [torch.zeros(2), "", None])
def test_the_tag_comes_first(tag):
    c = Collectives((), _ctx())
    with pytest.raises(TypeError, match=r"takes the tag first \(e\.g\. ctx\.comm\.all_reduce"):
        c.all_reduce(tag, torch.zeros(2))


# ----------------------------------------------------------------------------- replaced


def test_a_replaced_lowering_gets_the_call_and_the_ops_own_arguments():
    log = []
    c = Collectives((TaggedLowering("t", "mine", _recording(log)),), _ctx(mine={}))
    t = torch.arange(4.0)
    c.all_reduce("t", t, op="max")
    c.all_gather("t", t)
    c.reduce_scatter("t", t, op="avg")
    c.all_to_all("t", t, output_split_sizes=[4], input_split_sizes=[4])
    c.broadcast("t", t, src=0)
    assert log == [
        ("t", "all_reduce", "mine", {"op": "max", "group": None, "async_op": False}),
        ("t", "all_gather", "mine", {"group": None, "async_op": False}),
        ("t", "reduce_scatter", "mine", {"op": "avg", "group": None, "async_op": False}),
        (
            "t",
            "all_to_all",
            "mine",
            {
                "output_split_sizes": [4],
                "input_split_sizes": [4],
                "group": None,
                "async_op": False,
            },
        ),
        ("t", "broadcast", "mine", {"src": 0, "group": None, "async_op": False}),
    ]
    assert c.replaced("t") and not c.replaced("other")


def test_donation_reaches_the_comm_table_but_not_a_replaced_lowering():
    log = []
    c = Collectives((TaggedLowering("t", "mine", _recording(log)),), _ctx(mine={}))
    t = torch.arange(4.0)
    assert c.all_gather("zero.params", t, donate=True) is t  # a world of one
    assert c.reduce_scatter("zero.grads", t, op="avg", donate=True) is t
    out = c.all_gather("t", t, donate=True)
    assert out is not t and torch.equal(out, t)
    assert log == [("t", "all_gather", "mine", {"group": None, "async_op": False})]


def test_only_its_own_tag_is_replaced():
    log = []
    c = Collectives((TaggedLowering("zero.grads", "mine", _recording(log)),), _ctx(mine={}))
    c.all_reduce("dp.grads", torch.zeros(2))
    c.reduce_scatter("zero.params", torch.zeros(2))
    assert log == []


def test_call_state_is_the_owners_slot():
    def count(call, t, **kwargs):
        call.state = {"calls": call.state["calls"] + 1}
        return call.default(t, **kwargs)

    ctx = _ctx(mine={"calls": 0}, other={"calls": 7})
    c = Collectives((TaggedLowering("t", "mine", count),), ctx)
    for _ in range(3):
        c.all_reduce("t", torch.zeros(2))
    assert ctx.state == {"mine": {"calls": 3}, "other": {"calls": 7}}


def test_a_missing_state_slot_names_the_owner_and_the_fix():
    c = Collectives((TaggedLowering("t", "mine", lambda call, t, **kw: call.state),), _ctx())
    with pytest.raises(RuntimeError, match=r"'t' reads the state slot 'mine'.*mine's init stage"):
        c.all_reduce("t", torch.zeros(2))


def test_default_is_counted_once_under_the_tag():
    c = Collectives((TaggedLowering("zero.grads", "mine", _recording([])),), _ctx(mine={}))
    with comm.counting() as counts:
        c.reduce_scatter("zero.grads", torch.zeros(6))
    assert counts.tags["zero.grads"].calls == 1 and counts.tags["zero.grads"].bytes == 24
    assert counts.ops["reduce_scatter"].calls == 1


def test_a_plain_tensor_for_an_async_call_becomes_a_completed_handle():
    c = Collectives(
        (TaggedLowering("t", "mine", lambda call, t, **kw: t * 2),),
        _ctx(mine={}),
    )
    h = c.all_gather("t", torch.ones(3), async_op=True)
    assert isinstance(h, comm.Handle) and h.is_completed()
    assert torch.equal(h.wait(), torch.full((3,), 2.0))


@pytest.mark.parametrize("async_op", [False, True])
@pytest.mark.parametrize("op", ["all_reduce", "broadcast"])
def test_in_place_ops_land_in_the_input_whatever_the_lowering_returns(op, async_op):
    # tagged.py's own example: reduce an fp16 copy and return it cast back (a new tensor).
    def fp16(call, t, **kw):
        return call.default(t.half(), **{**kw, "async_op": False}).to(t.dtype) + 1

    c = Collectives((TaggedLowering("t", "mine", fp16),), _ctx(mine={}))
    t = torch.tensor([1.0, 2.0])
    out = getattr(c, op)("t", t, async_op=async_op)
    if async_op:
        out = out.wait()
    assert out is t
    assert torch.equal(t, torch.tensor([2.0, 3.0]))


# ----------------------------------------------------------------------------- on a step


def _step():
    params, apply = fs.functional(torch.nn.Linear(3, 2))
    return fs.train_step(lambda p, b: apply(p, b).sum(), fs.optim.sgd(0.1)), params


def test_lowerings_are_scoped_to_the_step_that_declared_them():
    step, params = _step()
    mine = step.with_transform(fs.Transform("mine"), lowerings={"dp.grads": _recording([])})
    assert [(e.tag, e.owner) for e in mine.lowerings] == [("dp.grads", "mine")]
    _, state = mine.init(dict(params))
    assert StepContext(mine, state).comm.replaced("dp.grads")
    assert not StepContext(step, state).comm.replaced("dp.grads")
    assert step.lowerings == ()


def test_a_lowering_must_be_callable():
    step, _ = _step()
    with pytest.raises(TypeError, match=r"mine: the lowering of 'dp\.grads' must be callable"):
        step.with_transform(fs.Transform("mine"), lowerings={"dp.grads": "fp16"})


def test_two_owners_of_one_tag_raise_naming_both():
    step, _ = _step()
    step = step.with_transform(fs.Transform("a"), lowerings={"dp.grads": _recording([])})
    with pytest.raises(
        ValueError, match=r"b replaces the lowering of 'dp\.grads', which a already replaced"
    ):
        step.with_transform(fs.Transform("b"), lowerings={"dp.grads": _recording([])})


def test_call_default_runs_the_same_op():
    call = Call("t", "all_gather", "mine", _ctx())
    assert torch.equal(call.default(torch.ones(2), group=None, async_op=False), torch.ones(2))


# ----------------------------------------------------------------------------- gloo world of 2


def _world_fn(rank, world):
    def fp16(call, t, **kw):
        call.state = {"calls": call.state["calls"] + 1}
        # Async through the default lowering, cast back when waited on.
        return call.default(t.half(), **kw).then(lambda r: r.to(t.dtype))

    ctx = _ctx(mine={"calls": 0})
    c = Collectives((TaggedLowering("x", "mine", fp16),), ctx)
    out = {}
    t = torch.tensor([1.0, 2.0, 3.0, 4.0]) * (rank + 1)
    h = c.all_reduce("x", t, op="avg", async_op=True)
    out["all_reduce"] = (h.wait() is t, t.clone())
    out["reduce_scatter"] = c.reduce_scatter("x", torch.arange(4.0) + rank, op="sum", async_op=True)
    out["reduce_scatter"] = out["reduce_scatter"].wait()
    out["all_gather"] = c.all_gather("x", torch.tensor([float(rank)]), async_op=True).wait()
    out["dtype"] = out["all_gather"].dtype
    with comm.counting() as counts:
        c.all_reduce("plain", torch.ones(2), op="sum")
    out["plain"] = counts.tags["plain"].calls
    out["calls"] = ctx.state["mine"]["calls"]
    return out


def test_a_replaced_lowering_on_gloo():
    for rank, out in enumerate(run_world(_world_fn, 2)):
        assert out["all_reduce"][0]  # the handle's result is the input, reduced in place
        assert torch.equal(out["all_reduce"][1], torch.tensor([1.5, 3.0, 4.5, 6.0]))
        want = (torch.arange(4.0) * 2 + 1)[rank * 2 : rank * 2 + 2]
        assert torch.equal(out["reduce_scatter"], want)
        assert torch.equal(out["all_gather"], torch.tensor([0.0, 1.0]))
        assert out["dtype"] == torch.float32
        assert out["plain"] == 1 and out["calls"] == 3

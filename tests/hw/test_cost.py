"""The comm cost model (fscale/hw/cost.py): formulas by hand, parsing, fs.explain's line."""

from __future__ import annotations

import pytest
import torch

import fscale as fs
from fscale.hw import cost
from fscale.models.gpt import GPT, GPTConfig
from fscale.plan import Collective
from tests.dist import run_world
from tests.helpers import lm_loss

MB = 10**6


@pytest.mark.parametrize(
    "text, bits",
    [
        ("1gbit", 1e9),
        ("10Gbit/s", 1e10),
        ("400mbit", 4e8),
        (" 2.5 gbit ", 2.5e9),
        ("1.25GB/s", 1e10),
        ("100MB/s", 8e8),
        ("1e9bit", 1e9),
        (5e8, 5e8),
    ],
)
def test_parse_bandwidth(text, bits):
    assert cost.parse_bandwidth(text) == pytest.approx(bits)


@pytest.mark.parametrize(
    "text, match",
    [
        ("fast", "not understood"),
        ("1 gigabit", "unknown unit"),
        ("10gbps", "ambiguous"),
        ("1GB", "unknown unit"),  # bytes need '/s', so 'GB' alone is not guessed at
        ("0gbit", "positive"),
        (-1.0, "positive"),
        (None, "must be a string"),
        (True, "not a bandwidth"),
    ],
)
def test_bad_bandwidth_is_refused_with_the_fix(text, match):
    with pytest.raises(ValueError, match=match):
        cost.parse_bandwidth(text)


def test_ring_formulas_by_hand():
    link = cost.Link(1e9, latency_s=0.0)  # 125 MB/s
    n, s = 4, 100 * MB
    # all_reduce: 2(n-1)/n of the buffer per rank -> 150 MB -> 1.2 s
    assert cost.collective_seconds("all_reduce", s, link, n) == pytest.approx(1.2)
    # reduce_scatter / all_to_all: (n-1)/n -> 75 MB -> 0.6 s
    assert cost.collective_seconds("reduce_scatter", s, link, n) == pytest.approx(0.6)
    assert cost.collective_seconds("all_to_all", s, link, n) == pytest.approx(0.6)
    # all_gather of a 25 MB shard: (n-1)/n of the 100 MB output -> 0.6 s
    assert cost.collective_seconds("all_gather", s // n, link, n) == pytest.approx(0.6)
    assert cost.collective_seconds("broadcast", s, link, n) == pytest.approx(0.8)
    assert cost.collective_seconds("all_reduce", s, link, 1) == 0.0  # world of one


def test_latency_counts_ring_steps_per_call():
    link = cost.Link(1e12, latency_s=1e-3)  # bytes ~free: latency alone
    assert cost.collective_seconds("all_reduce", 8, link, 4, calls=3) == pytest.approx(
        3 * 6e-3, rel=1e-3
    )
    assert cost.collective_seconds("all_gather", 8, link, 4) == pytest.approx(3e-3, rel=1e-3)


def test_shared_link_carries_every_rank():
    one = cost.Link(1e9, 0.0)
    shared = cost.Link(1e9, 0.0, shared=True)
    for op in ("all_reduce", "reduce_scatter", "all_gather", "all_to_all"):
        assert cost.collective_seconds(op, MB, shared, 4) == pytest.approx(
            4 * cost.collective_seconds(op, MB, one, 4)
        )
    # broadcast: three receivers, each gets the buffer once
    assert cost.collective_seconds("broadcast", MB, shared, 4) == pytest.approx(3 * 8e-3)


def test_gloo_reduce_scatter_moves_an_all_reduce():
    ring = cost.Link(1e9, 0.0)
    gloo = cost.Link(1e9, 0.0, backend="gloo")
    rs = cost.collective_seconds("reduce_scatter", MB, gloo, 4)
    assert rs == pytest.approx(cost.collective_seconds("all_reduce", MB, ring, 4))
    assert rs == pytest.approx(2 * cost.collective_seconds("reduce_scatter", MB, ring, 4))
    ag = cost.collective_seconds("all_gather", MB, gloo, 4)
    assert ag == pytest.approx(cost.collective_seconds("all_gather", MB, ring, 4))
    with pytest.raises(ValueError, match="backend='mpi' is not modelled"):
        cost.Link(1e9, backend="mpi")


def test_predict_sums_per_tag_and_matches_measured_bytes():
    link = cost.Link.parse("1gbit", latency_s=0.0)
    plan = [
        Collective("all_gather", 10 * MB, "materialize", calls=2, tag="zero.params"),
        Collective("reduce_scatter", 40 * MB, "loss_and_grad", tag="zero.grads"),
        Collective("all_reduce", 4, "finish_grads", tag="guard.nonfinite"),
    ]
    p = cost.predict(plan, link, 2)
    assert p.by_tag["zero.params"] == pytest.approx(0.08)  # 10 MB in -> 10 MB out per rank
    assert p.by_tag["zero.grads"] == pytest.approx(0.16)
    assert p.seconds == pytest.approx(sum(p.by_tag.values()))
    measured = cost.predict_bytes({"all_gather": 10 * MB, "reduce_scatter": 40 * MB}, link, 2)
    assert measured.seconds == pytest.approx(0.24)
    by_tag = cost.predict_tags(
        {"zero.params": 10 * MB, "zero.grads": 40 * MB},
        {c.tag: c.op for c in plan},
        link,
        2,
    )
    assert by_tag.seconds == pytest.approx(0.24)
    with pytest.raises(ValueError, match="no op given for tag 'dp.grads'"):
        cost.predict_tags({"dp.grads": 1}, {}, link, 2)


def _explain(rank, world):
    torch.manual_seed(0)
    model = GPT(GPTConfig.tiny())
    params, apply = fs.functional(model)
    step = fs.train_step(lm_loss(apply), fs.optim.adamw(1e-3))
    out = {"dp": fs.explain(step, params, bandwidth="1gbit")}
    out["z3"] = fs.explain(fs.shard_zero(step, 3), params, bandwidth="10Gbit/s", latency_s=0)
    out["bytes"] = fs.plan(step, params).param_bytes
    try:
        fs.explain(step, params, bandwidth="10gbps")
    except ValueError as e:
        out["error"] = str(e)
    return out


def test_explain_prints_comm_time_per_step():
    out, _ = run_world(_explain, 2)
    line = next(x for x in out["dp"].splitlines() if x.startswith("expected communication"))
    assert "1 Gbit/s per rank" in line
    # world 2: the all-reduce moves the whole grad once per rank, plus the 4-byte vote
    seconds = 8 * out["bytes"] / 1e9 + 4 * 50e-6 + 8 * 4 / 1e9
    shown = float(line.split(": ")[-1].split()[0]) / 1e3  # printed in ms
    assert shown == pytest.approx(seconds, rel=1e-3)
    assert "dp.grads" in out["dp"].split(line)[1]
    assert "zero.params" in out["z3"] and "10 Gbit/s per rank" in out["z3"]
    assert "ambiguous" in out["error"]


def test_explain_without_bandwidth_is_unchanged():
    torch.manual_seed(0)
    params, apply = fs.functional(GPT(GPTConfig.tiny()))
    step = fs.train_step(lm_loss(apply), fs.optim.adamw(1e-3))
    assert "expected communication" not in fs.explain(step, params)
    assert "0.000 ms" in fs.explain(step, params, bandwidth="1gbit")  # world of one


# ----------------------------------------------------------------- overlapped steps


def _prefetch_schedule(gather_bytes, compute_s, prefetch=True):
    """ZeRO-3's forward: wait for unit i's gather, issue unit i+1's (prefetch), compute
    unit i; without prefetch unit i+1's gather is issued after unit i's compute."""
    ev = [("issue", 0, "all_gather", gather_bytes[0])]
    for i, p in enumerate(compute_s):
        ev.append(("wait", i))
        last = i + 1 == len(compute_s)
        nxt = [] if last else [("issue", i + 1, "all_gather", gather_bytes[i + 1])]
        ev += nxt + [("compute", p)] if prefetch else [("compute", p)] + nxt
    return ev


def test_overlap_of_a_prefetched_pipeline_by_hand():
    link = cost.Link(1e9, latency_s=0.0)  # 125 MB/s: a 2-rank all_gather of x MB in, 8x ms
    c = [0.1, 0.3, 0.2, 0.1]  # gather seconds: 12.5, 37.5, 25, 12.5 MB in
    nbytes = [round(s * 125 * MB) for s in c]
    p = [0.2, 0.2, 0.2, 0.2]
    # c0 + max(p0, c1) + max(p1, c2) + max(p2, c3) + p3 = 0.1 + 0.3 + 0.2 + 0.2 + 0.2
    o = cost.predict_overlap(_prefetch_schedule(nbytes, p), link, world=2)
    assert o.seconds == pytest.approx(1.0)
    assert o.compute == pytest.approx(0.8) and o.comm == pytest.approx(0.7)
    assert o.exposed == pytest.approx(0.2) and o.hidden == pytest.approx(0.5)
    # no prefetch: nothing hides, the step is the sum (compute + predict's comm)
    serial = cost.predict_overlap(_prefetch_schedule(nbytes, p, prefetch=False), link, 2)
    assert serial.seconds == pytest.approx(1.5) and serial.hidden == pytest.approx(0.0)
    summed = cost.predict_bytes({"all_gather": sum(nbytes)}, link, 2)
    assert serial.comm == pytest.approx(summed.seconds)


def test_overlap_queues_collectives_on_one_link():
    link = cost.Link(1e9, latency_s=0.0, shared=True, backend="gloo")
    # world 2, shared gloo link: a reduce_scatter of 25 MB moves an all_reduce of it,
    # 2 ranks x 25 MB = 50 MB -> 0.4 s; two issued back to back share the link in turn.
    ev = [
        ("issue", "a", "reduce_scatter", 25 * MB),
        ("compute", 0.1),
        ("issue", "b", "reduce_scatter", 25 * MB),
        ("compute", 0.1),
        ("wait", "a"),  # at 0.4
        ("compute", 0.5),  # 0.9; b ended at 0.8, under this compute
        ("wait", "b"),
    ]
    o = cost.predict_overlap(ev, link, world=2)
    assert o.seconds == pytest.approx(0.9)
    assert o.comm == pytest.approx(0.8) and o.hidden == pytest.approx(0.6)
    # a collective never waited on still ends the step when the link does
    o = cost.predict_overlap([("issue", 0, "all_reduce", 25 * MB), ("compute", 0.1)], link, 2)
    assert o.seconds == pytest.approx(0.4) and o.exposed == pytest.approx(0.3)
    # latency counts per call, as in collective_seconds
    slow = cost.Link(1e12, latency_s=1e-3)
    o = cost.predict_overlap([("issue", 0, "all_gather", 8, 3), ("wait", 0)], slow, 4)
    assert o.seconds == pytest.approx(9e-3, rel=1e-3)


def test_overlap_charges_the_host_cpu_of_a_transfer_to_compute():
    # world 2, per-rank link, 125 MB/s: an all_reduce of 12.5 MB puts 12.5 MB on the wire
    # (2(n-1)/n of it), 0.1 s; at 4 ns of the rank's CPU per wire byte it also takes 0.05 s
    # of the cores the compute runs on.
    ev = [("issue", 0, "all_reduce", 12.5 * MB), ("compute", 0.2), ("wait", 0)]
    free = cost.predict_overlap(ev, cost.Link(1e9, 0.0), world=2)
    assert free.seconds == pytest.approx(0.2) and free.hidden == pytest.approx(0.1)
    busy = cost.predict_overlap(ev, cost.Link(1e9, 0.0, host_s_per_byte=4e-9), world=2)
    assert busy.seconds == pytest.approx(0.25) and busy.hidden == pytest.approx(0.05)
    # CPU-bound transfer (15 ns a byte: 0.1875 s > 0.1 s on the wire): nothing hides,
    # and the collective lasts as long as its CPU work
    cpu = cost.predict_overlap(ev, cost.Link(1e9, 0.0, host_s_per_byte=1.5e-8), world=2)
    assert cpu.seconds == pytest.approx(0.3875)
    # a synchronous collective with CPU work under its wire time: the wire time, as before
    sync = [("issue", 0, "all_reduce", 12.5 * MB), ("wait", 0)]
    o = cost.predict_overlap(sync, cost.Link(1e9, 0.0, host_s_per_byte=4e-9), world=2)
    assert o.seconds == pytest.approx(0.1)
    with pytest.raises(ValueError, match="host_s_per_byte must be a number >= 0"):
        cost.Link(1e9, host_s_per_byte=-1.0)


@pytest.mark.parametrize(
    "events, match",
    [
        ([("wait", 1)], "not in flight"),
        ([("issue", 1, "all_reduce", 4), ("issue", 1, "all_reduce", 4)], "again before a wait"),
        ([("compute", -1.0)], "must be >= 0"),
        ([("sleep", 1.0)], "unknown kind 'sleep'"),
    ],
)
def test_overlap_refuses_bad_schedules(events, match):
    with pytest.raises(ValueError, match=match):
        cost.predict_overlap(events, "1gbit", world=2)

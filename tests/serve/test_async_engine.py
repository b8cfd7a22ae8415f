"""The AsyncEngine's bound on the wait before a request starts ([Note: two waits before a
request starts] in async_engine.py), and ``Engine.started``.

The engine is the tiny GPT-2 with one seat (``max_num_seqs=1``) and steps slowed down
(>= 10 ms each), so a second request must wait in the engine's queue until the first
one, running for a known least time, finishes. Expected outputs come from the same
engine run alone (``generate``) before the AsyncEngine takes it over.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from fscale.serve.async_engine import AsyncEngine, QueueTimeout, StartTimeout
from fscale.serve.engine import Engine
from fscale.serve.params import SamplingParams

GREEDY = dict(temperature=0.0, ignore_eos=True)
STEP_DELAY_S = 0.01
PROMPT = "The quick brown fox"


class _Slow:
    """The real engine, each step at least ``delay_s`` long."""

    def __init__(self, engine, delay_s: float = STEP_DELAY_S):
        self._engine, self.delay_s = engine, delay_s

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def step(self):
        time.sleep(self.delay_s)
        return self._engine.step()


@pytest.fixture(scope="module")
def one_seat(tiny_gpt2_dir):
    return Engine(tiny_gpt2_dir, max_num_seqs=1, num_blocks=64)


def _run(engine, body, **kw):
    """``await body(aeng)`` with an AsyncEngine over the slowed ``engine``; stops it after."""

    async def go():
        aeng = AsyncEngine(_Slow(engine), **kw)
        aeng.start(asyncio.get_running_loop())
        try:
            return await body(aeng)
        finally:
            aeng.stop()

    return asyncio.run(go())


async def _until(cond, timeout: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.005)


def _assert_idle(engine):
    assert not engine.has_unfinished()
    stats = engine.stats()
    assert stats["num_waiting"] == stats["num_running"] == 0
    assert stats["kv_blocks_used"] == 0 and engine.blocks.num_free == engine.blocks.total


def test_max_start_wait_s_is_validated(one_seat):
    for bad in (-1.0, float("nan")):
        with pytest.raises(ValueError, match="max_start_wait_s must be >= 0"):
            AsyncEngine(one_seat, max_start_wait_s=bad)
    assert AsyncEngine(one_seat).max_start_wait_s == 300.0
    assert AsyncEngine(one_seat, max_start_wait_s=None).max_start_wait_s is None


def test_request_not_started_in_time_is_refused_and_leaves_no_trace(one_seat):
    long_params = SamplingParams(max_tokens=100, **GREEDY)  # >= 1 s of steps
    expected = one_seat.generate(PROMPT, long_params)[0].token_ids

    async def body(aeng):
        long = await aeng.add("long", PROMPT, long_params)
        t0 = time.monotonic()
        with pytest.raises(QueueTimeout, match=r"waited .* s for the engine to start it") as e:
            await aeng.add("late", "Hello", SamplingParams(max_tokens=4))
        assert isinstance(e.value, StartTimeout)
        assert 0.2 <= time.monotonic() - t0 < 5.0
        # Aborted in the engine, while the long one still runs (the metrics' copy).
        await _until(lambda: aeng.sample.stats["num_waiting"] == 0, what="the abort")
        assert aeng.sample.stats["num_running"] == 1
        return [out async for out in long][-1]

    final = _run(one_seat, body, max_start_wait_s=0.2)
    assert final.finished and final.token_ids == expected
    _assert_idle(one_seat)
    assert one_seat.started("late")  # unknown to the engine: nothing of it is left


def test_queued_request_is_returned_once_it_started(one_seat):
    first_params = SamplingParams(max_tokens=20, **GREEDY)
    second_params = SamplingParams(max_tokens=6, **GREEDY)
    expected = one_seat.generate([PROMPT, "Hello"], [first_params, second_params])

    async def body(aeng):
        first = await aeng.add("first", PROMPT, first_params)
        second = await aeng.add("second", "Hello", second_params)
        # One seat: the second started only after the first finished, and add() waited
        # for that start, so the first's outputs are all there already.
        firsts = [first.queue.get_nowait() for _ in range(first.queue.qsize())]
        assert firsts and firsts[-1].finished
        return firsts[-1], [out async for out in second][-1]

    finals = _run(one_seat, body, max_start_wait_s=30.0)
    assert [o.token_ids for o in finals] == [o.token_ids for o in expected]
    _assert_idle(one_seat)


def test_cancel_while_waiting_to_start_withdraws_the_request(one_seat):
    long_params = SamplingParams(max_tokens=60, **GREEDY)
    expected = one_seat.generate(PROMPT, long_params)[0].token_ids
    generated = one_seat.stats()["generation_tokens_total"]

    async def body(aeng):
        long = await aeng.add("long", PROMPT, long_params)
        waiting = asyncio.ensure_future(aeng.add("waiting", "Hello", SamplingParams(max_tokens=8)))
        await _until(lambda: aeng.sample.stats["num_waiting"] == 1, what="the queued request")
        waiting.cancel()  # as a handler whose client went away
        with pytest.raises(asyncio.CancelledError):
            await waiting
        await _until(lambda: aeng.sample.stats["num_waiting"] == 0, what="the withdrawal")
        return [out async for out in long][-1]

    final = _run(one_seat, body)
    assert final.token_ids == expected
    # The withdrawn request never ran: the long one's are the only tokens generated.
    assert one_seat.stats()["generation_tokens_total"] - generated == len(expected)
    _assert_idle(one_seat)


def test_engine_started_stays_true_across_preemption(tiny_gpt2_dir):
    # 12 blocks of 4 tokens cannot hold three growing sequences (8 + 4 + 4): preemption.
    engine = Engine(tiny_gpt2_dir, max_tokens_per_step=64, block_size=4, num_blocks=13)
    prompts = [list(range(5, 24)), [100, 101, 102], [7]]
    rids = [f"r{i}" for i in range(len(prompts))]
    for rid, prompt in zip(rids, prompts, strict=True):
        engine.add_request(rid, prompt, SamplingParams(max_tokens=12, **GREEDY))
    assert not any(engine.started(r) for r in rids)
    assert engine.started("never-added")
    engine.step()  # all three fit in the first step's budget and blocks
    assert all(engine.started(r) for r in rids)
    for _ in range(100):
        engine.step()
        if engine.stats()["num_preempted_total"]:
            break
    assert engine.stats()["num_preempted_total"] > 0
    assert engine.stats()["num_waiting"] >= 1  # re-queued, yet started
    assert all(engine.started(r) for r in rids)
    while engine.has_unfinished():
        engine.step()
    assert all(engine.started(r) for r in rids)

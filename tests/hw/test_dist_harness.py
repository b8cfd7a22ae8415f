"""tests/dist.py: results come back in rank order, failures name their rank, hangs end."""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist

from tests.dist import WorldError, run_world


def _echo(rank, n, scale, *, offset=0.0):
    t = torch.full((2,), float(rank))
    dist.all_reduce(t)
    return {"rank": rank, "n": n, "sum": t * scale + offset, "threads": torch.get_num_threads()}


def test_results_in_rank_order_with_args():
    out = run_world(_echo, 3, 2.0, offset=1.0)
    assert [o["rank"] for o in out] == [0, 1, 2]
    assert all(o["n"] == 3 and o["threads"] == 1 for o in out)
    assert all(torch.equal(o["sum"], torch.full((2,), 7.0)) for o in out)  # (0+1+2)*2+1


def test_world_of_one():
    assert run_world(_echo, 1, 1.0)[0]["sum"].tolist() == [0.0, 0.0]


def _raise_on_one(rank, n):
    if rank == 1:
        raise KeyError("planted failure on rank one")
    dist.barrier()  # rank 0 waits for the dead rank: it must not hang the test
    return rank


def test_rank_error_names_rank_and_traceback():
    start = time.monotonic()
    with pytest.raises(WorldError) as info:
        run_world(_raise_on_one, 2, timeout=60)
    message = str(info.value)
    assert message.startswith("rank 1 raised:")  # the root cause first
    assert "planted failure on rank one" in message and "_raise_on_one" in message
    assert "Traceback" in message
    assert 1 in info.value.ranks
    assert time.monotonic() - start < 30  # fails fast, not at the timeout


def _hang_on_one(rank, n):
    if rank == 1:
        time.sleep(600)
    return rank


def test_hung_rank_times_out():
    run_world(_hang_on_one, 1)  # warm the fork server, so the short timeout is all hang
    start = time.monotonic()
    with pytest.raises(TimeoutError, match=r"ranks \[1\] did not finish within 8 s"):
        run_world(_hang_on_one, 2, timeout=8)  # rank 0 finished: only rank 1 is named
    assert time.monotonic() - start < 20


def _env(rank, n):
    return os.environ.get("FSCALE_TEST_PROBE")


def test_environment_reaches_ranks(monkeypatch):
    monkeypatch.setenv("FSCALE_TEST_PROBE", "seen")
    assert run_world(_env, 2) == ["seen", "seen"]


def test_unpicklable_fn_is_refused():
    with pytest.raises(TypeError, match="module-level function"):
        run_world(lambda rank, n: rank, 2)

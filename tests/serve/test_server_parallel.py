"""The HTTP server over a tensor-parallel engine: rank 0 serves, the other ranks follow.

- ``test_torchrun_cli``: ``torchrun --standalone --nproc-per-node 2 -m fscale.serve
  --tensor-parallel world`` for real (gloo, CPU), with a 10 s collective timeout: greedy
  completions equal the single-rank engine's; after 12 s idle (longer than the timeout: only
  the heartbeat keeps rank 1 alive) another request still works; SIGTERM to both ranks
  ends every rank, and torchrun, with status 0.
- ``test_lockstep_loop_in_process``: the loop's heartbeat, its shutdown() at the lifespan's
  end and its failure path, on a single-rank engine posing as a group's rank 0.

(A gloo world through tests/dist.run_world took as long as the torchrun run here, ~20 s
on 2 cores, and proved less: it is not kept.)
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

from fscale.serve.engine import Engine
from fscale.serve.parallel import TensorParallel
from fscale.serve.params import SamplingParams
from fscale.serve.server import build_app, start_server

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = ["The quick brown fox", "Hello world!", "Once upon a time"]
MAX_TOKENS = 8


def _reference(path) -> list[tuple[str, int]]:
    """(text, completion tokens) of each prompt, from a single-rank engine."""
    engine = Engine(path, device="cpu")
    outs = engine.generate(PROMPTS, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0))
    return [(o.text, len(o.token_ids)) for o in outs]


def _completion(client, prompts) -> tuple[list[str], int]:
    """One batched greedy request: (texts in prompt order, completion tokens)."""
    body = {"prompt": prompts, "max_tokens": MAX_TOKENS, "temperature": 0}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    choices = sorted(r.json()["choices"], key=lambda c: c["index"])
    return [c["text"] for c in choices], r.json()["usage"]["completion_tokens"]


def _expect(ref) -> tuple[list[str], int]:
    return [t for t, _ in ref], sum(n for _, n in ref)


# ---------------------------------------------------------------------------- torchrun


def _env(**extra) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(extra)
    return env


def _until(cond, timeout: float, what: str, log: list[str]):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}:\n{''.join(log)}")
        time.sleep(0.05)


def test_torchrun_cli(tiny_llama_dir):
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.skip("torchrun is not installed next to this python")
    cmd = [str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "fscale.serve",
           "--model", str(tiny_llama_dir), "--tensor-parallel", "world", "--port", "0",
           "--device", "cpu", "--log-level", "warning"]  # fmt: skip
    # Followers of a server that stopped stepping would die after this; it also covers
    # start-up (rank 1 waits in its first broadcast while rank 0 builds the app), so it
    # leaves room for a loaded 2-core box.
    pg_timeout_s = 15.0
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=_env(FSCALE_PG_TIMEOUT_S=str(pg_timeout_s)),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    found = SimpleNamespace(url=None, leader=None, follower=None)

    def read():
        for line in proc.stdout:
            lines.append(line)
            if m := re.search(r"at (http://\S+) .*pid (\d+)", line):
                found.url, found.leader = m.group(1), int(m.group(2))
            if m := re.search(r"rank 1 \(pid (\d+)\) follows", line):
                found.follower = int(m.group(1))

    threading.Thread(target=read, daemon=True).start()
    try:
        ref = _reference(tiny_llama_dir)
        _until(
            lambda: (found.url and found.follower) or proc.poll() is not None,
            90,
            "both ranks to start",
            lines,
        )
        assert found.url and found.follower, "".join(lines)
        with httpx.Client(base_url=found.url, timeout=60) as client:
            assert _completion(client, PROMPTS) == _expect(ref)
            time.sleep(pg_timeout_s + 2)  # idle: only the heartbeat keeps rank 1 alive
            assert _completion(client, PROMPTS[1:]) == _expect(ref[1:])
            assert client.get("/health").status_code == 200
        # As Ctrl-C or torchrun's forwarding would: every rank is signalled; rank 1 waits
        # for rank 0's shutdown instead of dying in the middle of a step.
        os.kill(found.follower, signal.SIGTERM)
        os.kill(found.leader, signal.SIGTERM)
        rc = proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert rc == 0, "".join(lines)  # torchrun exits 0 only when every rank did
    assert "Traceback" not in "".join(lines), "".join(lines)


# ---------------------------------------------------------------------------- in process


class _PosingLeader:
    """A single-rank engine that says it is rank 0 of a group of 2; counts the calls a
    follower would mirror, and can fail a step on demand."""

    def __init__(self, engine):
        self._engine = engine
        self.tp = TensorParallel(2, 0, None)
        self.steps = 0
        self.shutdowns = 0
        self.fail = False

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def step(self):
        self.steps += 1
        if self.fail:
            raise RuntimeError("injected step failure")
        return self._engine.step()

    def shutdown(self):
        self.shutdowns += 1


def test_lockstep_loop_in_process(tiny_gpt2_dir):
    from fscale.serve.async_engine import AsyncEngine

    engine = Engine(tiny_gpt2_dir, device="cpu")
    follower = SimpleNamespace(tp=TensorParallel(2, 1, None))
    with pytest.raises(ValueError, match="rank 1 of a tensor-parallel group"):
        AsyncEngine(follower)
    with pytest.raises(ValueError, match="heartbeat_s"):
        AsyncEngine(engine, heartbeat_s=0)

    fake = _PosingLeader(engine)
    app = build_app(fake, heartbeat_s=0.05)
    aeng = app.state.fscale.aeng
    failures = []
    aeng.on_failure = lambda: failures.append(True)
    srv = start_server(app)
    try:
        with httpx.Client(base_url=srv.url, timeout=30) as client:
            body = {"prompt": "Hi", "max_tokens": 3, "temperature": 0}
            assert client.post("/v1/completions", json=body).status_code == 200
            before = fake.steps
            time.sleep(0.6)
            assert fake.steps - before >= 4  # idle, yet stepping: the heartbeat
            fake.fail = True  # a failed step cannot be survived under TP: the loop ends
            r = client.post("/v1/completions", json={**body, "max_tokens": 50})
            assert r.status_code in (500, 503), r.text
            deadline = time.monotonic() + 10
            while aeng._thread.is_alive() and time.monotonic() < deadline:
                time.sleep(0.02)
            assert not aeng._thread.is_alive()
            assert failures == [True] and fake.shutdowns == 0
            assert client.get("/health").status_code == 503
    finally:
        srv.stop()

    # A clean stop (the lifespan's end) calls shutdown() once, and on_failure never.
    fake = _PosingLeader(engine)
    app = build_app(fake, heartbeat_s=0.05)
    failures = []
    app.state.fscale.aeng.on_failure = lambda: failures.append(True)
    srv = start_server(app)
    srv.stop()
    assert fake.shutdowns == 1 and not failures

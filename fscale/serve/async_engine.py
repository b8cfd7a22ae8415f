"""AsyncEngine: one thread drives a single-threaded ``Engine``; asyncio code awaits outputs.

The engine is not thread-safe, so only the loop thread ever calls it ([Note: one
thread owns the engine]). Request handlers talk to that thread through an inbox of
commands and get outputs back on per-request ``asyncio.Queue``\\s.

Usage::

    aeng = AsyncEngine(engine, max_queue_wait_s=2.0, max_start_wait_s=300.0)
    aeng.start(asyncio.get_running_loop())
    stream = await aeng.add("req-1", token_ids, SamplingParams(max_tokens=8))  # started
    async for out in stream:          # RequestOutput deltas, the last one finished
        print(out.delta_text, end="")
    aeng.stop()

``add`` returns once the engine has *started* the request (scheduled it for the first
time), so a full engine is refused before a handler answers anything: QueueTimeout when
no place in the engine's waiting queue came within ``max_queue_wait_s``, or when the
request waited ``max_start_wait_s`` in all without being started (the KV cache or the
seats stayed full); see [Note: two waits before a request starts].

Under tensor parallelism (``engine.tp.size > 1``; this must be the group's rank 0) the
loop also keeps the other ranks in step ([Note: heartbeat for the followers]) and its
``stop()`` ends their ``Engine.follow()`` with ``engine.shutdown()``.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from fscale.serve.errors import EngineFull

log = logging.getLogger(__name__)

# [Note: one thread owns the engine]
# Engine.step() runs a forward pass: tens of ms to seconds. If handlers called the engine
# under a lock, the event loop would stall behind every step (no new connections, no SSE
# flushes). Instead handlers append commands to an inbox and return at once; the loop
# thread applies them between steps. A request's outcome (started, ValueError, or a
# QueueTimeout after one of its waits) comes back through a concurrent Future, and each
# RequestOutput through loop.call_soon_threadsafe onto the request's asyncio.Queue.
# A full engine (EngineFull) is not an error at first: the request waits in the server's
# admission queue, in arrival order, and is retried after every step until its deadline.

# [Note: two waits before a request starts]
# A request passes two queues before it runs: the server's admission queue (waiting for a
# place in the engine's waiting queue, bounded by max_queue_wait_s) and the engine's
# waiting queue (waiting for KV blocks and a seat, which only requests that finish
# free). Without a bound on the second, a request queued behind long generations could
# wait there for minutes, its client hanging (a streaming one with its 200 already
# sent). So ``add`` resolves only once ``engine.started(rid)``, and the loop aborts in
# the engine a request still unstarted ``max_start_wait_s`` after ``add`` was called
# (StartTimeout, a QueueTimeout: the server answers 503). Only the first start counts:
# a preempted request re-queued after it ran belongs to its stream and is never timed
# out. The check runs after every loop pass; a request in the engine keeps it busy, so
# the loop steps (and checks) continuously until the request starts or ends. Under
# tensor parallelism the abort reaches the other ranks through the engine's outbox.

# [Note: heartbeat for the followers]
# With tensor parallelism the other ranks of the group sit in Engine.follow(), each of
# their step()s blocked in the broadcast that opens rank 0's next step(). An idle server
# would never step, and the followers would hit the collective timeout (10 min by
# default) and die. So while idle, the loop still calls step() every ``heartbeat_s``: on
# rank 0 an idle step() is just the broadcast (an empty outbox: one 8-byte collective),
# on the followers it returns at once and they wait in the next one. A failed step()
# cannot be survived here (the ranks may no longer agree on what was scheduled), so it
# ends the loop; ``on_failure`` lets the process exit so the launcher ends the job.

TOKENS_PER_S_WINDOW_S = 10.0  # the tokens/s gauge averages over this recent window


class EngineStepError(RuntimeError):
    """Engine.step() raised while this request was in flight; the request was dropped."""


class QueueTimeout(RuntimeError):
    """The engine stayed full for the whole admission wait."""


class StartTimeout(QueueTimeout):
    """The request waited ``max_start_wait_s`` without the engine starting it (aborted)."""


class ShuttingDown(RuntimeError):
    """The server stopped before the request finished."""


class Withdrawn(RuntimeError):
    """The handler gave up on the request before the engine started it (nobody waits)."""


class _Fatal(Exception):
    """Ends the loop thread (already logged): see [Note: heartbeat for the followers]."""


@dataclass(eq=False)
class _Pending:
    request_id: str
    prompt: Any
    params: Any
    arrived: float  # monotonic time of the add() call
    deadline: float  # for a place in the engine's waiting queue
    start_deadline: float  # for the engine to start it
    admitted: concurrent.futures.Future  # resolved once started (_check_starts)
    stream: RequestStream


@dataclass
class _Sample:
    """Engine numbers the loop thread copies out after each step, for /metrics."""

    stats: dict = field(default_factory=dict)
    admission_waiting: int = 0
    window_start: tuple[float, int] = (0.0, 0)  # (monotonic time, generation_tokens_total)
    last: tuple[float, int] = (0.0, 0)

    def tokens_per_s(self) -> float:
        """Generated tokens/s from the window's start until now (decays to 0 when idle)."""
        t0, g0 = self.window_start
        dt = time.monotonic() - t0
        return (self.last[1] - g0) / dt if dt > 1e-3 else 0.0


class RequestStream:
    """Async iterator of one request's ``RequestOutput``\\s; ends after the finished one."""

    def __init__(self, aeng: AsyncEngine, request_id: str, queue: asyncio.Queue | None = None):
        self._aeng, self.request_id = aeng, request_id
        self.queue = asyncio.Queue() if queue is None else queue
        self.finished = False

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self.finished:
            raise StopAsyncIteration
        item = await self.queue.get()
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        if item.finished:
            self.finished = True
        return item

    def abort(self) -> None:
        """Free the request's engine resources (idempotent, never blocks)."""
        if not self.finished:
            self.finished = True
            self._aeng.abort(self.request_id)


class AsyncEngine:
    """Owns ``engine`` and the thread that steps it. See the module docstring."""

    def __init__(
        self,
        engine,
        *,
        max_queue_wait_s: float = 2.0,
        max_start_wait_s: float | None = 300.0,
        heartbeat_s: float = 0.5,
        on_failure=None,
    ):
        """``max_queue_wait_s``: how long a request waits for a place in the engine's
        waiting queue. ``max_start_wait_s``: how long it may wait in all, from ``add``,
        until the engine starts it (None: no limit, as vLLM); see [Note: two waits
        before a request starts]. ``heartbeat_s``: under tensor parallelism, the longest
        the loop stays without a ``step()`` while idle. ``on_failure()``: called from the
        loop thread when it ends other than by ``stop()`` (a failed step under tensor
        parallelism, a bug)."""
        if max_queue_wait_s < 0:
            raise ValueError(f"max_queue_wait_s must be >= 0, got {max_queue_wait_s}.")
        if max_start_wait_s is not None and not max_start_wait_s >= 0:  # NaN too
            raise ValueError(
                f"max_start_wait_s must be >= 0 seconds or None (no limit), got "
                f"{max_start_wait_s!r}."
            )
        if not heartbeat_s > 0:
            raise ValueError(f"heartbeat_s must be > 0, got {heartbeat_s}.")
        self.engine = engine
        self.max_queue_wait_s = float(max_queue_wait_s)
        self.max_start_wait_s = None if max_start_wait_s is None else float(max_start_wait_s)
        self.heartbeat_s = float(heartbeat_s)
        self.on_failure = on_failure
        tp = getattr(engine, "tp", None)
        size = getattr(tp, "size", 1)
        self.lockstep = isinstance(size, int) and size > 1  # other ranks follow our steps
        if self.lockstep and not tp.leader:
            raise ValueError(
                f"this engine is rank {tp.rank} of a tensor-parallel group: only its rank 0 "
                "takes requests; run engine.follow() on this rank instead of an AsyncEngine."
            )
        self._cond = threading.Condition()
        self._inbox: collections.deque = collections.deque()  # guarded by _cond
        self._stop = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # Loop-thread only:
        self._admission: collections.deque[_Pending] = collections.deque()
        self._starting: dict[str, _Pending] = {}  # in the engine, not started yet
        self._active: dict[str, RequestStream] = {}  # in the engine (_starting's included)
        self._tok_samples: collections.deque = collections.deque()
        self._last_step = -math.inf  # monotonic time of the last step() call
        self.sample = _Sample()  # replaced whole by the loop thread; read by anyone
        self.step_errors = 0

    # ------------------------------------------------------------------ lifecycle

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._thread is not None:
            raise RuntimeError("AsyncEngine.start() was called twice; build a new AsyncEngine.")
        self._loop = loop
        self._snapshot()
        self._thread = threading.Thread(target=self._run, name="fscale-serve-loop", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the loop thread after its current step; in-flight requests get ShuttingDown."""
        with self._cond:
            self._stop = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stop

    # ------------------------------------------------------------------ handler side

    async def add(self, request_id: str, prompt, params, *, queue=None) -> RequestStream:
        """Queue a request; returns its stream once the engine has started it (or it
        ended before that: its outputs are in the stream).

        ``queue``: an ``asyncio.Queue`` to share between several requests (outputs carry
        their ``request_id``); by default the stream has its own. Raises the engine's
        ValueError for a bad request, QueueTimeout when the engine stayed full for
        ``max_queue_wait_s`` or did not start the request within ``max_start_wait_s``
        (StartTimeout), ShuttingDown after ``stop()``, EngineStepError when a failed
        step dropped it. If the caller is cancelled while waiting, the request is
        withdrawn (and aborted in the engine).
        """
        if not self.is_alive():
            raise ShuttingDown("the engine loop is not running")
        stream = RequestStream(self, request_id, queue)
        now = time.monotonic()
        start_wait = math.inf if self.max_start_wait_s is None else self.max_start_wait_s
        pending = _Pending(
            request_id,
            prompt,
            params,
            now,
            now + self.max_queue_wait_s,
            now + start_wait,
            concurrent.futures.Future(),
            stream,
        )
        self._send(("add", pending))
        try:
            await asyncio.wrap_future(pending.admitted)
        except asyncio.CancelledError:
            stream.abort()
            raise
        return stream

    def abort(self, request_id: str) -> None:
        self._send(("abort", request_id))

    def _send(self, cmd) -> None:
        with self._cond:
            self._inbox.append(cmd)
            self._cond.notify()

    # ------------------------------------------------------------------ loop thread

    def _run(self) -> None:
        failures = 0
        try:
            self._bind_device()
            while True:
                with self._cond:
                    while not (self._stop or self._inbox or self._busy() or self._beat_due()):
                        self._cond.wait(self._wait_timeout())
                        if self._admission or self._starting:
                            break  # a deadline may have passed
                    if self._stop:
                        break
                    cmds, self._inbox = self._inbox, collections.deque()
                for kind, arg in cmds:
                    # Once running, the handler can no longer cancel the future: only the
                    # loop thread resolves it (no race between set_result and cancel).
                    if kind == "add" and arg.admitted.set_running_or_notify_cancel():
                        self._admission.append(arg)
                    elif kind == "abort":
                        self._abort(arg)
                self._admit()
                if self._busy() or self._beat_due():
                    failures = self._step(failures)
                self._check_starts()
                self._snapshot()
        except _Fatal:
            pass  # logged where it happened
        except BaseException:  # a bug here must not leave handlers waiting forever
            log.exception("fscale.serve loop thread died")
            raise
        finally:
            self._fail_all(ShuttingDown("the server is shutting down"))
            self._finish()

    def _bind_device(self) -> None:
        # A CUDA device is current per thread: collectives of this thread use the engine's.
        device = getattr(self.engine, "device", None)
        if self.lockstep and getattr(device, "type", None) == "cuda":
            import torch

            torch.cuda.set_device(device)

    def _beat_due(self) -> bool:
        return self.lockstep and time.monotonic() - self._last_step >= self.heartbeat_s

    def _wait_timeout(self) -> float | None:
        timeout = self._admission_timeout()
        if self.lockstep:
            beat = max(0.0, self._last_step + self.heartbeat_s - time.monotonic())
            timeout = beat if timeout is None else min(timeout, beat)
        return timeout

    def _finish(self) -> None:
        """After the loop: release the followers (a clean stop), or report the failure."""
        clean = self._stop
        if self.lockstep and clean:
            try:
                self.engine.shutdown()  # the aborts of _fail_all go out with it
            except Exception:
                log.exception("engine.shutdown() raised; the other ranks may not have stopped")
        if not clean and self.on_failure is not None:
            try:
                self.on_failure()
            except Exception:
                log.exception("the loop's on_failure callback raised")

    def _busy(self) -> bool:
        # Aborted requests may still hold engine work until the next step cleans them up.
        return bool(self._active) or self.engine.has_unfinished()

    def _admission_timeout(self) -> float | None:
        if not (self._admission or self._starting):
            return None
        first = min(
            [min(p.deadline, p.start_deadline) for p in self._admission]
            + [p.start_deadline for p in self._starting.values()]
        )
        return max(0.0, first - time.monotonic())

    def _admit(self) -> None:
        now = time.monotonic()
        kept: collections.deque[_Pending] = collections.deque()
        full = False
        while self._admission:
            p = self._admission.popleft()
            if p.stream.finished:  # withdrawn by its handler; the abort command follows
                p.admitted.set_exception(Withdrawn(p.request_id))
                continue
            if full:  # arrival order: nobody overtakes a request waiting for room
                self._expire_or_keep(p, now, kept)
                continue
            try:
                self.engine.add_request(p.request_id, p.prompt, p.params)
            except EngineFull:
                full = True
                self._expire_or_keep(p, now, kept)
                continue
            except Exception as e:  # ValueError: bad request; anything else: 500 for it alone
                p.admitted.set_exception(e)
                continue
            self._active[p.request_id] = p.stream
            self._starting[p.request_id] = p  # resolved by _check_starts
        self._admission = kept

    def _expire_or_keep(self, p: _Pending, now: float, kept) -> None:
        if now >= p.start_deadline:
            p.admitted.set_exception(self._start_timeout(p, now))
        elif now >= p.deadline:
            p.admitted.set_exception(
                QueueTimeout(f"the engine stayed full for {self.max_queue_wait_s:g} s")
            )
        else:
            kept.append(p)

    def _start_timeout(self, p: _Pending, now: float) -> StartTimeout:
        return StartTimeout(
            f"waited {now - p.arrived:.3g} s for the engine to start it: its KV cache or "
            "seats stayed full"
        )

    def _check_starts(self) -> None:
        """Resolve the ``add`` of each request the engine started (or ended); abort those
        still waiting past their start deadline ([Note: two waits before a request starts])."""
        if not self._starting:
            return
        now = time.monotonic()
        for rid, p in list(self._starting.items()):
            if self.engine.started(rid):
                del self._starting[rid]
                p.admitted.set_result(None)
            elif now >= p.start_deadline:
                del self._starting[rid]
                self._active.pop(rid, None)
                self._engine_abort(rid)
                p.admitted.set_exception(self._start_timeout(p, now))

    def _abort(self, request_id: str) -> None:
        for p in [p for p in self._admission if p.request_id == request_id]:
            self._admission.remove(p)
            p.admitted.set_exception(Withdrawn(p.request_id))
        p = self._starting.pop(request_id, None)
        if p is not None:
            p.admitted.set_exception(Withdrawn(request_id))
        if self._active.pop(request_id, None) is not None:
            self._engine_abort(request_id)

    def _engine_abort(self, request_id: str) -> None:
        try:
            self.engine.abort(request_id)
        except Exception:
            log.exception("engine.abort(%r) raised", request_id)

    def _fail_starts(self, err: BaseException) -> None:
        """Fail the ``add`` of every request not started yet (they are in ``_active``)."""
        for p in self._starting.values():
            p.admitted.set_exception(err)
        self._starting.clear()

    def _step(self, failures: int) -> int:
        self._last_step = time.monotonic()
        try:
            outputs = self.engine.step()
        except Exception as e:
            if self.lockstep:  # see [Note: heartbeat for the followers]
                self.step_errors += 1
                log.exception("Engine.step() raised under tensor parallelism; stopping the loop")
                err = EngineStepError(f"the engine failed while running this request: {e!r}")
                self._fail_starts(err)
                for stream in self._active.values():
                    self._post(stream, err)
                self._active.clear()
                raise _Fatal() from e
            # Which requests the failed step held is unknown: fail every in-flight one
            # (their handlers answer 500) and abort them so their blocks are freed; the
            # engine then serves new requests. Back off if it keeps failing.
            log.exception("Engine.step() raised; failing %d in-flight requests", len(self._active))
            self.step_errors += 1
            err = EngineStepError(f"the engine failed while running this request: {e!r}")
            self._fail_starts(err)  # their handlers answer 500 before any header
            for rid, stream in list(self._active.items()):
                self._abort(rid)
                self._post(stream, err)
            time.sleep(min(1.0, 0.01 * 2**failures))
            return failures + 1
        for out in outputs:
            stream = self._active.get(out.request_id)
            if stream is None:
                continue  # aborted by its client
            if out.finished:
                del self._active[out.request_id]
            self._post(stream, out)
        return 0

    def _post(self, stream: RequestStream, item) -> None:
        try:
            self._loop.call_soon_threadsafe(stream.queue.put_nowait, item)
        except RuntimeError:  # the event loop is closed: nobody is waiting any more
            pass

    def _fail_all(self, err: BaseException) -> None:
        for p in self._admission:
            if not p.admitted.done():
                p.admitted.set_exception(err)
        self._admission.clear()
        self._fail_starts(err)
        for rid, stream in list(self._active.items()):
            try:
                self.engine.abort(rid)
            except Exception:
                log.exception("engine.abort(%r) raised at shutdown", rid)
            self._post(stream, err)
        self._active.clear()
        with self._cond:
            for kind, arg in self._inbox:
                if kind == "add" and arg.admitted.set_running_or_notify_cancel():
                    arg.admitted.set_exception(err)
            self._inbox.clear()

    def _snapshot(self) -> None:
        try:
            stats = dict(self.engine.stats())
        except Exception:
            log.exception("engine.stats() raised")
            return
        now = time.monotonic()
        gen = stats.get("generation_tokens_total", 0)
        self._tok_samples.append((now, gen))
        while len(self._tok_samples) > 2 and now - self._tok_samples[1][0] > TOKENS_PER_S_WINDOW_S:
            self._tok_samples.popleft()
        self.sample = _Sample(stats, len(self._admission), self._tok_samples[0], (now, gen))

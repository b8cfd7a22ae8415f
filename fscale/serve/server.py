"""An OpenAI-compatible HTTP server for an fscale ``Engine`` (FastAPI + uvicorn).

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (both with SSE
streaming), ``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus). Errors
use OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``: 400 for bad
parameters, 404 for another model's name, 503 + ``Retry-After`` (code ``engine_full``)
when the engine stayed full for ``max_queue_wait_s`` or did not start the request within
``max_start_wait_s``, 500 when the engine failed on the request. A request is answered
only once the engine has started it (async_engine.py, [Note: two waits before a request
starts]), so these 503s come before any header, for streaming requests too. A client
that disconnects has its request aborted in the engine, queued or running.

Usage::

    from fscale.serve.engine import Engine
    from fscale.serve.server import build_app, serve, start_server
    serve("path/to/hf_dir", port=8000)               # blocks, like python -m fscale.serve
    srv = start_server(build_app(Engine("path/to/hf_dir")))   # in a thread, free port
    print(srv.url); srv.stop()

Tensor parallel (every rank of ``torchrun --nproc-per-node N -m fscale.serve --model DIR
--tensor-parallel N`` runs this; see fscale/serve/README.md)::

    engine = Engine("path/to/hf_dir", tensor_parallel="world")   # after fs.init_distributed
    serve(engine, port=8000)   # rank 0: HTTP + a loop that heartbeats while idle;
                               # other ranks: engine.follow() until rank 0 shuts down
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import signal
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Sequence

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from fscale.serve.async_engine import (
    AsyncEngine,
    EngineStepError,
    QueueTimeout,
    RequestStream,
    ShuttingDown,
    StartTimeout,
)
from fscale.serve.protocol import (
    APIError,
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
    ModelCard,
    ModelList,
    Usage,
    error_body,
)
from fscale.serve.server_metrics import ServerMetrics

log = logging.getLogger(__name__)

DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions
DISCONNECT_POLL_S = 0.2  # how often a waiting handler checks that its client is still there
FOLLOWER_GRACE_S = 30.0  # a signalled follower waits this long for rank 0's shutdown
# Retry-After of a request the engine did not start in time: the seats free as requests
# finish, which no one can predict; a few seconds, not another max_start_wait_s.
START_RETRY_AFTER_MAX_S = 5


class _ClientGone(Exception):
    """The client closed the connection; its requests were aborted."""


def build_app(
    engine,
    *,
    served_model_name: str | None = None,
    max_queue_wait_s: float = 2.0,
    max_start_wait_s: float | None = 300.0,
    heartbeat_s: float = 0.5,
):
    """A FastAPI app serving ``engine``; its lifespan starts and stops the engine's thread.

    Args:
      engine: an ``fscale.serve.engine.Engine`` (the app becomes its only user). Under
        tensor parallelism, the group's rank 0; the lifespan's end then also calls
        ``engine.shutdown()``, which ends the other ranks' ``follow()``.
      served_model_name: the name clients pass as ``model`` (default ``engine.model_name``).
      max_queue_wait_s: how long a request waits for room in a full engine's waiting
        queue before 503.
      max_start_wait_s: how long a request may wait in all (from its arrival) for the
        engine to start it, its KV cache or seats full, before it is dropped with a 503;
        None: no limit (as vLLM). The default, 300 s, is shorter than clients' usual
        timeouts.
      heartbeat_s: under tensor parallelism, how often an idle server still steps, so
        the other ranks never wait long in the step's broadcast (see async_engine.py).
    """
    aeng = AsyncEngine(
        engine,
        max_queue_wait_s=max_queue_wait_s,
        max_start_wait_s=max_start_wait_s,
        heartbeat_s=heartbeat_s,
    )
    state = _State(aeng, served_model_name or engine.model_name)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        aeng.start(asyncio.get_running_loop())
        try:
            yield
        finally:
            await asyncio.get_running_loop().run_in_executor(None, aeng.stop)

    app = FastAPI(title="fscale.serve", lifespan=lifespan)
    app.state.fscale = state
    _add_error_handlers(app)

    @app.get("/health")
    async def health():
        if aeng.is_alive():
            return {"status": "ok"}
        return JSONResponse({"status": "engine loop not running"}, status_code=503)

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.render(), media_type=state.metrics.content_type)

    @app.get("/v1/models")
    async def models():
        card = ModelCard(id=state.model_name, max_model_len=engine.max_model_len)
        return ModelList(data=[card])

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await _guard(state.completions(body, request))

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        return await _guard(state.chat(body, request))

    return app


async def _guard(handler):
    """Await a handler; an unexpected error becomes a 500 APIError for this request alone.

    Starlette's catch-all ``Exception`` handler re-raises after answering, and uvicorn then
    closes the connection: a keep-alive client would see its next request fail. An
    APIError is answered by the ordinary handler, with the connection kept.
    """
    try:
        return await handler
    except APIError:
        raise
    except Exception as e:
        log.exception("request failed")
        raise APIError(500, f"internal error: {e!r}", type="server_error") from None


def _add_error_handlers(app: FastAPI) -> None:
    def respond(status: int, message: str, type_: str, param=None, code=None, headers=None):
        return JSONResponse(error_body(message, type_, param, code), status, headers=headers)

    @app.exception_handler(APIError)
    async def api_error(request, exc: APIError):
        return JSONResponse(exc.body(), exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc: RequestValidationError):
        # FastAPI answers 422; OpenAI clients expect 400 for a bad body, malformed JSON included.
        errs = exc.errors()
        first = errs[0] if errs else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        if first.get("type") == "json_invalid":
            msg = f"the request body is not valid JSON ({first.get('msg', '')}); send JSON"
            return respond(400, msg, "invalid_request_error")
        where = ".".join(loc) or "body"
        msg = f"{where}: {first.get('msg', 'invalid value')}"
        if loc and loc[0] == "prompt":  # pydantic reports every arm of the union: say it once
            msg = (
                "prompt must be a string, a list of token ids (ints), or a list of strings or "
                "of token-id lists (one completion each)"
            )
        elif len(errs) > 1:
            msg += f" (and {len(errs) - 1} more problem(s) in the body)"
        return respond(400, msg, "invalid_request_error", param=loc[0] if loc else None)

    @app.exception_handler(Exception)
    async def crashed(request, exc: Exception):
        # Last resort for routes without _guard: a 500 in the error shape (uvicorn logs the
        # traceback and closes this connection); the server goes on.
        return respond(500, f"internal error: {exc!r}", "server_error")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return respond(exc.status_code, str(exc.detail), kind, headers=exc.headers)


class _State:
    """What the handlers share: the async engine, the model's name, the metrics."""

    def __init__(self, aeng: AsyncEngine, model_name: str):
        self.aeng, self.engine, self.model_name = aeng, aeng.engine, model_name
        self.metrics = ServerMetrics(aeng)

    # ------------------------------------------------------------------ validation

    def check(self, body) -> None:
        if body.model and body.model != self.model_name:
            raise APIError(
                404,
                f"model {body.model!r} is not served here; this server serves "
                f"{self.model_name!r} (GET /v1/models lists it)",
                type="not_found_error",
                param="model",
                code="model_not_found",
            )
        for param, why in body.unsupported():
            raise APIError(400, why, param=param)

    def sampling(self, body, n_prompt: int, requested: int | None, default: int | None):
        """SamplingParams for one prompt of ``n_prompt`` tokens, or APIError 400."""
        from fscale.serve.params import SamplingParams

        limit = self.engine.max_model_len
        room = limit - n_prompt
        if room <= 0:
            raise APIError(
                400,
                f"the prompt has {n_prompt} tokens but the model's context is {limit} tokens "
                "(max_model_len), with room needed for at least one generated token; "
                "shorten the prompt",
                param="prompt",
                code="context_length_exceeded",
            )
        if requested is None:
            max_tokens = room if default is None else min(default, room)
        elif requested < 1:
            raise APIError(400, f"max_tokens must be >= 1, got {requested}", param="max_tokens")
        elif requested > room:
            raise APIError(
                400,
                f"max_tokens={requested} plus the prompt's {n_prompt} tokens exceeds the model's "
                f"context of {limit} tokens (max_model_len); ask for at most {room}",
                param="max_tokens",
                code="context_length_exceeded",
            )
        else:
            max_tokens = requested
        stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        try:
            return SamplingParams(
                max_tokens=max_tokens,
                temperature=body.temperature,
                top_k=0 if body.top_k == -1 else body.top_k,
                top_p=body.top_p,
                seed=body.seed,
                stop=stop,
                stop_token_ids=tuple(body.stop_token_ids or ()),
                ignore_eos=body.ignore_eos,
            )
        except (ValueError, TypeError) as e:
            raise APIError(400, str(e)) from None

    def encode(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            ids = list(self.engine.tokenizer.encode(prompt))
        else:
            ids = list(prompt)
            bad = [t for t in ids if t < 0]
            if bad:
                raise APIError(400, f"token ids must be >= 0, got {bad[:5]}", param="prompt")
        if not ids:
            raise APIError(400, "the prompt is empty; send at least one token", param="prompt")
        return ids

    # ------------------------------------------------------------------ endpoints

    async def completions(self, body: CompletionRequest, request: Request):
        self.check(body)
        prompts = body.prompts()
        if not prompts:
            raise APIError(400, "prompt is an empty list; send at least one prompt", param="prompt")
        ids = [self.encode(p) for p in prompts]
        params = [
            self.sampling(body, len(x), body.max_tokens, DEFAULT_COMPLETION_TOKENS) for x in ids
        ]
        rid = f"cmpl-{uuid.uuid4().hex}"
        run = _Run(self, request, rid, ids)
        await run.admit(params)
        if body.stream:
            return _sse(run, self._completion_chunks(run, body.include_usage()))
        finals = await run.collect()
        choices = [
            CompletionChoice(index=i, text=o.text, finish_reason=o.finish_reason)
            for i, o in enumerate(finals)
        ]
        return CompletionResponse(
            id=rid, model=self.model_name, choices=choices, usage=run.usage(finals)
        )

    async def _completion_chunks(self, run: _Run, include_usage: bool):
        async for i, out in run.outputs():
            if not out.delta_text and not out.finished:
                continue
            choice = {
                "index": i,
                "text": out.delta_text,
                "finish_reason": out.finish_reason if out.finished else None,
                "logprobs": None,
            }
            yield run.chunk("text_completion", [choice])
        if include_usage:
            yield run.chunk("text_completion", [], usage=run.usage().model_dump())

    async def chat(self, body: ChatCompletionRequest, request: Request):
        self.check(body)
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        try:
            ids = list(self.engine.tokenizer.apply_chat_template(messages))
        except ValueError as e:
            raise APIError(
                400,
                f"/v1/chat/completions needs the model's chat template: {e}",
                param="messages",
                code="no_chat_template",
            ) from None
        except Exception as e:  # the template itself refused (e.g. roles must alternate)
            raise APIError(
                400, f"the chat template could not render these messages: {e}", param="messages"
            ) from None
        requested = body.max_completion_tokens if body.max_tokens is None else body.max_tokens
        params = self.sampling(body, len(ids), requested, None)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        run = _Run(self, request, rid, [ids])
        await run.admit([params])
        if body.stream:
            return _sse(run, self._chat_chunks(run, body.include_usage()))
        (final,) = await run.collect()
        choice = ChatChoice(
            index=0, message=AssistantMessage(content=final.text), finish_reason=final.finish_reason
        )
        return ChatCompletionResponse(
            id=rid, model=self.model_name, choices=[choice], usage=run.usage([final])
        )

    async def _chat_chunks(self, run: _Run, include_usage: bool):
        def chunk(delta: DeltaMessage, finish=None) -> str:
            c = ChatCompletionChunk(
                id=run.rid,
                created=run.created,
                model=self.model_name,
                choices=[ChatChunkChoice(index=0, delta=delta, finish_reason=finish)],
            )
            return _event(c.model_dump(exclude_none=True, exclude={"choices": {0: {"logprobs"}}}))

        yield chunk(DeltaMessage(role="assistant", content=""))
        async for _, out in run.outputs():
            if out.delta_text:
                yield chunk(DeltaMessage(content=out.delta_text))
            if out.finished:
                yield chunk(DeltaMessage(), out.finish_reason)
        if include_usage:
            yield run.chunk("chat.completion.chunk", [], usage=run.usage().model_dump())


class _Run:
    """The engine requests of one HTTP request (one per prompt), their outputs and metrics."""

    def __init__(self, state: _State, request: Request, rid: str, ids: list[list[int]]):
        self.state, self.request, self.rid, self.ids = state, request, rid, ids
        self.created = int(time.time())
        self.t0 = time.monotonic()
        self.first_token_at: float | None = None
        self.next_check = self.t0 + DISCONNECT_POLL_S  # when _watch next asks about the client
        self.streams: list[RequestStream] = []
        self.queue: asyncio.Queue = asyncio.Queue()  # shared by the streams: arrival order
        self.index: dict[str, int] = {}
        self.finals: list = [None] * len(ids)

    async def admit(self, params: Sequence) -> None:
        """Add every prompt to the engine, returning once it started them all; on any
        failure withdraw them all and raise."""
        aeng, m = self.state.aeng, self.state.metrics
        adds = []
        for i, (ids, sp) in enumerate(zip(self.ids, params, strict=True)):
            rid = self.rid if len(self.ids) == 1 else f"{self.rid}-{i}"
            self.index[rid] = i
            adds.append(aeng.add(rid, ids, sp, queue=self.queue))
        try:
            # All at once: one round trip through the loop thread, not one step per prompt.
            results = await self._watch(asyncio.gather(*adds, return_exceptions=True))
            self.streams = [r for r in results if isinstance(r, RequestStream)]
            for r in results:
                if isinstance(r, BaseException):
                    raise r
        except BaseException as e:
            self.abort()
            if isinstance(e, QueueTimeout):
                if isinstance(e, StartTimeout):
                    m.rejected.labels("start_timeout").inc()
                    limit = aeng.max_start_wait_s or 0
                    wait = max(1, math.ceil(min(limit, START_RETRY_AFTER_MAX_S)))
                else:
                    m.rejected.labels("queue_full").inc()
                    wait = max(1, math.ceil(aeng.max_queue_wait_s))
                raise APIError(
                    503,
                    f"the server is at capacity ({e}); retry after {wait} s",
                    type="service_unavailable",
                    code="engine_full",
                    headers={"Retry-After": str(wait)},
                ) from None
            if isinstance(e, ShuttingDown):
                raise APIError(503, f"{e}; retry later", type="service_unavailable") from None
            if isinstance(e, EngineStepError):  # a failed step dropped it before it started
                m.rejected.labels("error").inc()
                raise APIError(500, str(e), type="server_error") from None
            if isinstance(e, ValueError):
                m.rejected.labels("bad_request").inc()
                raise APIError(400, str(e), param="prompt") from None
            if isinstance(e, _ClientGone):
                m.requests.labels("abort").inc()
                raise APIError(499, "the client closed the connection") from None
            if isinstance(e, Exception):
                log.exception("add_request failed for %s", self.rid)
                m.rejected.labels("error").inc()
                raise APIError(
                    500, f"the engine could not take the request: {e!r}", type="server_error"
                ) from None
            raise

    async def outputs(self) -> AsyncIterator[tuple[int, object]]:
        """``(prompt index, RequestOutput)`` as they arrive, until every prompt finished."""
        m = self.state.metrics
        left = len(self.streams)
        ended = "abort"  # unless it finishes or fails: a closed stream, a client gone
        try:
            while left:
                item = await self._watch(self.queue.get())
                if isinstance(item, BaseException):
                    raise item
                i = self.index[item.request_id]
                if self.first_token_at is None and item.new_token_ids:
                    self.first_token_at = time.monotonic()
                    m.ttft.observe(self.first_token_at - self.t0)
                if item.finished:
                    left -= 1
                    self.streams[i].finished = True
                    self.finals[i] = item
                    m.requests.labels(item.finish_reason or "unknown").inc()
                yield i, item
            m.e2e.observe(time.monotonic() - self.t0)
        except (EngineStepError, ShuttingDown):
            ended = "error"
            raise
        finally:
            if left:  # the engine requests that did not finish
                m.requests.labels(ended).inc(left)
            self.abort()  # no-op for finished streams; frees the rest (closed stream, error)

    async def collect(self) -> list:
        """Every prompt's final output (non-streaming); errors become APIError."""
        try:
            async for _ in self.outputs():
                pass
        except _ClientGone:
            raise APIError(499, "the client closed the connection") from None
        except EngineStepError as e:
            raise APIError(500, str(e), type="server_error") from None
        except ShuttingDown as e:
            raise APIError(503, f"{e}; retry later", type="service_unavailable") from None
        return self.finals

    def usage(self, finals=None) -> Usage:
        finals = self.finals if finals is None else finals
        done = sum(len(o.token_ids) for o in finals if o is not None)
        return Usage.of(sum(len(x) for x in self.ids), done)

    def chunk(self, obj: str, choices: list, usage=None) -> str:
        body = {
            "id": self.rid,
            "object": obj,
            "created": self.created,
            "model": self.state.model_name,
            "choices": choices,
        }
        if usage is not None:
            body["usage"] = usage
        return _event(body)

    def abort(self) -> None:
        for s in self.streams:
            s.abort()

    async def _watch(self, aw):
        """Await ``aw`` while checking every DISCONNECT_POLL_S that the client is still there."""
        task = asyncio.ensure_future(aw)
        try:
            while True:
                wait = max(0.0, self.next_check - time.monotonic())
                done, _ = await asyncio.wait({task}, timeout=wait)
                # Checked on a clock, not only on timeouts: a fast stream of outputs would
                # otherwise never look, and a gone client's request would run to the end.
                if time.monotonic() >= self.next_check:
                    self.next_check = time.monotonic() + DISCONNECT_POLL_S
                    if await self.request.is_disconnected():
                        raise _ClientGone()
                if done:
                    return task.result()
        finally:
            if not task.done():
                task.cancel()


def _event(body: dict) -> str:
    return f"data: {json.dumps(body, separators=(',', ':'))}\n\n"


def _sse(run: _Run, chunks: AsyncIterator[str]) -> StreamingResponse:
    async def body():
        try:
            async for c in chunks:
                yield c
        except _ClientGone:
            return  # nobody is reading; outputs() already aborted the requests
        except (EngineStepError, ShuttingDown) as e:
            # The 200 and earlier chunks are already sent: report in-band, as OpenAI does.
            yield _event(error_body(str(e), "server_error"))
        finally:
            run.abort()  # the generator was closed early (disconnect): free the engine
        yield "data: [DONE]\n\n"

    return StreamingResponse(
        body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
    )


# ---------------------------------------------------------------------------- running it


class RunningServer:
    """A uvicorn server in a background thread; ``url`` once it listens, ``stop()`` to end."""

    def __init__(self, server, thread: threading.Thread, url: str):
        self.server, self.thread, self.url = server, thread, url

    def stop(self, timeout: float = 30.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def start_server(app, host: str = "127.0.0.1", port: int = 0, *, log_level: str = "warning"):
    """Run ``app`` with uvicorn in a daemon thread; returns once it accepts connections.

    ``port=0`` picks a free port (see ``.url``).
    """
    import uvicorn

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name="fscale-serve-http", daemon=True
    )
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the uvicorn server did not start; see the log above")
        time.sleep(0.01)
    return RunningServer(server, thread, f"http://{_url_host(host)}:{port}")


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def serve(
    engine_or_dir,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    served_model_name: str | None = None,
    max_queue_wait_s: float = 2.0,
    max_start_wait_s: float | None = 300.0,
    heartbeat_s: float = 0.5,
    log_level: str = "info",
    on_ready=None,
    **engine_kwargs,
) -> None:
    """Serve an Engine (or build one from a model directory) until Ctrl-C / SIGTERM.

    Args:
      engine_or_dir: an ``Engine``, or what ``Engine(...)`` takes (a model directory,
        an ``nn.Module``), built with ``engine_kwargs``.
      on_ready: called with the URL once the server accepts connections.
      served_model_name, max_queue_wait_s, max_start_wait_s, heartbeat_s: see
        :func:`build_app`.

    Under tensor parallelism every rank of the group calls it: rank 0 serves HTTP
    (stepping at least every ``heartbeat_s``) and, when it stops, ends the others, which
    run :func:`follow` here and return then. A failed step on rank 0 stops its server and
    raises, so the launcher ends the job.
    """
    import uvicorn

    if hasattr(engine_or_dir, "step") and hasattr(engine_or_dir, "add_request"):
        if engine_kwargs:
            raise ValueError(
                f"engine options {sorted(engine_kwargs)} were given with a built Engine; "
                "pass them to Engine(...) instead, or pass a model directory"
            )
        engine = engine_or_dir
    else:
        from fscale.serve.engine import Engine

        engine = Engine(engine_or_dir, **engine_kwargs)
    if not getattr(engine, "is_leader", True):
        follow(engine)
        return
    app = build_app(
        engine,
        served_model_name=served_model_name,
        max_queue_wait_s=max_queue_wait_s,
        max_start_wait_s=max_start_wait_s,
        heartbeat_s=heartbeat_s,
    )

    class _Server(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets)
            if self.started and on_ready is not None:
                bound = self.servers[0].sockets[0].getsockname()
                on_ready(f"http://{_url_host(host)}:{bound[1]}")

    server = _Server(uvicorn.Config(app, host=host, port=port, log_level=log_level))
    aeng = app.state.fscale.aeng
    failed = threading.Event()
    restore = {}
    if aeng.lockstep:

        def on_failure():
            failed.set()
            server.should_exit = True

        aeng.on_failure = on_failure
        # uvicorn re-raises a SIGTERM / SIGINT after its graceful shutdown; under a
        # launcher a rank killed by it is a failed rank, so this one exits 0 instead.
        restore = _handle_signals(lambda sig, frame: None)
    try:
        server.run()
    finally:
        for sig, handler in restore.items():
            signal.signal(sig, handler)
    if failed.is_set():
        raise RuntimeError(
            "the engine loop failed under tensor parallelism (see the log above); the "
            "server stopped so that the launcher ends the other ranks"
        )


def follow(engine, grace_s: float = FOLLOWER_GRACE_S) -> None:
    """A tensor-parallel rank other than 0: ``engine.follow()`` until rank 0 shuts down.

    SIGTERM / SIGINT do not end it at once: torchrun forwards them to every rank and
    Ctrl-C reaches the whole process group, so rank 0 got one too and its shutdown
    releases this rank in step. If that has not happened ``grace_s`` seconds after the
    first signal, or on a second one, this rank exits with status 1.
    """
    signals: list[int] = []

    def give_up(why: str):
        raise SystemExit(f"fscale.serve: tensor-parallel rank {engine.tp.rank}: {why}; exiting")

    def on_signal(sig, frame):
        signals.append(sig)
        if len(signals) > 1:
            give_up("signalled twice before rank 0 shut down")
        if hasattr(signal, "setitimer"):
            signal.setitimer(signal.ITIMER_REAL, grace_s)

    def on_alarm(sig, frame):
        give_up(f"rank 0 did not shut down within {grace_s:g} s of a signal")

    restore = _handle_signals(on_signal)
    if restore and hasattr(signal, "SIGALRM"):
        restore[signal.SIGALRM] = signal.signal(signal.SIGALRM, on_alarm)
    try:
        engine.follow()
    finally:
        if hasattr(signal, "setitimer"):
            signal.setitimer(signal.ITIMER_REAL, 0)
        for sig, handler in restore.items():
            signal.signal(sig, handler)


def _handle_signals(handler) -> dict:
    """Install ``handler`` for SIGINT / SIGTERM (main thread only); the old handlers."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}

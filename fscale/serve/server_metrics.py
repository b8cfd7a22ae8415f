"""Prometheus metrics of one server: its own registry, engine numbers read at scrape time.

Engine-side values (queue depth, running requests, KV use, token totals) come from the
loop thread's latest ``engine.stats()`` copy, so a scrape never touches the engine from
the event loop ([Note: one thread owns the engine] in async_engine.py). Request-side
values (finish reasons, rejections, TTFT, end-to-end latency) are recorded by the handlers.

Usage::

    metrics = ServerMetrics(async_engine)
    metrics.ttft.observe(0.12)
    text = metrics.render()          # the /metrics body
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

# Seconds; the tiny CPU models of the tests answer in ms, a 7B on a GPU in 10s of ms to s.
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class _EngineCollector:
    """Gauges and counters straight from the loop thread's last stats copy."""

    def __init__(self, aeng):
        self.aeng = aeng

    def describe(self):
        return []  # skip the registration-time collect (the engine may not be started yet)

    def collect(self):
        s = self.aeng.sample
        st = s.stats

        def gauge(name, doc, value):
            g = GaugeMetricFamily(f"fscale_{name}", doc)
            g.add_metric([], float(value))
            return g

        def counter(name, doc, value):
            c = CounterMetricFamily(f"fscale_{name}", doc)
            c.add_metric([], float(value))
            return c

        waiting = st.get("num_waiting", 0)
        yield gauge("num_requests_waiting", "Requests in the engine's waiting queue.", waiting)
        yield gauge(
            "num_requests_admission",
            "Requests the server holds back while the engine is full (before 503).",
            s.admission_waiting,
        )
        yield gauge(
            "queue_depth", "Requests not yet running: engine waiting + server admission.",
            waiting + s.admission_waiting,
        )  # fmt: skip
        yield gauge("num_requests_running", "Requests being decoded.", st.get("num_running", 0))
        yield gauge("kv_cache_usage_ratio", "Fraction of KV blocks in use.", st.get("kv_usage", 0))
        yield gauge("kv_cache_blocks_used", "KV blocks in use.", st.get("kv_blocks_used", 0))
        yield gauge(
            "kv_cache_blocks_total", "KV blocks in the cache.", st.get("kv_blocks_total", 0)
        )
        yield gauge(
            "generation_tokens_per_second",
            "Generated tokens per second over the last ~10 s.",
            s.tokens_per_s(),
        )
        yield gauge(
            "engine_loop_alive", "1 while the engine loop thread runs.", self.aeng.is_alive()
        )
        yield counter("prompt_tokens", "Prompt tokens processed.", st.get("prompt_tokens_total", 0))
        yield counter(
            "generation_tokens", "Tokens generated.", st.get("generation_tokens_total", 0)
        )
        yield counter(
            "num_preemptions", "Requests preempted (recomputed).", st.get("num_preempted_total", 0)
        )
        yield counter("engine_steps", "Engine forward steps.", st.get("steps_total", 0))
        yield counter("engine_step_errors", "Engine steps that raised.", self.aeng.step_errors)


class ServerMetrics:
    """The registry and the handler-side metrics of one app."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, aeng):
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(aeng))
        reg = self.registry
        self.requests = Counter(
            "fscale_requests",
            "Finished engine requests by finish reason (stop, length, abort, error).",
            ["finish_reason"],
            registry=reg,
        )
        self.rejected = Counter(
            "fscale_requests_rejected",
            "Requests refused before running (queue_full: 503, start_timeout: 503, "
            "bad_request: 400, error: 500).",
            ["reason"],
            registry=reg,
        )
        self.ttft = Histogram(
            "fscale_time_to_first_token_seconds",
            "Arrival to first generated token.",
            buckets=_LATENCY_BUCKETS,
            registry=reg,
        )
        self.e2e = Histogram(
            "fscale_e2e_request_latency_seconds",
            "Arrival to last token.",
            buckets=_LATENCY_BUCKETS,
            registry=reg,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)

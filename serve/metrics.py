"""What the gateway measures, as Prometheus metrics at GET /metrics (one set per gateway replica).

Measured at the gateway, so both engines report the same metrics the same way. Labels carry
only names this server knows (a served model, an outcome), never raw request input.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
PER_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)
RATE_BUCKETS = (1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000)


class GatewayMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, engine: str):
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "lorafleet_requests",
            "Generation requests by model (base or adapter), adapter version (empty: none) and outcome.",
            ["model", "version", "outcome"],
            registry=r,
        )
        self.refused = Counter(
            "lorafleet_refused_requests", "Requests answered with an error, by HTTP status.", ["status"], registry=r
        )
        self.ttft = Histogram(
            "lorafleet_time_to_first_token_seconds",
            "From arrival to the first generated token.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            "lorafleet_time_per_output_token_seconds",
            "Per token after the first.",
            ["model"],
            buckets=PER_TOKEN_BUCKETS,
            registry=r,
        )
        self.rate = Histogram(
            "lorafleet_request_tokens_per_second",
            "Generated tokens per second of each request.",
            ["model"],
            buckets=RATE_BUCKETS,
            registry=r,
        )
        self.tokens = Counter("lorafleet_generated_tokens", "Tokens generated, all choices.", ["model"], registry=r)
        self.prompt_tokens = Counter(
            "lorafleet_prompt_tokens", "Prompt tokens of answered requests.", ["model"], registry=r
        )
        self.in_flight = Gauge("lorafleet_requests_in_flight", "Requests holding a slot (being generated).", registry=r)
        self.waiting = Gauge(
            "lorafleet_requests_waiting", "Requests queued for a slot (serve.overload: queue).", registry=r
        )
        Gauge("lorafleet_engine_info", "The generation engine behind this gateway.", ["engine"], registry=r).labels(
            engine
        ).set(1)

    def answered(
        self, model: str, version: str, prompt_tokens: int, tokens: int, first_token_s: float, total_s: float
    ) -> None:
        self.requests.labels(model, version, "ok").inc()
        self.prompt_tokens.labels(model).inc(prompt_tokens)
        self.tokens.labels(model).inc(tokens)
        self.ttft.labels(model).observe(first_token_s)
        if tokens > 1:
            self.tpot.labels(model).observe(max(0.0, total_s - first_token_s) / (tokens - 1))
        if total_s > 0:
            self.rate.labels(model).observe(tokens / total_s)

    def failed(self, model: str, version: str) -> None:
        self.requests.labels(model, version, "error").inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


# This process's metrics, kept here rather than on the Gateway: the error handlers are module
# functions, and Serve ships the Gateway class by value, so its module globals are a copy.
_current: GatewayMetrics | None = None


def start(engine: str) -> GatewayMetrics:
    global _current
    _current = GatewayMetrics(engine)
    return _current


def count_refused(status: int) -> None:
    if _current is not None:
        _current.refused.labels(str(status)).inc()

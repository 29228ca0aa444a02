"""Prometheus metrics of one server, in a registry of its own (served at GET /metrics)."""
from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from chitu.serve.async_engine import RequestStream
from chitu.serve.engine_events import EngineStats

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)
TOKEN_TIME_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)


class ServeMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("chitu_requests", "Finished requests by finish reason (stop, length, abort, error)",
                                ["finish_reason"], registry=r)
        self.prompt_tokens = Counter("chitu_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter("chitu_generation_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram("chitu_time_to_first_token_seconds", "Time from arrival to the first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("chitu_time_per_output_token_seconds", "Mean time between output tokens of a request",
                              buckets=TOKEN_TIME_BUCKETS, registry=r)
        self.latency = Histogram("chitu_e2e_request_latency_seconds", "Time from arrival to the last token",
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.running = Gauge("chitu_num_requests_running", "Requests admitted to the batch", registry=r)
        self.waiting = Gauge("chitu_num_requests_waiting", "Requests queued for admission", registry=r)
        self.kv_usage = Gauge("chitu_kv_cache_usage_ratio", "Fraction of KV-cache blocks in use", registry=r)
        self.kv_free_blocks = Gauge("chitu_kv_cache_free_blocks", "Free KV-cache blocks", registry=r)
        self.prefix_queries = Counter("chitu_prefix_cache_queries", "Prompt tokens looked up in the prefix cache",
                                      registry=r)
        self.prefix_hits = Counter("chitu_prefix_cache_hits", "Prompt tokens found in the prefix cache", registry=r)
        self.prefix_hit_rate = Gauge("chitu_prefix_cache_hit_rate", "Prefix-cache hits over queries so far", registry=r)
        self._counted = (0, 0)  # the engine's queries and hits already added

    def observe_engine(self, stats: EngineStats) -> None:
        """Refresh the gauges; called after every turn of the engine loop."""
        self.running.set(stats.running)
        self.waiting.set(stats.waiting)
        self.kv_usage.set(stats.kv_usage)
        self.kv_free_blocks.set(stats.kv_free_blocks)
        queries, hits = stats.prefix_query_tokens, stats.prefix_hit_tokens
        self.prefix_queries.inc(queries - self._counted[0])
        self.prefix_hits.inc(hits - self._counted[1])
        self._counted = (queries, hits)
        self.prefix_hit_rate.set(hits / queries if queries else 0.0)

    def observe_request(self, stream: RequestStream, finish_reason: str) -> None:
        now = time.monotonic()
        self.requests.labels(finish_reason).inc()
        self.prompt_tokens.inc(stream.num_prompt_tokens)
        self.generation_tokens.inc(stream.num_output_tokens)
        self.latency.observe(now - stream.created_at)
        if stream.first_token_at is not None:
            self.ttft.observe(stream.first_token_at - stream.created_at)
            if stream.num_output_tokens > 1:
                self.tpot.observe((now - stream.first_token_at) / (stream.num_output_tokens - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)

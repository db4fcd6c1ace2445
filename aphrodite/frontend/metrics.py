"""Prometheus metrics (`aphrodite:*`, labelled with model_name) and the periodic stats line.

The families and buckets follow vLLM's (`vllm:*`), so dashboards built for vLLM work after
a change of prefix.

Engine-level numbers come from the stats dict of each STEP_OUTPUTS frame; latencies are
measured here, in the frontend, where the client sees them. Each server owns its own
registry, so two servers in one process (tests) never share counters.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from aphrodite.protocol import EngineStats

logger = logging.getLogger("aphrodite.server")

CONTENT_TYPE = CONTENT_TYPE_LATEST

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
TOKEN_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
                         0.75, 1.0, 2.5, 5.0, 10.0)
ITERATION_TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
PARAMS_N_BUCKETS = (1, 2, 5, 10, 20)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
               120.0, 240.0, 480.0)


def _length_buckets(max_len: int) -> list[int]:
    """1, 2, 5, 10, 20, 50, ... up to max_len."""
    buckets, scale = [], 1
    while True:
        for m in (1, 2, 5):
            if m * scale > max_len:
                return buckets
            buckets.append(m * scale)
        scale *= 10


class ServerMetrics:
    def __init__(self, model_name: str, max_model_len: int):
        self.registry = CollectorRegistry()
        labels = ["model_name"]

        def gauge(name, doc):
            return Gauge(f"aphrodite:{name}", doc, labels, registry=self.registry).labels(model_name)

        def counter(name, doc):
            return Counter(f"aphrodite:{name}", doc, labels, registry=self.registry).labels(model_name)

        def histogram(name, doc, buckets):
            return Histogram(f"aphrodite:{name}", doc, labels, buckets=buckets,
                             registry=self.registry).labels(model_name)

        self.num_running = gauge("num_requests_running", "Sequences in the running batch.")
        self.num_waiting = gauge("num_requests_waiting", "Sequences waiting to be scheduled.")
        self.kv_usage = gauge("kv_cache_usage_perc", "Share of KV-cache blocks in use (0-1).")
        # Per-request state in each process; all three return to 0 when traffic stops.
        self.frontend_requests = gauge("frontend_requests",
                                       "Client requests in flight in the frontend.")
        self.engine_requests = gauge("engine_core_requests",
                                     "Requests the engine core holds state for.")
        self.worker_requests = gauge("worker_requests",
                                     "Requests rank 0's model runner holds state for.")
        self.prompt_tokens = counter("prompt_tokens", "Prefill tokens computed.")
        self.generation_tokens = counter("generation_tokens", "Tokens generated.")
        self.preemptions = counter("num_preemptions", "Sequences preempted (recomputed later).")
        self.prefix_queries = counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.")
        self.prefix_hits = counter("prefix_cache_hits", "Prompt tokens found in the prefix cache.")
        self._success = Counter("aphrodite:request_success", "Finished sequences by finish reason.",
                                ["model_name", "finished_reason"], registry=self.registry)
        self._model_name = model_name
        self.ttft = histogram("time_to_first_token_seconds", "Time to the first token.", TTFT_BUCKETS)
        self.tpot = histogram("time_per_output_token_seconds",
                              "Time per output token after the first (one observation each).",
                              TOKEN_LATENCY_BUCKETS)
        self.itl = histogram("inter_token_latency_seconds", "Time between two tokens.",
                             TOKEN_LATENCY_BUCKETS)
        self.e2e = histogram("e2e_request_latency_seconds", "Arrival to last token.", E2E_BUCKETS)
        self.decode_time = histogram("request_decode_time_seconds",
                                     "First to last token, per sequence.", E2E_BUCKETS)
        self.queue_time = histogram("request_queue_time_seconds",
                                    "Arrival to the engine's first batch, per sequence.",
                                    E2E_BUCKETS)
        self.prefill_time = histogram("request_prefill_time_seconds",
                                      "The engine's first batch to the first token.",
                                      E2E_BUCKETS)
        self.inference_time = histogram("request_inference_time_seconds",
                                        "The engine's first batch to the last token.",
                                        E2E_BUCKETS)
        self.iteration_tokens = histogram("iteration_tokens_total",
                                          "Tokens computed per engine step (prefill + decode).",
                                          ITERATION_TOKEN_BUCKETS)
        self.params_n = histogram("request_params_n", "The n of each request.", PARAMS_N_BUCKETS)
        self._cache_info_labels = ["model_name", "block_size", "num_gpu_blocks", "cache_dtype",
                                   "enable_prefix_caching"]
        lengths = _length_buckets(max_model_len)
        self.request_prompt_tokens = histogram("request_prompt_tokens", "Prompt length per request.", lengths)
        self.request_generation_tokens = histogram("request_generation_tokens",
                                                   "Generated tokens per sequence.", lengths)
        self.params_max_tokens = histogram("request_params_max_tokens",
                                           "The max_tokens of each request.", lengths)
        # Cumulative engine counters, to turn them into increments.
        self._last_cumulative = {"prefix_cache_queries": 0, "prefix_cache_hits": 0, "num_preemptions": 0}
        # Totals for the stats line.
        self.total_prompt_tokens = 0
        self.total_generation_tokens = 0
        self.latest = EngineStats()

    def set_cache_config(self, block_size: int, num_blocks: int, cache_dtype: str,
                         enable_prefix_caching: bool) -> None:
        """vLLM's cache_config_info: a gauge of 1 whose labels describe the KV cache."""
        Gauge("aphrodite:cache_config_info", "The KV cache's configuration.",
              self._cache_info_labels, registry=self.registry).labels(
            self._model_name, str(block_size), str(num_blocks), cache_dtype,
            str(enable_prefix_caching)).set(1)

    def on_request(self, n: int, max_tokens: int | None) -> None:
        """A request admitted to the engine, with its parameters."""
        self.params_n.observe(n)
        if max_tokens is not None:
            self.params_max_tokens.observe(max_tokens)

    def on_step(self, stats: EngineStats) -> None:
        self.latest = stats
        self.num_running.set(stats.num_running)
        self.num_waiting.set(stats.num_waiting)
        self.kv_usage.set(stats.kv_cache_usage)
        self.engine_requests.set(stats.num_engine_requests)
        self.worker_requests.set(stats.num_worker_requests)
        prompt, generated = stats.num_prompt_tokens, stats.num_generation_tokens
        if prompt or generated:
            self.iteration_tokens.observe(prompt + generated)
        self.prompt_tokens.inc(prompt)
        self.generation_tokens.inc(generated)
        self.total_prompt_tokens += prompt
        self.total_generation_tokens += generated
        for key, counter in (("prefix_cache_queries", self.prefix_queries),
                             ("prefix_cache_hits", self.prefix_hits),
                             ("num_preemptions", self.preemptions)):
            value = getattr(stats, key)
            if value > self._last_cumulative[key]:
                counter.inc(value - self._last_cumulative[key])
            self._last_cumulative[key] = value

    def on_first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def on_inter_token(self, seconds: float, num_tokens: int) -> None:
        per_token = seconds / max(num_tokens, 1)
        for _ in range(num_tokens):
            self.itl.observe(per_token)
            self.tpot.observe(per_token)

    def on_sequence_finished(self, state, seq, now: float) -> None:
        """`state`/`seq`: the client's RequestState and sequence (arrival, token times)."""
        num_out = len(seq.detokenizer.token_ids)
        self._success.labels(self._model_name, seq.finish_reason).inc()
        self.e2e.observe(now - state.arrival_time)
        self.request_generation_tokens.observe(num_out)
        if seq.index == 0:
            self.request_prompt_tokens.observe(len(state.prompt_token_ids))
        if seq.first_token_time is not None:
            self.decode_time.observe(seq.last_token_time - seq.first_token_time)
        if seq.scheduled_time is not None:       # both wall clocks of this machine
            self.queue_time.observe(max(0.0, seq.scheduled_time - state.arrival_time))
            self.prefill_time.observe(max(0.0, seq.first_token_time - seq.scheduled_time))
            self.inference_time.observe(max(0.0, seq.last_token_time - seq.scheduled_time))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class StatsLogger:
    """Logs the throughput / queue / KV line every `interval_s` while the engine is busy."""

    def __init__(self, metrics: ServerMetrics, memory_usage: Callable[[], tuple[str, int]],
                 interval_s: float = 5.0, clock: Callable[[], float] = time.monotonic):
        """memory_usage() -> ("GPU" or "CPU", bytes the server's processes use there)."""
        self.metrics = metrics
        self.memory_usage = memory_usage
        self.interval_s = interval_s
        self.clock = clock
        self._last_time = clock()
        self._last_prompt = 0
        self._last_generation = 0
        self._last_queries = 0
        self._last_hits = 0

    def line(self) -> str | None:
        """The stats line for the interval since the last call; None when nothing happened."""
        m, now = self.metrics, self.clock()
        stats = m.latest
        elapsed = max(now - self._last_time, 1e-9)
        prompt = m.total_prompt_tokens - self._last_prompt
        generated = m.total_generation_tokens - self._last_generation
        queries, hits = stats.prefix_cache_queries, stats.prefix_cache_hits
        d_queries, d_hits = queries - self._last_queries, hits - self._last_hits
        self._last_time, self._last_prompt, self._last_generation = now, m.total_prompt_tokens, m.total_generation_tokens
        self._last_queries, self._last_hits = queries, hits
        running, waiting = stats.num_running, stats.num_waiting
        if not (prompt or generated or running or waiting):
            return None
        hit_rate = 100.0 * d_hits / d_queries if d_queries > 0 else 0.0
        device, used = self.memory_usage()
        return (f"Avg prompt throughput: {prompt / elapsed:.1f} tokens/s, "
                f"Avg generation throughput: {generated / elapsed:.1f} tokens/s, "
                f"Running: {running} reqs, Waiting: {waiting} reqs, "
                f"KV cache usage: {100.0 * stats.kv_cache_usage:.1f}%, "
                f"Prefix cache hit rate: {hit_rate:.1f}%, "
                f"{device} memory usage: {used / 1e9:.2f} GB")

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                text = self.line()
            except Exception:  # the log line must never take the server down
                logger.exception("stats logging failed")
                continue
            if text is not None:
                logger.info(text)

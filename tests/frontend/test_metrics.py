"""Prometheus metrics from engine stats, and the periodic stats line, without a server."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from aphrodite.frontend.metrics import ServerMetrics, StatsLogger, _length_buckets
from aphrodite.protocol import EngineStats


def samples(metrics: ServerMetrics) -> dict:
    out = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def stats(**overrides) -> EngineStats:
    return EngineStats(**{"num_kv_blocks": 100, **overrides})


def test_counters_follow_engine_stats():
    m = ServerMetrics("my-model", 2048)
    m.on_step(stats(num_running=3, num_waiting=1, kv_cache_usage=0.5, num_prompt_tokens=100,
                    prefix_cache_queries=100, prefix_cache_hits=32, num_preemptions=1))
    m.on_step(stats(num_running=2, kv_cache_usage=0.25, num_generation_tokens=3,
                    prefix_cache_queries=150, prefix_cache_hits=48, num_preemptions=1))
    got = samples(m)
    label = (("model_name", "my-model"),)
    assert got[("aphrodite:num_requests_running", label)] == 2
    assert got[("aphrodite:num_requests_waiting", label)] == 0
    assert got[("aphrodite:kv_cache_usage_perc", label)] == 0.25
    assert got[("aphrodite:prompt_tokens_total", label)] == 100
    assert got[("aphrodite:generation_tokens_total", label)] == 3
    # Cumulative engine counters become increments, not sums of cumulative values.
    assert got[("aphrodite:prefix_cache_queries_total", label)] == 150
    assert got[("aphrodite:prefix_cache_hits_total", label)] == 48
    assert got[("aphrodite:num_preemptions_total", label)] == 1


def test_latency_histograms():
    m = ServerMetrics("m", 512)
    m.on_first_token(0.2)
    m.on_inter_token(0.09, 3)
    got = samples(m)
    label = (("model_name", "m"),)
    assert got[("aphrodite:time_to_first_token_seconds_count", label)] == 1
    assert abs(got[("aphrodite:time_to_first_token_seconds_sum", label)] - 0.2) < 1e-9
    assert got[("aphrodite:inter_token_latency_seconds_count", label)] == 3
    assert abs(got[("aphrodite:inter_token_latency_seconds_sum", label)] - 0.09) < 1e-9


def test_stats_line_rates_and_idle_silence():
    now = [100.0]
    m = ServerMetrics("m", 512)
    logger = StatsLogger(m, memory_usage=lambda: ("CPU", 1_500_000_000), interval_s=5, clock=lambda: now[0])
    assert logger.line() is None                       # idle: nothing to log
    m.on_step(stats(num_running=2, num_waiting=1, kv_cache_usage=0.123, num_prompt_tokens=50,
                    num_generation_tokens=2, prefix_cache_queries=40, prefix_cache_hits=10))
    m.on_step(stats(num_running=2, num_waiting=1, kv_cache_usage=0.123, num_generation_tokens=8,
                    prefix_cache_queries=40, prefix_cache_hits=10))
    now[0] += 5.0
    assert logger.line() == (
        "Avg prompt throughput: 10.0 tokens/s, Avg generation throughput: 2.0 tokens/s, "
        "Running: 2 reqs, Waiting: 1 reqs, KV cache usage: 12.3%, Prefix cache hit rate: 25.0%, "
        "CPU memory usage: 1.50 GB")
    # Next interval: the counters are differences since the last line.
    m.on_step(stats(num_generation_tokens=4, prefix_cache_queries=60, prefix_cache_hits=30))
    now[0] += 2.0
    line = logger.line()
    assert "Avg prompt throughput: 0.0 tokens/s, Avg generation throughput: 2.0 tokens/s" in line
    assert "Prefix cache hit rate: 100.0%" in line and "Running: 0 reqs" in line
    now[0] += 5.0
    assert logger.line() is None


def test_length_buckets():
    assert _length_buckets(2048) == [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000]


def test_vllm_families_per_step_request_and_token():
    m = ServerMetrics("m", 512)
    m.set_cache_config(16, 364, "float32", True)
    m.on_step(stats(num_prompt_tokens=40, num_generation_tokens=2))
    m.on_step(stats(num_generation_tokens=3))
    m.on_step(stats())                                  # an empty step is not an iteration
    m.on_request(2, 100)
    m.on_request(1, None)
    m.on_inter_token(0.3, 3)                            # three tokens after the first
    got = samples(m)
    label = (("model_name", "m"),)
    assert got[("aphrodite:iteration_tokens_total_count", label)] == 2
    assert got[("aphrodite:iteration_tokens_total_sum", label)] == 45
    assert got[("aphrodite:request_params_n_count", label)] == 2
    assert got[("aphrodite:request_params_n_sum", label)] == 3
    assert got[("aphrodite:request_params_max_tokens_count", label)] == 1
    assert got[("aphrodite:request_params_max_tokens_sum", label)] == 100
    # One observation per output token after the first, as vLLM counts them.
    assert got[("aphrodite:time_per_output_token_seconds_count", label)] == 3
    assert abs(got[("aphrodite:time_per_output_token_seconds_sum", label)] - 0.3) < 1e-9
    info = (("block_size", "16"), ("cache_dtype", "float32"), ("enable_prefix_caching", "True"),
            ("model_name", "m"), ("num_gpu_blocks", "364"))
    assert got[("aphrodite:cache_config_info", info)] == 1


def test_queue_prefill_inference_and_decode_times_from_the_engines_first_batch():
    """Arrival 10.0 (frontend), first batch 10.5 (engine core), first token 11.0, last 13.0."""
    from types import SimpleNamespace
    m = ServerMetrics("m", 512)
    state = SimpleNamespace(arrival_time=10.0, prompt_token_ids=[1, 2, 3])
    seq = SimpleNamespace(index=0, finish_reason="stop", scheduled_time=10.5,
                          first_token_time=11.0, last_token_time=13.0,
                          detokenizer=SimpleNamespace(token_ids=[5, 6, 7]))
    m.on_sequence_finished(state, seq, now=13.0)
    got = samples(m)
    label = (("model_name", "m"),)
    for name, seconds in (("queue", 0.5), ("prefill", 0.5), ("inference", 2.5),
                          ("decode", 2.0)):
        assert got[(f"aphrodite:request_{name}_time_seconds_count", label)] == 1
        assert abs(got[(f"aphrodite:request_{name}_time_seconds_sum", label)] - seconds) < 1e-9
    aborted = SimpleNamespace(index=0, finish_reason="abort", scheduled_time=None,
                              first_token_time=None, last_token_time=None,
                              detokenizer=SimpleNamespace(token_ids=[]))
    m.on_sequence_finished(state, aborted, now=14.0)     # never scheduled: no engine times
    assert samples(m)[("aphrodite:request_queue_time_seconds_count", label)] == 1

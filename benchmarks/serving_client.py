"""Closed-loop streaming clients for /v1/completions and the per-run metrics.

`concurrency` clients each send their next request as soon as the previous one finishes.
TTFT is the time to the first streamed text; TPOT is (latency - TTFT) / (tokens - 1) and decode
tok/s its inverse, per request. Both use the end of the stream rather than the last text
chunk's arrival: a server may send several tokens in one chunk (a fast step, or text held back
until it decodes), and the stream ends right after the last token.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from dataclasses import dataclass, field

import aiohttp

from serving_workloads import Request


@dataclass
class RequestResult:
    ok: bool
    output_tokens: int = 0
    wanted_tokens: int = 0
    ttft: float = 0.0
    latency: float = 0.0
    error: str = ""


@dataclass
class Endpoint:
    base_url: str
    model: str
    api_key: str | None = None
    extra_body: dict = field(default_factory=dict)  # e.g. logit_bias where ignore_eos is unknown


async def one_request(session: aiohttp.ClientSession, ep: Endpoint,
                      req: Request) -> RequestResult:
    """One streamed request. A pooled keep-alive connection that the server has already
    closed (llama.cpp's server does so between requests) fails before anything is sent;
    that attempt is retried once on a fresh connection, as HTTP clients do."""
    result, stale = await _stream(session, ep, req)
    if stale:
        result, _ = await _stream(session, ep, req)
    return result


async def _stream(session: aiohttp.ClientSession, ep: Endpoint,
                  req: Request) -> tuple[RequestResult, bool]:
    # ignore_eos is our (and vLLM's) extension, min_tokens the portable spelling of the same.
    body = {"model": ep.model, "prompt": req.prompt, "max_tokens": req.max_tokens,
            "temperature": 0.0, "ignore_eos": True, "min_tokens": req.max_tokens,
            "stream": True, "stream_options": {"include_usage": True}, **ep.extra_body}
    headers = {"Authorization": f"Bearer {ep.api_key}"} if ep.api_key else {}
    result = RequestResult(ok=False, wanted_tokens=req.max_tokens)
    chunks = 0
    responded = False
    start = time.perf_counter()
    try:
        async with session.post(f"{ep.base_url}/v1/completions", json=body,
                                headers=headers) as r:
            responded = True
            if r.status != 200:
                result.error = f"HTTP {r.status}: {(await r.text())[:200]}"
                return result, False
            async for raw in r.content:
                line = raw.strip()
                if not line.startswith(b"data:") or line == b"data: [DONE]":
                    continue
                chunk = json.loads(line[5:])
                if chunk.get("usage"):
                    result.output_tokens = chunk["usage"].get("completion_tokens", 0)
                choices = chunk.get("choices") or []
                if not choices or not choices[0].get("text"):
                    continue
                chunks += 1
                if chunks == 1:
                    result.ttft = time.perf_counter() - start
        result.latency = time.perf_counter() - start
        # Servers without include_usage: one streamed chunk per token is the usual shape.
        result.output_tokens = result.output_tokens or chunks
        result.ok = result.output_tokens > 0
        if not result.ok:
            result.error = "no tokens streamed"
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
        result.error = repr(exc)[:200]
        stale = not responded and isinstance(exc, (aiohttp.ClientOSError,
                                                   aiohttp.ServerDisconnectedError))
        return result, stale
    return result, False


async def run_closed_loop(ep: Endpoint, requests: list[Request], concurrency: int,
                          timeout_s: float) -> tuple[list[RequestResult], float]:
    pending = iter(requests)
    results: list[RequestResult] = []

    async def client(session):
        for req in pending:            # the shared iterator hands each request out once
            results.append(await one_request(session, ep, req))

    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        start = time.perf_counter()
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
        return results, time.perf_counter() - start


def percentiles(values: list[float]) -> dict:
    if not values:
        return {"p50": None, "p99": None, "mean": None}
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
    return {"p50": statistics.median(ordered), "p99": p99, "mean": statistics.fmean(ordered)}


def summarise(results: list[RequestResult], elapsed: float) -> dict:
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    tpot = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    decode = [(r.output_tokens - 1) / (r.latency - r.ttft) for r in ok
              if r.output_tokens > 1 and r.latency > r.ttft]
    ms = lambda d: {k: (v * 1e3 if v is not None else None) for k, v in d.items()}
    return {
        "requests": len(results), "completed": len(ok), "errors": len(results) - len(ok),
        "error_samples": sorted({r.error for r in results if not r.ok})[:3],
        # Servers that ignore ignore_eos/min_tokens stop early; their throughput is then not
        # comparable, so say so instead of hiding it.
        "short_outputs": sum(r.output_tokens < r.wanted_tokens for r in ok),
        "duration_s": elapsed, "output_tokens": out_tokens,
        "output_tok_s": out_tokens / elapsed if elapsed else 0.0,
        "request_s": len(ok) / elapsed if elapsed else 0.0,
        "ttft_ms": ms(percentiles([r.ttft for r in ok])),
        "tpot_ms": ms(percentiles(tpot)),
        "decode_tok_s": percentiles(decode),
        "e2e_ms": ms(percentiles([r.latency for r in ok])),
    }


def run_level(ep: Endpoint, requests: list[Request], concurrency: int,
              timeout_s: float) -> dict:
    results, elapsed = asyncio.run(run_closed_loop(ep, requests, concurrency, timeout_s))
    return summarise(results, elapsed)

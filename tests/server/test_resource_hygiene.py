"""Once traffic stops, nothing stays behind: no KV block in use, and no per-request state in
the frontend, the engine core or the worker (each counted on /metrics)."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from server_utils import shared_server, wait_idle

pytestmark = pytest.mark.slow   # starts the real server with the default model

STATE_GAUGES = ("aphrodite:frontend_requests", "aphrodite:engine_core_requests",
                "aphrodite:worker_requests")
IDLE_GAUGES = (*STATE_GAUGES, "aphrodite:num_requests_running",
               "aphrodite:num_requests_waiting", "aphrodite:kv_cache_usage_perc")


@pytest.fixture(scope="module")
def server():
    return shared_server()




async def stream_lines(response):
    async for line in response.content:
        if line.startswith(b"data: "):
            yield line


def test_state_gauges_count_a_live_request(server):
    """The gauges are live: an open stream shows up in all three processes."""
    body = {"model": "smollm2", "prompt": "Count to a hundred:", "max_tokens": 100,
            "ignore_eos": True, "stream": True}

    async def main():
        async with aiohttp.ClientSession() as session:
            async with session.post(server.url_for("v1", "completions"), json=body) as r:
                chunks = 0
                async for _ in stream_lines(r):
                    chunks += 1
                    if chunks == 3:
                        break
                # The worker reports its count with each step's result: a few more steps.
                await asyncio.sleep(0.5)
                return {name: server.metric(name) for name in STATE_GAUGES}

    during = asyncio.run(main())     # leaving the block hung up: the request is aborted
    assert all(value >= 1 for value in during.values()), during
    assert wait_idle(server, IDLE_GAUGES) == dict.fromkeys(IDLE_GAUGES, 0), \
        "state left after an abort"


def test_a_mixed_burst_leaves_nothing_behind(server):
    url = server.url_for("v1")

    async def hang_up(session, i):
        """A stream the client drops after two chunks."""
        async with session.post(f"{url}/chat/completions", json={
                "model": "smollm2", "messages": [{"role": "user", "content": f"Story {i}"}],
                "max_tokens": 60, "ignore_eos": True, "stream": True}) as r:
            chunks = 0
            async for _ in stream_lines(r):
                chunks += 1
                if chunks == 2:
                    return "dropped"
        return "ended"

    async def time_out(session, i):
        """A non-streaming request whose client gives up before the answer."""
        try:
            async with session.post(f"{url}/completions", json={
                    "model": "smollm2", "prompt": f"Essay {i}:", "max_tokens": 100,
                    "ignore_eos": True}, timeout=aiohttp.ClientTimeout(total=0.5)) as r:
                await r.read()
                return "answered"
        except asyncio.TimeoutError:
            return "gave up"

    async def complete(session, i):
        """Runs to its end: n=2, a stop string (the frontend aborts it), small max_tokens."""
        async with session.post(f"{url}/completions", json={
                "model": "smollm2", "prompt": f"List {i}: one, two,", "max_tokens": 3 + i % 5,
                "n": 2, "temperature": 1.0, "seed": i, "stop": [","]}) as r:
            assert r.status == 200, await r.text()
            return "completed"

    async def main():
        async with aiohttp.ClientSession() as session:
            jobs = []
            for i in range(8):
                jobs += [hang_up(session, i), time_out(session, i), complete(session, i)]
            return await asyncio.gather(*jobs)

    outcomes = asyncio.run(main())
    assert outcomes.count("completed") == 8
    assert outcomes.count("dropped") >= 1 and "gave up" in outcomes   # aborts happened
    assert wait_idle(server, IDLE_GAUGES) == dict.fromkeys(IDLE_GAUGES, 0)
    assert "Traceback" not in "\n".join(server.log)

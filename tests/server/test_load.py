"""Concurrency end to end: 64 streams at once, clients that hang up mid-stream, and a burst
of 300 streams against admission control."""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import pytest
import requests

from server_utils import RemoteServer, shared_server

pytestmark = pytest.mark.slow   # starts the real server with the default model


@pytest.fixture(scope="module")
def server():
    return shared_server()


def test_64_concurrent_streams_all_complete(server):
    async def one(client, i):
        stream = await client.completions.create(
            model="smollm2", prompt=f"Fact number {i}:", max_tokens=6, temperature=0.8,
            seed=i, stream=True, extra_body={"ignore_eos": True},
            stream_options={"include_usage": True})
        text, finish, usage = "", None, None
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].text
                finish = chunk.choices[0].finish_reason or finish
            if chunk.usage:
                usage = chunk.usage
        return text, finish, usage

    async def main():
        client = server.get_async_client()
        try:
            return await asyncio.gather(*(one(client, i) for i in range(64)))
        finally:
            await client.close()

    results = asyncio.run(main())
    assert len(results) == 64
    assert all(finish == "length" and usage.completion_tokens == 6 for _, finish, usage in results)
    assert all(text for text, _, _ in results)


def test_disconnected_clients_free_their_kv_blocks(server):
    body = {"model": "smollm2", "prompt": "Write a very long essay about the sea.",
            "max_tokens": 200, "temperature": 1.0, "stream": True, "ignore_eos": True}
    url = server.url_for("v1", "completions")

    async def hang_up_after_a_few_chunks(session):
        async with session.post(url, json=body) as r:
            chunks = 0
            async for line in r.content:
                if line.startswith(b"data: "):
                    chunks += 1
                    if chunks == 3:
                        break          # leaving the block closes the connection

    async def main():
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session:
            await asyncio.gather(*(hang_up_after_a_few_chunks(session) for _ in range(20)))

    generated_before = server.metric("aphrodite:generation_tokens_total")
    asyncio.run(main())
    # The engine aborts them all: nothing runs, nothing waits, no KV block stays in use.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        running = server.metric("aphrodite:num_requests_running")
        waiting = server.metric("aphrodite:num_requests_waiting")
        usage = server.metric("aphrodite:kv_cache_usage_perc")
        if running == waiting == usage == 0:
            break
        time.sleep(0.5)
    assert (running, waiting, usage) == (0, 0, 0)
    # The requests really stopped: far fewer tokens than 20 x 200 were generated.
    generated = server.metric("aphrodite:generation_tokens_total") - generated_before
    assert generated < 20 * 200 / 4
    assert "Traceback" not in "\n".join(server.log)


# ---- admission control under a burst ------------------------------------------------------------

BURST = 300
BURST_MAX_TOKENS = 8
BURST_DEADLINE_S = 300       # generous for a loaded 2-core box; nothing may take longer
BURST_SEQS, BURST_QUEUE = 32, 16


def test_300_concurrent_streams_complete_or_get_503(capsys):
    """Every request of a burst beyond --max-num-seqs + --max-queue-len either streams its
    full answer or is refused with an explicit 503 + Retry-After; none hangs."""
    args = ["--served-model-name", "smollm2", "--max-model-len", "128", "--kv-cache-memory",
            "128MiB", "--max-num-seqs", str(BURST_SEQS), "--max-queue-len", str(BURST_QUEUE)]
    body = {"model": "smollm2", "max_tokens": BURST_MAX_TOKENS, "temperature": 0.8,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}

    async def one(session, url, i) -> tuple[str, str]:
        async with session.post(url, json={**body, "prompt": f"Fact number {i}:",
                                           "seed": i}) as r:
            if r.status == 503:
                error = (await r.json())["error"]
                ok = (r.headers.get("Retry-After") == "1" and error["type"] == "server_overloaded"
                      and set(error) == {"message", "type", "param", "code"})
                return ("rejected" if ok else "bad 503"), str(error)
            if r.status != 200:
                return "bad status", f"{r.status} {await r.text()}"
            text, finish, usage, done = "", None, None, False
            async for line in r.content:
                if line == b"data: [DONE]\n":
                    done = True
                elif line.startswith(b"data: "):
                    chunk = json.loads(line[6:])
                    for choice in chunk.get("choices", []):
                        text += choice["text"]
                        finish = choice["finish_reason"] or finish
                    usage = chunk.get("usage") or usage
            complete = (done and finish == "length" and text
                        and usage and usage["completion_tokens"] == BURST_MAX_TOKENS)
            return ("completed" if complete else "incomplete"), text

    async def burst(url):
        timeout = aiohttp.ClientTimeout(total=BURST_DEADLINE_S)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                         timeout=timeout) as session:
            return await asyncio.gather(*(one(session, url, i) for i in range(BURST)),
                                        return_exceptions=True)

    with RemoteServer(args) as server:
        started = time.monotonic()
        results = asyncio.run(burst(server.url_for("v1", "completions")))
        elapsed = time.monotonic() - started
        outcomes = [type(r).__name__ if isinstance(r, BaseException) else r[0] for r in results]
        counts = {name: outcomes.count(name) for name in sorted(set(outcomes))}
        with capsys.disabled():
            print(f"\n{BURST} concurrent streams: {counts} in {elapsed:.1f} s")
        assert set(counts) <= {"completed", "rejected"}, counts
        assert counts.get("rejected", 0) > 0, counts            # the queue limit did bite
        assert counts.get("completed", 0) >= BURST_SEQS + BURST_QUEUE, counts
        # Afterwards the engine is idle and the server still serves.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (
                server.metric("aphrodite:num_requests_running")
                or server.metric("aphrodite:num_requests_waiting")
                or server.metric("aphrodite:kv_cache_usage_perc")):
            time.sleep(0.5)
        assert server.metric("aphrodite:num_requests_running") == 0
        assert server.metric("aphrodite:kv_cache_usage_perc") == 0
        r = requests.post(server.url_for("v1", "completions"), timeout=60, json={
            "model": "smollm2", "prompt": "Hello", "max_tokens": 2})
        assert r.status_code == 200

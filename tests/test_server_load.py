"""Concurrency end to end: 64 streams at once, and clients that hang up mid-stream."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest

from server_utils import shared_server

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

"""AsyncEngineClient against a scripted engine peer on real ZeroMQ sockets (no model).

The peer plays the engine core: it reads the ADD/ABORT frames the client sends and
answers with STEP_OUTPUTS / DEAD frames that the test writes, so each client behaviour
(merging for a slow consumer, stop strings, fan-out, abort on close, engine death) is
checked against the exact frames on the wire.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import time
from contextlib import aclosing

import pytest
import zmq

from aphrodite.frontend.async_engine import AsyncEngineClient
from aphrodite.frontend.engine_process import EngineDeadError, EngineProcess
from aphrodite.frontend.errors import APIError
from aphrodite.frontend.metrics import ServerMetrics
from aphrodite.model_files import load_tokenizer, resolve_model
from aphrodite.protocol import AbortRequests, EngineReady, Failure, Frame, decode, encode
from aphrodite.sampling_params import SamplingParams

READY = EngineReady(num_kv_blocks=64, block_size=16, max_model_len=256, vocab_size=49152,
                    eos_token_ids=[2], device="cpu", dtype="float32", worker_pids=[])


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(resolve_model(None))


class ScriptedEngine:
    """Looks like EngineProcess to the client; the test drives the other ends of its sockets."""

    def __init__(self, tmp_path):
        self.ctx = zmq.Context()
        self.input_socket = self.ctx.socket(zmq.PUSH)
        self.input_socket.bind(f"ipc://{tmp_path}/in")
        self.output_socket = self.ctx.socket(zmq.PULL)
        self.output_socket.bind(f"ipc://{tmp_path}/out")
        self.inbox = self.ctx.socket(zmq.PULL)
        self.inbox.connect(f"ipc://{tmp_path}/in")
        self.outbox = self.ctx.socket(zmq.PUSH)
        self.outbox.connect(f"ipc://{tmp_path}/out")
        # A real child process, so the client's sentinel watch has something to watch.
        self.proc = multiprocessing.get_context("spawn").Process(target=time.sleep, args=(120,))
        self.proc.start()
        self.ready = READY
        self.shutdown_called = False
        self.ipc_dir = str(tmp_path)
        self.tokenizer_shared = False

    share_tokenizer = EngineProcess.share_tokenizer

    def frames(self, timeout_ms: int = 2000) -> list[tuple[Frame, dict]]:
        """Frames the client sent, waiting up to timeout_ms for the first."""
        out = []
        if self.inbox.poll(timeout_ms):
            while self.inbox.poll(50):
                out.append(decode(self.inbox.recv()))
        return out

    def step(self, outputs: list[dict], **stats) -> None:
        self.outbox.send(encode(Frame.STEP_OUTPUTS, {"outputs": outputs, "stats": stats,
                                                      "timestamp": time.time()}))

    def shutdown(self, timeout_s: float = 10) -> None:
        self.shutdown_called = True
        self.proc.kill()
        self.proc.join(5)

    def close(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)
        for sock in (self.input_socket, self.output_socket, self.inbox, self.outbox):
            sock.close(0)
        self.ctx.term()


@pytest.fixture
def engine(tmp_path):
    eng = ScriptedEngine(tmp_path)
    yield eng
    eng.close()


def out(request_id, ids, finish=None, stop_reason=None, **extra):
    return {"request_id": request_id, "new_token_ids": ids, "finish_reason": finish,
            "stop_reason": stop_reason, "num_cached_tokens": 0, **extra}


async def _frames(engine, timeout_ms=2000):
    return await asyncio.to_thread(engine.frames, timeout_ms)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


def test_lagging_consumer_gets_one_merged_delta(engine, tokenizer):
    text = "Hello there, 日本語 and 🐉!"
    ids = tokenizer.encode(text, add_special_tokens=False)
    prompt = tokenizer.encode("Say:")

    async def main():
        client = AsyncEngineClient(engine, tokenizer, log_requests=False)
        client.start()
        gen = client.generate("r1", prompt, SamplingParams(max_tokens=len(ids)))
        (frame, body), = await _frames(engine)
        assert frame is Frame.ADD and body.request_id == "r1-0"
        assert body.prompt_token_ids == prompt
        assert SamplingParams.from_dict(body.sampling_params).max_tokens == len(ids)
        # Every token arrives in its own step, and the client reads them all (the last one
        # finishes the sequence) before the consumer looks.
        for i, token in enumerate(ids):
            engine.step([out("r1-0", [token], "length" if i == len(ids) - 1 else None)])
        while client.num_unfinished_sequences:
            await asyncio.sleep(0.01)
        deltas = await gen.__anext__()
        rest = [d async for batch in gen for d in batch]
        return deltas, rest

    deltas, rest = run(main())
    assert len(deltas) == 1 and rest == []
    assert deltas[0].token_ids == ids
    assert deltas[0].text == text
    assert deltas[0].finish_reason == "length"


def test_stop_string_ends_sequence_and_aborts_in_engine(engine, tokenizer):
    ids = tokenizer.encode("one two three four five", add_special_tokens=False)

    async def main():
        client = AsyncEngineClient(engine, tokenizer, log_requests=False)
        client.start()
        params = SamplingParams(max_tokens=50, stop=["three"])
        received = []
        async with aclosing(client.generate("r2", [1, 2, 3], params)) as gen:
            await _frames(engine)   # the ADD
            for token in ids:
                engine.step([out("r2-0", [token])])
            async for batch in gen:
                received.extend(batch)
        return received, await _frames(engine), client.num_in_flight

    received, frames, in_flight = run(main())
    text = "".join(d.text for d in received)
    assert text == "one two "
    assert received[-1].finish_reason == "stop" and received[-1].stop_reason == "three"
    assert frames == [(Frame.ABORT, AbortRequests(["r2-0"]))]
    assert in_flight == 0
    # Tokens after the one that completed the stop string are not reported.
    assert sum(len(d.token_ids) for d in received) == ids.index(tokenizer.encode(" three", add_special_tokens=False)[-1]) + 1


def test_n_fans_out_with_consecutive_seeds(engine, tokenizer):
    async def main():
        client = AsyncEngineClient(engine, tokenizer, log_requests=False)
        client.start()
        params = SamplingParams(n=3, seed=7, max_tokens=1)
        gen = client.generate("r3", [5, 6], params)
        task = asyncio.ensure_future(_collect(gen))
        adds = await _frames(engine)
        for i in (2, 0, 1):
            engine.step([out(f"r3-{i}", [100 + i], "length")])
        return adds, await task

    adds, deltas = run(main())
    assert [f for f, _ in adds] == [Frame.ADD] * 3
    assert [b.request_id for _, b in adds] == ["r3-0", "r3-1", "r3-2"]
    assert [b.sampling_params["seed"] for _, b in adds] == [7, 8, 9]
    by_index = {d.index: d for d in deltas}
    assert sorted(by_index) == [0, 1, 2]
    assert all(by_index[i].token_ids == [100 + i] for i in range(3))


async def _collect(gen):
    return [d async for batch in gen for d in batch]


def test_closing_the_stream_aborts_once(engine, tokenizer):
    async def main():
        client = AsyncEngineClient(engine, tokenizer, log_requests=False)
        client.start()
        gen = client.generate("r4", [5], SamplingParams(n=2, max_tokens=100))
        first = asyncio.ensure_future(gen.__anext__())
        await _frames(engine)
        engine.step([out("r4-0", [300]), out("r4-1", [301], "length")])
        await first
        await gen.aclose()            # the client went away
        frames = await _frames(engine)
        client.abort("r4")            # idempotent: nothing more is sent
        engine.step([out("r4-0", [302])])   # a late output is ignored
        await asyncio.sleep(0.2)
        return frames, await _frames(engine, 300), client.num_in_flight

    frames, again, in_flight = run(main())
    assert frames == [(Frame.ABORT, AbortRequests(["r4-0"]))]   # r4-1 had finished
    assert again == []
    assert in_flight == 0


def test_dead_frame_fails_in_flight_requests(engine, tokenizer):
    async def main():
        client = AsyncEngineClient(engine, tokenizer, log_requests=False)
        reasons = []
        client.start(on_dead=reasons.append)
        gen = client.generate("r5", [5], SamplingParams(max_tokens=10))
        task = asyncio.ensure_future(_collect(gen))
        await _frames(engine)
        engine.outbox.send(encode(Frame.DEAD, Failure("worker 0 died")))
        with pytest.raises(EngineDeadError, match="worker 0 died"):
            await task
        with pytest.raises(EngineDeadError):
            await client.generate("r6", [5], SamplingParams()).__anext__()
        return reasons, client.is_alive

    reasons, alive = run(main())
    assert reasons == ["worker 0 died"]
    assert alive is False


def test_engine_process_exit_fails_in_flight_requests(engine, tokenizer):
    async def main():
        client = AsyncEngineClient(engine, tokenizer, log_requests=False)
        reasons = []
        client.start(on_dead=reasons.append)
        task = asyncio.ensure_future(_collect(client.generate("r7", [5], SamplingParams())))
        await _frames(engine)
        engine.proc.kill()
        started = time.monotonic()
        with pytest.raises(EngineDeadError, match="exited"):
            await task
        return reasons, time.monotonic() - started

    reasons, _ = run(main())
    assert len(reasons) == 1 and "exit code" in reasons[0]


def test_step_stats_reach_metrics(engine, tokenizer):
    metrics = ServerMetrics("m", 256)

    async def main():
        client = AsyncEngineClient(engine, tokenizer, metrics=metrics, log_requests=False)
        client.start()
        task = asyncio.ensure_future(_collect(client.generate("r8", [5, 6, 7], SamplingParams(max_tokens=2))))
        await _frames(engine)
        engine.step([out("r8-0", [40])], num_running=1, num_waiting=2, kv_cache_usage=0.25,
                    num_prompt_tokens=3, num_generation_tokens=1, prefix_cache_queries=3,
                    prefix_cache_hits=0, num_preemptions=0)
        engine.step([out("r8-0", [41], "length")], num_running=0, num_waiting=0,
                    kv_cache_usage=0.0, num_prompt_tokens=0, num_generation_tokens=1,
                    prefix_cache_queries=3, prefix_cache_hits=0, num_preemptions=0)
        return await task

    run(main())
    text = metrics.render().decode()
    assert 'aphrodite:prompt_tokens_total{model_name="m"} 3.0' in text
    assert 'aphrodite:generation_tokens_total{model_name="m"} 2.0' in text
    assert 'aphrodite:kv_cache_usage_perc{model_name="m"} 0.0' in text
    assert 'aphrodite:time_to_first_token_seconds_count{model_name="m"} 1.0' in text
    assert 'aphrodite:request_success_total{finished_reason="length",model_name="m"} 1.0' in text


def test_merged_streams_interleave_and_closing_aborts_all(engine, tokenizer):
    from aphrodite.frontend.serving_base import merge_streams

    async def main():
        client = AsyncEngineClient(engine, tokenizer, log_requests=False)
        client.start()
        streams = [client.generate(f"m{j}", [5], SamplingParams(max_tokens=10)) for j in range(2)]
        merged = merge_streams(streams)
        await _frames(engine)
        engine.step([out("m1-0", [50]), out("m0-0", [40])])
        seen = {}
        while len(seen) < 2:
            j, deltas = await merged.__anext__()
            seen[j] = deltas[0].token_ids
        await merged.aclose()
        return seen, await _frames(engine), client.num_in_flight

    seen, frames, in_flight = run(main())
    assert seen == {0: [40], 1: [50]}
    aborted = sorted(rid for frame, body in frames for rid in body.request_ids)
    assert [f for f, _ in frames] == [Frame.ABORT] * len(frames) and aborted == ["m0-0", "m1-0"]
    assert in_flight == 0


def test_an_engine_error_fails_only_its_request_as_an_api_error(engine, tokenizer, tmp_path):
    """A grammar the engine could not compile: that request's stream raises the 400 the
    engine described; the tokenizer was shared before its ADD; the other request goes on."""
    async def main():
        client = AsyncEngineClient(engine, tokenizer, log_requests=False)
        client.start()
        constrained = SamplingParams(max_tokens=4, structured_outputs={"regex": "[0-9]+"})
        failing = client.generate("bad", [1, 2], constrained)
        assert (tmp_path / "tokenizer.json").stat().st_size > 0
        fine = client.generate("good", [1, 2], SamplingParams(max_tokens=1))
        await _frames(engine)
        error = {"message": "The grammar does not compile", "status": 400,
                 "param": "structured_outputs"}
        engine.step([out("bad-0", [], "error", error=error), out("good-0", [42], "length")])
        with pytest.raises(APIError) as caught:
            await failing.__anext__()
        deltas = [d async for batch in fine for d in batch]
        return caught.value, deltas, client.num_in_flight

    exc, deltas, in_flight = run(main())
    assert exc.status == 400 and exc.param == "structured_outputs"
    assert exc.message == "The grammar does not compile"
    assert deltas[-1].token_ids == [42] and deltas[-1].finish_reason == "length"
    assert in_flight == 0

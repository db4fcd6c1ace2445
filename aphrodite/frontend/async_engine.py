"""The server's asyncio client of the engine-core process.

One output task reads STEP_OUTPUTS frames (one per engine step, for every request), hands
them to the OutputProcessor (detokenising, stop strings, finish reasons; a stop string
sends ABORT) and wakes each request's consumer, who takes the merged news of its
sequences. The engine counts as dead when it sends DEAD, when its process exits, or when
the output socket fails; every in-flight request then raises EngineDeadError.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable, Sequence

import zmq
import zmq.asyncio

from aphrodite.frontend.engine_process import EngineDeadError, EngineProcess
from aphrodite.frontend.errors import APIError, bad_request, internal_error
from aphrodite.frontend.output_processor import OutputProcessor, RequestState, SequenceDelta
from aphrodite.protocol import AbortRequests, EngineStats, Frame, StepOutputs, decode, encode

logger = logging.getLogger("aphrodite.server")


class RequestStream:
    """Async iterator over one request's deltas (see AsyncEngineClient.generate)."""

    def __init__(self, client: "AsyncEngineClient", state: RequestState):
        self._client = client
        self.state = state
        self.wakeup = asyncio.Event()
        self.error: Exception | None = None
        self._closed = False

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> list[SequenceDelta]:
        state = self.state
        while not self._closed:
            if state.error is not None:      # e.g. its grammar did not compile
                await self.aclose()
                raise request_error(state.error)
            deltas = [d for d in (s.take() for s in state.sequences) if d is not None]
            if deltas:
                return deltas
            if state.finished and all(s.delivered_finish for s in state.sequences):
                break
            if self.error is not None:
                await self.aclose()
                raise self.error
            try:
                await self.wakeup.wait()
            except asyncio.CancelledError:
                await self.aclose()
                raise
            self.wakeup.clear()
        await self.aclose()
        raise StopAsyncIteration

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            self._client._release(self.state)


class AsyncEngineClient:
    """Owns the engine process for the server: generate(), abort(), health."""

    def __init__(self, engine: EngineProcess, tokenizer, metrics=None, log_requests: bool = True):
        self.engine = engine
        self.tokenizer = tokenizer
        self.metrics = metrics
        self.log_requests = log_requests
        self.ready = engine.ready
        self.max_model_len: int = engine.ready.max_model_len
        self.vocab_size: int = engine.ready.vocab_size
        self.latest_stats = EngineStats()
        self.dead_reason: str | None = None
        self._on_dead: list[Callable[[str], None]] = []
        self._processor = OutputProcessor(tokenizer)
        self._streams: dict[str, RequestStream] = {}
        self._input = zmq.asyncio.Socket.from_socket(engine.input_socket)
        self._output = zmq.asyncio.Socket.from_socket(engine.output_socket)
        self._output_task: asyncio.Task | None = None
        self._closed = False

    # ---- life cycle ----------------------------------------------------------------------
    def start(self, on_dead: Callable[[str], None] | None = None) -> None:
        """Start the output task and the process watch (inside the running loop)."""
        if on_dead is not None:
            self._on_dead.append(on_dead)
        loop = asyncio.get_running_loop()
        self._output_task = loop.create_task(self._output_loop(), name="engine-output-loop")
        loop.add_reader(self.engine.proc.sentinel, self._on_process_exit)

    @property
    def is_alive(self) -> bool:
        return self.dead_reason is None and not self._closed and self.engine.proc.is_alive()

    @property
    def num_in_flight(self) -> int:
        return len(self._streams)

    @property
    def num_unfinished_sequences(self) -> int:
        """Sequences sent to the engine that have not finished (running or waiting there)."""
        return self._processor.num_unfinished_sequences

    async def close(self, timeout_s: float = 10) -> None:
        """Stop the engine and its workers (blocking work runs in a thread)."""
        if self._closed:
            return
        self._closed = True
        loop = asyncio.get_running_loop()
        loop.remove_reader(self.engine.proc.sentinel)
        if self._output_task is not None:
            self._output_task.cancel()
            try:
                await self._output_task
            except (asyncio.CancelledError, Exception):
                pass
        self._fail_all("the server is shutting down")
        await loop.run_in_executor(None, self.engine.shutdown, timeout_s)

    # ---- requests ------------------------------------------------------------------------
    def generate(self, request_id: str, prompt_token_ids: Sequence[int], params) -> "RequestStream":
        """Send the request to the engine now; iterate the result for its deltas.

        The stream yields lists of deltas (one per sequence with news) until all n
        sequences finish. Closing it early (`aclose()`, or cancelling the task that waits
        on it) aborts the request; use it with `contextlib.aclosing`.
        """
        if self.dead_reason is not None or self._closed:
            raise EngineDeadError(self.dead_reason or "the engine is shut down")
        if params.structured_outputs is not None:
            # Once per engine, a few MB in tens of ms: not worth a thread.
            try:
                self.engine.share_tokenizer(self.tokenizer)
            except ValueError as exc:
                raise bad_request(str(exc), param="structured_outputs") from exc
        state, adds = self._processor.add_request(request_id, prompt_token_ids, params)
        stream = self._streams[request_id] = RequestStream(self, state)
        for add in adds:
            self._send(Frame.ADD, add)
        return stream

    def _release(self, state: RequestState) -> None:
        if not state.finished:
            self.abort(state.request_id)
        self._streams.pop(state.request_id, None)
        self._processor.forget(state.request_id)

    def abort(self, request_id: str) -> None:
        """Abort every unfinished sequence of a request. Idempotent; unknown ids are ignored."""
        stream = self._streams.get(request_id)
        if stream is None:
            return
        ids = self._processor.abort(request_id)
        if ids:
            self._send(Frame.ABORT, AbortRequests(ids))
            self._log_finished(stream.state)
        stream.wakeup.set()

    def abort_all(self) -> None:
        for request_id in list(self._streams):
            self.abort(request_id)

    def _send(self, frame: Frame, body) -> None:
        # zmq.asyncio sends at once when it can and queues otherwise; never blocks the loop.
        future = self._input.send(encode(frame, body))
        future.add_done_callback(_ignore_result)

    # ---- engine outputs ------------------------------------------------------------------
    async def _output_loop(self) -> None:
        try:
            while True:
                frame, body = decode(await self._output.recv())
                if frame is Frame.STEP_OUTPUTS:
                    self._process_step(body)
                elif frame is Frame.DEAD:
                    self._set_dead(body.message or "the engine core failed")
                    return
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a broken frame or socket: nothing more will arrive
            logger.exception("engine output loop failed")
            self._set_dead(f"engine output loop failed: {exc}")

    def _process_step(self, body: StepOutputs) -> None:
        now = time.time()
        news = self._processor.process(body, now)
        for update in news.updates:
            state, seq = update.request, update.sequence
            if self.metrics is not None and update.num_new_tokens:
                if update.previous_token_time is None:
                    self.metrics.on_first_token(now - state.arrival_time)
                else:
                    self.metrics.on_inter_token(now - update.previous_token_time,
                                                update.num_new_tokens)
            if seq.finish_reason is not None:
                if self.metrics is not None:
                    self.metrics.on_sequence_finished(state, seq, now)
                if state.finished:
                    self._log_finished(state)
            self._streams[state.request_id].wakeup.set()
        if news.abort_ids:
            self._send(Frame.ABORT, AbortRequests(news.abort_ids))
        self.latest_stats = body.stats
        if self.metrics is not None:
            self.metrics.on_step(body.stats)

    # ---- engine death --------------------------------------------------------------------
    def _on_process_exit(self) -> None:
        asyncio.get_running_loop().remove_reader(self.engine.proc.sentinel)
        if not self._closed:
            self.engine.proc.join(0)
            self._set_dead(f"the engine core process exited (exit code {self.engine.proc.exitcode})")

    def _set_dead(self, reason: str) -> None:
        if self.dead_reason is not None or self._closed:
            return
        self.dead_reason = reason
        logger.error("Engine is dead: %s", reason)
        self._fail_all(reason)
        for callback in self._on_dead:
            callback(reason)

    def _fail_all(self, reason: str) -> None:
        for stream in list(self._streams.values()):
            if not stream.state.finished:
                stream.error = EngineDeadError(reason)
                stream.wakeup.set()
        self._processor.engine_gone()

    def _log_finished(self, state: RequestState) -> None:
        if not self.log_requests:
            return
        reasons = ",".join(str(s.finish_reason) for s in state.sequences)
        logger.info("Finished request %s: prompt_tokens=%d, output_tokens=%d, finish=%s, "
                    "latency=%.3f s", state.request_id, len(state.prompt_token_ids),
                    state.num_output_tokens(), reasons, time.time() - state.arrival_time)


def request_error(error: dict) -> APIError:
    """An engine error that ended one request (protocol.EngineOutput.error) as its response."""
    if error.get("status", 500) == 400:
        return bad_request(error["message"], param=error.get("param"))
    return internal_error(error["message"])


def _ignore_result(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()

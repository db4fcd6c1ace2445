"""The server's asyncio client of the engine-core process.

One output task reads STEP_OUTPUTS frames (one per engine step, for every request),
detokenises each sequence's new tokens, matches stop strings (a match sends ABORT) and
wakes the request's consumer. A consumer that lags behind finds its pending tokens and
text merged into one delta, so memory stays bounded by the output length, not by the
number of steps. The engine counts as dead when it sends DEAD, when its process exits,
or when the output socket fails; every in-flight request then raises EngineDeadError.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import zmq
import zmq.asyncio

from aphrodite.frontend.detokenizer import RequestDetokenizer
from aphrodite.frontend.engine_process import EngineDeadError, EngineProcess
from aphrodite.protocol import (AbortRequests, AddRequest, EngineOutput, EngineStats, Frame,
                                StepOutputs, decode, encode)

logger = logging.getLogger("aphrodite.server")


@dataclass
class SequenceDelta:
    """What one sequence produced since its consumer last looked."""
    index: int
    text: str
    token_ids: list[int]
    logprobs: list[dict] | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_cached_tokens: int = 0        # prompt tokens served from the prefix cache
    # Engine entries for prompt tokens 1.. (params.prompt_logprobs); only in the first delta.
    prompt_logprobs: list[dict] | None = None


@dataclass
class _Sequence:
    engine_id: str
    index: int
    detokenizer: RequestDetokenizer
    want_logprobs: bool
    pending_text: str = ""
    pending_ids: list[int] = field(default_factory=list)
    pending_logprobs: list[dict] = field(default_factory=list)
    pending_prompt_logprobs: list[dict] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    delivered_finish: bool = False
    num_cached_tokens: int = 0
    first_token_time: float | None = None
    last_token_time: float | None = None

    def take(self) -> SequenceDelta | None:
        if not self.pending_ids and not self.pending_text and \
                self.pending_prompt_logprobs is None and (
                self.finish_reason is None or self.delivered_finish):
            return None
        delta = SequenceDelta(self.index, self.pending_text, self.pending_ids,
                              self.pending_logprobs if self.want_logprobs else None,
                              self.finish_reason, self.stop_reason, self.num_cached_tokens,
                              self.pending_prompt_logprobs)
        self.pending_text, self.pending_ids, self.pending_logprobs = "", [], []
        self.pending_prompt_logprobs = None
        self.delivered_finish = self.finish_reason is not None
        return delta


@dataclass
class RequestState:
    """One client request: n sequences fanned out to the engine as separate requests."""
    request_id: str
    prompt_token_ids: list[int]
    arrival_time: float
    sequences: list[_Sequence]
    wakeup: asyncio.Event = field(default_factory=asyncio.Event)
    error: Exception | None = None

    @property
    def finished(self) -> bool:
        return all(s.finish_reason is not None for s in self.sequences)

    def num_output_tokens(self) -> int:
        return sum(len(s.detokenizer.token_ids) for s in self.sequences)


class RequestStream:
    """Async iterator over one request's deltas (see AsyncEngineClient.generate)."""

    def __init__(self, client: "AsyncEngineClient", state: RequestState):
        self._client = client
        self._state = state
        self._closed = False

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> list[SequenceDelta]:
        state = self._state
        while not self._closed:
            deltas = [d for d in (s.take() for s in state.sequences) if d is not None]
            if deltas:
                return deltas
            if state.finished and all(s.delivered_finish for s in state.sequences):
                break
            if state.error is not None:
                await self.aclose()
                raise state.error
            try:
                await state.wakeup.wait()
            except asyncio.CancelledError:
                await self.aclose()
                raise
            state.wakeup.clear()
        await self.aclose()
        raise StopAsyncIteration

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            self._client._release(self._state)


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
        self._requests: dict[str, RequestState] = {}
        self._by_engine_id: dict[str, tuple[RequestState, _Sequence]] = {}
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
        return len(self._requests)

    @property
    def num_unfinished_sequences(self) -> int:
        """Sequences sent to the engine that have not finished (running or waiting there)."""
        return len(self._by_engine_id)

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
        if request_id in self._requests:
            raise ValueError(f"duplicate request id {request_id}")
        return RequestStream(self, self._register(request_id, list(prompt_token_ids), params))

    def _release(self, state: RequestState) -> None:
        if not state.finished:
            self.abort(state.request_id)
        self._requests.pop(state.request_id, None)

    def abort(self, request_id: str) -> None:
        """Abort every unfinished sequence of a request. Idempotent; unknown ids are ignored."""
        state = self._requests.get(request_id)
        if state is None:
            return
        ids = []
        for seq in state.sequences:
            if seq.finish_reason is None:
                seq.finish_reason = "abort"
                ids.append(seq.engine_id)
            self._by_engine_id.pop(seq.engine_id, None)
        if ids:
            self._send(Frame.ABORT, AbortRequests(ids))
            self._log_finished(state)
        state.wakeup.set()

    def abort_all(self) -> None:
        for request_id in list(self._requests):
            self.abort(request_id)

    def _register(self, request_id: str, prompt_ids: list[int], params) -> RequestState:
        now = time.time()
        children = []
        for index in range(params.n):
            child = copy.copy(params)
            if params.seed is not None:
                child.seed = params.seed + index   # distinct but reproducible samples
            children.append(child)
        sequences = [_Sequence(f"{request_id}-{i}", i,
                               RequestDetokenizer(self.tokenizer, prompt_ids, child),
                               params.logprobs is not None)
                     for i, child in enumerate(children)]
        state = RequestState(request_id, prompt_ids, now, sequences)
        self._requests[request_id] = state
        for seq, child in zip(sequences, children):
            self._by_engine_id[seq.engine_id] = (state, seq)
            self._send(Frame.ADD, AddRequest(seq.engine_id, prompt_ids, child.to_dict(), now))
        return state

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
        to_abort: list[str] = []
        for out in body.outputs:
            entry = self._by_engine_id.get(out.request_id)
            if entry is None:
                continue  # late output of an aborted request
            state, seq = entry
            if self._apply_output(state, seq, out, now):
                to_abort.append(seq.engine_id)
            if seq.finish_reason is not None:
                del self._by_engine_id[seq.engine_id]
                if self.metrics is not None:
                    self.metrics.on_sequence_finished(state, seq, now)
                if state.finished:
                    self._log_finished(state)
            state.wakeup.set()
        if to_abort:
            self._send(Frame.ABORT, AbortRequests(to_abort))
        self.latest_stats = body.stats
        if self.metrics is not None:
            self.metrics.on_step(body.stats)

    def _apply_output(self, state: RequestState, seq: _Sequence, out: EngineOutput,
                      now: float) -> bool:
        """Folds one engine output into the sequence; True if a stop string ended it."""
        new_ids = out.new_token_ids
        finish = out.finish_reason
        if new_ids:
            if seq.first_token_time is None:
                seq.first_token_time = now
                seq.num_cached_tokens = out.num_cached_tokens
                if self.metrics is not None:
                    self.metrics.on_first_token(now - state.arrival_time)
            elif self.metrics is not None:
                self.metrics.on_inter_token(now - seq.last_token_time, len(new_ids))
            seq.last_token_time = now
        before = len(seq.detokenizer.token_ids)
        text, stop_string = seq.detokenizer.add_tokens(
            new_ids, ends_with_stop_token=finish == "stop")
        kept = len(seq.detokenizer.token_ids) - before   # tokens after a stop string are dropped
        seq.pending_ids.extend(new_ids[:kept])
        if seq.want_logprobs and out.logprobs:
            seq.pending_logprobs.extend(out.logprobs[:kept])
        if out.prompt_logprobs is not None:
            seq.pending_prompt_logprobs = out.prompt_logprobs
        seq.pending_text += text
        stopped_here = stop_string is not None and finish is None
        if stopped_here:
            finish, seq.stop_reason = "stop", stop_string
        elif finish is not None:
            seq.stop_reason = out.stop_reason
        if finish is not None:
            seq.pending_text += seq.detokenizer.finish()
            seq.finish_reason = finish
        return stopped_here

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
        for state in list(self._requests.values()):
            if not state.finished:
                state.error = EngineDeadError(reason)
                state.wakeup.set()
        self._by_engine_id.clear()

    def _log_finished(self, state: RequestState) -> None:
        if not self.log_requests:
            return
        reasons = ",".join(str(s.finish_reason) for s in state.sequences)
        logger.info("Finished request %s: prompt_tokens=%d, output_tokens=%d, finish=%s, "
                    "latency=%.3f s", state.request_id, len(state.prompt_token_ids),
                    state.num_output_tokens(), reasons, time.time() - state.arrival_time)


def _ignore_result(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()

"""What the frontend makes of the engine's outputs; the server and the offline `LLM` share it.

A client request with `n` samples runs in the engine as n engine requests, one per
sequence, with ids ``{request_id}-{index}`` and seeds seed + index (distinct but
reproducible samples). Each STEP_OUTPUTS frame brings every running sequence's new tokens:
the processor detokenises them, matches stop strings (a match ends the sequence here, and
the engine must be told to ABORT it), keeps the token ids and logprobs up to the token
that completed the stop string, and records finish and stop reasons.

News a sequence has not handed out yet accumulates in it, merged over steps, until its
consumer takes it (`SequenceState.take`): a consumer that lags behind gets one delta, and
memory stays bounded by the output length, not by the number of steps.

Plain synchronous code: the callers own the sockets and send the frames it returns.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Sequence

from aphrodite.frontend.detokenizer import RequestDetokenizer
from aphrodite.protocol import AddRequest, EngineOutput, StepOutputs
from aphrodite.sampling_params import SamplingParams


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
class SequenceState:
    """One of a request's n sequences, which runs in the engine as request `engine_id`."""
    engine_id: str
    index: int
    detokenizer: RequestDetokenizer
    want_logprobs: bool
    finish_reason: str | None = None     # "stop" | "length" | "abort" | "error"
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    num_cached_tokens: int = 0
    error: dict | None = None            # with "error": protocol.EngineOutput.error
    scheduled_time: float | None = None     # when the engine first put it in a batch
    first_token_time: float | None = None   # when its first / latest tokens arrived here
    last_token_time: float | None = None
    # Not yet taken by the consumer:
    pending_text: str = ""
    pending_ids: list[int] = field(default_factory=list)
    pending_logprobs: list[dict] = field(default_factory=list)
    pending_prompt_logprobs: list[dict] | None = None
    delivered_finish: bool = False

    def take(self) -> SequenceDelta | None:
        """The news since the last take, merged into one delta; None if there is none."""
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
    """One client request: its n sequences."""
    request_id: str
    prompt_token_ids: list[int]
    arrival_time: float
    sequences: list[SequenceState]

    @property
    def finished(self) -> bool:
        return all(s.finish_reason is not None for s in self.sequences)

    @property
    def error(self) -> dict | None:
        """The first engine error of its sequences (one fails the whole request)."""
        return next((s.error for s in self.sequences if s.error is not None), None)

    def num_output_tokens(self) -> int:
        return sum(len(s.detokenizer.token_ids) for s in self.sequences)


@dataclass
class SequenceUpdate:
    """One engine output applied to its sequence."""
    request: RequestState
    sequence: SequenceState
    num_new_tokens: int                 # as the engine sent them, before a stop-string cut
    previous_token_time: float | None   # the sequence's last_token_time before this output


@dataclass
class StepNews:
    """What one STEP_OUTPUTS frame changed."""
    updates: list[SequenceUpdate]       # one per output of a sequence still running here
    abort_ids: list[str]                # engine ids a stop string ended: send them ABORT


class OutputProcessor:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.requests: dict[str, RequestState] = {}
        self._running: dict[str, tuple[RequestState, SequenceState]] = {}   # by engine id

    @property
    def num_unfinished_sequences(self) -> int:
        """Sequences sent to the engine that have not finished (running or waiting there)."""
        return len(self._running)

    def add_request(self, request_id: str, prompt_token_ids: Sequence[int],
                    params: SamplingParams, arrival_time: float | None = None
                    ) -> tuple[RequestState, list[AddRequest]]:
        """Registers a request; returns it and the ADD frames for the caller to send."""
        if request_id in self.requests:
            raise ValueError(f"duplicate request id {request_id}")
        prompt_ids = list(prompt_token_ids)
        now = time.time() if arrival_time is None else arrival_time
        children = []
        for index in range(params.n):
            child = copy.copy(params)
            if params.seed is not None:
                child.seed = params.seed + index   # distinct but reproducible samples
            children.append(child)
        sequences = [SequenceState(f"{request_id}-{i}", i,
                                   RequestDetokenizer(self.tokenizer, prompt_ids, child),
                                   params.logprobs is not None)
                     for i, child in enumerate(children)]
        request = RequestState(request_id, prompt_ids, now, sequences)
        self.requests[request_id] = request
        for seq in sequences:
            self._running[seq.engine_id] = (request, seq)
        adds = [AddRequest(seq.engine_id, prompt_ids, child.to_dict(), now)
                for seq, child in zip(sequences, children)]
        return request, adds

    def process(self, step: StepOutputs, now: float | None = None) -> StepNews:
        """Applies one STEP_OUTPUTS frame; outputs of unknown or finished sequences (late
        outputs of aborted requests) are ignored."""
        now = time.time() if now is None else now
        news = StepNews([], [])
        for out in step.outputs:
            entry = self._running.get(out.request_id)
            if entry is None:
                continue
            request, seq = entry
            previous_token_time = seq.last_token_time
            if _apply_output(seq, out, now):
                news.abort_ids.append(seq.engine_id)
            if seq.finish_reason is not None:
                del self._running[seq.engine_id]
            news.updates.append(SequenceUpdate(request, seq, len(out.new_token_ids),
                                               previous_token_time))
        return news

    def abort(self, request_id: str) -> list[str]:
        """Ends a request's unfinished sequences with finish_reason "abort"; returns their
        engine ids for the caller to ABORT. Unknown ids are ignored; aborting twice sends
        nothing the second time."""
        request = self.requests.get(request_id)
        if request is None:
            return []
        ids = []
        for seq in request.sequences:
            if seq.finish_reason is None:
                seq.finish_reason = "abort"
                ids.append(seq.engine_id)
            self._running.pop(seq.engine_id, None)
        return ids

    def forget(self, request_id: str) -> None:
        """Drops a request its consumer is done with (abort it first if it runs)."""
        request = self.requests.pop(request_id, None)
        if request is not None:
            for seq in request.sequences:
                self._running.pop(seq.engine_id, None)

    def engine_gone(self) -> None:
        """The engine is gone: no sequence runs there any more and no output will arrive."""
        self._running.clear()


def _apply_output(seq: SequenceState, out: EngineOutput, now: float) -> bool:
    """Folds one engine output into the sequence; True if a stop string ended it."""
    new_ids = out.new_token_ids
    finish = out.finish_reason
    if new_ids:
        if seq.first_token_time is None:
            seq.first_token_time = now
            seq.num_cached_tokens = out.num_cached_tokens
            seq.scheduled_time = out.scheduled_time
        seq.last_token_time = now
    detokenizer = seq.detokenizer
    before = len(detokenizer.token_ids)
    # A sequence the engine ends on EOS or a stop token id does not output that token's text.
    # A grammar that completes ends on a token of the text.
    text, stop_string = detokenizer.add_tokens(
        new_ids, ends_with_stop_token=finish == "stop" and not out.grammar_complete)
    kept = len(detokenizer.token_ids) - before   # tokens after a stop string are dropped
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
        seq.pending_text += detokenizer.finish()
        seq.finish_reason = finish
        seq.error = out.error
    return stopped_here

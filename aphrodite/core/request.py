"""Per-request state held by the engine core (token ids only; the core never sees text)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from aphrodite.protocol import AddRequest


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: dict          # SamplingParams.to_dict(); forwarded to the workers untouched
    max_tokens: int
    min_tokens: int = 0
    stop_token_ids: frozenset[int] = frozenset()
    eos_token_ids: frozenset[int] = frozenset()   # empty when ignore_eos
    arrival_time: float = 0.0

    output_token_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0     # prompt tokens served from the prefix cache on first admission
    num_preemptions: int = 0
    scheduled_time: float | None = None   # wall clock of its first admission to a batch
    # Chained prefix-cache keys, one per full block of known tokens, extended lazily.
    block_hashes: list[int] = field(default_factory=list)
    # How many of this request's tokens the workers hold (tokens are sent once).
    num_tokens_sent: int = 0
    finish_reason: str | None = None
    stop_reason: int | None = None
    # Entries for prompt tokens 1, 2, ... gathered over prefill chunks (when asked for).
    prompt_logprobs: list[dict] = field(default_factory=list)
    # Structured outputs: the grammar compiles in the background (the scheduler skips the
    # request meanwhile), then this request's own llguidance matcher follows its tokens.
    awaiting_grammar: bool = False
    matcher: Any = None
    error: dict | None = None      # with finish_reason "error" (see protocol.EngineOutput)
    grammar_complete: bool = False   # finished "stop" by the grammar on a token of the text

    @classmethod
    def from_add_frame(cls, body: AddRequest, eos_token_ids: list[int],
                       max_model_len: int) -> "Request":
        params = body.sampling_params
        prompt = body.prompt_token_ids
        max_tokens = params.get("max_tokens")
        room = max_model_len - len(prompt)
        return cls(
            request_id=body.request_id,
            prompt_token_ids=prompt,
            sampling_params=params,
            max_tokens=room if max_tokens is None else min(max_tokens, room),
            min_tokens=params.get("min_tokens") or 0,
            stop_token_ids=frozenset(params.get("stop_token_ids") or ()),
            eos_token_ids=frozenset() if params.get("ignore_eos") else frozenset(eos_token_ids),
            arrival_time=body.arrival_time,
        )

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def wants_prompt_logprobs(self) -> bool:
        return self.sampling_params.get("prompt_logprobs") is not None

    def add_prompt_logprobs(self, chunk_start: int, entries: list[dict]) -> None:
        """Entries for prompt tokens chunk_start + 1, ... from one prefill chunk. A recompute
        after preemption repeats positions already held; those are skipped."""
        self.prompt_logprobs.extend(entries[len(self.prompt_logprobs) - chunk_start:])

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    @property
    def structured_outputs(self) -> dict | None:
        return self.sampling_params.get("structured_outputs")

    @property
    def samples_under_grammar(self) -> bool:
        """A live matcher: its mask applies to this request's next token."""
        return self.matcher is not None and not self.matcher.is_stopped()

    def append_token(self, token_id: int) -> None:
        """Add a sampled token and decide whether it ends the request (token-level stops,
        and the grammar: once it is complete, nothing but EOS could follow)."""
        self.output_token_ids.append(token_id)
        num_out = len(self.output_token_ids)
        if self.matcher is not None:
            if not self.matcher.consume_token(token_id):
                self.fail(f"the grammar rejected sampled token {token_id}: "
                          f"{self.matcher.get_error()}", status=500)
                return
            if self.matcher.is_stopped():
                if token_id in self.stop_token_ids:
                    self.finish("stop", stop_reason=token_id)
                else:
                    # The text ends with this token unless it is EOS (whose text is dropped).
                    self.grammar_complete = token_id not in self.eos_token_ids
                    self.finish("stop")
                return
        if num_out >= self.min_tokens:
            if token_id in self.eos_token_ids:
                self.finish("stop")
                return
            if token_id in self.stop_token_ids:
                self.finish("stop", stop_reason=token_id)
                return
        if num_out >= self.max_tokens:
            self.finish("length")

    def finish(self, reason: str, stop_reason: int | None = None) -> None:
        self.status = RequestStatus.FINISHED
        self.finish_reason = reason
        self.stop_reason = stop_reason
        self.matcher = None
        self.awaiting_grammar = False

    def fail(self, message: str, status: int = 400, param: str | None = None) -> None:
        """Finish with an error the frontend reports for this request alone."""
        self.error = {"message": message, "status": status, "param": param}
        self.finish("error")

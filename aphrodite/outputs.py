"""Results of the offline API, shaped like vLLM's so users' scripts carry over."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None     # "stop" | "length" | "abort"
    stop_reason: int | str | None = None  # stop token id or stop string
    logprobs: list[dict] | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = False
    num_cached_tokens: int = 0
    # With SamplingParams.prompt_logprobs: one entry per prompt token, None for the first
    # (nothing predicts it); entries are dicts like CompletionOutput.logprobs' items.
    prompt_logprobs: list[dict | None] | None = None

"""Frames exchanged between the frontend, the engine core and the workers, defined once.

A frame is one ZeroMQ message: ``[type: 1 byte][body: orjson bytes]``. Each body is one of
the dataclasses below; orjson writes a dataclass as a JSON object, and `decode` builds the
frame type's dataclass back, so every reader works with attributes, never with raw dicts
(no pickle: the bytes on the wire stay plain JSON).

Frontend -> engine core:  ADD (AddRequest), ABORT (AbortRequests), SHUTDOWN
Engine core -> frontend:  READY (EngineReady), STEP_OUTPUTS (StepOutputs), DEAD (Failure)
Engine core -> workers:   STEP (SchedulerOutput), BITMASK (to rank 0), SHUTDOWN
Worker -> engine core:    READY (WorkerReady), RESULT (StepResult), DEAD (Failure)

BITMASK is the one two-part ZeroMQ message: ``[type][orjson GrammarMask]`` then the raw
int32 token bitmask, C order, ``[len(req_ids), ceil(vocab_size / 32)]`` (bit k of word w
allows token 32w + k). The core sends it right after a STEP whose ``grammar_req_ids`` is
not empty, once the masks are filled, so that work overlaps the forward pass; rank 0 reads
it just before sampling (`encode_bitmask` / `decode_bitmask`).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

import orjson


class Frame(enum.IntEnum):
    ADD = 1
    ABORT = 2
    READY = 3
    STEP_OUTPUTS = 4
    DEAD = 7
    SHUTDOWN = 8
    STEP = 9
    RESULT = 10
    BITMASK = 11


# ---- frontend <-> engine core ------------------------------------------------------------------

@dataclass
class AddRequest:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: dict          # SamplingParams.to_dict(): the core reads a few keys, the
    arrival_time: float = 0.0      # workers rebuild the SamplingParams


@dataclass
class AbortRequests:
    """Idempotent: unknown or finished ids are ignored."""
    request_ids: list[str]


@dataclass
class EngineReady:
    """What the frontend needs once the model is loaded and the KV pool sized."""
    num_kv_blocks: int
    block_size: int
    max_model_len: int
    vocab_size: int
    eos_token_ids: list[int]
    device: str
    dtype: str
    worker_pids: list[int]


@dataclass
class EngineOutput:
    """One engine request's news from one step."""
    request_id: str
    new_token_ids: list[int]
    finish_reason: str | None      # None while running, else "stop" | "length" | "abort"
    stop_reason: int | None        # the stop token id that ended it
    num_cached_tokens: int         # prompt tokens served from the prefix cache
    logprobs: list[dict] | None = None          # one entry per new token, when asked for
    prompt_logprobs: list[dict] | None = None   # once, with the first new token, when asked for
    # With finish_reason "error": {"message", "status" (400: the request's fault, 500: ours),
    # "param" (the request field to blame, or None)}.
    error: dict | None = None
    # finish_reason "stop" because the grammar is complete: the last token is text, not EOS.
    grammar_complete: bool = False
    # Wall clock (time.time()) of the request's first admission to a batch; sent once, with
    # its first token, for the queue / prefill / inference time metrics.
    scheduled_time: float | None = None


@dataclass
class EngineStats:
    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0
    num_kv_blocks: int = 0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    num_preemptions: int = 0
    num_prompt_tokens: int = 0        # computed in this step
    num_generation_tokens: int = 0    # sampled in this step
    # Per-request state held in the engine core and (as rank 0 last reported) the workers:
    # both return to 0 once traffic stops.
    num_engine_requests: int = 0
    num_worker_requests: int = 0


@dataclass
class StepOutputs:
    """One frame per engine step, for every request that has news."""
    outputs: list[EngineOutput]
    stats: EngineStats
    timestamp: float

    @classmethod
    def from_wire(cls, body: dict) -> "StepOutputs":
        return cls([EngineOutput(**o) for o in body["outputs"]], EngineStats(**body["stats"]),
                   body["timestamp"])


@dataclass
class Failure:
    """DEAD: the sender is going down."""
    message: str
    rank: int | None = None


# ---- engine core <-> workers -------------------------------------------------------------------

@dataclass
class NewRequestData:
    req_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    block_ids: list[int]
    num_computed_tokens: int
    sampling_params: dict


@dataclass
class CachedRequestData:
    req_id: str
    new_token_ids: list[int]
    new_block_ids: list[int]
    num_computed_tokens: int


@dataclass
class SchedulerOutput:
    """STEP: a diff for the workers, who keep every request's tokens and blocks between steps.
    A step with no scheduled tokens only tells them which requests to drop."""
    step_id: int
    new_requests: list[NewRequestData] = field(default_factory=list)
    cached_requests: list[CachedRequestData] = field(default_factory=list)
    # Scheduled token counts, in batch order; requests not listed do not run this step.
    num_scheduled_tokens: dict[str, int] = field(default_factory=dict)
    # Requests the workers must forget (finished or aborted).
    finished_req_ids: list[str] = field(default_factory=list)
    # Requests preempted by recompute: the workers drop their tokens and blocks but keep
    # their sampler state (mirostat's mu) for when they come back as new requests.
    preempted_req_ids: list[str] = field(default_factory=list)
    # Scheduled requests that sample this step under a grammar: a BITMASK frame follows.
    grammar_req_ids: list[str] = field(default_factory=list)

    @property
    def total_num_scheduled_tokens(self) -> int:
        return sum(self.num_scheduled_tokens.values())

    @classmethod
    def from_wire(cls, body: dict) -> "SchedulerOutput":
        return cls(body["step_id"], [NewRequestData(**r) for r in body["new_requests"]],
                   [CachedRequestData(**r) for r in body["cached_requests"]],
                   body["num_scheduled_tokens"], body["finished_req_ids"],
                   body["preempted_req_ids"], body.get("grammar_req_ids", []))


@dataclass
class GrammarMask:
    """BITMASK's header: which step and which rows (in order) the bitmask covers."""
    step_id: int
    req_ids: list[str]


@dataclass
class WorkerReady:
    rank: int
    num_kv_blocks: int
    max_model_len: int
    vocab_size: int
    eos_token_ids: list[int]
    device: str
    dtype: str


@dataclass
class StepResult:
    """RESULT, from rank 0 only."""
    sampled: dict[str, int] = field(default_factory=dict)    # request id -> next token
    logprobs: dict[str, dict] = field(default_factory=dict)  # for the requests that ask
    # Entries for the prompt tokens this step's prefill chunks predicted, when asked for.
    prompt_logprobs: dict[str, list[dict]] = field(default_factory=dict)
    num_requests: int = 0          # requests the worker keeps state for


# ---- codec -------------------------------------------------------------------------------------

_BODIES: dict[Frame, Any] = {
    Frame.ADD: AddRequest, Frame.ABORT: AbortRequests, Frame.STEP_OUTPUTS: StepOutputs,
    Frame.DEAD: Failure, Frame.STEP: SchedulerOutput, Frame.RESULT: StepResult,
}
# READY's body depends on the direction: the readers say which (decode's `ready` argument).


def encode(frame: Frame, body: Any = None) -> bytes:
    return bytes((frame,)) + orjson.dumps(body if body is not None else {})


def encode_bitmask(header: GrammarMask, bitmask) -> list:
    """BITMASK's two parts; ``bitmask`` is a C-contiguous int32 numpy array."""
    return [encode(Frame.BITMASK, header), memoryview(bitmask).cast("B")]


def decode_bitmask(parts: list) -> tuple[GrammarMask, memoryview]:
    """The header and the raw bitmask bytes (numpy.frombuffer(..., numpy.int32) reads them);
    parts may be bytes or zmq.Frame objects."""
    head = memoryview(parts[0])
    frame = Frame(head[0])
    if frame is not Frame.BITMASK or len(parts) != 2:
        raise ValueError(f"expected a BITMASK frame, got {frame.name} in {len(parts)} parts")
    return GrammarMask(**orjson.loads(head[1:])), memoryview(parts[1])


def decode(message: bytes, ready: type | None = None) -> tuple[Frame, Any]:
    """The frame type and its body as a dataclass (READY's as `ready`, SHUTDOWN's as None)."""
    frame = Frame(message[0])
    data = orjson.loads(memoryview(message)[1:])
    cls = ready if frame is Frame.READY else _BODIES.get(frame)
    if cls is None:
        return frame, None
    from_wire = getattr(cls, "from_wire", None)
    return frame, from_wire(data) if from_wire is not None else cls(**data)

"""Frames exchanged between the frontend, the engine core and the workers.

A frame is one ZeroMQ message: ``[type: 1 byte][body: orjson bytes]``. Bodies are
plain dicts and lists of str/int/float/bool/None, so every process can read them
without sharing classes (no pickle, no msgpack).

Frontend -> engine core:  ADD, ABORT, UTILITY, SHUTDOWN
Engine core -> frontend:  READY, STEP_OUTPUTS, UTILITY_RESULT, DEAD
Engine core -> workers:   STEP, UTILITY, SHUTDOWN
Worker -> engine core:    READY, RESULT, UTILITY_RESULT, DEAD

Bodies (``?`` marks optional keys):

ADD            {"request_id", "prompt_token_ids": [int], "sampling_params": {...},
                "arrival_time": float}
ABORT          {"request_ids": [str]}            idempotent; unknown ids are ignored
READY          engine core -> frontend: {"num_kv_blocks", "block_size", "max_model_len",
                "vocab_size", "eos_token_ids": [int], "device", "dtype"}
STEP_OUTPUTS   {"outputs": [{"request_id", "new_token_ids": [int],
                "finish_reason": null|"stop"|"length"|"abort", "stop_reason": null|int,
                "logprobs"?: [...], "prompt_logprobs"?: [...], "num_cached_tokens": int}],
                "stats": {... "num_engine_requests", "num_worker_requests" ...},
                "timestamp": float}
UTILITY        {"call_id": int, "method": str, "args": [...]}
UTILITY_RESULT {"call_id": int, "result": any, "error"?: str}
DEAD           {"message": str}                  the sender is going down
SHUTDOWN       {}
STEP           a SchedulerOutput (aphrodite/core/scheduler.py); one with no scheduled
               tokens only tells the workers which requests to drop
RESULT         {"sampled": {req_id: int}, "logprobs"?, "prompt_logprobs"?,
                "num_requests": int}   (aphrodite/executor/model_runner.py)
"""

from __future__ import annotations

import enum
from typing import Any

import orjson


class Frame(enum.IntEnum):
    ADD = 1
    ABORT = 2
    READY = 3
    STEP_OUTPUTS = 4
    UTILITY = 5
    UTILITY_RESULT = 6
    DEAD = 7
    SHUTDOWN = 8
    STEP = 9
    RESULT = 10


def encode(frame: Frame, body: Any = None) -> bytes:
    return bytes((frame,)) + orjson.dumps(body if body is not None else {})


def decode(message: bytes) -> tuple[Frame, Any]:
    return Frame(message[0]), orjson.loads(memoryview(message)[1:])

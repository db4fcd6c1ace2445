"""What the chat and completions handlers share: model names, tokenisation off the event
loop, turning a request into SamplingParams, length checks, SSE and logprob formatting."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable

import orjson
from aiohttp import web

from aphrodite.frontend.args import ServerOptions
from aphrodite.frontend.async_engine import AsyncEngineClient
from aphrodite.frontend.errors import (APIError, bad_request, limit_exceeded, model_not_found,
                                       server_overloaded)
from aphrodite.frontend.openai_protocol import ChatMessage
from aphrodite.frontend.structured_request import (check_structured_outputs,
                                                   structured_outputs_from_request)
from aphrodite.sampling_params import SamplingParamError, SamplingParams
from aphrodite.structured_outputs import StructuredOutputsParams

logger = logging.getLogger("aphrodite.server")

# A queue slot frees up as soon as any running sequence finishes, which at the usual
# tens of tokens per second per sequence is within about a second.
RETRY_AFTER_S = 1


@dataclass
class ServingContext:
    client: AsyncEngineClient
    tokenizer: Any
    model_names: list[str]          # served names; the first one is reported in responses
    chat_template: str | None       # --chat-template text, else the tokenizer's own
    response_role: str
    max_logprobs: int
    # One thread: HF tokenizers are not safe to use from several threads at once, and a
    # long prompt must not stall the event loop while it is tokenised.
    tokenizer_pool: ThreadPoolExecutor

    @property
    def max_model_len(self) -> int:
        return self.client.max_model_len


class OpenAIServing:
    def __init__(self, ctx: ServingContext, options: ServerOptions):
        self.ctx = ctx
        self.options = options
        self._token_texts: dict[int, str] = {}

    # ---- model names and ids ---------------------------------------------------------------
    def check_model(self, name: str | None) -> str:
        """The name to report in the response; 404 when the server does not serve `name`."""
        if name is None or name in self.ctx.model_names:
            return name or self.ctx.model_names[0]
        raise model_not_found(name)

    @staticmethod
    def new_id(prefix: str) -> str:
        return f"{prefix}-{uuid.uuid4().hex}"

    @staticmethod
    def now() -> int:
        return int(time.time())

    # ---- tokenisation ------------------------------------------------------------------------
    async def in_tokenizer_thread(self, fn: Callable, *args, **kwargs):
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.ctx.tokenizer_pool, lambda: fn(*args, **kwargs))

    async def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return await self.in_tokenizer_thread(
            self.ctx.tokenizer.encode, text, add_special_tokens=add_special_tokens)

    async def render_chat(self, messages: list[ChatMessage], add_generation_prompt: bool = True,
                          continue_final_message: bool = False, chat_template: str | None = None,
                          template_kwargs: dict | None = None,
                          tools: list[dict] | None = None) -> str:
        """The prompt text. ``tools`` (OpenAI tool definitions) go to the template, which
        renders them its own way; a template that ignores them gets no tools."""
        template = chat_template or self.ctx.chat_template
        if template is None and not getattr(self.ctx.tokenizer, "chat_template", None):
            raise bad_request("This model has no chat template; start the server with "
                              "--chat-template or use /v1/completions.")
        conversation = [_template_message(m) for m in messages]
        if continue_final_message and add_generation_prompt:
            raise bad_request("continue_final_message and add_generation_prompt cannot both be true",
                              param="continue_final_message")
        try:
            return await self.in_tokenizer_thread(
                self.ctx.tokenizer.apply_chat_template, conversation, chat_template=template,
                tokenize=False, add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message, tools=tools,
                **(template_kwargs or {}))
        except APIError:
            raise
        except Exception as exc:  # a template's raise_exception(), bad roles, Jinja errors
            raise bad_request(f"The chat template failed on these messages: {exc}",
                              param="messages") from exc

    def check_token_ids(self, ids: list[int], param: str) -> None:
        vocab = self.ctx.client.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise bad_request(f"Token id {bad[0]} is outside the vocabulary (0..{vocab - 1}).",
                              param=param)

    def check_length(self, prompt_len: int, param: str) -> None:
        """400 unless the prompt leaves room for at least one generated token. A max_tokens
        beyond the room left is not an error: generation stops at the context length
        (finish_reason "length")."""
        limit = self.ctx.max_model_len
        if prompt_len == 0:
            raise bad_request("The prompt is empty.", param=param)
        if prompt_len >= limit:
            raise bad_request(
                f"This model's maximum context length is {limit} tokens, but the {param} "
                f"{'have' if param == 'messages' else 'has'} {prompt_len} tokens, which leaves "
                f"no room for a completion. Please shorten the {param}.",
                param=param, code="context_length_exceeded")

    # ---- per-request caps and admission control -----------------------------------------
    def check_caps(self, request) -> None:
        """400 for requests beyond the server's per-request limits (cheap: before tokenising)."""
        o = self.options
        if request.n > o.max_n:
            raise limit_exceeded("n", f"n is {request.n}, but at most {o.max_n} choices are "
                                 "allowed per request", "--max-n")
        stop = [request.stop] if isinstance(request.stop, str) else request.stop or []
        if len(stop) > o.max_stop_sequences:
            raise limit_exceeded("stop", f"{len(stop)} stop sequences were sent, but at most "
                                 f"{o.max_stop_sequences} are allowed", "--max-stop-sequences")
        longest = max(stop, key=len, default="")
        if len(longest) > o.max_stop_length:
            raise limit_exceeded("stop", f"A stop sequence has {len(longest)} characters, but "
                                 f"at most {o.max_stop_length} are allowed", "--max-stop-length")

    def admit(self, num_sequences: int, param: str = "n") -> None:
        """503 with Retry-After, before anything reaches the engine, when the new sequences
        would leave more than --max-queue-len sequences waiting for a batch slot.

        Call it right before generate() with no await in between: the count cannot change
        under it, so a burst of concurrent requests cannot all pass the check at once."""
        o = self.options
        capacity = o.max_num_seqs + o.max_queue_len
        if num_sequences > capacity:   # could never be admitted: the client must change it
            raise limit_exceeded(param, f"The request needs {num_sequences} sequences, but at "
                                 f"most {capacity} can be in flight", "--max-num-seqs + "
                                 "--max-queue-len")
        waiting_after = self.ctx.client.num_unfinished_sequences + num_sequences - o.max_num_seqs
        if waiting_after > o.max_queue_len:
            raise server_overloaded(f"admitting {num_sequences} more sequence(s) would leave "
                                    f"{waiting_after} waiting for a batch slot, but the queue "
                                    f"holds {o.max_queue_len} (--max-queue-len)", RETRY_AFTER_S)

    def log_received(self, request_id: str, num_prompt_tokens: int,
                     params: SamplingParams) -> None:
        """One log line per request: sizes and the non-default parameters, never the prompt
        text or headers (keys), cut to --max-log-len characters."""
        if self.options.disable_log_requests:
            return
        line = (f"Received request {request_id}: prompt_tokens={num_prompt_tokens}, "
                f"params={_params_summary(params)}")
        limit = self.options.max_log_len
        if len(line) > limit:
            line = line[:limit] + f"... [{len(line) - limit} more characters]"
        logger.info("%s", line)

    # ---- sampling parameters -----------------------------------------------------------------
    async def check_structured_outputs(self, request, extra: dict | None = None) -> None:
        """400 unless the request's constraint compiles; run in the tokenizer thread, since a
        large schema takes milliseconds. sampling_params() then finds it checked (cached)."""
        try:
            constraint, param = _structured_outputs(request, extra)
            if constraint is not None:
                await self.in_tokenizer_thread(check_structured_outputs, constraint, param)
        except SamplingParamError as exc:
            raise bad_request(str(exc), param=exc.param) from exc
        except (TypeError, ValueError) as exc:
            raise bad_request(str(exc)) from exc

    def sampling_params(self, request, *, max_tokens: int | None, logprobs: int | None,
                        extra: dict | None = None) -> SamplingParams:
        """One place where a request becomes validated SamplingParams (400 on bad values).
        ``extra["structured_outputs"]`` (a forced tool call's schema) replaces the request's
        own constraint fields."""
        fields = request.sent_sampler_fields()
        stop = request.stop
        for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty"):
            if getattr(request, name) is not None:
                fields[name] = getattr(request, name)
        fields.update(n=request.n, max_tokens=max_tokens, logprobs=logprobs,
                      seed=None if request.seed == -1 else request.seed,
                      stop=[stop] if isinstance(stop, str) else list(stop or []))
        if request.logit_bias:
            fields["logit_bias"] = request.logit_bias
        fields.update(extra or {})
        try:
            constraint, param = _structured_outputs(request, extra)
            if constraint is not None:
                check_structured_outputs(constraint, param)   # a cache hit once checked
            fields["structured_outputs"] = constraint
            params = SamplingParams(**fields)
            params.validate(self.ctx.client.vocab_size, self.ctx.max_logprobs)
            params.resolve_token_strings(self.ctx.tokenizer)
        except SamplingParamError as exc:
            raise bad_request(str(exc), param=exc.param) from exc   # "top_p: must be ..."
        except (TypeError, ValueError) as exc:
            raise bad_request(str(exc)) from exc
        return params

    # ---- output formatting -------------------------------------------------------------------
    def token_text(self, token_id: int) -> str:
        text = self._token_texts.get(token_id)
        if text is None:
            text = self.ctx.tokenizer.decode([token_id])
            self._token_texts[token_id] = text
        return text

    def prompt_logprobs_field(self, entries: list[dict], top_n: int) -> list[dict | None]:
        """vLLM's prompt_logprobs: per prompt token (None for the first), the token and its
        top_n alternatives as {token id: {logprob, rank, decoded_token}}."""
        out: list[dict | None] = [None]
        for entry in entries:
            token_id, logprob, top = parse_logprobs(entry)
            position = {str(t): {"logprob": lp, "rank": rank, "decoded_token": self.token_text(t)}
                        for rank, (t, lp) in enumerate(top[:top_n], start=1)}
            position[str(token_id)] = {"logprob": logprob, "rank": int(entry["rank"]),
                                       "decoded_token": self.token_text(token_id)}
            out.append(position)
        return out

    @staticmethod
    def usage(prompt_tokens: int, completion_tokens: int, cached: int = 0) -> dict:
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                 "total_tokens": prompt_tokens + completion_tokens}
        if cached:
            usage["prompt_tokens_details"] = {"cached_tokens": cached}
        return usage


# Kernel send buffer of a streaming connection. Left to autotuning it grows to tcp_wmem's
# maximum (4 MB on Linux), so a client that stops reading would have megabytes of events
# queued for it; bounded, the writer blocks early and the request's pending tokens are merged
# into one event when the client reads again.
STREAM_SEND_BUFFER_BYTES = 128 * 1024


def _template_message(m: ChatMessage) -> dict:
    """A message as chat templates expect it. An assistant's tool-call arguments arrive as
    JSON text (OpenAI's wire form); templates index into them, so they become objects."""
    message: dict = {"role": m.role, "content": m.text()}
    if m.name:
        message["name"] = m.name
    if m.tool_call_id is not None:
        message["tool_call_id"] = m.tool_call_id
    if m.tool_calls:
        calls = []
        for call in m.tool_calls:
            try:
                arguments = json.loads(call.function.arguments or "{}")
            except ValueError:
                raise bad_request(f"tool call {call.id or call.function.name!r} has arguments "
                                  "that are not JSON", param="messages") from None
            calls.append({"id": call.id, "type": "function",
                          "function": {"name": call.function.name, "arguments": arguments}})
        message["tool_calls"] = calls
    return message


async def start_sse(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-cache",
                                           "X-Accel-Buffering": "no"})
    sock = request.transport.get_extra_info("socket") if request.transport else None
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, STREAM_SEND_BUFFER_BYTES)
        except OSError:
            pass   # not a TCP socket (e.g. a test transport): nothing to bound
    await response.prepare(request)
    return response


async def send_event(response: web.StreamResponse, payload: dict) -> None:
    await response.write(b"data: " + orjson.dumps(payload) + b"\n\n")


async def send_done(response: web.StreamResponse) -> None:
    await response.write(b"data: [DONE]\n\n")


def json_response(payload: dict, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(payload), content_type="application/json")


def parse_logprobs(entry: dict) -> tuple[int, float, list[tuple[int, float]]]:
    """One engine logprobs entry -> (sampled token id, its logprob, [(top id, logprob)])."""
    top = [(int(t), float(lp)) for t, lp in zip(entry["top_token_ids"], entry["top_logprobs"])]
    return int(entry["token_id"]), float(entry["logprob"]), top


def _structured_outputs(request, extra: dict | None
                        ) -> tuple[StructuredOutputsParams | None, str | None]:
    override = (extra or {}).get("structured_outputs")
    if override is None:
        return structured_outputs_from_request(request)
    if isinstance(override, dict):
        override = StructuredOutputsParams.from_dict(override)
    return override, "tools"   # only a forced tool call overrides: its schema is the tools'


def _params_summary(params: SamplingParams) -> str:
    data = params.to_dict()
    defaults = SamplingParams().to_dict()
    return str({k: v for k, v in data.items() if v != defaults.get(k)})


_END = object()


async def merge_streams(streams: list[AsyncIterator]) -> AsyncIterator[tuple[int, Any]]:
    """Interleave several async iterators as (iterator index, item).

    Each iterator is drained by its own task through a one-slot queue, so a slow consumer
    holds the producers back (and the engine client merges their deltas meanwhile).
    Closing the merged iterator closes every source (which aborts their requests).
    """
    if len(streams) == 1:  # the usual case: no task or queue hop per delta
        async with aclosing(streams[0]) as only:
            async for item in only:
                yield 0, item
        return
    queue: asyncio.Queue = asyncio.Queue(maxsize=1)

    async def pump(index: int, source: AsyncIterator) -> None:
        try:
            async with aclosing(source) as items:
                async for item in items:
                    await queue.put((index, item, None))
            await queue.put((index, _END, None))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            await queue.put((index, _END, exc))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            index, item, exc = await queue.get()
            if exc is not None:
                raise exc
            if item is _END:
                remaining -= 1
                continue
            yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

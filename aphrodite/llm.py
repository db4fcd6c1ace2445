"""Offline API: ``LLM(model).generate(prompts, SamplingParams(...))``.

This process plays the frontend: it tokenises, sends ADD frames to the engine-core
process and hands the engine's outputs to the OutputProcessor the server uses too
(detokenising, stop strings, logprobs, finish reasons). It never runs torch.
"""

from __future__ import annotations

import copy
import itertools
from typing import Any, Sequence

from tqdm.auto import tqdm

from aphrodite.config import EngineConfig
from aphrodite.frontend.engine_process import EngineDeadError, EngineProcess
from aphrodite.frontend.output_processor import OutputProcessor, RequestState
from aphrodite.frontend.structured_request import check_structured_outputs
from aphrodite.model_files import load_tokenizer, resolve_model
from aphrodite.outputs import CompletionOutput, RequestOutput
from aphrodite.protocol import AbortRequests, EngineStats, Frame, StepOutputs, decode
from aphrodite.sampling_params import SamplingParams

PromptType = str | list[int] | dict


class LLM:
    def __init__(self, model: str | None = None, tokenizer: str | None = None,
                 dtype: str = "auto", **engine_args: Any):
        self.config = EngineConfig(model=model, tokenizer=tokenizer, dtype=dtype, **engine_args)
        self.engine = EngineProcess(self.config)        # loads the model meanwhile
        try:
            self.tokenizer = load_tokenizer(resolve_model(model), tokenizer)
            self.engine.wait_ready()
        except BaseException:
            self.engine.shutdown(timeout_s=2)
            raise
        self.max_model_len = self.engine.ready.max_model_len
        self.vocab_size = self.engine.ready.vocab_size
        self._ids = itertools.count()
        self._processor = OutputProcessor(self.tokenizer)
        self._dead: str | None = None
        # Engine counters from the latest step (KV use, cache hits).
        self.last_stats = EngineStats()

    # ---- public API ------------------------------------------------------------------------
    def generate(self, prompts: PromptType | Sequence[PromptType],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        prompts = _as_prompt_list(prompts)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params or SamplingParams()] * len(prompts)
        if len(sampling_params) != len(prompts):
            raise ValueError("give one SamplingParams, or one per prompt")
        requests = [self._prepare(p, sp) for p, sp in zip(prompts, sampling_params)]
        return self._run(requests, use_tqdm)

    def chat(self, messages: list[dict] | list[list[dict]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             chat_template: str | None = None, add_generation_prompt: bool = True,
             use_tqdm: bool = True) -> list[RequestOutput]:
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = []
        for conversation in conversations:
            text = self.tokenizer.apply_chat_template(
                conversation, chat_template=chat_template, tokenize=False,
                add_generation_prompt=add_generation_prompt)
            prompts.append({"prompt": text, "prompt_token_ids":
                            self.tokenizer.encode(text, add_special_tokens=False)})
        return self.generate(prompts, sampling_params, use_tqdm)

    def shutdown(self) -> None:
        if getattr(self, "engine", None) is not None:
            self.engine.shutdown()
            self.engine = None

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def __del__(self):
        try:
            self.shutdown()
        except Exception:
            pass

    # ---- internals -----------------------------------------------------------------------
    def _prepare(self, prompt: PromptType, params: SamplingParams
                 ) -> tuple[str | None, list[int], SamplingParams]:
        """The prompt's text and token ids, and a validated copy of its params."""
        if isinstance(prompt, str):
            text, token_ids = prompt, self.tokenizer.encode(prompt)
        elif isinstance(prompt, dict):
            text = prompt.get("prompt")
            token_ids = prompt.get("prompt_token_ids")
            if token_ids is None:
                token_ids = self.tokenizer.encode(text)
        else:
            text, token_ids = None, list(prompt)
        if not token_ids:
            raise ValueError("prompt is empty")
        if len(token_ids) >= self.max_model_len:
            raise ValueError(f"prompt is {len(token_ids)} tokens long; this model's maximum "
                             f"context length is {self.max_model_len} tokens")
        params = copy.deepcopy(params)
        params.validate(self.vocab_size)
        if params.structured_outputs is not None:   # a ValueError here, before the engine
            check_structured_outputs(params.structured_outputs, "structured_outputs")
        params.resolve_token_strings(self.tokenizer)
        return text, list(token_ids), params

    def _run(self, requests: list[tuple[str | None, list[int], SamplingParams]],
             use_tqdm: bool) -> list[RequestOutput]:
        if self.engine is None or self._dead:
            raise EngineDeadError(f"the engine is not running: {self._dead or 'shut down'}")
        results: dict[str, RequestOutput] = {}
        unfinished: set[str] = set()
        bar = tqdm(total=len(requests), desc="Generating", disable=not use_tqdm)
        try:
            if any(params.structured_outputs is not None for _, _, params in requests):
                self.engine.share_tokenizer(self.tokenizer)
            for text, token_ids, params in requests:
                request_id = str(next(self._ids))
                results[request_id] = RequestOutput(request_id, text, token_ids)
                unfinished.add(request_id)
                _, adds = self._processor.add_request(request_id, token_ids, params)
                for add in adds:
                    self.engine.send(Frame.ADD, add)
            while unfinished:
                step = self._next_step()
                if step is None:
                    continue
                news = self._processor.process(step)
                if news.abort_ids:
                    self.engine.send(Frame.ABORT, AbortRequests(news.abort_ids))
                for update in news.updates:
                    request = update.request
                    if request.error is not None:
                        raise ValueError(f"request {request.request_id} failed in the engine: "
                                         f"{request.error['message']}")
                    if request.finished and request.request_id in unfinished:
                        _fill_output(results[request.request_id], request)
                        unfinished.remove(request.request_id)
                        bar.update(1)
        except BaseException:
            if self._dead is None:
                engine_ids = [i for rid in unfinished for i in self._processor.abort(rid)]
                if engine_ids:
                    self.engine.send(Frame.ABORT, AbortRequests(engine_ids))
            raise
        finally:
            bar.close()
            for request_id in results:
                self._processor.forget(request_id)
        return list(results.values())

    def _next_step(self) -> StepOutputs | None:
        socket = self.engine.output_socket
        while not socket.poll(500):
            if not self.engine.proc.is_alive():
                self._dead = f"engine core exited with code {self.engine.proc.exitcode}"
                raise EngineDeadError(self._dead)
        frame, body = decode(socket.recv())
        if frame is Frame.DEAD:
            self._dead = body.message or "engine failed"
            raise EngineDeadError(f"the engine failed: {self._dead}")
        if frame is Frame.STEP_OUTPUTS:
            self.last_stats = body.stats
            return body
        return None


def _fill_output(result: RequestOutput, request: RequestState) -> None:
    """Fills a finished request's result from its sequences' news, taken in one piece."""
    for seq in request.sequences:
        delta = seq.take()
        result.outputs.append(CompletionOutput(
            seq.index, delta.text, delta.token_ids, seq.finish_reason, seq.stop_reason,
            delta.logprobs))
        if delta.prompt_logprobs is not None and result.prompt_logprobs is None:
            result.prompt_logprobs = [None, *delta.prompt_logprobs]
    result.num_cached_tokens = max(seq.num_cached_tokens for seq in request.sequences)
    result.finished = True


def _as_prompt_list(prompts) -> list[PromptType]:
    if isinstance(prompts, (str, dict)):
        return [prompts]
    prompts = list(prompts)
    if prompts and all(isinstance(t, int) for t in prompts):
        return [prompts]                 # one prompt given as token ids
    return prompts

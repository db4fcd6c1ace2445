"""Offline API: ``LLM(model).generate(prompts, SamplingParams(...))``.

This process plays the frontend: it tokenises, sends ADD frames to the engine-core
process, detokenises the streamed tokens and matches stop strings. It never runs torch.
"""

from __future__ import annotations

import copy
import itertools
import time
from typing import Any, Sequence

from tqdm.auto import tqdm

from aphrodite.config import EngineConfig
from aphrodite.frontend.detokenizer import RequestDetokenizer
from aphrodite.frontend.engine_process import EngineDeadError, EngineProcess
from aphrodite.model_files import load_tokenizer, resolve_model
from aphrodite.outputs import CompletionOutput, RequestOutput
from aphrodite.protocol import (AbortRequests, AddRequest, EngineOutput, EngineStats, Frame,
                                decode)
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
    def _prepare(self, prompt: PromptType, params: SamplingParams) -> RequestOutput:
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
        params.resolve_token_strings(self.tokenizer)
        out = RequestOutput(request_id=str(next(self._ids)), prompt=text,
                            prompt_token_ids=list(token_ids))
        out._params = params                        # carried until the run ends
        return out

    def _run(self, requests: list[RequestOutput], use_tqdm: bool) -> list[RequestOutput]:
        if self.engine is None or self._dead:
            raise EngineDeadError(f"the engine is not running: {self._dead or 'shut down'}")
        live: dict[str, tuple[RequestOutput, CompletionOutput, RequestDetokenizer]] = {}
        for req in requests:
            params = req._params
            for index in range(params.n):
                child = copy.copy(params)
                if params.seed is not None:
                    child.seed = params.seed + index
                completion = CompletionOutput(index=index, text="", token_ids=[])
                req.outputs.append(completion)
                sub_id = f"{req.request_id}-{index}"
                live[sub_id] = (req, completion,
                                RequestDetokenizer(self.tokenizer, req.prompt_token_ids, child))
                self.engine.send(Frame.ADD, AddRequest(sub_id, req.prompt_token_ids,
                                                       child.to_dict(), time.time()))
        remaining = {req.request_id: req._params.n for req in requests}
        bar = tqdm(total=len(requests), desc="Generating", disable=not use_tqdm)
        try:
            while live:
                for output in self._next_outputs():
                    entry = live.get(output.request_id)
                    if entry is None:
                        continue
                    req, completion, detok = entry
                    finish = output.finish_reason
                    if output.logprobs:
                        completion.logprobs = (completion.logprobs or []) + output.logprobs
                    if output.prompt_logprobs is not None and req.prompt_logprobs is None:
                        req.prompt_logprobs = [None, *output.prompt_logprobs]
                    # Ends on EOS or a stop token id: that token's text is not output.
                    _, stopped_by = detok.add_tokens(output.new_token_ids,
                                                     ends_with_stop_token=finish == "stop")
                    if stopped_by is not None and finish is None:
                        self.engine.send(Frame.ABORT, AbortRequests([output.request_id]))
                        finish, completion.stop_reason = "stop", stopped_by
                    elif finish is not None:
                        completion.stop_reason = output.stop_reason
                    if finish is None:
                        continue
                    detok.finish()
                    completion.text = detok.text
                    completion.token_ids = list(detok.token_ids)   # cut at a stop string
                    completion.finish_reason = finish
                    req.num_cached_tokens = output.num_cached_tokens
                    del live[output.request_id]
                    remaining[req.request_id] -= 1
                    if remaining[req.request_id] == 0:
                        req.finished = True
                        bar.update(1)
        except BaseException:
            if live and self._dead is None:
                self.engine.send(Frame.ABORT, AbortRequests(list(live)))
            raise
        finally:
            bar.close()
        for req in requests:
            del req._params
        return requests

    def _next_outputs(self) -> list[EngineOutput]:
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
            return body.outputs
        return []


def _as_prompt_list(prompts) -> list[PromptType]:
    if isinstance(prompts, (str, dict)):
        return [prompts]
    prompts = list(prompts)
    if prompts and all(isinstance(t, int) for t in prompts):
        return [prompts]                 # one prompt given as token ids
    return prompts

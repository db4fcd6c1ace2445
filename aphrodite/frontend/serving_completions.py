"""POST /v1/completions (one or several prompts, as text or token ids)."""

from __future__ import annotations

from contextlib import aclosing

from aiohttp import web

from aphrodite.frontend.engine_process import EngineDeadError
from aphrodite.frontend.errors import APIError, bad_request, engine_unavailable
from aphrodite.frontend.openai_protocol import CompletionRequest
from aphrodite.frontend.serving_base import (OpenAIServing, json_response, merge_streams,
                                             parse_logprobs, send_done, send_event, start_sse)


class _Choice:
    """Accumulated text, logprobs and offsets of one choice."""

    def __init__(self, prompt_ids: list[int], echo_text: str):
        self.prompt_ids = prompt_ids
        self.echo_text = echo_text    # sent with the first delta
        self.prompt_logprobs = None   # the extended prompt_logprobs field, once it arrives
        self.text = ""
        self.num_tokens = 0
        self.token_ids: list[int] = []
        self.offset = 0               # text_offset of the next token
        self.finish_reason = None
        self.stop_reason = None
        self.cached = 0


class CompletionServing(OpenAIServing):
    async def create(self, http_request: web.Request, body: CompletionRequest) -> web.StreamResponse:
        model = self.check_model(body.model)
        self._reject_unsupported(body)
        self.check_caps(body)
        await self.check_structured_outputs(body)
        prompts = await self._prompt_ids(body)
        max_tokens = body.max_tokens
        if "max_tokens" not in body.model_fields_set and self.options.default_max_tokens:
            max_tokens = self.options.default_max_tokens
        if max_tokens is not None and max_tokens < 1:
            raise bad_request(f"max_tokens must be at least 1, got {max_tokens}", param="max_tokens")
        for ids, _ in prompts:
            self.check_length(len(ids), "prompt")
        params = self.sampling_params(body, max_tokens=max_tokens, logprobs=body.logprobs,
                                      extra={"prompt_logprobs": body.prompt_logprobs})
        if body.echo and body.logprobs is not None:   # echoed prompt tokens get logprobs too
            params.prompt_logprobs = max(params.prompt_logprobs or 0, body.logprobs)
        request_id = self.new_id("cmpl")
        choices = [_Choice(ids, text if body.echo else "")
                   for ids, text in prompts for _ in range(body.n)]
        num_prompt_tokens = sum(len(ids) for ids, _ in prompts)
        streams = []
        self.admit(len(prompts) * body.n, param="n" if len(prompts) == 1 else "prompt")
        self.log_received(request_id, num_prompt_tokens, params)
        try:
            metrics = getattr(self.ctx.client, "metrics", None)
            for j, (ids, _) in enumerate(prompts):
                streams.append(self.ctx.client.generate(f"{request_id}-{j}", ids, params))
                if metrics is not None:
                    metrics.on_request(body.n, params.max_tokens)
            if body.stream:
                return await self._stream(http_request, body, model, request_id, streams,
                                          choices, num_prompt_tokens)
            return await self._complete(body, model, request_id, streams, choices,
                                        num_prompt_tokens)
        finally:
            for stream in streams:
                await stream.aclose()   # aborts whatever did not finish

    async def _complete(self, body, model, request_id, streams, choices, num_prompt_tokens
                        ) -> web.Response:
        n = body.n
        logprobs = [self._empty_logprobs() for _ in choices] if body.logprobs is not None else None
        async with aclosing(merge_streams(streams)) as merged:
            async for j, deltas in merged:
                for d in deltas:
                    index = j * n + d.index
                    self._apply(body, choices[index], d, logprobs[index] if logprobs else None)
        # vLLM's fields, null unless asked, so clients that read them find them.
        return_ids = (body.model_extra or {}).get("return_token_ids") is True
        payload_choices = [{"index": i, "text": c.echo_text + c.text,
                            "logprobs": logprobs[i] if logprobs else None,
                            "finish_reason": c.finish_reason, "stop_reason": c.stop_reason,
                            "prompt_logprobs": c.prompt_logprobs,
                            "prompt_token_ids": c.prompt_ids if return_ids else None,
                            "token_ids": c.token_ids if return_ids else None}
                           for i, c in enumerate(choices)]
        return json_response({
            "id": request_id, "object": "text_completion", "created": self.now(), "model": model,
            "choices": payload_choices,
            "usage": self.usage(num_prompt_tokens, sum(c.num_tokens for c in choices),
                                max(c.cached for c in choices))})

    @staticmethod
    def _reject_unsupported(body: CompletionRequest) -> None:
        if body.suffix is not None:
            raise bad_request("suffix is not supported.", param="suffix")
        if body.best_of is not None and body.best_of != body.n:
            raise bad_request("best_of must equal n (best-of ranking is not supported).",
                              param="best_of")
        if body.stream_options is not None and not body.stream:
            raise bad_request("stream_options is only allowed with stream=true.",
                              param="stream_options")

    async def _prompt_ids(self, body: CompletionRequest) -> list[tuple[list[int], str]]:
        """Each prompt as (token ids, text); the text is only needed for echo."""
        prompt = body.prompt
        if isinstance(prompt, str):
            items = [prompt]
        elif prompt and all(isinstance(t, int) for t in prompt):
            items = [prompt]
        else:
            items = list(prompt)
        if not items:
            raise bad_request("The prompt is empty.", param="prompt")
        out = []
        for item in items:
            if isinstance(item, str):
                ids = await self.encode(item, add_special_tokens=body.add_special_tokens)
                out.append((ids, item))
            else:
                self.check_token_ids(item, "prompt")
                text = self.ctx.tokenizer.decode(item) if body.echo else ""
                out.append((list(item), text))
        return out

    @staticmethod
    def _empty_logprobs() -> dict:
        return {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}

    def _apply(self, body: CompletionRequest, choice: _Choice, delta,
               logprobs: dict | None) -> dict | None:
        """Folds a delta into the choice; returns the delta's own logprobs block."""
        choice.text += delta.text
        choice.num_tokens += len(delta.token_ids)
        choice.token_ids.extend(delta.token_ids)
        if delta.finish_reason is not None:
            choice.finish_reason, choice.stop_reason = delta.finish_reason, delta.stop_reason
            choice.cached = delta.num_cached_tokens
        rows = []     # (token id, logprob, top alternatives); None where nothing predicts it
        if delta.prompt_logprobs is not None:
            if body.prompt_logprobs is not None:
                choice.prompt_logprobs = self.prompt_logprobs_field(
                    delta.prompt_logprobs, body.prompt_logprobs)
            if body.echo:
                rows.append((choice.prompt_ids[0], None, None))
                rows += [parse_logprobs(e) for e in delta.prompt_logprobs]
        rows += [parse_logprobs(e) for e in delta.logprobs or ()]
        if logprobs is None or not rows:
            return None
        own = self._empty_logprobs()
        for token_id, logprob, top in rows:
            text = self.token_text(token_id)
            top_texts = None if top is None else \
                self._top_logprobs(token_id, logprob, top[:body.logprobs])
            for block in (logprobs, own):
                block["tokens"].append(text)
                block["token_logprobs"].append(logprob)
                block["top_logprobs"].append(top_texts)
                block["text_offset"].append(choice.offset)
            choice.offset += len(text)
        return own

    def _top_logprobs(self, token_id: int, logprob: float, top: list) -> dict[str, float]:
        """The legacy API's top_logprobs (OpenAI's and vLLM's): the chosen token and the
        top alternatives, up to logprobs + 1 entries, so logprobs=0 still names the token."""
        entries = {self.token_text(token_id): logprob}
        for t, lp in top:
            entries.setdefault(self.token_text(t), lp)
        return entries

    async def _stream(self, http_request, body, model, request_id, streams, choices,
                      num_prompt_tokens) -> web.StreamResponse:
        response = await start_sse(http_request)
        created = self.now()
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        continuous = include_usage and body.stream_options.continuous_usage_stats
        n = body.n
        want_logprobs = body.logprobs is not None

        def usage() -> dict:
            return self.usage(num_prompt_tokens, sum(c.num_tokens for c in choices))

        async with aclosing(merge_streams(streams)) as merged:
            try:
                async for j, deltas in merged:
                    for d in deltas:
                        index = j * n + d.index
                        choice = choices[index]
                        own_logprobs = self._apply(body, choice, d, self._empty_logprobs()
                                                   if want_logprobs else None)
                        text = choice.echo_text + d.text
                        choice.echo_text = ""
                        if not text and d.finish_reason is None and own_logprobs is None:
                            continue
                        event = {"index": index, "text": text, "logprobs": own_logprobs,
                                 "finish_reason": d.finish_reason}
                        if d.prompt_logprobs is not None and body.prompt_logprobs is not None:
                            event["prompt_logprobs"] = choice.prompt_logprobs
                        if d.finish_reason is not None:
                            event["stop_reason"] = d.stop_reason
                        payload = {"id": request_id, "object": "text_completion",
                                   "created": created, "model": model, "choices": [event]}
                        if include_usage:
                            payload["usage"] = usage() if continuous else None
                        await send_event(response, payload)
            except (EngineDeadError, APIError) as exc:   # APIError: one request's engine error
                error = exc if isinstance(exc, APIError) else engine_unavailable(str(exc))
                await send_event(response, error.body())
                await send_done(response)
                return response
        if include_usage:
            await send_event(response, {"id": request_id, "object": "text_completion",
                                        "created": created, "model": model, "choices": [],
                                        "usage": usage()})
        await send_done(response)
        return response

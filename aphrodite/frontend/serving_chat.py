"""POST /v1/chat/completions."""

from __future__ import annotations

from contextlib import aclosing
from functools import cached_property

from aiohttp import web

from aphrodite.frontend.engine_process import EngineDeadError
from aphrodite.frontend.errors import APIError, bad_request, engine_unavailable
from aphrodite.frontend.openai_protocol import ChatCompletionRequest
from aphrodite.frontend.serving_base import (OpenAIServing, json_response, parse_logprobs,
                                             send_done, send_event, start_sse)
from aphrodite.frontend.tool_call_output import StreamedToolCalls, message_fields
from aphrodite.frontend.tool_calls import ToolPlan, plan_tool_calls, special_token_texts


class ChatServing(OpenAIServing):
    async def create(self, http_request: web.Request, body: ChatCompletionRequest) -> web.StreamResponse:
        model = self.check_model(body.model)
        self._reject_unsupported(body)
        self.check_caps(body)
        plan = plan_tool_calls(body, self.options)
        prompt = await self.render_chat(body.messages, body.add_generation_prompt,
                                        body.continue_final_message, body.chat_template,
                                        body.chat_template_kwargs,
                                        tools=plan.tools if plan else None)
        prompt_ids = await self.encode(prompt, add_special_tokens=body.add_special_tokens)
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        if max_tokens is not None and max_tokens < 1:
            raise bad_request(f"{param} must be at least 1, got {max_tokens}", param=param)
        self.check_length(len(prompt_ids), "messages")
        if max_tokens is None:  # --default-max-tokens, else as long as the context allows
            max_tokens = min(self.options.default_max_tokens or self.ctx.max_model_len,
                             self.ctx.max_model_len - len(prompt_ids))
        extra = {"prompt_logprobs": body.prompt_logprobs, **self._tool_extra(body, plan)}
        await self.check_structured_outputs(body, extra)
        params = self.sampling_params(
            body, max_tokens=max_tokens,
            logprobs=(body.top_logprobs or 0) if body.logprobs else None, extra=extra)
        tools = plan if plan is not None and plan.reads_calls else None
        request_id = self.new_id("chatcmpl")
        self.admit(body.n)
        self.log_received(request_id, len(prompt_ids), params)
        if getattr(self.ctx.client, "metrics", None) is not None:
            self.ctx.client.metrics.on_request(body.n, params.max_tokens)
        outputs = self.ctx.client.generate(request_id, prompt_ids, params)
        try:
            if body.stream:
                return await self._stream(http_request, body, model, request_id, prompt_ids,
                                          outputs, tools)
            return await self._complete(body, model, request_id, prompt_ids, outputs, tools)
        finally:
            await outputs.aclose()   # aborts the request unless it finished

    def _tool_extra(self, body: ChatCompletionRequest, plan: ToolPlan | None) -> dict:
        """Sampling fields a tool plan sets: the forced call's schema, and special tokens
        kept in the text where the parser's markers are special tokens."""
        extra: dict = {}
        if plan is None:
            return extra
        if plan.structured_outputs is not None:
            extra["structured_outputs"] = plan.structured_outputs
        if plan.parser is not None and body.skip_special_tokens is None \
                and any(marker in self._special_tokens for marker in plan.parser.markers):
            extra["skip_special_tokens"] = False
        return extra

    def _echo_text(self, body: ChatCompletionRequest) -> str:
        """vLLM's chat `echo`: the last message's content, when it has the response's role
        (a message being continued), comes before the generated text."""
        last = body.messages[-1]
        if (body.model_extra or {}).get("echo") is True and last.role == self.ctx.response_role:
            return last.text()
        return ""

    @cached_property
    def _special_tokens(self) -> set[str]:
        return special_token_texts(self.ctx.tokenizer)

    def _reject_unsupported(self, body: ChatCompletionRequest) -> None:
        if body.stream_options is not None and not body.stream:
            raise bad_request("stream_options is only allowed with stream=true.",
                              param="stream_options")
        if body.top_logprobs is not None and not body.logprobs:
            raise bad_request("top_logprobs requires logprobs=true.", param="top_logprobs")
        if body.top_logprobs is not None and not 0 <= body.top_logprobs <= self.ctx.max_logprobs:
            raise bad_request(f"top_logprobs must be in [0, {self.ctx.max_logprobs}] "
                              "(the server's --max-logprobs).", param="top_logprobs")

    def _logprobs_content(self, entries: list[dict]) -> list[dict]:
        content = []
        for entry in entries:
            token_id, logprob, top = parse_logprobs(entry)
            text = self.token_text(token_id)
            content.append({
                "token": text, "logprob": logprob, "bytes": list(text.encode("utf-8")),
                "top_logprobs": [{"token": self.token_text(t), "logprob": lp,
                                  "bytes": list(self.token_text(t).encode("utf-8"))}
                                 for t, lp in top]})
        return content

    async def _complete(self, body, model, request_id, prompt_ids, outputs,
                        tools: ToolPlan | None) -> web.Response:
        n = body.n
        texts, logprobs = [""] * n, [[] for _ in range(n)]
        finish, stop_reason, tokens = [None] * n, [None] * n, [0] * n
        token_ids: list[list[int]] = [[] for _ in range(n)]
        cached = 0
        prompt_logprobs = None
        async with aclosing(outputs) as stream:
            async for deltas in stream:
                for d in deltas:
                    if d.prompt_logprobs is not None and prompt_logprobs is None:
                        prompt_logprobs = d.prompt_logprobs
                    texts[d.index] += d.text
                    tokens[d.index] += len(d.token_ids)
                    token_ids[d.index].extend(d.token_ids)
                    if d.logprobs:
                        logprobs[d.index].extend(d.logprobs)
                    if d.finish_reason is not None:
                        finish[d.index], stop_reason[d.index] = d.finish_reason, d.stop_reason
                        cached = max(cached, d.num_cached_tokens)
        choices = []
        echo = self._echo_text(body)
        # vLLM's fields, null unless asked, so clients that read them find them.
        return_ids = (body.model_extra or {}).get("return_token_ids") is True
        for i in range(n):
            message = {"role": self.ctx.response_role, "content": texts[i]}
            if tools is not None:
                fields, finish[i] = message_fields(tools, texts[i], finish[i])
                message.update(fields)
            if echo and message.get("content") is not None:
                message["content"] = echo + message["content"]
            choices.append({
                "index": i, "message": message,
                "logprobs": {"content": self._logprobs_content(logprobs[i])}
                if body.logprobs else None,
                "finish_reason": finish[i], "stop_reason": stop_reason[i],
                "token_ids": token_ids[i] if return_ids else None})
        payload = {
            "id": request_id, "object": "chat.completion", "created": self.now(), "model": model,
            "choices": choices,
            "usage": self.usage(len(prompt_ids), sum(tokens), cached),
            "prompt_logprobs": None, "prompt_token_ids": prompt_ids if return_ids else None}
        if body.prompt_logprobs is not None:   # vLLM's place for it: the response, not a choice
            payload["prompt_logprobs"] = self.prompt_logprobs_field(
                prompt_logprobs or [], body.prompt_logprobs)
        return json_response(payload)

    async def _stream(self, http_request, body, model, request_id, prompt_ids, outputs,
                      tools: ToolPlan | None) -> web.StreamResponse:
        response = await start_sse(http_request)
        created = self.now()
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        continuous = include_usage and body.stream_options.continuous_usage_stats
        completion_tokens = 0
        prompt_logprobs_sent = False
        streams = [StreamedToolCalls(tools) for _ in range(body.n)] if tools else None

        def chunk(choice: dict) -> dict:
            payload = {"id": request_id, "object": "chat.completion.chunk", "created": created,
                       "model": model, "choices": [choice]}
            if include_usage:
                payload["usage"] = (self.usage(len(prompt_ids), completion_tokens)
                                    if continuous else None)
            return payload

        async with aclosing(outputs) as stream:
            try:
                echo = self._echo_text(body)
                for i in range(body.n):
                    await send_event(response, chunk({
                        "index": i, "delta": {"role": self.ctx.response_role, "content": echo},
                        "logprobs": None, "finish_reason": None}))
                async for deltas in stream:
                    for d in deltas:
                        completion_tokens += len(d.token_ids)
                        send_prompt_logprobs = (d.prompt_logprobs is not None
                                                and body.prompt_logprobs is not None
                                                and not prompt_logprobs_sent)
                        if not (d.text or d.finish_reason is not None or d.logprobs
                                or send_prompt_logprobs):
                            continue  # held back (possible stop string) or mid-character
                        finish = d.finish_reason
                        if streams is None:
                            deltas = [{"content": d.text} if d.text else {}]
                        else:
                            stream_calls = streams[d.index]
                            deltas = stream_calls.deltas(d.text, final=finish is not None)
                            if finish is not None:
                                finish = stream_calls.finish_reason(finish)
                            if not deltas and (finish is not None or d.logprobs
                                               or send_prompt_logprobs):
                                deltas = [{}]
                        for k, delta in enumerate(deltas):
                            first, last = k == 0, k == len(deltas) - 1
                            choice = {"index": d.index, "delta": delta,
                                      "logprobs": {"content": self._logprobs_content(d.logprobs)}
                                      if d.logprobs and first else None,
                                      "finish_reason": finish if last else None}
                            if finish is not None and last:
                                choice["stop_reason"] = d.stop_reason
                            payload = chunk(choice)
                            if send_prompt_logprobs and first:   # once, in the first chunk
                                payload["prompt_logprobs"] = self.prompt_logprobs_field(
                                    d.prompt_logprobs, body.prompt_logprobs)
                                prompt_logprobs_sent = True
                            await send_event(response, payload)
            except (EngineDeadError, APIError) as exc:   # APIError: one request's engine error
                error = exc if isinstance(exc, APIError) else engine_unavailable(str(exc))
                await send_event(response, error.body())
                await send_done(response)
                return response
        if include_usage:
            await send_event(response, {
                "id": request_id, "object": "chat.completion.chunk", "created": created,
                "model": model, "choices": [],
                "usage": self.usage(len(prompt_ids), completion_tokens)})
        await send_done(response)
        return response

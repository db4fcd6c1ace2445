"""The KoboldAI API's handlers: generate (whole or streamed as Kobold's SSE events), check
and abort by genkey, token counts, and the model, version and config routes that
SillyTavern and Kobold Lite read to connect.

Generation goes through the same caps, admission control, request log, engine client and
metrics as the OpenAI routes, and the API-key middleware covers /api as well. Errors carry
OpenAI's error object and KoboldCpp's `detail` (protocol.KoboldErrorResponse).
"""

from __future__ import annotations

import types
from contextlib import aclosing
from dataclasses import dataclass

import orjson
from aiohttp import web
from pydantic import ValidationError

from aphrodite import __version__
from aphrodite.frontend.engine_process import EngineDeadError
from aphrodite.frontend.errors import (APIError, bad_request, engine_unavailable,
                                       from_validation_error)
from aphrodite.frontend.kobold import mapping
from aphrodite.frontend.kobold.protocol import (KoboldGenerateRequest, KoboldGenkeyRequest,
                                                KoboldTokenCountRequest)
from aphrodite.frontend.serving_base import OpenAIServing, json_response, merge_streams, start_sse
from aphrodite.frontend.structured_request import check_structured_outputs
from aphrodite.sampler_specs import SamplingParamError
from aphrodite.sampling_params import SamplingParams

# What SillyTavern's feature checks read: "KoboldCpp" compares above every version number,
# so streaming, token counts, min_p, mirostat and grammar are all turned on.
KOBOLD_API_VERSION = "1.2.5"
KOBOLDCPP_VERSION = "1.76"


@dataclass
class _Generation:
    request_id: str
    text: str = ""       # sequence 0's text so far, for /api/extra/generate/check


class KoboldServing(OpenAIServing):
    def __init__(self, ctx, options):
        super().__init__(ctx, options)
        self._generations: dict[str, _Generation] = {}    # by genkey, while they run

    # ---- errors ------------------------------------------------------------------------------
    @staticmethod
    def error_response(exc: APIError) -> web.Response:
        body = exc.body()
        body["detail"] = {"msg": exc.message, "type": exc.type}
        return web.Response(status=exc.status, body=orjson.dumps(body),
                            content_type="application/json", headers=exc.headers)

    async def _parse(self, request: web.Request, model, allow_empty: bool = False):
        raw = await request.read()
        if allow_empty and not raw.strip():
            return model()
        try:
            return model.model_validate_json(raw or b"")
        except ValidationError as exc:
            raise from_validation_error(exc) from None

    # ---- generation --------------------------------------------------------------------------
    async def generate(self, request: web.Request, stream: bool) -> web.StreamResponse:
        try:
            body = await self._parse(request, KoboldGenerateRequest)
            prepared = await self._prepare(body, stream)
        except APIError as exc:
            return self.error_response(exc)
        genkey, ids, params = prepared
        request_id = self.new_id("kai")
        try:
            self.admit(params.n)
        except APIError as exc:
            return self.error_response(exc)
        self.log_received(request_id, len(ids), params)
        generation = self._generations[genkey] = _Generation(request_id)
        source = self.ctx.client.generate(request_id, ids, params)
        try:
            if stream:
                return await self._stream(request, source, generation)
            return await self._complete(source, generation, params.n)
        except APIError as exc:          # one request's engine error (its grammar, say)
            return self.error_response(exc)
        except EngineDeadError as exc:
            return self.error_response(engine_unavailable(str(exc)))
        finally:
            await source.aclose()        # aborts whatever did not finish
            self._generations.pop(genkey, None)

    async def _prepare(self, body: KoboldGenerateRequest, stream: bool
                       ) -> tuple[str, list[int], SamplingParams]:
        genkey = body.genkey or self.new_id("kai")
        if genkey in self._generations:
            raise bad_request(f"A generation with genkey {genkey!r} is already running.",
                              param="genkey")
        try:
            context = mapping.context_size(body.max_context_length, self.ctx.max_model_len)
            max_length = mapping.generation_length(body.max_length, context,
                                                   self.options.default_max_tokens)
            fields = mapping.sampling_fields(body, max_length,
                                             list(self.ctx.client.ready.eos_token_ids))
            if stream and fields.get("n", 1) != 1:
                raise SamplingParamError("n", "must be 1 when streaming")
            self.check_caps(types.SimpleNamespace(n=fields.get("n", 1),
                                                  stop=fields.get("stop", [])))
            constraint = fields.get("structured_outputs")
            if constraint is not None:
                await self.in_tokenizer_thread(check_structured_outputs, constraint, "grammar")
            params = SamplingParams(**fields)
            params.validate(self.ctx.client.vocab_size, self.ctx.max_logprobs)
            params.resolve_token_strings(self.ctx.tokenizer)
        except SamplingParamError as exc:
            name = mapping.kobold_param(exc.param)
            raise bad_request(f"{name}: {exc.message}", param=name) from exc
        except (TypeError, ValueError) as exc:
            raise bad_request(str(exc)) from exc
        ids = await self._prompt_ids(body, context - max_length)
        self.check_length(len(ids), "prompt")
        return genkey, ids, params

    async def _prompt_ids(self, body: KoboldGenerateRequest, budget: int) -> list[int]:
        """The tokenizer's leading special tokens (BOS), the memory and the prompt, cut from
        the left to ``budget`` tokens."""
        special = await self.encode("", add_special_tokens=True)
        memory = await self.encode(body.memory, add_special_tokens=False) if body.memory else []
        prompt = await self.encode(body.prompt, add_special_tokens=False)
        if not prompt and not memory:
            raise bad_request("The prompt is empty.", param="prompt")
        return mapping.fit_prompt(special, memory, prompt, budget)

    async def _complete(self, source, generation: _Generation, n: int) -> web.Response:
        texts, reasons = [""] * n, [None] * n
        async with aclosing(merge_streams([source])) as merged:
            async for _, deltas in merged:
                for d in deltas:
                    texts[d.index] += d.text
                    if d.finish_reason is not None:
                        reasons[d.index] = d.finish_reason
                generation.text = texts[0]
        return json_response({"results": [{"text": text, "finish_reason": _kobold_reason(r)}
                                          for text, r in zip(texts, reasons)]})

    async def _stream(self, request: web.Request, source, generation: _Generation
                      ) -> web.StreamResponse:
        response = await start_sse(request)
        async with aclosing(merge_streams([source])) as merged:
            try:
                async for _, deltas in merged:
                    for d in deltas:
                        if not d.text and d.finish_reason is None:
                            continue
                        generation.text += d.text
                        await _send_token(response, d.text, _kobold_reason(d.finish_reason))
            except (EngineDeadError, APIError) as exc:
                error = exc if isinstance(exc, APIError) else engine_unavailable(str(exc))
                await _send_token(response, "", "error", error.body()["error"])
        return response

    # ---- genkey routes -----------------------------------------------------------------------
    async def check(self, request: web.Request) -> web.Response:
        genkey = request.query.get("genkey")
        if genkey is None and request.method == "POST":
            try:
                genkey = (await self._parse(request, KoboldGenkeyRequest, True)).genkey
            except APIError as exc:
                return self.error_response(exc)
        generation = self._generations.get(genkey) if genkey else None
        return json_response({"results": [{"text": generation.text if generation else ""}]})

    async def abort(self, request: web.Request) -> web.Response:
        """Without a genkey nothing is aborted: another client's generation must not stop
        when SillyTavern sends its empty abort (its stream's disconnect aborts its own)."""
        try:
            genkey = (await self._parse(request, KoboldGenkeyRequest, True)).genkey
        except APIError as exc:
            return self.error_response(exc)
        generation = self._generations.get(genkey) if genkey else None
        if generation is not None:
            self.ctx.client.abort(generation.request_id)
        found = "true" if generation is not None else "false"
        return json_response({"success": found, "done": found})

    async def tokencount(self, request: web.Request) -> web.Response:
        try:
            body = await self._parse(request, KoboldTokenCountRequest)
        except APIError as exc:
            return self.error_response(exc)
        ids = await self.encode(body.prompt, add_special_tokens=body.special)
        return json_response({"value": len(ids), "ids": ids})

    # ---- model, version and config -----------------------------------------------------------
    async def model(self, request: web.Request) -> web.Response:
        return json_response({"result": f"aphrodite/{self.ctx.model_names[0]}"})

    async def api_version(self, request: web.Request) -> web.Response:
        return json_response({"result": KOBOLD_API_VERSION})

    async def extra_version(self, request: web.Request) -> web.Response:
        return json_response({"result": "KoboldCpp", "version": KOBOLDCPP_VERSION,
                              "aphrodite": __version__})

    async def max_context_length(self, request: web.Request) -> web.Response:
        return json_response({"value": self.ctx.max_model_len})

    async def max_length(self, request: web.Request) -> web.Response:
        return json_response({"value": mapping.generation_length(
            None, self.ctx.max_model_len, self.options.default_max_tokens)})


async def _send_token(response: web.StreamResponse, token: str, finish_reason: str,
                      error: dict | None = None) -> None:
    payload = {"token": token, "finish_reason": finish_reason}
    if error is not None:
        payload["error"] = error
    await response.write(b"event: message\ndata: " + orjson.dumps(payload) + b"\n\n")


def _kobold_reason(reason: str | None) -> str:
    """KoboldCpp's finish_reason: "null" (a string) until the end, then "length" or "stop"."""
    if reason is None:
        return "null"
    return "length" if reason == "length" else "stop"

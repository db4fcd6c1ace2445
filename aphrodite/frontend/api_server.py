"""The aiohttp application: routes, API-key check, CORS, OpenAI-shaped errors."""

from __future__ import annotations

import hmac
import logging
import time

from aiohttp import web
from pydantic import ValidationError

from aphrodite import __version__
from aphrodite.frontend.args import ServerOptions
from aphrodite.frontend.engine_process import EngineDeadError
from aphrodite.frontend.errors import (APIError, bad_request, engine_unavailable,
                                       from_validation_error, internal_error, model_not_found,
                                       too_large, unauthorized)
from aphrodite.frontend.kobold.routes import KOBOLD_BODY_MODELS, add_kobold_routes
from aphrodite.frontend.kobold.serving import KoboldServing
from aphrodite.frontend.metrics import CONTENT_TYPE, ServerMetrics
from aphrodite.frontend.openapi import build_openapi
from aphrodite.frontend.openai_protocol import (ChatCompletionRequest, CompletionRequest,
                                                DetokenizeRequest, TokenizeRequest)
from aphrodite.frontend.playground import PlaygroundFiles
from aphrodite.frontend.serving_base import OpenAIServing, ServingContext, json_response
from aphrodite.frontend.serving_chat import ChatServing
from aphrodite.frontend.serving_completions import CompletionServing
from aphrodite.frontend.structured_request import REQUEST_FIELDS
from aphrodite.sampler_specs import SAMPLER_SPECS

logger = logging.getLogger("aphrodite.server")

# Reachable without an API key: load balancers and Prometheus do not send one, and API
# tools read the document before they are configured. The playground page and its files
# carry no data: the page's own API calls send the key the user types.
OPEN_PATHS = frozenset({"/health", "/metrics", "/version", "/openapi.json", "/",
                        "/static/{name}"})
# The model that validates each POST route's body (and describes it in /openapi.json).
BODY_MODELS = {"/v1/chat/completions": ChatCompletionRequest,
               "/v1/completions": CompletionRequest,
               "/v1/tokenize": TokenizeRequest,
               "/v1/detokenize": DetokenizeRequest,
               "/tokenize": TokenizeRequest,      # vLLM serves these at the root too
               "/detokenize": DetokenizeRequest,
               **KOBOLD_BODY_MODELS}


class ApiServer:
    def __init__(self, ctx: ServingContext, options: ServerOptions, metrics: ServerMetrics,
                 model_root: str):
        self.ctx = ctx
        self.options = options
        self.metrics = metrics
        self.model_root = model_root
        self.created = int(time.time())
        self.shutting_down = False
        self.active_handlers = 0   # requests whose handler has not returned yet
        self.chat = ChatServing(ctx, options)
        self.completions = CompletionServing(ctx, options)
        self.tokens = OpenAIServing(ctx, options)
        self.kobold = KoboldServing(ctx, options)
        self._api_keys = [key.encode() for key in options.api_keys]
        self._openapi: bytes | None = None     # built on first request, once routes are fixed
        self.playground = PlaygroundFiles()

    def build_app(self) -> web.Application:
        app = web.Application(client_max_size=self.options.max_request_body_bytes,
                              middlewares=[self._errors, self._cors, self._auth, self._gate])
        app.router.add_get("/", self.playground.playground)
        app.router.add_get("/static/{name}", self.playground.static_file)
        app.router.add_get("/health", self.health)
        app.router.add_get("/version", self.version)
        app.router.add_get("/metrics", self.prometheus)
        app.router.add_get("/openapi.json", self.openapi)
        app.router.add_get("/v1/models", self.list_models)
        app.router.add_get("/v1/models/{model_id:.+}", self.get_model)
        app.router.add_get("/v1/samplers", self.samplers)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_post("/v1/completions", self.text_completions)
        app.router.add_post("/v1/tokenize", self.tokenize)
        app.router.add_post("/v1/detokenize", self.detokenize)
        app.router.add_post("/tokenize", self.tokenize_at_root)
        app.router.add_post("/detokenize", self.detokenize_at_root)
        add_kobold_routes(app, self.kobold)
        return app

    # ---- middlewares ---------------------------------------------------------------------------
    @web.middleware
    async def _errors(self, request: web.Request, handler):
        self.active_handlers += 1
        try:
            return await handler(request)
        except APIError as exc:
            return exc.response()
        except EngineDeadError as exc:
            return engine_unavailable(str(exc)).response()
        except web.HTTPRequestEntityTooLarge:
            return too_large(self.options.max_request_body_bytes).response()
        except web.HTTPException as exc:
            if exc.status >= 400:  # unknown route, wrong method: same error shape
                return APIError(exc.status, exc.reason, param=None,
                                code=exc.reason.lower().replace(" ", "_")).response()
            raise
        except (ConnectionResetError, ConnectionError):
            raise  # the client went away; nothing to answer
        except Exception:
            logger.exception("Unhandled error in %s %s", request.method, request.path)
            return internal_error("Internal server error; see the server log.").response()
        finally:
            self.active_handlers -= 1

    @web.middleware
    async def _cors(self, request: web.Request, handler):
        origins = self.options.allowed_origins
        if not origins:
            return await handler(request)
        origin = request.headers.get("Origin")
        allowed = origin is not None and ("*" in origins or origin in origins)
        if request.method == "OPTIONS" and allowed:
            response = web.Response(status=204)
            response.headers["Access-Control-Allow-Methods"] = "GET, POST, OPTIONS"
            response.headers["Access-Control-Allow-Headers"] = request.headers.get(
                "Access-Control-Request-Headers", "Authorization, Content-Type, X-API-Key")
            response.headers["Access-Control-Max-Age"] = "600"
        else:
            response = await handler(request)
        if allowed:
            response.headers["Access-Control-Allow-Origin"] = "*" if "*" in origins else origin
            response.headers["Vary"] = "Origin"
        return response

    @web.middleware
    async def _auth(self, request: web.Request, handler):
        # the matched route's pattern, so /static/{name} covers every file under it
        route = request.match_info.route.resource
        path = route.canonical if route is not None else request.path
        if self._api_keys and request.method != "OPTIONS" and path not in OPEN_PATHS:
            if not self._key_ok(request):
                raise unauthorized()
        return await handler(request)

    def _key_ok(self, request: web.Request) -> bool:
        sent = request.headers.get("x-api-key")
        auth = request.headers.get("Authorization", "")
        if sent is None and auth[:7].lower() == "bearer ":
            sent = auth[7:].strip()
        if not sent:
            return False
        sent_bytes = sent.encode()
        # compare_digest against every key: the time taken does not reveal which one matched
        matches = [hmac.compare_digest(sent_bytes, key) for key in self._api_keys]
        return any(matches)

    @web.middleware
    async def _gate(self, request: web.Request, handler):
        if self.shutting_down and request.path != "/metrics":
            raise engine_unavailable("the server is shutting down")
        return await handler(request)

    # ---- helpers -------------------------------------------------------------------------------
    @staticmethod
    async def _parse(request: web.Request, model):
        # 415 for a body declared as something else (a form, text): serving it as JSON
        # would hide the client's mistake. A body without a Content-Type is read as JSON.
        declared = request.headers.get("Content-Type")
        media_type = (declared or "").split(";")[0].strip().lower()
        if declared is not None and media_type != "application/json" \
                and not media_type.endswith("+json"):
            raise APIError(415, f"Unsupported Content-Type {media_type or declared!r}: send "
                           "the body as JSON with Content-Type: application/json.",
                           code="unsupported_media_type")
        raw = await request.read()
        try:
            return model.model_validate_json(raw or b"")
        except ValidationError as exc:
            raise from_validation_error(exc) from None

    def _card(self, name: str) -> dict:
        return {"id": name, "object": "model", "created": self.created, "owned_by": "aphrodite",
                "root": self.model_root, "parent": None,
                "max_model_len": self.ctx.max_model_len, "permission": []}

    # ---- routes --------------------------------------------------------------------------------
    async def health(self, request: web.Request) -> web.Response:
        """200 while the engine is alive and the server is not shutting down."""
        client = self.ctx.client
        if client.is_alive and not self.shutting_down:
            return web.Response(status=200)
        raise engine_unavailable(client.dead_reason or "the server is shutting down")

    async def version(self, request: web.Request) -> web.Response:
        """The server's version."""
        return json_response({"version": __version__})

    async def prometheus(self, request: web.Request) -> web.Response:
        """Prometheus metrics (text exposition format)."""
        return web.Response(body=self.metrics.render(), headers={"Content-Type": CONTENT_TYPE})

    async def openapi(self, request: web.Request) -> web.Response:
        """This OpenAPI 3.1 document."""
        if self._openapi is None:
            document = build_openapi(request.app, BODY_MODELS, OPEN_PATHS,
                                     keys_required=bool(self._api_keys),
                                     title="Aphrodite OpenAI-compatible API", version=__version__)
            self._openapi = json_response(document).body
        return web.Response(body=self._openapi, content_type="application/json")

    async def list_models(self, request: web.Request) -> web.Response:
        """The served model names."""
        return json_response({"object": "list",
                              "data": [self._card(name) for name in self.ctx.model_names]})

    async def get_model(self, request: web.Request) -> web.Response:
        """One served model by name."""
        name = request.match_info["model_id"]
        if name not in self.ctx.model_names:
            raise model_not_found(name)
        return json_response(self._card(name))

    async def samplers(self, request: web.Request) -> web.Response:
        """Every sampler parameter with its type, default, range and effect."""
        specs = [*SAMPLER_SPECS, *REQUEST_FIELDS]   # and the fields that set structured_outputs
        return json_response({"object": "list", "data": [spec.to_dict() for spec in specs]})

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        """Chat completion (JSON, or server-sent events with stream=true)."""
        body = await self._parse(request, BODY_MODELS["/v1/chat/completions"])
        return await self.chat.create(request, body)

    async def text_completions(self, request: web.Request) -> web.StreamResponse:
        """Text completion (JSON, or server-sent events with stream=true)."""
        body = await self._parse(request, BODY_MODELS["/v1/completions"])
        return await self.completions.create(request, body)

    async def tokenize(self, request: web.Request) -> web.Response:
        """Token ids of a prompt or of chat messages rendered with the chat template."""
        body = await self._parse(request, BODY_MODELS["/v1/tokenize"])
        self.tokens.check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise bad_request("Send either `prompt` or `messages`.", param="prompt")
        if body.messages is not None:
            text = await self.tokens.render_chat(body.messages, body.add_generation_prompt)
            add_special = bool(body.add_special_tokens)
        else:
            text = body.prompt
            add_special = True if body.add_special_tokens is None else body.add_special_tokens
        ids = await self.tokens.encode(text, add_special_tokens=add_special)
        token_strs = None   # vLLM's field: each token's vocabulary string, when asked
        if (body.model_extra or {}).get("return_token_strs") is True:
            token_strs = self.ctx.tokenizer.convert_ids_to_tokens(ids)
        return json_response({"tokens": ids, "count": len(ids),
                              "max_model_len": self.ctx.max_model_len,
                              "token_strs": token_strs})

    async def tokenize_at_root(self, request: web.Request) -> web.Response:
        """/v1/tokenize at vLLM's path."""
        return await self.tokenize(request)

    async def detokenize_at_root(self, request: web.Request) -> web.Response:
        """/v1/detokenize at vLLM's path."""
        return await self.detokenize(request)

    async def detokenize(self, request: web.Request) -> web.Response:
        """Text of a list of token ids."""
        body = await self._parse(request, BODY_MODELS["/v1/detokenize"])
        self.tokens.check_model(body.model)
        self.tokens.check_token_ids(body.tokens, "tokens")
        text = await self.tokens.in_tokenizer_thread(self.ctx.tokenizer.decode, body.tokens)
        return json_response({"prompt": text})

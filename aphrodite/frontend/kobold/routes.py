"""The KoboldAI API's routes, as SillyTavern (KoboldAI Classic mode) and Kobold Lite call them.

The routes under /api/v1 are also served under /api/latest, as KoboldAI United does. Each
route gets a handler of its own name, so /openapi.json has one operationId per operation.
"""

from __future__ import annotations

from aiohttp import web

from aphrodite.frontend.kobold.protocol import (KoboldGenerateRequest, KoboldGenkeyRequest,
                                                KoboldTokenCountRequest)
from aphrodite.frontend.kobold.serving import KoboldServing

# The model that validates each POST route's body (and describes it in /openapi.json).
KOBOLD_BODY_MODELS = {
    "/api/v1/generate": KoboldGenerateRequest,
    "/api/latest/generate": KoboldGenerateRequest,
    "/api/extra/generate/stream": KoboldGenerateRequest,
    "/api/extra/generate/check": KoboldGenkeyRequest,
    "/api/extra/abort": KoboldGenkeyRequest,
    "/api/extra/tokencount": KoboldTokenCountRequest,
}


def _handler(name: str, doc: str, fn, *args):
    async def handler(request: web.Request) -> web.StreamResponse:
        return await fn(request, *args)
    handler.__name__ = name
    handler.__doc__ = doc
    return handler


def add_kobold_routes(app: web.Application, kobold: KoboldServing) -> None:
    for prefix in ("v1", "latest"):
        tag = "" if prefix == "v1" else "_latest"
        app.router.add_post(f"/api/{prefix}/generate", _handler(
            f"kobold_generate{tag}", "KoboldAI generate: {\"results\": [{\"text\"}]}",
            kobold.generate, False))
        app.router.add_get(f"/api/{prefix}/model", _handler(
            f"kobold_model{tag}", "KoboldAI model name: {\"result\": \"aphrodite/<name>\"}",
            kobold.model))
        app.router.add_get(f"/api/{prefix}/info/version", _handler(
            f"kobold_api_version{tag}", "KoboldAI API version: {\"result\"}",
            kobold.api_version))
        app.router.add_get(f"/api/{prefix}/config/max_context_length", _handler(
            f"kobold_max_context_length{tag}", "The model's context length: {\"value\"}",
            kobold.max_context_length))
        app.router.add_get(f"/api/{prefix}/config/max_length", _handler(
            f"kobold_max_length{tag}", "Tokens generated when max_length is left out: "
            "{\"value\"}", kobold.max_length))
    app.router.add_get("/api/extra/true_max_context_length", _handler(
        "kobold_true_max_context_length", "The model's context length: {\"value\"}",
        kobold.max_context_length))
    app.router.add_get("/api/extra/version", _handler(
        "kobold_extra_version", "KoboldCpp-compatible version: {\"result\": \"KoboldCpp\", "
        "\"version\"}", kobold.extra_version))
    app.router.add_post("/api/extra/generate/stream", _handler(
        "kobold_generate_stream", "KoboldAI generate as server-sent events: event: message, "
        "data: {\"token\", \"finish_reason\"}", kobold.generate, True))
    check_doc = "Text generated so far by the generation with this genkey: {\"results\": " \
                "[{\"text\"}]}"
    app.router.add_get("/api/extra/generate/check", _handler(
        "kobold_check", check_doc, kobold.check))
    app.router.add_post("/api/extra/generate/check", _handler(
        "kobold_check_post", check_doc, kobold.check))
    app.router.add_post("/api/extra/abort", _handler(
        "kobold_abort", "Abort the generation with this genkey: {\"success\", \"done\"}",
        kobold.abort))
    app.router.add_post("/api/extra/tokencount", _handler(
        "kobold_tokencount", "Token count and ids of a prompt: {\"value\", \"ids\"}",
        kobold.tokencount))

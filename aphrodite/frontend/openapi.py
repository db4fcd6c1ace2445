"""GET /openapi.json: an OpenAPI 3.1 document built from the app's router and from the
pydantic models that validate the request bodies, so it cannot drift from what the server
enforces. Shared sub-schemas ($defs) become components/schemas."""

from __future__ import annotations

import re

from aiohttp import web
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from aphrodite.frontend.kobold.protocol import KoboldErrorResponse
from aphrodite.frontend.openai_protocol import ErrorResponse

REF_TEMPLATE = "#/components/schemas/{model}"
_ERROR_TEXT = {400: "Invalid request; `param` names the offending field or limit",
               401: "Missing or wrong API key", 404: "Unknown model or route",
               413: "Request body too large", 503: "Engine unavailable, shutting down or "
               "overloaded (then with a Retry-After header)"}
_SECURITY_SCHEMES = {"bearer": {"type": "http", "scheme": "bearer"},
                     "apiKeyHeader": {"type": "apiKey", "in": "header", "name": "x-api-key"}}


def build_openapi(app: web.Application, body_models: dict[str, type[BaseModel]],
                  open_paths: frozenset[str], keys_required: bool, title: str,
                  version: str) -> dict:
    """The document for every route of `app`; body_models maps a POST path to its body model.

    Raises KeyError for a POST route without a body model, so a new route cannot be left out.
    """
    models = [*dict.fromkeys(body_models.values()), ErrorResponse, KoboldErrorResponse]
    refs, defs = models_json_schema([(m, "validation") for m in models],
                                    ref_template=REF_TEMPLATE)
    paths: dict[str, dict] = {}
    for route in app.router.routes():
        path = route.resource.canonical
        method = route.method.lower()
        name = route.handler.__name__
        operation = {"operationId": name if method in ("get", "post") else f"{name}_{method}",
                     "summary": (route.handler.__doc__ or route.handler.__name__).strip()
                     .splitlines()[0],
                     "responses": {"200": {"description": "OK"}}}
        names = re.findall(r"\{(\w+)\}", path)
        if names:
            operation["parameters"] = [{"name": name, "in": "path", "required": True,
                                        "schema": {"type": "string"}} for name in names]
        codes = [] if path == "/metrics" else [503]   # /metrics answers even while stopping
        if method == "post":
            model = body_models[path]
            operation["requestBody"] = {"required": True, "content": {
                "application/json": {"schema": refs[(model, "validation")]}}}
            codes += [400, 404, 413]
        elif names:
            codes.append(404)
        if keys_required and path not in open_paths:
            codes.append(401)
            operation["security"] = [{name: []} for name in _SECURITY_SCHEMES]
        error_model = KoboldErrorResponse if path.startswith("/api/") else ErrorResponse
        error_schema = refs[(error_model, "validation")]
        for code in sorted(codes):
            operation["responses"][str(code)] = {
                "description": _ERROR_TEXT[code],
                "content": {"application/json": {"schema": error_schema}}}
        paths.setdefault(path, {})[method] = operation
    components: dict = {"schemas": defs.get("$defs", {})}
    if keys_required:
        components["securitySchemes"] = _SECURITY_SCHEMES
    return {"openapi": "3.1.0", "info": {"title": title, "version": version},
            "paths": paths, "components": components}

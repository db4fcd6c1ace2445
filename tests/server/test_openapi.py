"""GET /openapi.json: a valid OpenAPI 3.1 document for every route, whose request schemas are
the validating pydantic models' own; then schemathesis fuzzes a live server from it."""

from __future__ import annotations

import asyncio
import time

import pytest
import requests
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from openapi_spec_validator import validate

from aphrodite import __version__
from aphrodite.frontend.api_server import BODY_MODELS, OPEN_PATHS, ApiServer
from aphrodite.frontend.args import ServerOptions
from aphrodite.frontend.kobold.protocol import KoboldErrorResponse
from aphrodite.frontend.openai_protocol import ErrorResponse
from aphrodite.frontend.openapi import build_openapi
from aphrodite.frontend.structured_request import REQUEST_FIELDS
from aphrodite.sampler_specs import SAMPLER_SPECS
from server_utils import RemoteServer

FUZZ_MAX_MODEL_LEN = 64     # bounds generation when a fuzzed request sets no max_tokens
FUZZ_ARGS = ["--served-model-name", "smollm2", "--max-model-len", str(FUZZ_MAX_MODEL_LEN),
             "--kv-cache-memory", "64MiB", "--max-num-seqs", "16", "--max-request-body", "64KiB"]
FUZZ_EXAMPLES = 25          # per operation, positive and negative cases mixed


def app_routes(api_keys: list[str] | None = None) -> tuple[ApiServer, web.Application]:
    # The routes and the key check do not touch the engine: no context is needed.
    api = ApiServer(None, ServerOptions(api_keys=api_keys or []), None, model_root="smollm2")
    return api, api.build_app()


def document_for(app: web.Application, keys_required: bool = False) -> dict:
    return build_openapi(app, BODY_MODELS, OPEN_PATHS, keys_required,
                         title="Aphrodite OpenAI-compatible API", version=__version__)


def inline_refs(node, defs: dict, prefix: str):
    """The schema with every `$ref` to `prefix + name` replaced by defs[name], recursively."""
    if isinstance(node, dict):
        if "$ref" in node:
            return inline_refs(defs[node["$ref"].removeprefix(prefix)], defs, prefix)
        return {k: inline_refs(v, defs, prefix) for k, v in node.items()}
    if isinstance(node, list):
        return [inline_refs(v, defs, prefix) for v in node]
    return node


def own_schema(model) -> dict:
    """The model's JSON schema with its $defs inlined."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})
    return inline_refs(schema, defs, "#/$defs/")


# ---- the document itself (in process) -------------------------------------------------------

def test_document_is_valid_openapi_and_covers_every_route():
    _, app = app_routes()
    document = document_for(app)
    validate(document)                      # raises on any OpenAPI 3.1 violation
    assert document["openapi"].startswith("3.1")
    routes = {(r.resource.canonical, r.method.lower()) for r in app.router.routes()}
    documented = {(path, method) for path, ops in document["paths"].items() for method in ops}
    assert documented == routes
    assert ("/openapi.json", "get") in documented and ("/v1/chat/completions", "post") in routes
    for path, ops in document["paths"].items():
        for method, op in ops.items():
            assert ("requestBody" in op) == (method == "post"), (path, method)
            errors = {code for code in op["responses"] if code != "200"}
            assert errors <= {"400", "401", "404", "413", "503"}
            if method == "post":
                assert {"400", "404", "413", "503"} <= errors
            error_model = "KoboldErrorResponse" if path.startswith("/api/") else "ErrorResponse"
            for code in errors:
                schema = op["responses"][code]["content"]["application/json"]["schema"]
                assert schema == {"$ref": f"#/components/schemas/{error_model}"}


def test_request_schemas_are_the_pydantic_models_schemas():
    _, app = app_routes()
    document = document_for(app)
    components = document["components"]["schemas"]
    for path, model in BODY_MODELS.items():
        body = document["paths"][path]["post"]["requestBody"]
        assert body["required"] is True
        in_document = inline_refs(body["content"]["application/json"]["schema"], components,
                                  "#/components/schemas/")
        assert in_document == own_schema(model), path
    assert inline_refs(components["ErrorResponse"], components, "#/components/schemas/") == \
        own_schema(ErrorResponse)


def test_structured_output_fields_are_documented_on_both_generation_routes():
    _, app = app_routes()
    document = document_for(app)
    components = document["components"]["schemas"]
    effects = {spec.name: spec.effect for spec in (*SAMPLER_SPECS, *REQUEST_FIELDS)}
    names = ["structured_outputs", "response_format", "guided_json", "guided_regex",
             "guided_choice", "guided_grammar", "guided_whitespace_pattern",
             "guided_decoding_backend"]
    for path in ("/v1/chat/completions", "/v1/completions"):
        body = document["paths"][path]["post"]["requestBody"]["content"]["application/json"]
        properties = inline_refs(body["schema"], components, "#/components/schemas/")["properties"]
        for name in names:
            assert properties[name]["description"] == effects[name], (path, name)
        response_format = next(option for option in properties["response_format"]["anyOf"]
                               if option.get("type") == "object")
        assert response_format["properties"]["type"]["enum"] == ["text", "json_object",
                                                                 "json_schema"]
        assert "schema" in response_format["properties"]["json_schema"]["anyOf"][0]["properties"]
    assert "JSON schema" in effects["structured_outputs"]
    assert "json_schema" in effects["response_format"]


def test_samplers_list_structured_outputs_and_the_fields_that_set_it():
    _, app = app_routes()

    async def fetch() -> list[dict]:
        async with TestClient(TestServer(app)) as client:
            r = await client.get("/v1/samplers")
            assert r.status == 200
            return (await r.json())["data"]

    data = {entry["name"]: entry for entry in asyncio.run(fetch())}
    for spec in (*SAMPLER_SPECS, *REQUEST_FIELDS):
        assert data[spec.name] == spec.to_dict()
    assert {"structured_outputs", "response_format", "guided_json", "guided_regex",
            "guided_choice", "guided_grammar", "guided_whitespace_pattern"} <= set(data)
    assert all(entry["effect"] for entry in data.values())


def test_a_post_route_without_a_body_model_is_refused():
    _, app = app_routes()
    async def new_thing(request: web.Request) -> web.Response:
        return web.Response()

    app.router.add_post("/v1/new-thing", new_thing)
    with pytest.raises(KeyError):
        document_for(app)


def test_document_is_open_but_the_api_needs_the_key_when_keys_are_set():
    api, app = app_routes(api_keys=["sk-openapi-test"])

    async def fetch() -> dict:
        async with TestClient(TestServer(app)) as client:
            r = await client.get("/openapi.json")
            assert r.status == 200
            assert (await client.get("/v1/samplers")).status == 401
            keyed = await client.get("/v1/samplers",
                                     headers={"Authorization": "Bearer sk-openapi-test"})
            assert keyed.status == 200
            return await r.json()

    document = asyncio.run(fetch())
    assert document == document_for(app, keys_required=True)
    validate(document)
    assert set(document["components"]["securitySchemes"]) == {"bearer", "apiKeyHeader"}
    chat = document["paths"]["/v1/chat/completions"]["post"]
    assert "401" in chat["responses"] and chat["security"]
    assert "security" not in document["paths"]["/openapi.json"]["get"]
    assert "security" not in document["paths"]["/health"]["get"]


# ---- schemathesis against a live server -------------------------------------------------------

def bound_generation(case) -> None:
    """Keep fuzzed generations to a couple of tokens: an absent, null or larger valid
    max_tokens becomes 2 and n at most 2 (their limits have their own tests)."""
    body = case.body
    if not isinstance(body, dict):
        return
    for name in ("max_tokens", "max_completion_tokens", "max_length"):   # max_length: Kobold's
        value = body.get(name)
        if value is None or (type(value) is int and value > 2):
            body[name] = 2
    if type(body.get("n")) is int and body["n"] > 2:
        body["n"] = 2


@pytest.mark.slow
def test_schemathesis_fuzz_finds_no_server_error(capsys):
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, Phase, given, settings, strategies as st
    from schemathesis import GenerationMode
    from schemathesis.checks import (content_type_conformance, not_a_server_error,
                                     response_schema_conformance, status_code_conformance)

    started = time.monotonic()
    with RemoteServer(FUZZ_ARGS) as server:
        schema = schemathesis.openapi.from_url(server.url_for("openapi.json"))
        session = requests.Session()
        seen: dict[int, int] = {}
        operations = [result.ok() for result in schema.get_all_operations()]
        paths = requests.get(server.url_for("openapi.json"), timeout=10).json()["paths"]
        documented = {f"{method.upper()} {path}" for path, ops in paths.items() for method in ops}
        # schemathesis leaves out the schema's own URL; everything else is fuzzed
        assert {op.label for op in operations} == documented - {"GET /openapi.json"}
        for operation in operations:
            cases = st.one_of(operation.as_strategy(GenerationMode.POSITIVE),
                              operation.as_strategy(GenerationMode.NEGATIVE))

            @settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None,
                      phases=[Phase.explicit, Phase.generate],
                      suppress_health_check=list(HealthCheck))
            @given(case=cases)
            def fuzz(case):
                bound_generation(case)
                response = case.call(base_url=server.base_url, session=session, timeout=120)
                seen[response.status_code] = seen.get(response.status_code, 0) + 1
                assert response.status_code < 500, (case.method, case.path, case.body,
                                                    response.text)
                if response.status_code >= 400 and case.method != "HEAD":
                    error_model = KoboldErrorResponse if case.path.startswith("/api/") \
                        else ErrorResponse
                    error_model.model_validate_json(response.content)   # OpenAI-shaped
                case.validate_response(response, checks=[
                    not_a_server_error, status_code_conformance, content_type_conformance,
                    response_schema_conformance])

            fuzz()
        # The server survived it and still answers normally.
        r = requests.post(server.url_for("v1", "completions"), timeout=60, json={
            "model": "smollm2", "prompt": "The capital of France is", "max_tokens": 3,
            "temperature": 0})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
        assert requests.get(server.url_for("health"), timeout=10).status_code == 200
        assert "Traceback" not in "\n".join(server.log)
    with capsys.disabled():
        print(f"\nschemathesis {schemathesis.SCHEMATHESIS_VERSION}: {len(operations)} operations, "
              f"status counts {dict(sorted(seen.items()))}, {time.monotonic() - started:.0f} s")
    assert seen.get(200) and seen.get(400)     # both valid and invalid requests were sent

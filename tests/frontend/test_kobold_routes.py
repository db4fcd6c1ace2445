"""The KoboldAI routes in process (no engine): the API key guards /api as it guards /v1, and
errors carry both OpenAI's error object and KoboldCpp's detail."""

import asyncio
import types

from aiohttp.test_utils import TestClient, TestServer

from aphrodite.frontend.api_server import ApiServer
from aphrodite.frontend.args import ServerOptions
from aphrodite.frontend.kobold.protocol import KoboldErrorResponse

KEY = "sk-kobold-test"


def run(coro_fn, api_keys=()):
    ctx = types.SimpleNamespace(model_names=["smollm2"])   # what the model route reads
    app = ApiServer(ctx, ServerOptions(api_keys=list(api_keys)), None, "smollm2").build_app()

    async def main():
        async with TestClient(TestServer(app)) as client:
            return await coro_fn(client)
    return asyncio.run(main())


def test_api_key_is_enforced_on_kobold_routes():
    async def calls(client):
        missing = await client.get("/api/v1/model")
        wrong = await client.post("/api/extra/abort", headers={"Authorization": "Bearer nope"})
        keyed = await client.get("/api/v1/model", headers={"Authorization": f"Bearer {KEY}"})
        by_header = await client.get("/api/extra/version", headers={"x-api-key": KEY})
        return (missing.status, wrong.status, keyed.status, await keyed.json(),
                by_header.status)

    missing, wrong, keyed, body, by_header = run(calls, api_keys=[KEY])
    assert (missing, wrong, keyed, by_header) == (401, 401, 200, 200)
    assert body == {"result": "aphrodite/smollm2"}


def test_bad_bodies_are_400_in_both_shapes():
    async def calls(client):
        out = []
        for path, data in (("/api/v1/generate", b"{not json"),
                           ("/api/extra/tokencount", b'{"prompt": 5}'),
                           ("/api/extra/abort", b'["genkey"]')):
            r = await client.post(path, data=data)
            out.append((r.status, await r.text()))
        empty_abort = await client.post("/api/extra/abort")      # SillyTavern's: no body
        out.append((empty_abort.status, await empty_abort.text()))
        return out

    *errors, empty_abort = run(calls)
    for status, text in errors:
        assert status == 400
        error = KoboldErrorResponse.model_validate_json(text)
        assert error.detail.msg == error.error.message
    assert empty_abort == (200, '{"success":"false","done":"false"}')

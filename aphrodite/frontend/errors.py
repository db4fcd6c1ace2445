"""OpenAI-shaped errors: `{"error": {"message", "type", "param", "code"}}` with an HTTP status."""

from __future__ import annotations

import orjson
from aiohttp import web
from pydantic import ValidationError


class APIError(Exception):
    """An error returned to the client; raised anywhere below a route handler."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type,
                          "param": self.param, "code": self.code}}

    def response(self) -> web.Response:
        return web.Response(status=self.status, body=orjson.dumps(self.body()),
                            content_type="application/json", headers=self.headers)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def model_not_found(model: str) -> APIError:
    return APIError(404, f"The model `{model}` does not exist.", param="model",
                    code="model_not_found")


def unauthorized() -> APIError:
    return APIError(401, "Invalid or missing API key. Send it as 'Authorization: Bearer KEY' "
                         "or 'x-api-key: KEY'.", type="authentication_error",
                    code="invalid_api_key")


def too_large(limit: int) -> APIError:
    return APIError(413, f"The request body is larger than the limit of {limit} bytes.",
                    code="request_too_large")


def engine_unavailable(message: str) -> APIError:
    return APIError(503, f"The engine is not available: {message}", type="service_unavailable",
                    code="engine_unavailable")


def limit_exceeded(param: str, message: str, option: str) -> APIError:
    """A request beyond one of the server's per-request caps; the message names the limit."""
    return bad_request(f"{message} (the server's {option}).", param=param, code="limit_exceeded")


def server_overloaded(message: str, retry_after_s: int) -> APIError:
    return APIError(503, f"The server is overloaded: {message}. Retry after {retry_after_s} s.",
                    type="server_overloaded", code="server_overloaded",
                    headers={"Retry-After": str(retry_after_s)})


def internal_error(message: str) -> APIError:
    return APIError(500, message, type="server_error", code="internal_error")


def from_validation_error(exc: ValidationError) -> APIError:
    """The first pydantic error as a 400 naming the offending field."""
    errors = exc.errors(include_url=False)
    if errors[0]["type"] == "json_invalid":
        return bad_request(f"The body is not valid JSON: {errors[0]['msg']}", code="invalid_json")
    # For a union field pydantic reports one error per member; the deepest one is the
    # member the client was evidently going for (a list of parts rather than a string).
    first = max(errors, key=lambda e: len(_user_loc(e)))
    param = ".".join(_user_loc(first)) or None
    where = f" ({param})" if param else ""
    return bad_request(f"Invalid request{where}: {first['msg']}", param=param, code="invalid_value")


def _user_loc(error: dict) -> list[str]:
    # Union members show up as extra loc parts ("str", "list[...]"); they only confuse users.
    return [str(part) for part in error.get("loc", ())
            if not any(c in str(part) for c in "[]()") and part not in ("str", "int", "float",
                                                                        "bool", "function-before")]

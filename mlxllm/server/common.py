"""What every route shares: `ApiError`, request fields checked against JSON kinds,
each API's error shape, JSON bodies and streamed responses."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import re
import uuid
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

from aiohttp import web

from ..constrain import ANY_OBJECT
from ..sample import SamplingParams

log = logging.getLogger("mlxllm.server")
MAX_STOPS = 16
MAX_ERROR_CHARS = 1000  # an error message's length at most
# seconds a connection may sit idle or take to send its request's headers (slowloris), and
# twice that for its body
IDLE_TIMEOUT = float(os.environ.get("MLXLLM_IDLE_TIMEOUT", "30"))
BODY_TIMEOUT = 2 * IDLE_TIMEOUT


class ApiError(Exception):
    """A request the server will not serve: status, message, and the field at fault."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


_KINDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "string": (lambda v: isinstance(v, str), "a string"),
    "bool": (lambda v: isinstance(v, bool), "a boolean"),
    "int": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    "number": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number"),
    "list": (lambda v: isinstance(v, list), "an array"),
    "object": (lambda v: isinstance(v, dict), "an object"),
}


def field_of(body: dict, key: str, kind: str, default: Any = None, where: str = "") -> Any:
    """body[key] checked against a JSON kind; null or absent gives the default. Numbers
    come back as finite floats and integers within 64 bits: Python's JSON takes NaN,
    Infinity and integers of any size, which MLX and NumPy do not."""
    value = body.get(key)
    if value is None:
        return default
    ok, name = _KINDS[kind]
    if not ok(value):
        raise ApiError(400, f"{where}{key} must be {name}, not {json.dumps(value)[:60]}", key)
    if kind == "int" and not -(2**63) <= value < 2**64:
        raise ApiError(400, f"{where}{key} is out of range: {str(value)[:30]}", key)
    if kind == "number":
        try:
            value = float(value)
        except OverflowError:
            value = math.inf
        if not math.isfinite(value):
            raise ApiError(400, f"{where}{key} must be a finite number", key)
    return value


def in_range(value: float | None, key: str, low: float, high: float) -> None:
    if value is not None and not low <= value <= high:
        raise ApiError(400, f"{key} must be between {low:g} and {high:g}, not {value:g}", key)


def stop_list(value: Any, key: str = "stop") -> list[str]:
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise ApiError(400, f"{key} must be a string or an array of strings", key)
    if len(stops) > MAX_STOPS:
        raise ApiError(400, f"{key} has {len(stops)} strings; at most {MAX_STOPS} are allowed", key)
    return stops


def sampling(values: dict[str, Any]) -> SamplingParams:
    params = SamplingParams(**{k: v for k, v in values.items() if v is not None})
    try:
        params.validate()
    except ValueError as e:
        raise ApiError(400, str(e), str(e).split()[0]) from None
    return params


_DURATION = re.compile(r"(-?\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_UNIT_S = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def keep_alive_of(body: dict) -> float | None | str:
    """Ollama's keep_alive: seconds as a number, or a Go duration ("5m", "1h30m", "0");
    negative keeps the model loaded forever (None). Absent: "default"."""
    value = body.get("keep_alive")
    if value is None:
        return "default"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str) and value.strip():
        text = value.strip()
        try:
            seconds = float(text)
        except ValueError:
            parts = _DURATION.findall(text)
            if not parts or "".join(n + u for n, u in parts) != text.replace("+", ""):
                raise ApiError(400, f"keep_alive {value!r} is not a duration (e.g. \"5m\", \"30s\", \"-1\")",
                               "keep_alive") from None
            seconds = sum(float(n) * _UNIT_S[u] for n, u in parts)
    else:
        raise ApiError(400, "keep_alive must be a number of seconds or a duration string", "keep_alive")
    return None if seconds < 0 else seconds


def json_schema_of(value: Any, key: str) -> dict | None:
    """A format request as a JSON schema: None (free text), ANY_OBJECT, or the schema."""
    if value in (None, ""):
        return None
    if value == "json":
        return ANY_OBJECT
    if isinstance(value, dict):
        return value
    raise ApiError(400, f"{key} must be \"json\" or a JSON schema object", key)


def is_openai(request: web.Request) -> bool:
    return request.path.startswith("/v1/") or request.path == "/v1"


def is_anthropic(request: web.Request) -> bool:
    return request.path == "/v1/messages" or request.path.startswith("/v1/messages/")


# status -> the error type Anthropic's API names it with
ANTHROPIC_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 402: "billing_error",
                         403: "permission_error", 404: "not_found_error", 413: "request_too_large",
                         429: "rate_limit_error", 504: "timeout_error", 529: "overloaded_error"}


def anthropic_error(status: int, message: str) -> dict:
    kind = ANTHROPIC_ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": kind, "message": message}}


def error_response(request: web.Request, status: int, message: str, param: str | None = None,
                   code: str | None = None) -> web.Response:
    """Each API's own error shape: OpenAI {"error": {message, type, param, code}},
    Anthropic {"type": "error", "error": {type, message}}, Ollama {"error": message}.
    Messages are cut at MAX_ERROR_CHARS: a request's own bytes may be quoted in one."""
    if len(message) > MAX_ERROR_CHARS:
        message = message[:MAX_ERROR_CHARS] + "…"
    if is_anthropic(request):
        body = anthropic_error(status, message)
    elif is_openai(request):
        kind = "server_error" if status >= 500 else "invalid_request_error"
        body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    else:
        body = {"error": message}
    return web.json_response(body, status=status)


@web.middleware
async def errors_middleware(request: web.Request, handler):
    """Every failure as the API's error shape: ApiError and aiohttp's own 4xx as they are,
    anything else a 500 logged with the request's id (sent as X-Request-Id)."""
    try:
        return await handler(request)
    except ApiError as e:
        return error_response(request, e.status, e.message, e.param, e.code)
    except web.HTTPException as e:  # aiohttp's own: unknown route, wrong method, body too large
        if e.status < 400:
            raise
        message = {404: f"not found: {request.method} {request.path}",
                   405: f"method {request.method} not allowed for {request.path}"}.get(e.status, e.text or e.reason)
        code = "not_found" if e.status == 404 else None
        return error_response(request, e.status, message, code=code)
    except (ConnectionResetError, asyncio.CancelledError):
        raise
    except Exception as e:
        log.exception("request %s: %s %s failed", request_id(request), request.method, request.path[:200])
        return error_response(request, 500, f"internal error (request {request_id(request)}): {type(e).__name__}: {e}")


def request_id(request: web.Request) -> str:
    if "id" not in request:
        request["id"] = uuid.uuid4().hex[:16]
    return request["id"]


async def send_request_id(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: every answer names its request, as the log does."""
    response.headers["X-Request-Id"] = request_id(request)


async def json_body(request: web.Request) -> dict:
    try:  # over client_max_size: aiohttp raises 413
        raw = await asyncio.wait_for(request.read(), BODY_TIMEOUT)
    except asyncio.TimeoutError:
        raise ApiError(408, f"the request body did not arrive within {BODY_TIMEOUT:g} s") from None
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"invalid JSON body: {e}") from None
    except RecursionError:
        raise ApiError(400, "invalid JSON body: nested too deeply") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return body


def model_of(body: dict) -> str:
    name = field_of(body, "model", "string")
    if not name:
        raise ApiError(400, "model is required", "model")
    return name


def now_rfc3339() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


async def ndjson_stream(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await response.prepare(request)
    return response


async def sse_stream(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    return response


def line(obj: Any) -> bytes:
    return (json.dumps(obj, ensure_ascii=False) + "\n").encode()


def sse(obj: Any) -> bytes:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)}\n\n".encode()

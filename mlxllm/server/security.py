"""What keeps a local server local: web pages the user visits must not drive it.

- **Host**: a browser that a page sent to `http://evil.example:11434` after the name was
  re-pointed at 127.0.0.1 (DNS rebinding) still sends `Host: evil.example`. Only loopback
  names, this machine's name, IP literals (a rebinding attack needs a domain name) and the
  names the operator adds are served; anything else is a 403.
- **Origin**: a page may POST `text/plain` across origins without a CORS preflight, so an
  `Origin` header that is not allowed is a 403 before any work, and preflights are answered
  only for allowed origins. The allowed origins are Ollama's (`OLLAMA_ORIGINS` semantics:
  localhost, 127.0.0.1 and 0.0.0.0 on any port, app://, file://, tauri://,
  vscode-webview://, plus the operator's patterns with `*` wildcards). Clients that are not
  browsers send no Origin and are unaffected.
- **API key** (`--api-key`, as llama-server's): every route but `/` and `/health` needs
  `Authorization: Bearer KEY` (or Anthropic's `x-api-key: KEY`); serving a non-loopback
  address without one is worth a warning.
"""

from __future__ import annotations

import fnmatch
import hmac
import ipaddress
import os
import socket
from collections.abc import Iterable
from dataclasses import dataclass, field

from aiohttp import web

from .common import ApiError

OPEN_ROUTES = ("/", "/health")  # no key needed: liveness checks
_LOCAL_NAMES = ("localhost", "127.0.0.1", "0.0.0.0", "[::1]")
DEFAULT_ORIGINS = tuple(
    f"{scheme}://{name}{port}" for name in _LOCAL_NAMES for scheme in ("http", "https") for port in ("", ":*")
) + ("app://*", "file://*", "tauri://*", "vscode-webview://*", "vscode-file://*")
CORS_HEADERS = "Authorization, Content-Type, User-Agent, Accept, X-Requested-With, X-Api-Key, Anthropic-Version"


def _split(value: str | None) -> list[str]:
    return [part.strip() for part in (value or "").split(",") if part.strip()]


def is_loopback(host: str) -> bool:
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class Security:
    api_key: str | None = None
    hosts: list[str] = field(default_factory=list)  # extra Host names allowed ("*": any)
    origins: list[str] = field(default_factory=list)  # extra Origin patterns allowed

    @classmethod
    def from_env(cls, api_key: str | None = None, hosts: Iterable[str] = (), origins: Iterable[str] = ()) -> Security:
        """Flags first, then MLXLLM_API_KEY, MLXLLM_ALLOWED_HOSTS and MLXLLM_ORIGINS (or
        Ollama's OLLAMA_ORIGINS, honoured as Ollama honours it)."""
        return cls(api_key=api_key or os.environ.get("MLXLLM_API_KEY") or None,
                   hosts=[*hosts, *_split(os.environ.get("MLXLLM_ALLOWED_HOSTS"))],
                   origins=[*origins, *_split(os.environ.get("MLXLLM_ORIGINS") or os.environ.get("OLLAMA_ORIGINS"))])

    def host_allowed(self, header: str) -> bool:
        if "*" in self.hosts:
            return True
        host = header.strip().lower()
        if host.startswith("["):  # [::1]:11434
            host = host[1:host.find("]")] if "]" in host else host
        elif host.count(":") == 1:
            host = host.rsplit(":", 1)[0]
        if not host or is_loopback(host) or host in (socket.gethostname().lower(), *map(str.lower, self.hosts)):
            return True
        try:
            ipaddress.ip_address(host)
            return True  # an IP literal: what the client connected to is what it named
        except ValueError:
            return host.endswith((".local", ".internal"))  # mDNS / container names, as Ollama allows

    def origin_allowed(self, origin: str) -> bool:
        origin = origin.strip().lower()
        return any(fnmatch.fnmatchcase(origin, pattern.lower()) for pattern in (*DEFAULT_ORIGINS, *self.origins))

    def key_ok(self, request: web.Request) -> bool:
        if self.api_key is None or request.path in OPEN_ROUTES or request.method == "OPTIONS":
            return True
        given = request.headers.get("x-api-key", "")
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() == "bearer":
            given = token.strip()
        return hmac.compare_digest(given.encode(), self.api_key.encode())


def middleware(security: Security):
    @web.middleware
    async def guard(request: web.Request, handler):
        host = request.headers.get("Host", "")
        if not security.host_allowed(host):
            raise ApiError(403, f"host {host[:100]!r} is not allowed (add it with --allowed-host or "
                                "MLXLLM_ALLOWED_HOSTS)", code="forbidden")
        origin = request.headers.get("Origin")
        if origin is not None and not security.origin_allowed(origin):
            raise ApiError(403, f"origin {origin[:100]!r} is not allowed (add it with --allowed-origin or "
                                "MLXLLM_ORIGINS)", code="forbidden")
        if request.method == "OPTIONS" and origin is not None:  # a CORS preflight from an allowed origin
            return web.Response(status=204)
        if not security.key_ok(request):
            raise ApiError(401, "a valid API key is required (Authorization: Bearer KEY)", code="invalid_api_key")
        return await handler(request)

    return guard


async def cors_headers(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: CORS headers for an origin the middleware let through (streamed
    responses too, whose headers go out before the handler returns)."""
    origin = request.headers.get("Origin")
    if origin is None or response.status == 403:
        return
    response.headers["Access-Control-Allow-Origin"] = origin
    response.headers["Vary"] = "Origin"
    if request.method == "OPTIONS":
        response.headers["Access-Control-Allow-Methods"] = "GET, POST, DELETE, OPTIONS"
        response.headers["Access-Control-Allow-Headers"] = CORS_HEADERS
        response.headers["Access-Control-Max-Age"] = "600"

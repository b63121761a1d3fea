"""The application: its routes, and `serve`, which runs it until SIGINT or SIGTERM."""

from __future__ import annotations

import asyncio
import errno
import logging
import signal
from collections.abc import Callable
from typing import Any

from aiohttp import web

from .. import __version__
from . import anthropic, embeddings, models_api, ollama, openai, responses
from .common import IDLE_TIMEOUT, ApiError, errors_middleware, send_request_id
from .engine import DEFAULT_PARALLEL
from .pool import DEFAULT_KEEP_ALIVE, ModelPool, model_path, serve_names
from .security import Security, cors_headers, is_loopback
from .security import middleware as guard

log = logging.getLogger("mlxllm.server")

APIS = (ollama, openai, embeddings, anthropic, responses, models_api)  # each module's ROUTES: (method, path, handler)
DEFAULT_PORT = 11434  # Ollama's, so Ollama clients work without configuration


async def health(request: web.Request) -> web.Response:
    pool: ModelPool = request.app["pool"]
    models = [{"name": m.name, "active": m.engine.active, "queued": m.engine.queued, "batched": m.engine.batched,
               "prefix_cache_bytes": m.engine.prefixes.nbytes if m.engine.prefixes else 0}
              if m.engine is not None else
              {"name": m.name, "active": 0, "queued": 0, "batched": False, "prefix_cache_bytes": 0}
              for m in list(pool.loaded.values())]
    return web.json_response({"status": "ok", "version": __version__, "models": models,
                              "active": sum(m["active"] for m in models), "queued": sum(m["queued"] for m in models)})


async def root(request: web.Request) -> web.Response:
    return web.Response(text="mlxllm is running")  # Ollama answers "/" the same way


def make_app(pool: ModelPool | None = None, max_body: int = 16 << 20, security: Security | None = None) -> web.Application:
    app = web.Application(client_max_size=max_body,
                          middlewares=[errors_middleware, guard(security or Security.from_env())])
    app.on_response_prepare.extend([send_request_id, cors_headers])
    app["pool"] = pool or ModelPool()
    app.router.add_get("/", root)
    app.router.add_get("/health", health)
    for api in APIS:
        for method, path, handler in api.ROUTES:
            app.router.add_route(method, path, handler)

    async def reaper(app: web.Application):
        task = asyncio.get_running_loop().create_task(app["pool"].reap_forever())
        yield
        task.cancel()
        await app["pool"].close()

    app.cleanup_ctx.append(reaper)
    return app


ACCESS_LOG_FORMAT = '%a "%r" %s %b %Tfs'


class StartError(ValueError):
    """The server cannot start: one line saying why and what to do (the CLI prints it)."""


async def serve_async(host: str, port: int, preload: tuple[str, ...] = (), security: Security | None = None,
                      pool_class: Callable[..., ModelPool] = ModelPool, **pool_options: Any) -> None:
    max_body = pool_options.pop("max_body", 16 << 20)
    security = security or Security.from_env()
    # requests name models; paths are the operator's: --models-dir folders, --preload, --draft
    serve_names(pool_options.pop("models_dirs", ()), (*preload, (pool_options.get("speculation") or {}).get("draft")))
    for name in preload:  # an unknown name fails now, before the port is taken
        try:
            model_path(name)
        except ApiError as e:
            raise StartError(f"--preload {name}: {e.message}") from None
    app = make_app(pool_class(**pool_options), max_body, security)
    runner = web.AppRunner(app, access_log_format=ACCESS_LOG_FORMAT, handler_cancellation=True,
                           keepalive_timeout=IDLE_TIMEOUT)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except OSError as e:
        await runner.cleanup()
        await app["pool"].close()
        hint = (f"another server (Ollama?) is using port {port}: stop it or pass --port"
                if e.errno == errno.EADDRINUSE else f"{e.strerror or e}: check --host and --port")
        raise StartError(f"cannot listen on {host}:{port}: {hint}") from None
    bound = runner.addresses[0][1] if runner.addresses else port
    log.info("mlxllm %s serving on http://%s:%d (Ollama API at /api, OpenAI API at /v1)", __version__, host, bound)
    if security.api_key is None and not is_loopback(host):
        log.warning("serving %s without an API key: anyone who can reach this address can use it "
                    "(--api-key or MLXLLM_API_KEY)", host)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        for name in preload:
            try:
                loaded, _ = await app["pool"].acquire(name, None)
            except ApiError as e:
                raise StartError(f"--preload {name}: {e.message}") from None
            app["pool"].release(loaded)
        await stop.wait()
        log.info("shutting down")
    finally:
        await site.stop()  # no new connections; engines then fail what is still running
        await app["pool"].close()
        await runner.cleanup()
    log.info("stopped")


def serve(host: str = "127.0.0.1", port: int = DEFAULT_PORT, keep_alive: float | None = DEFAULT_KEEP_ALIVE,
          parallel: int = DEFAULT_PARALLEL, preload: tuple[str, ...] = (), max_body: int = 16 << 20,
          prefix_cache_bytes: int = 512 << 20, speculation: dict | None = None, kv_bits: int | None = None,
          security: Security | None = None, models_dirs: tuple[str, ...] = (), context_cap: int | None = None,
          pool_class: Callable[..., ModelPool] = ModelPool) -> None:
    """Run the server until SIGINT or SIGTERM. Requests name models; `models_dirs`: folders
    whose .gguf files requests may name too. pool_class: what holds the models (rank 0 of a
    pipeline: `mlxllm.distributed.pipeline_pool`)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(serve_async(host, port, preload, security, keep_alive=keep_alive, parallel=parallel,
                            prefix_cache_bytes=prefix_cache_bytes, max_body=max_body, speculation=speculation,
                            kv_bits=kv_bits, models_dirs=models_dirs, context_cap=context_cap,
                            pool_class=pool_class))

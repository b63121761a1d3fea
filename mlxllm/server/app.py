"""The application: its routes, and `serve`, which runs it until SIGINT or SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import Any

from aiohttp import web

from .. import __version__
from . import embeddings, ollama, openai
from .common import errors_middleware
from .engine import DEFAULT_PARALLEL
from .pool import DEFAULT_KEEP_ALIVE, ModelPool

log = logging.getLogger("mlxllm.server")

APIS = (ollama, openai, embeddings)  # each module's ROUTES: (method, path, handler)
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


def make_app(pool: ModelPool | None = None, max_body: int = 16 << 20) -> web.Application:
    app = web.Application(client_max_size=max_body, middlewares=[errors_middleware])
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


async def serve_async(host: str, port: int, preload: tuple[str, ...] = (), **pool_options: Any) -> None:
    max_body = pool_options.pop("max_body", 16 << 20)
    app = make_app(ModelPool(**pool_options), max_body)
    runner = web.AppRunner(app, access_log_format=ACCESS_LOG_FORMAT, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = runner.addresses[0][1] if runner.addresses else port
    log.info("mlxllm %s serving on http://%s:%d (Ollama API at /api, OpenAI API at /v1)", __version__, host, bound)
    for name in preload:
        loaded, _ = await app["pool"].acquire(name, None)
        app["pool"].release(loaded)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down")
    await site.stop()  # no new connections; engines then fail what is still running
    await app["pool"].close()
    await runner.cleanup()
    log.info("stopped")


def serve(host: str = "127.0.0.1", port: int = DEFAULT_PORT, keep_alive: float | None = DEFAULT_KEEP_ALIVE,
          parallel: int = DEFAULT_PARALLEL, preload: tuple[str, ...] = (), max_body: int = 16 << 20,
          prefix_cache_bytes: int = 512 << 20, speculation: dict | None = None, kv_bits: int | None = None) -> None:
    """Run the server until SIGINT or SIGTERM."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(serve_async(host, port, preload, keep_alive=keep_alive, parallel=parallel,
                            prefix_cache_bytes=prefix_cache_bytes, max_body=max_body, speculation=speculation,
                            kv_bits=kv_bits))

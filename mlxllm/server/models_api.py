"""Ollama's model-management routes: /api/pull (streamed progress), /api/delete, /api/copy,
/api/tags and /api/show, over the store (mlxllm/store.py) and the names this server serves
(pool.ServedNames)."""

from __future__ import annotations

import asyncio
import logging
import threading
from concurrent.futures import ThreadPoolExecutor

from aiohttp import web

from ..models import ModelConfig
from ..pull import PullError, pull
from ..store import InvalidDigest, InvalidName, ModelName, StoreError, find, local_store
from . import pool
from .common import ApiError, field_of, json_body, line, ndjson_stream
from .ollama import details, model_info
from .pool import arch_kind, describe, model_config

log = logging.getLogger("mlxllm.server")
_PULLS = ThreadPoolExecutor(max_workers=4, thread_name_prefix="pull")  # not the default executor: a pull takes minutes


class _Cancelled(Exception):
    pass


def _name_of(body: dict, *keys: str) -> str:
    for key in keys:
        value = field_of(body, key, "string")
        if value:
            return value
    raise ApiError(400, f"{keys[0]} is required", keys[0])


def _parsed(text: str, key: str = "model") -> ModelName:
    try:
        return ModelName.parse(text)
    except InvalidName as e:
        raise ApiError(400, str(e), key) from None


async def api_pull(request: web.Request) -> web.StreamResponse:
    """Ollama's /api/pull: {"status": "pulling manifest"}, {"status": "pulling <digest>",
    "digest", "total", "completed"}..., "verifying sha256 digest", "writing manifest",
    "success"; an error after the headers is an {"error"} line."""
    body = await json_body(request)
    text = _name_of(body, "model", "name")
    _parsed(text)
    insecure = field_of(body, "insecure", "bool", False)
    stream = field_of(body, "stream", "bool", True)
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    cancelled = threading.Event()

    def progress(event: dict) -> None:  # on the pull's thread
        if cancelled.is_set():
            raise _Cancelled
        loop.call_soon_threadsafe(queue.put_nowait, ("event", event))

    def work() -> None:
        try:
            pull(text, insecure=insecure, progress=progress)
        except _Cancelled:
            log.info("pull of %s cancelled: the client went away", text)
        except (PullError, StoreError, InvalidDigest, InvalidName, OSError) as e:
            loop.call_soon_threadsafe(queue.put_nowait, ("error", str(e)))
        except Exception as e:  # the client gets an error line; the log, the traceback
            log.exception("pull of %s failed", text)
            loop.call_soon_threadsafe(queue.put_nowait, ("error", f"internal error: {type(e).__name__}: {e}"))
        finally:
            loop.call_soon_threadsafe(queue.put_nowait, ("end", None))

    future = loop.run_in_executor(_PULLS, work)
    response, last = None, {"status": "success"}
    try:
        while True:
            kind, value = await queue.get()
            if kind == "end":
                break
            if kind == "error":
                if response is None:
                    status = 404 if "not found" in value else 400 if "invalid" in value else 502
                    raise ApiError(status, value, "model")
                await response.write(line({"error": value}))
                continue
            if stream:
                if response is None:
                    response = await ndjson_stream(request)
                await response.write(line(value))
            elif value.get("status") == "success":
                last = value
        if response is None:
            return web.json_response(last)
        await response.write_eof()
        return response
    except (ConnectionResetError, asyncio.CancelledError):
        cancelled.set()
        raise
    finally:
        if not future.done():
            cancelled.set()


async def api_delete(request: web.Request) -> web.Response:
    body = await json_body(request)
    name = _parsed(_name_of(body, "model", "name"))

    def remove() -> None:
        ours = local_store()
        if ours.find(name) is None:
            entry = find(name)
            if entry is not None:  # in Ollama's store, which mlxllm reads but never changes
                raise ApiError(400, f"{name} is in Ollama's store ({entry.store.root}): remove it with "
                                    "`ollama rm`", "model")
            raise ApiError(404, f"model {str(name)!r} not found", "model", "model_not_found")
        ours.remove(name)

    await asyncio.get_running_loop().run_in_executor(None, remove)
    return web.Response(status=200)


async def api_copy(request: web.Request) -> web.Response:
    body = await json_body(request)
    source = _parsed(_name_of(body, "source"), "source")
    destination = _parsed(_name_of(body, "destination"), "destination")

    def copy() -> None:
        entry = find(source)
        if entry is None:
            raise ApiError(404, f"model {str(source)!r} not found in the store", "source", "model_not_found")
        local_store().copy(entry, destination)

    await asyncio.get_running_loop().run_in_executor(None, copy)
    return web.Response(status=200)


def _tag(config: ModelConfig) -> dict:
    info = describe(config.path)
    return {"name": config.name, "model": config.name, "modified_at": config.modified_at or info["modified_at"],
            "size": config.size or info["file_size"], "digest": (config.digest or info["digest"]).removeprefix("sha256:"),
            "details": details(info)}


async def api_tags(request: web.Request) -> web.Response:
    def collect() -> list[dict]:
        out = []
        for config in pool.SERVED.catalog():  # read at call time: serve() replaces it
            try:
                out.append(_tag(config))
            except (OSError, ValueError) as e:  # a broken file is left out of the listing, not a 500
                log.warning("listing %s: %s", config.name, e)
        return out

    return web.json_response({"models": await asyncio.get_running_loop().run_in_executor(None, collect)})


async def api_show(request: web.Request) -> web.Response:
    body = await json_body(request)
    name = _name_of(body, "model", "name")

    def collect() -> dict:
        config = model_config(name)
        info = describe(config.path)
        meta = info["metadata"]
        template = config.template or meta.get("tokenizer.chat_template", "")
        # Ollama's capabilities: an encoder embeds; a decoder completes (and embeds too,
        # on /api/embed, as in Ollama, without saying so here)
        capabilities = ["embedding"] if arch_kind(config.path) == "encoder" else ["completion"]
        modelfile = [f"# Modelfile generated by mlxllm\nFROM {config.name}"]
        if config.template:
            modelfile.append(f'TEMPLATE """{config.template}"""')
        if config.system:
            modelfile.append(f'SYSTEM """{config.system}"""')
        modelfile += [f"PARAMETER {row}" for row in config.parameters_text().splitlines()]
        out = {"license": config.license or meta.get("general.license", ""), "modelfile": "\n".join(modelfile) + "\n",
               "parameters": config.parameters_text(), "template": template, "details": details(info),
               "model_info": model_info(info), "capabilities": capabilities,
               "modified_at": config.modified_at or info["modified_at"]}
        if config.system:
            out["system"] = config.system
        return out

    return web.json_response(await asyncio.get_running_loop().run_in_executor(None, collect))


ROUTES = [("POST", "/api/pull", api_pull), ("DELETE", "/api/delete", api_delete), ("POST", "/api/copy", api_copy),
          ("GET", "/api/tags", api_tags), ("POST", "/api/show", api_show)]

"""`mlxllm serve`: Ollama's and OpenAI's HTTP APIs over aiohttp, on the generation loop
the CLI uses (`mlxllm.generate.BatchGenerator`).

Top to bottom:
- `Engine` feeds one loaded model's jobs to its generation loop and hands each job its
  events; the `Worker` thread, the only one that runs MLX, ticks every engine: a prompt
  chunk and one token for every active job per tick (continuous batching, see
  `mlxllm.generate`);
- `ModelPool` loads models by name or path on demand and unloads each after keep_alive;
- routes (`/api/*` Ollama, `/v1/*` OpenAI) validate a request, build its prompt and hand a
  `Job` to the model's engine, then turn the engine's events into that API's shapes;
- embedding routes (`/api/embed`, `/api/embeddings`, `/v1/embeddings`, `/v1/rerank`) run
  `mlxllm.embeddings.embed_tokens` on the worker thread, many inputs per forward pass; an
  encoder (`Arch.kind == "encoder"`) gets no engine and refuses the generation routes.
Events flow back to the handlers through asyncio queues (`loop.call_soon_threadsafe`); a
handler whose client went away sets its job's cancel flag, which the engine checks between
steps, freeing the slot."""

from __future__ import annotations

import asyncio
import base64
import gc
import hashlib
import json
import logging
import os
import queue
import re
import signal
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import mlx.core as mx
import numpy as np
from aiohttp import web

from . import __version__
from .chat_template import ChatTemplateError, render_chat_template
from .constrain import ANY_OBJECT, Constraint, GrammarError, vocabulary_for
from .generate import BatchGenerator, GenerationRequest, PromptTooLong, batch_forms, encode_prompt
from .models import ModelNotFound, available, resolve
from .sample import SamplingParams

log = logging.getLogger("mlxllm.server")

DEFAULT_PORT = 11434  # Ollama's, so Ollama clients work without configuration
DEFAULT_KEEP_ALIVE = 300.0  # seconds a model stays loaded after its last request (Ollama: 5m)
DEFAULT_PARALLEL = 16  # jobs decoded together per model; more wait their turn
MAX_STOPS = 16
FINGERPRINT = f"fp_mlxllm_{__version__}"


# ---------------------------------------------------------------------------- the engine

@dataclass
class Job:
    """One generation request as the engine sees it."""

    prompt: list[int]
    params: SamplingParams
    max_tokens: int
    stop: list[str]
    emit: Callable[[tuple[str, Any]], None]  # called from the engine thread
    constraint: Constraint | None = None
    cancelled: bool = False  # set by the request handler; checked between steps


class Engine:
    """One loaded model's jobs on the generation loop (`mlxllm.generate.BatchGenerator`):
    each `tick()` admits waiting jobs, prefills one chunk of a prompt and decodes a token
    for every active job, then hands each job its events. Touched only from the worker
    thread."""

    def __init__(self, model, tokenizer, name: str = "", parallel: int = DEFAULT_PARALLEL,
                 prefix_cache_bytes: int = 512 << 20, **speculation: Any) -> None:
        self.name = name
        self.generator = BatchGenerator(model, tokenizer, parallel, prefix_cache_bytes=prefix_cache_bytes,
                                        **speculation)
        self.jobs: dict[int, Job] = {}

    @property
    def batched(self) -> bool:
        return self.generator.batched

    @property
    def prefixes(self):
        return self.generator.prefixes

    @property
    def busy(self) -> bool:
        return self.generator.busy

    @property
    def active(self) -> int:  # read from the event loop: a snapshot is all it needs
        return self.generator.active

    @property
    def queued(self) -> int:
        return self.generator.queued

    def submit(self, job: Job) -> None:
        try:
            uid = self.generator.insert(GenerationRequest(job.prompt, job.params, job.max_tokens, job.stop,
                                                          job.constraint))
        except Exception as e:  # noqa: BLE001  (this job's fault: it alone fails)
            job.emit(("error", f"generation failed: {type(e).__name__}: {e}"))
            return
        self.jobs[uid] = job

    def tick(self) -> None:
        """One step of the loop: a prompt chunk, one token for every active job."""
        gone = [uid for uid, job in self.jobs.items() if job.cancelled]
        for uid in gone:  # their clients went away: the slots are free for the next
            self.generator.cancel(uid)
            del self.jobs[uid]
        if gone:
            log.info("%s: %d cancelled job(s) freed their slots", self.name, len(gone))
        try:
            events = self.generator.step()
        except Exception as e:  # a bug or an MLX error: fail these jobs, keep serving
            log.exception("engine %s: step failed", self.name)
            events = self.generator.fail_all(f"generation failed: {type(e).__name__}: {e}")
        for event in events:
            self._deliver(event)

    def _deliver(self, event) -> None:
        job = self.jobs.get(event.uid)
        if job is None:
            return
        if event.error is not None:
            del self.jobs[event.uid]
            job.emit(("error", event.error))
            return
        if event.text:
            job.emit(("text", event.text))
        if event.finish_reason is not None:
            del self.jobs[event.uid]
            stats = event.stats
            job.emit(("done", {
                "finish_reason": event.finish_reason,
                "prompt_tokens": stats.prompt_tokens,
                "cached_tokens": stats.cached_tokens,
                "completion_tokens": stats.generation_tokens,
                "prompt_ns": stats.prompt_ns,
                "eval_ns": stats.eval_ns,
                "context": stats.context,
            }))

    def fail_all(self, message: str) -> None:
        for event in self.generator.fail_all(message):
            self._deliver(event)


class Worker:
    """The one thread that runs MLX: model loading, unloading and every engine's ticks.
    One thread because MLX work is not meant to be issued from several threads at once,
    and because the engines share the machine's compute and memory bandwidth anyway."""

    def __init__(self) -> None:
        self.engines: list[Engine] = []
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="mlxllm-worker", daemon=True)
        self._thread.start()

    def call(self, fn: Callable, *args: Any) -> asyncio.Future:
        """Run fn(*args) on the worker thread; the result arrives in the returned future."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()

        def deliver(result: Any, error: BaseException | None) -> None:
            if future.done():
                return
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)

        self._inbox.put(("call", fn, args, loop, deliver))
        return future

    def submit(self, engine: Engine, job: Job) -> None:
        self._inbox.put(("job", engine, job))

    def stop(self) -> None:
        self._inbox.put(None)
        self._thread.join()

    def _run(self) -> None:
        while True:
            busy = any(e.busy for e in self.engines)
            try:
                item = self._inbox.get_nowait() if busy else self._inbox.get()
                while True:
                    if item is None:
                        for engine in self.engines:
                            engine.fail_all("the server is shutting down")
                        # Let MLX finish what async_eval already queued: a stream thread still
                        # running at interpreter exit aborts the process ("terminate called").
                        mx.synchronize()
                        return
                    self._handle(item)
                    item = self._inbox.get_nowait()
            except queue.Empty:
                pass
            for engine in list(self.engines):
                engine.tick()

    def _handle(self, item: tuple) -> None:
        if item[0] == "job":
            _, engine, job = item
            if engine in self.engines:
                engine.submit(job)
            else:
                job.emit(("error", "the model was unloaded"))
            return
        _, fn, args, loop, deliver = item
        try:
            result, error = fn(*args), None
        except Exception as e:
            result, error = None, e
        loop.call_soon_threadsafe(deliver, result, error)


# ---------------------------------------------------------------------------- loaded models

@dataclass
class Loaded:
    name: str  # as first requested
    path: str
    model: Any
    tokenizer: Any
    engine: Engine | None  # None: an encoder, which only embeds
    load_ns: int
    digest: str
    users: int = 0
    keep_alive: float | None = DEFAULT_KEEP_ALIVE  # None: forever
    expires: float | None = None  # wall-clock deadline while idle
    vocabulary: Any = None  # constrain.Vocabulary, built on the first JSON request

    @property
    def context_length(self) -> int:
        return int(self.model.gguf.metadata.get("context_length", 4096))

    @property
    def nbytes(self) -> int:
        return self.model.load_stats.nbytes


class ApiError(Exception):
    """A request the server will not serve: status, message, and the field at fault."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def model_path(name: str) -> str:
    """The GGUF file a model name stands for; ApiError 404 when there is none."""
    try:
        path = resolve(name)
    except ModelNotFound as e:
        raise ApiError(404, str(e), "model", "model_not_found") from None
    if not os.path.isfile(path):
        raise ApiError(404, f"model {name!r} not found: no such file {path}", "model", "model_not_found")
    return os.path.realpath(path)


def file_digest(path: str) -> str:
    """A stable id for a model file without hashing gigabytes: path, size and mtime."""
    st = os.stat(path)
    return hashlib.sha256(f"{path}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()


class ModelPool:
    """Loaded models by file; each loads on first use and unloads keep_alive after its
    last request ends. All MLX work goes through the one `Worker` thread."""

    def __init__(self, keep_alive: float | None = DEFAULT_KEEP_ALIVE, parallel: int = DEFAULT_PARALLEL,
                 prefix_cache_bytes: int = 512 << 20, speculation: dict | None = None,
                 kv_bits: int | None = None) -> None:
        self.keep_alive = keep_alive
        self.kv_bits = kv_bits  # quantized KV caches (8 or 4 bits) for every model that has a batched form
        self.parallel = parallel
        self.prefix_cache_bytes = prefix_cache_bytes
        # {"draft": name or None, "prompt_lookup": bool, "draft_tokens": k}
        self.speculation = speculation or {}
        self._draft = None  # (path, model) of the draft model, loaded with the first model
        self.loaded: dict[str, Loaded] = {}
        self.worker = Worker()
        self._locks: dict[str, asyncio.Lock] = {}
        self._closed = False

    def _load(self, name: str, path: str) -> Loaded:  # on the worker thread
        from .loader import load

        start = time.perf_counter()
        model, tokenizer = load(path)
        if arch_kind(path) == "encoder":  # no generation loop: its requests are embeddings
            log.info("loaded %s (%s) in %.2f s; an embedding model", name, path, time.perf_counter() - start)
            return Loaded(name, path, model, tokenizer, None, int((time.perf_counter() - start) * 1e9),
                          file_digest(path))
        engine = Engine(model, tokenizer, name, self.parallel, self.prefix_cache_bytes,
                        kv_bits=self.kv_bits if batch_forms(model) else None, **self._speculation_for(model, path))
        self.worker.engines.append(engine)
        log.info("loaded %s (%s) in %.2f s; %s%s", name, path, time.perf_counter() - start,
                 "continuous batching" if engine.batched else "one forward per request per step (its "
                 "caches have no batched form)",
                 "; speculative decoding" if engine.generator.speculation is not None else "")
        return Loaded(name, path, model, tokenizer, engine, int((time.perf_counter() - start) * 1e9), file_digest(path))

    def _speculation_for(self, model, path: str) -> dict:  # on the worker thread
        """BatchGenerator's speculation keywords for a model: prompt lookup, or the draft
        model where its vocabulary is the model's (itself it does not draft for)."""
        spec = self.speculation
        if spec.get("prompt_lookup"):
            return {"prompt_lookup": True, "draft_tokens": spec["draft_tokens"]}
        if not spec.get("draft"):
            return {}
        from .loader import load

        if self._draft is None:
            draft_path = model_path(spec["draft"])
            self._draft = (draft_path, load(draft_path)[0])
        draft_path, draft = self._draft
        if draft_path == path or draft.args.vocab_size != model.args.vocab_size:
            log.info("%s: no speculative decoding (the draft model is this model or has another vocabulary)", path)
            return {}
        return {"draft_model": draft, "draft_tokens": spec["draft_tokens"]}

    def _unload(self, loaded: Loaded) -> None:  # on the worker thread
        engine = loaded.engine
        if engine is not None:
            engine.fail_all("the model was unloaded")
        mx.synchronize()  # queued async_evals still reference the weights
        if engine is not None:
            self.worker.engines.remove(engine)
        loaded.model = loaded.engine = loaded.vocabulary = None
        del engine
        gc.collect()
        mx.clear_cache()

    async def acquire(self, name: str, keep_alive: float | None | str = "default") -> tuple[Loaded, int]:
        """(the model, nanoseconds spent loading it for this request); held until release().
        keep_alive: seconds (None: forever) the model stays loaded once idle; "default": the
        server's."""
        path = await asyncio.get_running_loop().run_in_executor(None, model_path, name)
        async with self._locks.setdefault(path, asyncio.Lock()):
            loaded, load_ns = self.loaded.get(path), 0
            if loaded is None:
                try:
                    loaded = await self.worker.call(self._load, name, path)
                except Exception as e:
                    log.exception("loading %s failed", name)
                    raise ApiError(500, f"cannot load model {name!r}: {e}", "model") from None
                self.loaded[path] = loaded
                load_ns = loaded.load_ns
            loaded.users += 1
        loaded.expires = None
        loaded.keep_alive = self.keep_alive if keep_alive == "default" else keep_alive
        return loaded, load_ns

    def release(self, loaded: Loaded) -> None:
        loaded.users = max(loaded.users - 1, 0)
        if loaded.users == 0 and not self._closed:
            loaded.expires = None if loaded.keep_alive is None else time.time() + loaded.keep_alive
            if loaded.keep_alive is not None and loaded.keep_alive <= 0:
                asyncio.get_running_loop().create_task(self.unload(loaded))

    async def unload(self, loaded: Loaded) -> None:
        async with self._locks.setdefault(loaded.path, asyncio.Lock()):
            if loaded.users or self.loaded.get(loaded.path) is not loaded:
                return
            del self.loaded[loaded.path]
            await self.worker.call(self._unload, loaded)
        log.info("unloaded %s", loaded.name)

    async def reap_forever(self, every: float = 0.5) -> None:
        while True:
            await asyncio.sleep(every)
            now = time.time()
            for loaded in list(self.loaded.values()):
                if not loaded.users and loaded.expires is not None and loaded.expires <= now:
                    await self.unload(loaded)

    def find(self, name: str) -> Loaded | None:
        """The loaded model a name stands for, if it is loaded (never loads it)."""
        try:
            return self.loaded.get(model_path(name))
        except ApiError:
            return None

    async def close(self) -> None:
        """Fail whatever is still running, unload everything, stop the worker."""
        if self._closed:
            return
        self._closed = True
        for loaded in list(self.loaded.values()):
            loaded.users = 0
            await self.unload(loaded)
        await asyncio.get_running_loop().run_in_executor(None, self.worker.stop)


# ---------------------------------------------------------------------------- request fields

_KINDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "string": (lambda v: isinstance(v, str), "a string"),
    "bool": (lambda v: isinstance(v, bool), "a boolean"),
    "int": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    "number": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number"),
    "list": (lambda v: isinstance(v, list), "an array"),
    "object": (lambda v: isinstance(v, dict), "an object"),
}


def field_of(body: dict, key: str, kind: str, default: Any = None, where: str = "") -> Any:
    """body[key] checked against a JSON kind; null or absent gives the default."""
    value = body.get(key)
    if value is None:
        return default
    ok, name = _KINDS[kind]
    if not ok(value):
        raise ApiError(400, f"{where}{key} must be {name}, not {json.dumps(value)[:60]}", key)
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


# ---------------------------------------------------------------------------- prompts

_GO_IF = re.compile(r"\{\{(-?)\s*if\s+\.(\w+)\s*(-?)\}\}")
_GO_ELSE = re.compile(r"\{\{(-?)\s*else\s*(-?)\}\}")
_GO_END = re.compile(r"\{\{(-?)\s*end\s*(-?)\}\}")
_GO_VAR = re.compile(r"\{\{(-?)\s*\.(\w+)\s*(-?)\}\}")


def go_to_jinja(template: str) -> str:
    """Ollama's simplest Go templates (`{{ .System }}`, `{{ .Prompt }}`, `{{ if .X }}...
    {{ else }}...{{ end }}`) in Jinja, which renders the rest; anything else is Jinja."""
    template = _GO_IF.sub(lambda m: f"{{%{m[1]} if {m[2].lower()} {m[3]}%}}", template)
    template = _GO_ELSE.sub(lambda m: f"{{%{m[1]} else {m[2]}%}}", template)
    template = _GO_END.sub(lambda m: f"{{%{m[1]} endif {m[2]}%}}", template)
    return _GO_VAR.sub(lambda m: f"{{{{{m[1]} {m[2].lower()} {m[3]}}}}}", template)


def special_text(tokenizer, token_id: int | None) -> str:
    return tokenizer.token_to_bytes(token_id).decode("utf-8", "replace") if token_id is not None else ""


def render(tokenizer, messages: list[dict], template: str | None) -> str:
    """The prompt text: the model's chat template, or a request's own template."""
    try:
        if template is None:
            return tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        system = next((m["content"] for m in reversed(messages) if m["role"] == "system"), "")
        prompt = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
        return render_chat_template(go_to_jinja(template), messages, add_generation_prompt=True,
                                    system=system, prompt=prompt, response="",
                                    bos_token=special_text(tokenizer, tokenizer.bos_id),
                                    eos_token=special_text(tokenizer, tokenizer.eos_id))
    except ChatTemplateError as e:
        raise ApiError(400, str(e), "template") from None


# ---------------------------------------------------------------------------- one generation

@dataclass
class Request:
    """A generation request in API-neutral terms (the routes fill it in)."""

    model: str
    build: Callable[[Any, int], list[int]]  # (tokenizer, context) -> prompt ids (runs in a worker thread)
    params: SamplingParams
    max_tokens: int | None  # None: until the context is full
    num_ctx: int | None
    stop: list[str]
    schema: dict | None
    keep_alive: float | None | str = "default"
    started: float = field(default_factory=time.perf_counter)


class Run:
    """A submitted job seen from the event loop: its events, in order, then done."""

    def __init__(self, pool: ModelPool, loaded: Loaded, load_ns: int, request: Request) -> None:
        self.pool, self.loaded, self.load_ns, self.request = pool, loaded, load_ns, request
        self.queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self.job: Job | None = None
        self.finished = False
        self._released = False

    async def events(self) -> AsyncIterator[tuple[str, Any]]:
        """("text", str) pieces, then ("done", stats); an engine error raises ApiError 500."""
        while True:
            kind, value = await self.queue.get()
            if kind == "error":
                self.finished = True
                raise ApiError(500, value)
            if kind == "done":
                self.finished = True
                value["load_ns"] = self.load_ns
                value["total_ns"] = int((time.perf_counter() - self.request.started) * 1e9)
            yield kind, value
            if kind == "done":
                return

    def close(self) -> None:
        """The handler is done with it: a job still running is cancelled (its client went
        away) and the model is released to its keep_alive timer."""
        if self.job is not None and not self.finished:
            self.job.cancelled = True
        if not self._released:
            self._released = True
            self.pool.release(self.loaded)


def _prepare(loaded: Loaded, request: Request) -> tuple[list[int], int, Constraint | None]:
    """(prompt ids, max tokens, constraint), in a worker thread: tokenizing and compiling
    a grammar can take a while."""
    limit = loaded.context_length
    if request.max_tokens is not None and request.max_tokens > limit:
        raise ApiError(400, f"the token limit {request.max_tokens} is more than {loaded.name}'s context "
                            f"length {limit}", "max_tokens")
    num_ctx = min(request.num_ctx or limit, limit)
    try:
        ids = request.build(loaded.tokenizer, num_ctx)
    except PromptTooLong as e:
        raise ApiError(400, f"{e}; the context holds {num_ctx}", "messages", "context_length_exceeded") from None
    if not ids:
        raise ApiError(400, "the prompt is empty", "prompt")
    if len(ids) >= num_ctx:
        raise ApiError(400, f"the prompt is {len(ids)} tokens; the context holds {num_ctx}", "messages",
                       "context_length_exceeded")
    room = num_ctx - len(ids)
    max_tokens = room if request.max_tokens is None else min(request.max_tokens, room)
    constraint = None
    if request.schema is not None:
        vocab = vocabulary_for(loaded, loaded.tokenizer)
        try:
            constraint = vocab.constraint(vocab.json_grammar(request.schema))
        except GrammarError as e:
            raise ApiError(400, str(e), "format") from None
    return ids, max_tokens, constraint


async def start(app: web.Application, request: Request) -> Run:
    """Load the model, build the prompt and submit the job; the caller must close() the Run."""
    await refuse_embedding_model(request.model)
    pool: ModelPool = app["pool"]
    loaded, load_ns = await pool.acquire(request.model, request.keep_alive)
    run = Run(pool, loaded, load_ns, request)
    try:
        ids, max_tokens, constraint = await asyncio.get_running_loop().run_in_executor(
            None, _prepare, loaded, request)
        loop = asyncio.get_running_loop()

        def emit(event: tuple[str, Any]) -> None:  # on the worker thread
            try:
                loop.call_soon_threadsafe(run.queue.put_nowait, event)
            except RuntimeError:  # the event loop is closed: the server is stopping
                pass

        run.job = Job(ids, request.params, max_tokens, request.stop, emit, constraint)
        pool.worker.submit(loaded.engine, run.job)
    except BaseException:
        run.close()
        raise
    return run


# ---------------------------------------------------------------------------- HTTP plumbing

def is_openai(request: web.Request) -> bool:
    return request.path.startswith("/v1/") or request.path == "/v1"


def error_response(request: web.Request, status: int, message: str, param: str | None = None,
                   code: str | None = None) -> web.Response:
    """Each API's own error shape: OpenAI {"error": {message, type, param, code}},
    Ollama {"error": message}."""
    if is_openai(request):
        kind = "server_error" if status >= 500 else "invalid_request_error"
        body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    else:
        body = {"error": message}
    return web.json_response(body, status=status)


@web.middleware
async def errors_middleware(request: web.Request, handler):
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
        log.exception("%s %s failed", request.method, request.path)
        return error_response(request, 500, f"internal error: {type(e).__name__}: {e}")


async def json_body(request: web.Request) -> dict:
    raw = await request.read()  # over client_max_size: aiohttp raises 413
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"invalid JSON body: {e}") from None
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


# ---------------------------------------------------------------------------- Ollama API

OLLAMA_OPTIONS = {"num_ctx": "int", "num_predict": "int", "temperature": "number", "top_k": "int",
                  "top_p": "number", "min_p": "number", "repeat_penalty": "number", "repeat_last_n": "int",
                  "presence_penalty": "number", "frequency_penalty": "number", "seed": "int"}
SAMPLING_KEYS = set(SamplingParams.__dataclass_fields__)


def ollama_request(body: dict, model: str, build: Callable[[Any, int], list[int]]) -> Request:
    options = field_of(body, "options", "object", {})
    values = {k: field_of(options, k, kind, where="options.") for k, kind in OLLAMA_OPTIONS.items()}
    ignored = sorted(set(options) - set(OLLAMA_OPTIONS) - {"stop"})
    if ignored:
        log.info("ignoring options mlxllm does not use: %s", ", ".join(ignored))
    predict = values.pop("num_predict")
    if predict is not None and predict < 0 and predict not in (-1, -2):
        raise ApiError(400, f"options.num_predict must be positive, or -1 (no limit) or -2 (fill the context), "
                            f"not {predict}", "num_predict")
    if predict == 0:
        raise ApiError(400, "options.num_predict must not be 0", "num_predict")
    num_ctx = values.pop("num_ctx")
    if num_ctx is not None and num_ctx < 1:
        raise ApiError(400, "options.num_ctx must be positive", "num_ctx")
    params = sampling({k: v for k, v in values.items() if k in SAMPLING_KEYS})
    for key in ("images",):
        if body.get(key):
            raise ApiError(400, f"{model} does not support images", key)
    if body.get("think"):
        raise ApiError(400, f"{model!r} does not support thinking", "think")
    if body.get("tools"):
        raise ApiError(400, "tools are not supported by mlxllm yet", "tools")
    return Request(model=model, build=build, params=params,
                   max_tokens=predict if predict is not None and predict > 0 else None, num_ctx=num_ctx,
                   stop=stop_list(options.get("stop"), "options.stop"),
                   schema=json_schema_of(body.get("format"), "format"), keep_alive=keep_alive_of(body))


def ollama_final(model: str, stats: dict) -> dict:
    return {"model": model, "created_at": now_rfc3339(), "done": True, "done_reason": stats["finish_reason"],
            "total_duration": stats["total_ns"], "load_duration": stats["load_ns"],
            "prompt_eval_count": stats["prompt_tokens"], "prompt_eval_duration": stats["prompt_ns"],
            "eval_count": stats["completion_tokens"], "eval_duration": stats["eval_ns"]}


async def ollama_respond(request: web.Request, req: Request, stream: bool,
                         chunk: Callable[[str], dict], final: Callable[[str, dict], dict]) -> web.StreamResponse:
    """Run a generation and answer in Ollama's shape: NDJSON chunks, or one object."""
    run = await start(request.app, req)
    try:
        if not stream:
            text = []
            async for kind, value in run.events():
                if kind == "text":
                    text.append(value)
                else:
                    return web.json_response(final("".join(text), value))
        response = await ndjson_stream(request)
        try:
            async for kind, value in run.events():
                await response.write(line(chunk(value) if kind == "text" else final("", value)))
        except ApiError as e:  # headers are sent: the error goes in the stream
            await response.write(line({"error": e.message}))
        await response.write_eof()
        return response
    except ConnectionResetError:
        log.info("%s %s: client went away", request.method, request.path)
        return web.Response(status=499)
    finally:
        run.close()


async def ollama_load_only(request: web.Request, body: dict, model: str, shape: dict) -> web.Response:
    """Ollama's empty request: load the model (or, with keep_alive 0, unload it)."""
    pool: ModelPool = request.app["pool"]
    keep_alive = keep_alive_of(body)
    reason = "unload" if keep_alive == 0 else "load"
    loaded = await asyncio.get_running_loop().run_in_executor(None, pool.find, model)
    if reason == "unload" and loaded is None:  # nothing to unload: do not load it first
        await asyncio.get_running_loop().run_in_executor(None, model_path, model)  # 404 if unknown
    else:
        if reason == "load":  # unloading needs no capability (Ollama checks after it too)
            await refuse_embedding_model(model)
        loaded, _ = await pool.acquire(model, keep_alive)
        pool.release(loaded)
    return web.json_response({"model": model, "created_at": now_rfc3339(), **shape, "done": True, "done_reason": reason})


async def api_generate(request: web.Request) -> web.StreamResponse:
    body = await json_body(request)
    model = model_of(body)
    prompt = field_of(body, "prompt", "string", "")
    system = field_of(body, "system", "string")
    template = field_of(body, "template", "string")
    raw = field_of(body, "raw", "bool", False)
    stream = field_of(body, "stream", "bool", True)
    context = field_of(body, "context", "list", [])
    if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in context):
        raise ApiError(400, "context must be an array of token ids", "context")
    if field_of(body, "suffix", "string"):
        raise ApiError(400, f"{model!r} does not support insert (suffix)", "suffix")

    def build(tokenizer, limit: int) -> list[int]:
        if any(t >= tokenizer.vocab_size for t in context):
            raise ApiError(400, "context holds a token id outside the vocabulary", "context")
        if raw:
            text = prompt
        else:
            messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
            text = render(tokenizer, messages, template)
        return list(context) + encode_prompt(tokenizer, text, limit)

    req = ollama_request(body, model, build)
    if not prompt and not context:
        return await ollama_load_only(request, body, model, {"response": ""})

    def final(text: str, stats: dict) -> dict:
        return {**ollama_final(model, stats), "response": text, "context": stats["context"]}

    return await ollama_respond(request, req, stream,
                                lambda text: {"model": model, "created_at": now_rfc3339(), "response": text, "done": False},
                                final)


def ollama_messages(body: dict) -> list[dict]:
    messages = field_of(body, "messages", "list", [])
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ApiError(400, f"messages[{i}] must be an object", "messages")
        role = m.get("role")
        if role not in ("system", "user", "assistant", "tool"):
            raise ApiError(400, f"messages[{i}].role must be system, user, assistant or tool, not {json.dumps(role)}",
                           "messages")
        content = m.get("content") or ""
        if not isinstance(content, str):
            raise ApiError(400, f"messages[{i}].content must be a string", "messages")
        if m.get("images"):
            raise ApiError(400, "this model does not support images", "messages")
        out.append({"role": role, "content": content})
    return out


async def api_chat(request: web.Request) -> web.StreamResponse:
    body = await json_body(request)
    model = model_of(body)
    messages = ollama_messages(body)
    template = field_of(body, "template", "string")
    stream = field_of(body, "stream", "bool", True)
    req = ollama_request(body, model, lambda tokenizer, limit: encode_prompt(tokenizer, render(tokenizer, messages, template), limit))
    if not messages:
        return await ollama_load_only(request, body, model, {"message": {"role": "assistant", "content": ""}})

    def chunk(text: str) -> dict:
        return {"model": model, "created_at": now_rfc3339(), "message": {"role": "assistant", "content": text}, "done": False}

    def final(text: str, stats: dict) -> dict:
        return {**ollama_final(model, stats), "message": {"role": "assistant", "content": text}}

    return await ollama_respond(request, req, stream, chunk, final)


_SUMMARIES: dict[tuple[str, int], dict] = {}


def describe(path: str) -> dict:
    """The GGUF facts listings need (cached per file version): summary, metadata, template."""
    from .gguf import GGUFFile

    key = (path, os.stat(path).st_mtime_ns)
    if key not in _SUMMARIES:
        with GGUFFile(path) as gf:
            info = gf.summary()
            meta = dict(gf.metadata.items())
        info["metadata"] = meta
        info["modified_at"] = datetime.fromtimestamp(os.stat(path).st_mtime, timezone.utc).isoformat().replace("+00:00", "Z")
        info["digest"] = file_digest(path)
        _SUMMARIES[key] = info
    return _SUMMARIES[key]


def _human_count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(n)


def quantization_level(info: dict) -> str:
    import gguf

    ftype = info["metadata"].get("general.file_type")
    try:
        return gguf.LlamaFileType(ftype).name.removeprefix("MOSTLY_").removeprefix("ALL_")
    except ValueError:
        return next(iter(info["tensor_types"]), "unknown")


def details(info: dict) -> dict:
    arch = info["architecture"]
    return {"parent_model": "", "format": "gguf", "family": arch, "families": [arch],
            "parameter_size": _human_count(info["parameters"]), "quantization_level": quantization_level(info)}


def listed_models() -> list[tuple[str, str]]:
    """(name, path) of every model this server can load by name."""
    out = []
    for name in available():
        try:
            path = model_path(name)
        except ApiError:
            continue
        out.append((name, path))
    return out


async def api_tags(request: web.Request) -> web.Response:
    def collect() -> list[dict]:
        models = []
        for name, path in listed_models():
            info = describe(path)
            models.append({"name": name, "model": name, "modified_at": info["modified_at"], "size": info["file_size"],
                           "digest": info["digest"], "details": details(info)})
        return models

    return web.json_response({"models": await asyncio.get_running_loop().run_in_executor(None, collect)})


def model_info(info: dict) -> dict:
    """GGUF metadata for /api/show: scalars and short arrays (Ollama leaves out the
    vocabulary arrays too)."""
    out = {}
    for key, value in info["metadata"].items():
        if isinstance(value, (list, np.ndarray)) and len(value) > 64:
            continue
        out[key] = value.tolist() if isinstance(value, (np.ndarray, np.generic)) else value
    out["general.parameter_count"] = info["parameters"]
    return out


async def api_show(request: web.Request) -> web.Response:
    body = await json_body(request)
    name = field_of(body, "model", "string") or field_of(body, "name", "string")
    if not name:
        raise ApiError(400, "model is required", "model")

    def collect() -> dict:
        path = model_path(name)
        info = describe(path)
        meta = info["metadata"]
        template = meta.get("tokenizer.chat_template", "")
        # Ollama's capabilities: an encoder embeds; a decoder completes (and embeds too,
        # on /api/embed, as in Ollama, without saying so here)
        capabilities = ["embedding"] if arch_kind(path) == "encoder" else ["completion"]
        return {"license": meta.get("general.license", ""), "modelfile": f"# Modelfile generated by mlxllm\nFROM {path}\n",
                "parameters": "", "template": template, "details": details(info), "model_info": model_info(info),
                "capabilities": capabilities,
                "modified_at": info["modified_at"]}

    return web.json_response(await asyncio.get_running_loop().run_in_executor(None, collect))


def rfc3339(seconds: float | None) -> str:
    if seconds is None:  # loaded forever: Ollama shows a far-future time
        return "2318-01-01T00:00:00Z"
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat().replace("+00:00", "Z")


async def api_ps(request: web.Request) -> web.Response:
    pool: ModelPool = request.app["pool"]
    models = []
    for loaded in list(pool.loaded.values()):
        info = await asyncio.get_running_loop().run_in_executor(None, describe, loaded.path)
        expires = loaded.expires
        if expires is None and loaded.keep_alive is not None:  # in use: keep_alive after now at least
            expires = time.time() + loaded.keep_alive
        models.append({"name": loaded.name, "model": loaded.name, "size": loaded.nbytes, "digest": loaded.digest,
                       "details": details(info), "expires_at": rfc3339(expires),
                       "size_vram": 0 if mx.default_device() == mx.cpu else loaded.nbytes,
                       "context_length": loaded.context_length})
    return web.json_response({"models": models})


async def api_version(request: web.Request) -> web.Response:
    return web.json_response({"version": __version__})


# ---------------------------------------------------------------------------- OpenAI API

def openai_common(body: dict, model: str, build: Callable[[Any, int], list[int]], default_max: int | None) -> Request:
    n = field_of(body, "n", "int", 1)
    if n != 1:
        raise ApiError(400, "n must be 1: mlxllm returns one choice per request", "n")
    if body.get("logprobs") or body.get("top_logprobs"):
        raise ApiError(400, "logprobs are not supported by mlxllm yet", "logprobs")
    if body.get("tools"):
        raise ApiError(400, "tools are not supported by mlxllm yet", "tools")
    max_tokens = field_of(body, "max_completion_tokens", "int") or field_of(body, "max_tokens", "int")
    for key in ("max_completion_tokens", "max_tokens"):
        value = body.get(key)
        if value is not None and value < 1:
            raise ApiError(400, f"{key} must be at least 1, not {value}", key, "invalid_value")
    values = {k: field_of(body, k, "number") for k in ("temperature", "top_p", "presence_penalty", "frequency_penalty")}
    in_range(values["temperature"], "temperature", 0, 2)
    in_range(values["top_p"], "top_p", 0, 1)
    in_range(values["presence_penalty"], "presence_penalty", -2, 2)
    in_range(values["frequency_penalty"], "frequency_penalty", -2, 2)
    values["seed"] = field_of(body, "seed", "int")
    field_of(body, "stream", "bool")
    options = field_of(body, "stream_options", "object", {})
    field_of(options, "include_usage", "bool", where="stream_options.")
    return Request(model=model, build=build, params=sampling(values),
                   max_tokens=max_tokens if max_tokens is not None else default_max, num_ctx=None,
                   stop=stop_list(body.get("stop")), schema=response_schema(body.get("response_format")))


def response_schema(value: Any) -> dict | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ApiError(400, "response_format must be an object", "response_format")
    kind = value.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return ANY_OBJECT
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise ApiError(400, "response_format.json_schema must be an object with a schema object", "response_format")
        return spec.get("schema", {})
    raise ApiError(400, "response_format.type must be text, json_object or json_schema", "response_format")


def openai_messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty array", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ApiError(400, f"messages[{i}] must be an object", "messages")
        role = m.get("role")
        if role not in ("system", "developer", "user", "assistant", "tool"):
            raise ApiError(400, f"messages[{i}].role must be system, developer, user, assistant or tool, "
                                f"not {json.dumps(role)}", "messages")
        out.append({"role": "system" if role == "developer" else role, "content": message_text(m.get("content"), i)})
    return out


def message_text(content: Any, i: int) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ApiError(400, f"messages[{i}].content parts must be text parts: mlxllm has no image input",
                               "messages")
            parts.append(part["text"])
        return "".join(parts)
    raise ApiError(400, f"messages[{i}].content must be a string or an array of text parts", "messages")


def usage(stats: dict) -> dict:
    return {"prompt_tokens": stats["prompt_tokens"], "completion_tokens": stats["completion_tokens"],
            "total_tokens": stats["prompt_tokens"] + stats["completion_tokens"],
            "prompt_tokens_details": {"cached_tokens": stats["cached_tokens"]}}


async def openai_respond(request: web.Request, body: dict, req: Request, kind: str) -> web.StreamResponse:
    """Run a generation and answer as chat.completion(.chunk) or text_completion objects."""
    chat = kind == "chat"
    ident = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    created = int(time.time())
    head = {"id": ident, "object": "chat.completion" if chat else "text_completion", "created": created,
            "model": req.model, "system_fingerprint": FINGERPRINT}
    echo = body.get("prompt") if not chat and body.get("echo") and isinstance(body.get("prompt"), str) else ""

    def choice(text: str | None, finish: str | None, streaming: bool) -> dict:
        if not chat:
            return {"text": text or "", "index": 0, "logprobs": None, "finish_reason": finish}
        if streaming:
            delta = {"content": text} if text is not None else {}
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return {"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                "logprobs": None, "finish_reason": finish}

    run = await start(request.app, req)
    try:
        if not body.get("stream"):
            pieces = [echo]
            async for event, value in run.events():
                if event == "text":
                    pieces.append(value)
                else:
                    return web.json_response({**head, "choices": [choice("".join(pieces), value["finish_reason"], False)],
                                              "usage": usage(value)})
        chunk_head = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        response = await sse_stream(request)
        try:
            if chat:
                first = choice("", None, True)
                first["delta"] = {"role": "assistant", "content": ""}
                await response.write(sse({**chunk_head, "choices": [first]}))
            elif echo:
                await response.write(sse({**chunk_head, "choices": [choice(echo, None, True)]}))
            async for event, value in run.events():
                if event == "text":
                    await response.write(sse({**chunk_head, "choices": [choice(value, None, True)]}))
                    continue
                await response.write(sse({**chunk_head, "choices": [choice(None, value["finish_reason"], True)]}))
                if include_usage:
                    await response.write(sse({**chunk_head, "choices": [], "usage": usage(value)}))
        except ApiError as e:
            await response.write(sse({"error": {"message": e.message, "type": "server_error", "param": None, "code": None}}))
        await response.write(sse("[DONE]"))
        await response.write_eof()
        return response
    except ConnectionResetError:
        log.info("%s %s: client went away", request.method, request.path)
        return web.Response(status=499)
    finally:
        run.close()


async def v1_chat_completions(request: web.Request) -> web.StreamResponse:
    body = await json_body(request)
    model = model_of(body)
    messages = openai_messages(body)
    req = openai_common(body, model, lambda tokenizer, limit: encode_prompt(tokenizer, render(tokenizer, messages, None), limit), None)
    return await openai_respond(request, body, req, "chat")


def completion_prompt(value: Any) -> str | list[int]:
    """OpenAI's prompt: a string or token ids, alone or as a one-element array."""
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], (str, list)):
        value = value[0]
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value):
        return value
    raise ApiError(400, "prompt must be a non-empty string or array of token ids (one prompt per request)", "prompt")


async def v1_completions(request: web.Request) -> web.StreamResponse:
    body = await json_body(request)
    model = model_of(body)
    prompt = completion_prompt(body.get("prompt"))
    if body.get("suffix"):
        raise ApiError(400, "suffix is not supported by mlxllm", "suffix")
    if field_of(body, "best_of", "int", 1) != 1:
        raise ApiError(400, "best_of must be 1", "best_of")
    field_of(body, "echo", "bool")

    def build(tokenizer, limit: int) -> list[int]:
        if isinstance(prompt, str):
            return encode_prompt(tokenizer, prompt, limit)
        if max(prompt) >= tokenizer.vocab_size:
            raise ApiError(400, "prompt holds a token id outside the vocabulary", "prompt")
        return list(prompt)

    req = openai_common(body, model, build, 16)  # OpenAI's default max_tokens for completions
    return await openai_respond(request, body, req, "completion")


async def v1_models(request: web.Request) -> web.Response:
    def collect() -> list[dict]:
        return [{"id": name, "object": "model", "created": int(os.stat(path).st_mtime), "owned_by": "mlxllm"}
                for name, path in listed_models()]

    return web.json_response({"object": "list", "data": await asyncio.get_running_loop().run_in_executor(None, collect)})


async def v1_model(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    path = await asyncio.get_running_loop().run_in_executor(None, model_path, name)
    return web.json_response({"id": name, "object": "model", "created": int(os.stat(path).st_mtime), "owned_by": "mlxllm"})


# ---------------------------------------------------------------------------- embeddings

MAX_EMBED_INPUTS = 2048  # inputs per OpenAI embeddings request (OpenAI's own limit)


def arch_kind(path: str) -> str:
    """The file's architecture as the registry declares it: "decoder" or "encoder" (an
    architecture the registry does not know counts as a decoder: loading says why)."""
    from .registry import ArchError, get_arch

    try:
        return get_arch(describe(path)["architecture"]).kind
    except ArchError:
        return "decoder"


async def refuse_embedding_model(name: str) -> None:
    """Generation routes on an encoder: a 400 that says what the model is for."""
    loop = asyncio.get_running_loop()
    path = await loop.run_in_executor(None, model_path, name)
    if await loop.run_in_executor(None, arch_kind, path) == "encoder":
        raise ApiError(400, f"{name!r} is an embedding model: it does not generate text "
                            "(use /api/embed or /v1/embeddings)", "model", "model_not_supported")


def gives_hidden_states(model) -> bool:
    """What `mlxllm.embeddings.hidden_states` can run: an encoder, or a decoder built on the
    plain `Decoder` forward pass (blocks and final norm without the output projection)."""
    from .nn.decoder import Decoder
    from .nn.encoder import Encoder

    return isinstance(model, Encoder) or (isinstance(model, Decoder) and type(model).__call__ is Decoder.__call__)


def has_classifier(model) -> bool:
    from .nn.encoder import CLS, Encoder

    return isinstance(model, Encoder) and CLS in model


def embedding_width(model) -> int:
    """Floats per pooled vector: the hidden size."""
    return int(model.args.dim)


async def embed_on_worker(worker: Worker, model, token_lists: list[list[int]], pooling: str | None,
                          normalize: bool) -> list[list[float]]:
    """`mlxllm.embeddings.embed_tokens` on the worker thread, one call per forward pass's
    worth of texts (sorted by length, about BATCH_TOKENS padded tokens each), so other
    models' generation steps run between them and a client that leaves stops the rest."""
    from .embeddings import BATCH_TOKENS, embed_tokens

    order = sorted(range(len(token_lists)), key=lambda i: len(token_lists[i]))
    out: list = [None] * len(token_lists)
    start = 0
    while start < len(order):
        end = start + 1
        while end < len(order) and len(token_lists[order[end]]) * (end - start + 1) <= BATCH_TOKENS:
            end += 1
        rows = order[start:end]
        vectors = await worker.call(embed_tokens, model, [token_lists[i] for i in rows], pooling, normalize)
        for i, vector in zip(rows, vectors):
            out[i] = vector
        start = end
    return out


def tokenize_texts(tokenizer, texts: list[str], limit: int, truncate: bool, param: str) -> list[list[int]]:
    """Each text's tokens (with the file's special tokens); ApiError 400 for one with none,
    or past `limit` tokens when not truncating."""
    from .embeddings import tokenize

    try:
        return tokenize(tokenizer, texts, limit, truncate)
    except ValueError as e:
        code = "context_length_exceeded" if "past the context" in str(e) else None
        raise ApiError(400, f"{param}: {e}", param, code) from None


def check_token_lists(token_lists: list[list[int]], vocab_size: int, limit: int, param: str) -> None:
    for i, ids in enumerate(token_lists):
        if not ids:
            raise ApiError(400, f"{param}[{i}] has no tokens", param)
        if max(ids) >= vocab_size:
            raise ApiError(400, f"{param}[{i}] holds a token id outside the vocabulary of {vocab_size}", param)
        if len(ids) > limit:
            raise ApiError(400, f"{param}[{i}] has {len(ids)} tokens, past the context of {limit}", param,
                           "context_length_exceeded")


@dataclass
class Embedded:
    vectors: list[list[float]]
    tokens: int  # tokens evaluated, all inputs together
    load_ns: int
    total_ns: int


async def run_embeddings(app: web.Application, name: str, inputs: list[str] | list[list[int]], *,
                         keep_alive: float | None | str = "default", pooling: str | None = None,
                         normalize: bool = True, truncate: bool = True, num_ctx: int | None = None,
                         param: str = "input") -> Embedded:
    """Load the model, tokenize the inputs (strings, or lists of token ids taken as they
    are) and pool their hidden states on the worker thread, all inputs batched."""
    started = time.perf_counter()
    pool: ModelPool = app["pool"]
    loaded, load_ns = await pool.acquire(name, keep_alive)
    try:
        model = loaded.model
        if not gives_hidden_states(model):
            raise ApiError(400, f"{name!r} does not support embeddings ({type(model).__name__} gives no hidden "
                                "states)", "model")
        if pooling == "rank" and not has_classifier(model):
            raise ApiError(400, f"{name!r} has no classifier head to rerank with: it is not a reranker", "model")
        limit = model.args.context_length
        limit = min(num_ctx, limit) if num_ctx else limit
        if inputs and isinstance(inputs[0], str):
            token_lists = await asyncio.get_running_loop().run_in_executor(
                None, tokenize_texts, loaded.tokenizer, inputs, limit, truncate, param)
        else:
            token_lists = [list(ids) for ids in inputs]
            check_token_lists(token_lists, model.args.vocab_size, limit, param)
        vectors = await embed_on_worker(pool.worker, model, token_lists, pooling, normalize) if token_lists else []
    finally:
        pool.release(loaded)
    return Embedded(vectors, sum(map(len, token_lists)), load_ns, int((time.perf_counter() - started) * 1e9))


def ollama_embed_options(body: dict) -> int | None:
    """num_ctx from Ollama's options (the others are sampling options: nothing to embed)."""
    options = field_of(body, "options", "object", {})
    num_ctx = field_of(options, "num_ctx", "int", where="options.")
    if num_ctx is not None and num_ctx < 1:
        raise ApiError(400, "options.num_ctx must be positive", "num_ctx")
    return num_ctx


def shorten(vector: list[float], dimensions: int) -> list[float]:
    """Ollama's `dimensions`: the first `dimensions` floats, L2-normalized again."""
    head = np.asarray(vector[:dimensions], np.float32)
    return (head / max(float(np.linalg.norm(head)), 1e-12)).tolist()


async def api_embed(request: web.Request) -> web.Response:
    """Ollama's /api/embed: L2-normalized vectors, one per input, the inputs batched; an
    empty string (or no input) only loads the model, as in Ollama."""
    body = await json_body(request)
    model = model_of(body)
    inputs = body.get("input")
    if inputs is None or inputs == "":
        texts = []
    elif isinstance(inputs, str):
        texts = [inputs]
    elif isinstance(inputs, list) and all(isinstance(s, str) for s in inputs):
        if not inputs:
            raise ApiError(400, "input is an empty array: give a string or an array of strings", "input")
        texts = inputs
    else:
        raise ApiError(400, "invalid input type: input must be a string or an array of strings", "input")
    truncate = field_of(body, "truncate", "bool", True)
    dimensions = field_of(body, "dimensions", "int")
    if dimensions is not None and dimensions < 1:
        raise ApiError(400, f"dimensions must be a positive integer, not {dimensions}", "dimensions")
    num_ctx = ollama_embed_options(body)
    done = await run_embeddings(request.app, model, texts, keep_alive=keep_alive_of(body), truncate=truncate,
                                num_ctx=num_ctx)
    vectors = done.vectors
    if dimensions is not None:
        vectors = [shorten(v, dimensions) if dimensions < len(v) else v for v in vectors]
    return web.json_response({"model": model, "embeddings": vectors, "total_duration": done.total_ns,
                              "load_duration": done.load_ns, "prompt_eval_count": done.tokens})


async def api_embeddings(request: web.Request) -> web.Response:
    """Ollama's legacy /api/embeddings: one prompt, its pooled vector as the model gives it
    (not normalized, as in Ollama); an empty prompt only loads the model."""
    body = await json_body(request)
    model = model_of(body)
    prompt = field_of(body, "prompt", "string", "")
    num_ctx = ollama_embed_options(body)
    done = await run_embeddings(request.app, model, [prompt] if prompt else [], keep_alive=keep_alive_of(body),
                                normalize=False, num_ctx=num_ctx, param="prompt")
    return web.json_response({"embedding": done.vectors[0] if done.vectors else []})


def _is_token_ids(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(
        isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value)


def openai_embedding_inputs(value: Any) -> list[str] | list[list[int]]:
    """OpenAI's input: a string, an array of strings, an array of token ids, or an array of
    such arrays; none of them empty, at most MAX_EMBED_INPUTS."""
    if isinstance(value, str) or _is_token_ids(value):  # one input
        value = [value]
    if not isinstance(value, list) or not value:
        raise ApiError(400, "input must be a non-empty string, array of strings, array of token ids or array of "
                            "token id arrays", "input")
    if len(value) > MAX_EMBED_INPUTS:
        raise ApiError(400, f"input has {len(value)} entries; at most {MAX_EMBED_INPUTS} are allowed", "input")
    if all(isinstance(v, str) for v in value):
        for i, v in enumerate(value):
            if not v:
                raise ApiError(400, f"input[{i}] is an empty string", "input")
        return value
    if all(_is_token_ids(v) for v in value):
        return value
    raise ApiError(400, "input must be a non-empty string, array of strings, array of token ids or array of "
                        "token id arrays (each non-empty, not mixed)", "input")


async def v1_embeddings(request: web.Request) -> web.Response:
    """OpenAI's /v1/embeddings: L2-normalized vectors as floats or base64 (little-endian
    float32), the inputs batched; a text past the context is refused, as OpenAI does."""
    body = await json_body(request)
    model = model_of(body)
    inputs = openai_embedding_inputs(body.get("input"))
    encoding = field_of(body, "encoding_format", "string", "float")
    if encoding not in ("float", "base64"):
        raise ApiError(400, f"encoding_format must be float or base64, not {encoding!r}", "encoding_format")
    dimensions = field_of(body, "dimensions", "int")
    if dimensions is not None and dimensions < 1:
        raise ApiError(400, f"dimensions must be at least 1, not {dimensions}", "dimensions", "invalid_value")
    field_of(body, "user", "string")
    if dimensions is not None:
        # Only a model trained for shorter vectors (Matryoshka) can give them, and a GGUF
        # file does not say whether it was; its own width is the one size it can give.
        loaded, _ = await request.app["pool"].acquire(model)
        width = embedding_width(loaded.model)
        request.app["pool"].release(loaded)
        if dimensions != width:
            raise ApiError(400, f"{model!r} does not support specifying dimensions: its vectors have {width}",
                           "dimensions", "invalid_value")
    done = await run_embeddings(request.app, model, inputs, truncate=False)

    def encoded(vector: list[float]) -> list[float] | str:
        if encoding == "float":
            return vector
        return base64.b64encode(np.asarray(vector, "<f4").tobytes()).decode("ascii")

    return web.json_response({
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": encoded(v)} for i, v in enumerate(done.vectors)],
        "model": model,
        "usage": {"prompt_tokens": done.tokens, "total_tokens": done.tokens},
    })


def rerank_tokens(tokenizer, template: str | None, query: str, document: str) -> list[int]:
    """A query and a document as one cross-encoder input, as llama-server's
    format_prompt_rerank joins them: the file's rerank template (tokenizer.chat_template.rerank)
    with {query} and {document} filled in, else BOS? query EOS? SEP? document EOS? per the
    vocabulary's add_bos / add_eos / add_sep (EOS falling back to SEP)."""
    if template is not None:
        text = template.replace("{query}", query).replace("{document}", document)
        return tokenizer.encode(text, add_special=False, parse_special=True)
    eos = tokenizer.eos_id if tokenizer.eos_id is not None else tokenizer.sep_id
    ids = [tokenizer.bos_id] if tokenizer.add_bos else []
    ids += tokenizer.encode(query, add_special=False)
    ids += [eos] if tokenizer.add_eos else []
    ids += [tokenizer.sep_id] if tokenizer.add_sep else []
    ids += tokenizer.encode(document, add_special=False)
    ids += [eos] if tokenizer.add_eos else []
    return ids


RERANK_TEMPLATE = "tokenizer.chat_template.rerank"


async def v1_rerank(request: web.Request) -> web.Response:
    """llama-server's /v1/rerank: {query, documents, top_n} -> results {index,
    relevance_score} best first; the score is the classifier's first output, as llama.cpp
    reports it (a logit: no sigmoid). Only for files with a classifier head."""
    body = await json_body(request)
    model = model_of(body)
    query = body.get("query")
    if not isinstance(query, str):
        raise ApiError(400, "query must be a string" if "query" in body else "query must be provided", "query")
    documents = body.get("documents")
    if not isinstance(documents, list) or not documents or not all(isinstance(d, str) for d in documents):
        raise ApiError(400, "documents must be a non-empty array of strings", "documents")
    top_n = field_of(body, "top_n", "int", len(documents))
    if top_n < 0:
        raise ApiError(400, f"top_n must not be negative, not {top_n}", "top_n")
    pool: ModelPool = request.app["pool"]
    loaded, _ = await pool.acquire(model, "default")
    try:
        template = loaded.model.gguf.metadata.get(RERANK_TEMPLATE)
        token_lists = await asyncio.get_running_loop().run_in_executor(
            None, lambda: [rerank_tokens(loaded.tokenizer, template, query, d) for d in documents])
        done = await run_embeddings(request.app, model, token_lists, pooling="rank", normalize=False,
                                    param="documents")
    finally:
        pool.release(loaded)
    scores = [v[0] for v in done.vectors]
    order = sorted(range(len(documents)), key=lambda i: -scores[i])[:top_n]
    return web.json_response({
        "model": model, "object": "list", "usage": {"prompt_tokens": done.tokens, "total_tokens": done.tokens},
        "results": [{"index": i, "relevance_score": scores[i]} for i in order],
    })


# ---------------------------------------------------------------------------- app and serve

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
    app.router.add_post("/api/generate", api_generate)
    app.router.add_post("/api/chat", api_chat)
    app.router.add_get("/api/tags", api_tags)
    app.router.add_post("/api/show", api_show)
    app.router.add_get("/api/ps", api_ps)
    app.router.add_get("/api/version", api_version)
    app.router.add_post("/api/embed", api_embed)
    app.router.add_post("/api/embeddings", api_embeddings)
    app.router.add_post("/v1/embeddings", v1_embeddings)
    app.router.add_post("/v1/rerank", v1_rerank)
    app.router.add_post("/v1/chat/completions", v1_chat_completions)
    app.router.add_post("/v1/completions", v1_completions)
    app.router.add_get("/v1/models", v1_models)
    app.router.add_get("/v1/models/{name:.+}", v1_model)

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

"""Loaded models: `ModelPool` loads a model by name on demand, on the worker thread,
and unloads it keep_alive after its last request; names resolve to files here."""

from __future__ import annotations

import asyncio
import gc
import hashlib
import logging
import os
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import mlx.core as mx

from ..generate import batch_forms
from ..models import ModelConfig, ModelNotFound, catalog, lookup
from .common import ApiError
from .engine import DEFAULT_PARALLEL, Engine, Worker

log = logging.getLogger("mlxllm.server")
DEFAULT_KEEP_ALIVE = 300.0  # seconds a model stays loaded after its last request (Ollama: 5m)


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
    context_cap: int | None = None  # serve --ctx-size: the most context a request gets

    @property
    def context_length(self) -> int:
        """The context a request may fill, prompt and answer together: the model's own, or
        the server's cap where that is less."""
        own = int(self.model.gguf.metadata.get("context_length", 4096))
        return own if self.context_cap is None else min(own, self.context_cap)

    @property
    def nbytes(self) -> int:
        return self.model.load_stats.nbytes


class ServedNames:
    """What a request's model may name (issue 19: names, not paths, over HTTP): the models
    folder, the folders the operator named at start (`serve --models-dir`), the stores,
    model packages, and the names the operator gave on the command line (`--preload`,
    `--draft`, which may be paths). A request's name is compared with these; it never
    becomes a path of its own."""

    def __init__(self, folders: tuple[str, ...] = (), operator_names: tuple[str, ...] = ()) -> None:
        self.folders = tuple(os.path.realpath(f) for f in folders)
        self.operator: dict[str, ModelConfig] = {}
        for name in operator_names:
            try:  # an unknown one is reported where it is used (serve's preload check)
                self.operator[name] = lookup(name, paths=True, folders=self.folders)
            except ModelNotFound:
                continue

    def config(self, name: str) -> ModelConfig:
        if name in self.operator:
            return self.operator[name]
        return lookup(name, paths=False, folders=self.folders)

    def catalog(self) -> list[ModelConfig]:
        configs = catalog(self.folders)
        names = {c.name for c in configs}
        return configs + [c for name, c in self.operator.items() if c.name not in names and name not in names]


SERVED = ServedNames()  # one server per process: serve() configures it at start


def serve_names(folders: tuple[str, ...] = (), operator_names: tuple[str, ...] = ()) -> ServedNames:
    """Set what this process's server answers to (before its first request)."""
    global SERVED
    SERVED = ServedNames(folders, tuple(n for n in operator_names if n))
    return SERVED


def model_config(name: str) -> ModelConfig:
    """The served model a name stands for; ApiError 404 when there is none."""
    if not isinstance(name, str) or not name or len(name) > 512 or "\0" in name:
        raise ApiError(404, "model not found: invalid name", "model", "model_not_found")
    try:
        config = SERVED.config(name)
    except ModelNotFound as e:
        # the command line's message names the models folder: a client learns no server path
        message = (f"model {name[:200]!r} not found (GET /api/tags lists the models; POST /api/pull fetches one)"
                   if str(e).startswith("unknown model") else str(e))
        raise ApiError(404, message, "model", "model_not_found") from None
    if not os.path.isfile(config.path):
        raise ApiError(404, f"model {name!r} not found: its file is missing", "model", "model_not_found")
    return config


def model_path(name: str) -> str:
    """The GGUF file a model name stands for; ApiError 404 when there is none."""
    return os.path.realpath(model_config(name).path)


NO_DEFAULTS = ModelConfig("", "", "none")


async def model_defaults(name: str) -> ModelConfig:
    """What a pulled model's manifest sets for its requests (template, system prompt,
    parameters); NO_DEFAULTS for an unknown name, whose 404 comes when it is loaded."""
    try:
        return await asyncio.get_running_loop().run_in_executor(None, model_config, name)
    except ApiError:
        return NO_DEFAULTS


def file_digest(path: str) -> str:
    """A stable id for a model file without hashing gigabytes: path, size and mtime."""
    st = os.stat(path)
    return hashlib.sha256(f"{path}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()


_SUMMARIES: dict[tuple[str, int], dict] = {}


def describe(path: str) -> dict:
    """The GGUF facts listings need (cached per file version): summary, metadata, template."""
    from ..gguf import GGUFFile

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


def listed_models() -> list[tuple[str, str]]:
    """(name, path) of every model this server can load by name."""
    return [(c.name, os.path.realpath(c.path)) for c in SERVED.catalog() if os.path.isfile(c.path)]


def arch_kind(path: str) -> str:
    """The file's architecture as the registry declares it: "decoder" or "encoder" (an
    architecture the registry does not know counts as a decoder: loading says why)."""
    from ..registry import ArchError, get_arch

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


class ModelPool:
    """Loaded models by file; each loads on first use and unloads keep_alive after its
    last request ends. All MLX work goes through the one `Worker` thread."""

    def __init__(self, keep_alive: float | None = DEFAULT_KEEP_ALIVE, parallel: int = DEFAULT_PARALLEL,
                 prefix_cache_bytes: int = 512 << 20, speculation: dict | None = None,
                 kv_bits: int | None = None, context_cap: int | None = None) -> None:
        self.keep_alive = keep_alive
        self.context_cap = context_cap  # serve --ctx-size
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
        from ..loader import load

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
        from ..loader import load

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
                loaded.context_cap = self.context_cap
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

"""The engine: `Engine` feeds one loaded model's jobs to its generation loop
(`mlxllm.generate.BatchGenerator`) and hands each job its events; the `Worker` thread, the
only one that runs MLX, ticks every engine: a prompt chunk and one token for every active
job per tick (continuous batching, see `mlxllm.generate`)."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import mlx.core as mx

from ..constrain import Constraint
from ..generate import BatchGenerator, GenerationRequest
from ..sample import SamplingParams

log = logging.getLogger("mlxllm.server")
DEFAULT_PARALLEL = 16  # jobs decoded together per model; more wait their turn


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
    logprobs: int | None = None  # None: not wanted; k: each token's logprob and k alternatives
    reasoning_budget: tuple[int, list[int]] | None = None  # (tokens, close ids): see GenerationRequest


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
                                                          job.constraint, job.logprobs, job.reasoning_budget))
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
            if self.generator.lockstep is not None:  # other ranks are midway through this step: the
                self.generator.lockstep.fatal(f"a step failed: {type(e).__name__}: {e}")  # pipeline ends
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
        if event.logprob is not None and event.token not in self.generator.tokenizer.eos_ids:
            job.emit(("logprobs", self._logprobs_entry(event)))
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

    def _token(self, token: int) -> dict:
        piece = self.generator.tokenizer.token_to_bytes(token)
        return {"token": piece.decode("utf-8", "replace"), "bytes": list(piece), "id": token}

    def _logprobs_entry(self, event) -> dict:
        """A token's logprobs as OpenAI's chat API shows them (plus ids)."""
        return {**self._token(event.token), "logprob": event.logprob,
                "top_logprobs": [{**self._token(t), "logprob": lp} for t, lp in event.top_logprobs or ()]}

    def fail_all(self, message: str) -> None:
        for event in self.generator.fail_all(message):
            self._deliver(event)


class Worker:
    """The one thread that runs MLX: model loading, unloading and every engine's ticks.
    One thread because MLX work is not meant to be issued from several threads at once,
    and because the engines share the machine's compute and memory bandwidth anyway."""

    def __init__(self) -> None:
        self.engines: list[Engine] = []
        # Seconds between ticks while no engine is busy (None: none): a pipeline's heartbeat,
        # its empty steps telling the other ranks rank 0 is alive and finding a lost rank.
        self.idle_tick: float | None = None
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
                item = self._inbox.get_nowait() if busy else self._inbox.get(timeout=self.idle_tick)
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
        except Exception as e:  # noqa: BLE001  (the caller's future gets it)
            result, error = None, e
        loop.call_soon_threadsafe(deliver, result, error)

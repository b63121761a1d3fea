"""Pipeline-parallel inference across processes or machines, on MLX's own distributed engine.

    mlx.launch -n 2 --backend ring "$(command -v mlxllm)" run MODEL PROMPT
    mlx.launch --hostfile hosts.json --backend ring "$(command -v mlxllm)" run MODEL PROMPT
    mlx.launch -n 2 --backend ring "$(command -v mlxllm)" serve --preload MODEL

Every rank runs the same generation loop (`mlxllm.generate`) on a `PipelineModel`: rank r
builds and loads only its contiguous range of the decoder's layers (its memory is its
share of the weights), rank 0 also the token embedding, the last rank the final norm and
the output head. A forward pass runs the stages in turn: hidden states go from rank r to
r + 1 with `send` / `recv`, and the last rank's logits go back around the ring to every
rank, so that every rank samples the same token from the same logits (the random seed is
shared) and their loops stay in lockstep: the same steps, the same caches, the same stops.
Each rank keeps caches for its own layers only.

Layers are split by memory: the bytes of each layer's tensors in the file, the embedding
counted on rank 0 and the head on the last rank (a tied head is the embedding: both end
ranks hold it), so that the largest stage is as small as it can be. MLXLLM_PIPELINE_SPLIT
(e.g. "10,20": layers per rank, in rank order) overrides it.

Every model on the shared decoder stack (`nn.Decoder` and its subclasses that keep its
forward pass) can be split; one with a forward pass of its own (Mamba, the encoders) is
refused.

Serving (`mlxllm serve` under mlx.launch): rank 0 answers HTTP and runs the server's
engine, whose generation loop (`mlxllm.generate.BatchGenerator`) every other rank runs too,
driven by rank 0 through a `Lockstep`: at the start of each step rank 0 sends what joined
(request id, prompt ids) and left (cancellations), and after each read of sampled tokens
each row's token and whether it finished; the followers take the same steps on the same
rows with those decisions, so their caches hold the same rows in the same order, and need
no tokenizer, sampler, grammar or HTTP. Only rank 0 samples: the last rank's logits go to
it alone. While idle, rank 0 runs an empty step every quarter of the timeout (a heartbeat):
a lost rank is found within the timeout even without requests. SIGTERM or SIGINT on rank 0
stops the server; rank 0 then sends a stop, and the others exit with status 0.

Failure: each forward pass runs under a watchdog. A rank that dies makes its neighbours'
transfers fail at once; one that stalls makes them wait past MLXLLM_PIPELINE_TIMEOUT
seconds (default 120; MLXLLM_PIPELINE_LOAD_TIMEOUT, default 1800, while the ranks load).
Either way every rank still running writes one `error:` line to stderr and exits with
status 1: a pipeline with a stage missing cannot go on, and none waits forever. (mlx.launch
itself exits 0 whatever its ranks did; it also ends the other ranks once one exits with
an error.) When serving, rank 0 first ends every request in flight with that error (each API
answers it in its own error shape) and exits a moment later, once the answers are out.
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass

import mlx.core as mx
from mlx import nn

from .gguf import GGUFFile
from .nn.decoder import Decoder

SPLIT_ENV = "MLXLLM_PIPELINE_SPLIT"
TIMEOUT_ENV = "MLXLLM_PIPELINE_TIMEOUT"
LOAD_TIMEOUT_ENV = "MLXLLM_PIPELINE_LOAD_TIMEOUT"
STEP_TIMEOUT = 120.0  # seconds one forward pass may wait on the other ranks
LOAD_TIMEOUT = 1800.0  # ... and the ranks on each other while they load

# Variables the launchers set for the processes they start (ring and JACCL: MLX_RANK;
# NCCL: MLX_WORLD_SIZE; MPI: its own). Without them there is no group to join.
LAUNCH_ENV = ("MLX_RANK", "MLX_WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")

# Hidden states and logits travel in the dtype the sender computes them in; the receiver
# learns it once, at start, as one of these codes.
DTYPES = (mx.float32, mx.float16, mx.bfloat16)


class PipelineError(ValueError):
    """The ranks disagree on what they run (a different file, split or model): a setup
    mistake, told in one line (the command line prints it as an error)."""


def launched() -> bool:
    """Whether a launcher (mlx.launch, mpirun) started this process as one of several."""
    return any(name in os.environ for name in LAUNCH_ENV)


def init_group() -> mx.distributed.Group | None:
    """The distributed group this process belongs to, when it has more than one rank."""
    if not launched():
        return None
    group = mx.distributed.init()
    return group if group.size() > 1 else None


class _ErrorsOnly(io.TextIOBase):
    """A rank's stderr that passes on only its `error:` lines, marked with the rank: the
    notes and statistics every rank would repeat come from rank 0 alone."""

    def __init__(self, stream, rank: int) -> None:
        self.stream, self.rank, self.pending = stream, rank, ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            if line.startswith("error"):
                self.stream.write(f"error: rank {self.rank}: {line.removeprefix('error:').strip()}\n")
                self.stream.flush()
        return len(text)


def cli_group() -> mx.distributed.Group | None:
    """`init_group()` for the command line. On ranks other than 0 stdout goes nowhere and
    stderr keeps only errors (one answer is printed, not one per rank); MLXLLM_DEBUG=1
    keeps their stderr whole."""
    group = init_group()
    if group is not None and group.rank() != 0:
        devnull = os.open(os.devnull, os.O_WRONLY)
        sys.stdout.flush()
        os.dup2(devnull, 1)
        os.close(devnull)
        if not os.environ.get("MLXLLM_DEBUG"):
            sys.stderr = _ErrorsOnly(sys.stderr, group.rank())
    if group is not None and threading.current_thread() is threading.main_thread():
        # mlx.launch ends the other ranks with SIGTERM once one has failed: say why we stop
        signal.signal(signal.SIGTERM, lambda *_: _fatal(
            group, "terminated (SIGTERM): mlx.launch ends every rank once one has failed"))
    return group


FATAL_GRACE = 2.0  # seconds a serving rank 0 gives its clients' error answers before it exits
_on_fatal: Callable[[str], None] | None = None  # set by a serving rank 0: tells the clients
_fatal_lock = threading.Lock()
_fatal_started = False


def _fatal(group: mx.distributed.Group | None, message: str) -> None:
    """One line on stderr, then exit at once: the other ranks' transfers to this one fail,
    so they follow within moments instead of waiting on a stage that is gone. A serving
    rank 0 first hands the error to every request in flight (`_on_fatal`) and exits
    FATAL_GRACE seconds later; the calling thread never returns either way."""
    global _fatal_started
    where = f"pipeline rank {group.rank()} of {group.size()}" if group is not None else "pipeline"
    with suppress(Exception):  # exiting anyway
        sys.stdout.flush()
    with _fatal_lock:
        first, _fatal_started = not _fatal_started, True
    if first:
        os.write(2, f"error: {where}: {message}\n".encode(errors="replace"))
    hook = _on_fatal
    if hook is None:
        os._exit(1)
    if first:
        with suppress(Exception):  # the exit below must come whatever the hook does
            hook(f"{where}: {message}")
        threading.Timer(FATAL_GRACE, os._exit, (1,)).start()
    threading.Event().wait()  # this thread's work cannot go on: the timer ends the process


class Watchdog:
    """Ends the process when a watched wait on the other ranks lasts past its timeout."""

    def __init__(self, group: mx.distributed.Group | None) -> None:
        self.group = group
        self._cond = threading.Condition()
        self._deadline: float | None = None
        self._what = ""
        self._seconds = 0.0
        threading.Thread(target=self._run, name="mlxllm-pipeline-watchdog", daemon=True).start()

    @contextmanager
    def watch(self, what: str, seconds: float) -> Iterator[None]:
        with self._cond:
            self._deadline, self._what, self._seconds = time.monotonic() + seconds, what, seconds
            self._cond.notify()
        try:
            yield
        finally:
            with self._cond:
                self._deadline = None

    def _run(self) -> None:
        with self._cond:
            while True:
                if self._deadline is None:
                    self._cond.wait()
                    continue
                left = self._deadline - time.monotonic()
                if left <= 0:
                    _fatal(self.group, f"no answer from the other ranks within {self._seconds:g} s "
                                       f"({self._what}); a rank stalled or its machine is unreachable")
                self._cond.wait(left)


def _seconds(name: str, default: float) -> float:
    value = os.environ.get(name)
    if not value:
        return default
    try:
        seconds = float(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} is not a number of seconds") from None
    if not seconds > 0:
        raise ValueError(f"{name}={value!r} must be positive")
    return seconds


# ---------------------------------------------------------------------------- the split

@dataclass(frozen=True)
class Stage:
    """What one rank runs: layers [start, stop) of the stack, the embedding on the first
    rank, the output head on the last."""

    rank: int
    size: int
    start: int
    stop: int

    @property
    def first(self) -> bool:
        return self.rank == 0

    @property
    def last(self) -> bool:
        return self.rank == self.size - 1


def n_layers_of(gf: GGUFFile) -> int:
    from gguf import Keys
    return int(gf.metadata[Keys.LLM.BLOCK_COUNT])


def stage_bytes(gf: GGUFFile, n_layers: int) -> tuple[list[int], int, int]:
    """(bytes of each layer's tensors, of what the first stage adds, of what the last adds)."""
    layers = [0] * n_layers
    for name, info in gf.tensors.items():
        if name.startswith("blk."):
            i = int(name.split(".")[1])
            if i < n_layers:
                layers[i] += info.nbytes

    def size(*names: str) -> int:
        return sum(gf.tensors[n].nbytes for n in names if n in gf.tensors)
    embedding = size("token_embd.weight", "position_embd.weight")
    head = size("output.weight" if "output.weight" in gf.tensors else "token_embd.weight",
                "output.bias", "output_norm.weight", "output_norm.bias")
    return layers, embedding, head


def split_by_memory(layers: Sequence[int], first: int, last: int, ranks: int) -> list[int]:
    """Layers per rank, contiguous and in order, that make the largest stage (its layers'
    bytes, plus `first` on rank 0 and `last` on the last rank) as small as possible; ties
    go to the split with fewer layers early. Rank 0 always holds a layer;
    the others hold at least one when there are as many layers as ranks."""
    n = len(layers)
    if ranks < 1 or n < 1:
        raise ValueError(f"cannot split {n} layers over {ranks} ranks")
    least = 1 if n >= ranks else 0
    prefix = [0]
    for b in layers:
        prefix.append(prefix[-1] + b)

    def cost(r: int, a: int, b: int) -> int:
        return prefix[b] - prefix[a] + (first if r == 0 else 0) + (last if r == ranks - 1 else 0)

    # best[r][i]: (largest stage, layers per rank) for layers [0, i) over ranks 0..r
    best: list[dict[int, tuple[int, tuple[int, ...]]]] = [{} for _ in range(ranks)]
    for i in range(1, n + 1):
        best[0][i] = (cost(0, 0, i), (i,))
    for r in range(1, ranks):
        for i in range(n + 1):
            for j, (largest, counts) in best[r - 1].items():
                if i - j >= least:
                    cand = (max(largest, cost(r, j, i)), counts + (i - j,))
                    if i not in best[r] or cand[0] < best[r][i][0]:
                        best[r][i] = cand
    return list(best[ranks - 1][n][1])


def parse_split(text: str, n_layers: int, ranks: int) -> list[int]:
    try:
        counts = [int(p) for p in text.replace(" ", "").split(",")]
    except ValueError:
        raise ValueError(f"{SPLIT_ENV}={text!r}: give the layers per rank, e.g. \"10,20\"") from None
    if len(counts) != ranks or sum(counts) != n_layers or min(counts) < 0 or counts[0] < 1:
        raise ValueError(f"{SPLIT_ENV}={text!r}: {ranks} counts are needed, summing to the model's "
                         f"{n_layers} layers, the first at least 1")
    return counts


def plan(gf: GGUFFile, ranks: int, split: str | Sequence[int] | None = None) -> list[Stage]:
    """Every rank's stage for this file: `split` (layers per rank, or MLXLLM_PIPELINE_SPLIT)
    or else the split by memory."""
    n = n_layers_of(gf)
    split = split if split is not None else os.environ.get(SPLIT_ENV) or None
    if split is None:
        counts = split_by_memory(*stage_bytes(gf, n), ranks)
    else:
        counts = parse_split(split if isinstance(split, str) else ",".join(map(str, split)), n, ranks)
    stages, start = [], 0
    for rank, count in enumerate(counts):
        stages.append(Stage(rank, ranks, start, start + count))
        start += count
    return stages


def unsupported(model: nn.Module) -> str | None:
    """Why a model cannot be split into pipeline stages, or None when it can."""
    from .nn.encoder import Encoder
    if isinstance(model, Encoder):
        return f"{type(model).__name__} is an encoder: it makes embeddings, not text"
    if not isinstance(model, Decoder):
        return f"{type(model).__name__} has a forward pass of its own, not the shared decoder stack's"
    for method in ("__call__",):
        if getattr(type(model), method) is not getattr(Decoder, method):
            return f"{type(model).__name__} replaces the shared decoder stack's forward pass"
    return None


def keep_stage(stage: Stage):
    """The loader's `part` callback for `stage`: the layers outside it become empty modules
    (their tensors are not read), the embedding stays on the first rank (and on the last
    when the head is tied to it), the final norm and output on the last."""

    def part(model: nn.Module, gf: GGUFFile) -> None:
        reason = unsupported(model)
        if reason:
            raise ValueError(f"pipeline parallelism cannot split this model: {reason}")
        for i in range(len(model.blk)):
            if not stage.start <= i < stage.stop:
                model.blk[i] = nn.Module()
        tied = "output" not in model
        if not stage.first:
            model.pop("position_embd", None)
            if not (stage.last and tied):
                model.pop("token_embd", None)
        if not stage.last:
            model.pop("output", None)
            model.pop("output_norm", None)
            object.__setattr__(model, "output_norm", None)
    return part


# ---------------------------------------------------------------------------- the model

class PipelineModel(nn.Module):
    """One rank's stage of a decoder, called as the decoder is: `model(tokens, cache)` ->
    logits (B, L, V), on every rank. Each call finishes its transfers before it returns
    (the watchdog can see it, and no rank is left with a message another did not read)."""

    def __init__(self, inner: Decoder, stage: Stage, group: mx.distributed.Group,
                 timeout: float | None = None) -> None:
        super().__init__()
        self.inner = inner
        self.stage = stage
        object.__setattr__(self, "group", group)
        object.__setattr__(self, "timeout", timeout or _seconds(TIMEOUT_ENV, STEP_TIMEOUT))
        object.__setattr__(self, "watchdog", Watchdog(group))
        object.__setattr__(self, "hidden_in", None)  # dtype of the hidden states this stage receives
        object.__setattr__(self, "logits_dtype", None)
        object.__setattr__(self, "_batchable", getattr(inner, "batchable", False))
        object.__setattr__(self, "leader_samples", False)  # serving: the logits go to rank 0 alone

    def __getattr__(self, key: str):
        try:
            return super().__getattr__(key)
        except AttributeError:
            if "inner" not in self:
                raise
            return getattr(self["inner"], key)  # args, gguf, load_stats, ...

    @property
    def batchable(self) -> bool:
        return self._batchable

    @property
    def layers(self) -> list:
        return self.inner.blk

    def make_cache(self) -> list:
        return self.inner.make_cache()  # the local layers' (the stage's blk holds only those)

    # -- transfers

    def _next(self) -> int:
        return self.stage.rank + 1

    def _prev(self) -> int:
        return self.stage.rank - 1

    def _logits_from(self) -> int:
        """Logits go around the ring: last -> 0 -> 1 -> ... -> size - 2."""
        return (self.stage.rank - 1) % self.stage.size

    def _forwards_logits(self) -> bool:
        return not self.stage.last and self.stage.rank + 1 <= self.stage.size - 2

    @contextmanager
    def _watched(self, what: str, seconds: float | None = None) -> Iterator[None]:
        with self.watchdog.watch(what, seconds or self.timeout):
            try:
                yield
            except Exception as e:  # noqa: BLE001  (a stage that fails leaves the others stuck)
                _fatal(self.group, f"{what} failed: {type(e).__name__}: {e}")

    def _stack(self, h: mx.array, cache: list | None) -> mx.array:
        inner = self.inner
        caches = cache if cache else [None] * len(inner.blk)
        factors = inner[inner.args.rope_factors]["weight"] if inner.args.rope_factors else None
        for block, c, mask in zip(inner.blk, caches, inner.masks(h.shape[1], caches)):
            h = block(h, mask, c, factors)
        return h

    def __call__(self, tokens: mx.array, cache: list | None = None) -> mx.array:
        B, L = tokens.shape
        stage, group, inner = self.stage, self.group, self.inner
        with self._watched("a forward pass"):
            if stage.first:
                h = inner.input_embeddings(tokens, cache)
            else:
                h = mx.distributed.recv((B, L, inner.args.dim), self.hidden_in, self._prev(), group=group)
            h = self._stack(h, cache)
            if stage.last:
                logits = mx.distributed.send(inner.head(h), 0, group=group)
                mx.eval(logits)
                return self._nothing(B, L) if self.leader_samples else logits
            mx.eval(mx.distributed.send(h, self._next(), group=group))
            if self.leader_samples and not stage.first:
                return self._nothing(B, L)
            logits = mx.distributed.recv((B, L, inner.args.vocab_size), self.logits_dtype, self._logits_from(),
                                         group=group)
            if self._forwards_logits() and not self.leader_samples:
                logits = mx.distributed.send(logits, self._next(), group=group)
            mx.eval(logits)
            return logits

    @staticmethod
    def _nothing(B: int, L: int) -> mx.array:
        """A follower's logits while rank 0 samples: one zero per position (the loop's
        sampling of them is cheap, and `Lockstep` replaces what it picks)."""
        return mx.zeros((B, L, 1), mx.float32)

    # -- start

    def handshake(self, fingerprint: Sequence[int], seconds: float) -> None:
        """Once, after every rank has loaded: check that all run the same file and split,
        learn the dtypes of what arrives, agree on the random seed (sampling draws the same
        tokens everywhere) and on whether rows share forward passes."""
        group, stage = self.group, self.stage
        with self._watched("waiting for every rank to load its layers", seconds):
            mine = mx.array(list(fingerprint), mx.int32)
            low, high = mx.distributed.all_min(mine, group=group), mx.distributed.all_max(mine, group=group)
            mx.eval(low, high)
            same = mx.array_equal(low, high).item()
        if not same:
            raise PipelineError("the ranks loaded different models or splits (each needs the same GGUF file "
                                f"and {SPLIT_ENV})")
        with self._watched("agreeing on dtypes and the seed"):
            # Every rank's output dtype follows from its input's: the first rank's embedding
            # sets it, each next rank learns it from the one before (a lazy graph: nothing runs).
            if stage.first:
                h = self.inner.input_embeddings(mx.zeros((1, 1), mx.int32), None)
            else:
                code = mx.distributed.recv((1,), mx.int32, self._prev(), group=group).item()
                object.__setattr__(self, "hidden_in", DTYPES[code])
                h = mx.zeros((1, 1, self.inner.args.dim), self.hidden_in)
            h = self._stack(h, None)
            if not stage.last:
                mx.eval(mx.distributed.send(mx.array([DTYPES.index(h.dtype)], mx.int32), self._next(), group=group))
                code = mx.distributed.recv((1,), mx.int32, self._logits_from(), group=group)
                if self._forwards_logits():
                    code = mx.distributed.send(code, self._next(), group=group)
                object.__setattr__(self, "logits_dtype", DTYPES[code.item()])
            else:
                object.__setattr__(self, "logits_dtype", self.inner.head(h).dtype)
                mx.eval(mx.distributed.send(mx.array([DTYPES.index(self.logits_dtype)], mx.int32), 0, group=group))
            seed = int.from_bytes(os.urandom(3), "little") if stage.first else 0
            # batched rows need every stage's caches to have a batched form, not only this one's
            from .generate import batch_forms
            batchable = self._batchable and batch_forms(self.inner)
            agreed = mx.distributed.all_sum(mx.array([seed, int(batchable)], mx.int32), group=group).tolist()
        mx.random.seed(agreed[0])
        # rows share a forward pass only where every stage's caches allow it
        object.__setattr__(self, "_batchable", agreed[1] == stage.size)


def load(model: str, dtype: mx.Dtype = mx.float32, dense: bool | None = None,
         group: mx.distributed.Group | None = None, split: str | Sequence[int] | None = None):
    """`loader.load` for one rank of a pipeline: (its `PipelineModel`, the tokenizer). Without
    a group of several ranks (none given, and not launched as one) it is `loader.load`."""
    from .loader import LoadStats, load_model
    from .loader import load as load_whole
    from .models import resolve
    from .tokenizer import Tokenizer

    group = group if group is not None else init_group()
    if group is None or group.size() == 1:
        return load_whole(model, dtype, dense)
    load_timeout = _seconds(LOAD_TIMEOUT_ENV, LOAD_TIMEOUT)
    watchdog_timeout = _seconds(TIMEOUT_ENV, STEP_TIMEOUT)
    path = resolve(model)
    stages = plan(GGUFFile(path), group.size(), split)
    stage = stages[group.rank()]
    net, gf, _, stats = load_model(path, dtype, dense, part=keep_stage(stage))
    net.blk = net.blk[stage.start:stage.stop]  # the stage's own layers, in order (caches, masks)
    pipeline = PipelineModel(net, stage, group, watchdog_timeout)
    fingerprint = [n_layers_of(gf), net.args.dim, net.args.vocab_size, len(gf.tensors),
                   sum(t.nbytes for t in gf.tensors.values()) % (2 ** 31 - 1)] + \
        [s.stop - s.start for s in stages]
    pipeline.handshake(fingerprint, load_timeout)
    pipeline.gguf = gf
    pipeline.load_stats = LoadStats(stats.seconds, stats.nbytes)
    return pipeline, Tokenizer.from_metadata(gf.metadata)


# ---------------------------------------------------------------------------- serving

PLAN, ACCEPTED, STOP = 1, 2, 3  # what rank 0 sends: a step's start, the rows' tokens, the end
INSERT, CANCEL = 1, 2  # a plan's entries
FINISHES = (None, "stop", "length", "error")  # a row's finish, as sent
INLINE = 62  # payload values a message's header carries (the header: 64 int32)


class Stopped(Exception):
    """Rank 0 stopped serving: a follower's loop ends here."""


class Lockstep:
    """One generation loop run by every rank of a pipeline (BatchGenerator's `lockstep`).
    Rank 0, the leader, records the requests that join (`inserted`) and leave (`cancelled`)
    and sends them at the start of each step (`begin`); after it reads the tokens of a
    step it sends each row's token and finish (`accepted`). The followers wait for both at
    the same points of the same loop and apply them (`begin`, `follow`).

    Messages are int32 arrays summed over the group (rank 0 gives the values, the others
    zeros): a fixed header [kind, payload length, the payload's start], then the rest of a
    longer payload. Every rank takes part in each, so a rank that is gone or stalled stops
    the exchange: the watchdog and the transfers' errors end the pipeline as they do for a
    forward pass."""

    def __init__(self, model: PipelineModel) -> None:
        self.model = model
        self.leader = model.stage.first
        self.ops: list[int] = []  # the leader's plan for the next step
        self.heartbeat = model.timeout / 4  # seconds between the leader's steps while idle

    # -- the leader's records (a follower's own calls, replaying them, are not recorded)

    def inserted(self, row) -> None:
        if self.leader:
            prompt = row.request.prompt
            self.ops += [INSERT, row.uid, int(row.paced), len(prompt), *prompt]

    def cancelled(self, uid: int) -> None:
        if self.leader:
            self.ops += [CANCEL, uid]

    # -- the exchanges

    def _exchange(self, kind: int, payload: Sequence[int], what: str,
                  seconds: float | None = None) -> tuple[int, list[int]]:
        """One message from the leader to every rank: (kind, payload). Its header carries the
        first INLINE values, so that a step's usual messages (a plan with nothing new, the
        tokens of up to INLINE / 2 rows) take one collective, not two."""
        group = self.model.group
        with self.model._watched(what, seconds):
            head = [0] * (2 + INLINE)
            if self.leader:
                head[:2], head[2:2 + min(len(payload), INLINE)] = [kind, len(payload)], payload[:INLINE]
            head = mx.distributed.all_sum(mx.array(head, mx.int32), group=group, stream=mx.cpu).tolist()
            kind, n, body = head[0], head[1], head[2:2 + min(head[1], INLINE)]
            if n > INLINE:
                rest = mx.array(payload[INLINE:], mx.int32) if self.leader else mx.zeros((n - INLINE,), mx.int32)
                body += mx.distributed.all_sum(rest, group=group, stream=mx.cpu).tolist()
        return kind, body

    def _out_of_step(self, what: str) -> None:
        _fatal(self.model.group, f"the ranks are out of step ({what}); the pipeline cannot go on")

    def begin(self, generator) -> None:
        """A step starts: the leader sends its plan, a follower applies it (raises Stopped
        when the leader stopped). A follower waits as long as the timeout: the leader's
        heartbeat comes four times as often."""
        if self.leader:
            ops, self.ops = self.ops, []
            self._exchange(PLAN, ops, "sending a step's plan")
            return
        kind, body = self._exchange(0, (), "waiting for rank 0's next step")
        if kind == STOP:
            raise Stopped
        if kind != PLAN:
            self._out_of_step(f"a plan expected, message {kind} came")
        from .generate import GenerationRequest
        from .sample import SamplingParams
        i = 0
        while i < len(body):
            if body[i] == INSERT:
                uid, paced, n = body[i + 1:i + 4]
                prompt = body[i + 4:i + 4 + n]
                # Sampling and limits are rank 0's: the row only needs its prompt. Greedy with
                # no penalties: a follower's logits are a 1-wide placeholder, which a penalty's
                # scatter over the prompt's token ids would write past (heap corruption).
                params = SamplingParams(temperature=0, repeat_penalty=1.0)
                if generator.insert(GenerationRequest(prompt, params, 2 ** 31 - 1)) != uid:
                    self._out_of_step(f"request {uid} has another id here")
                generator.waiting[-1].paced = bool(paced)
                i += 4 + n
            elif body[i] == CANCEL:
                generator.cancel(body[i + 1])
                i += 2
            else:
                self._out_of_step(f"unknown plan entry {body[i]}")

    def accepted(self, rows: list, failure: str | None = None) -> None:
        """The leader's rows took their tokens (or failed): the followers learn which and how
        each ended. failure: why this rank's own step failed, when it did."""
        if not self.leader:
            self._out_of_step(f"a follower's own step failed: {failure}")
        if not rows:
            return
        payload: list[int] = []
        for row in rows:
            payload += [-1, FINISHES.index("error")] if row.finish == "error" else \
                [row.last, FINISHES.index(row.finish)]
        self._exchange(ACCEPTED, payload, "sending the step's tokens")

    def follow(self, rows: list) -> list:
        """A follower's rows take the leader's tokens and finishes."""
        if not rows:
            return []
        kind, body = self._exchange(0, (), "waiting for rank 0's tokens")
        if kind != ACCEPTED or len(body) != 2 * len(rows):
            self._out_of_step(f"the tokens of {len(rows)} rows expected, message {kind} of {len(body)} values came")
        return [row.follow(None if body[2 * i] < 0 else body[2 * i], FINISHES[body[2 * i + 1]])
                for i, row in enumerate(rows)]

    def stop(self) -> None:
        """The leader stops serving: the followers' loops end."""
        self._exchange(STOP, (), "telling the other ranks to stop")

    def fatal(self, message: str) -> None:
        """The leader's step failed midway: the followers are somewhere inside it, and no
        message can bring them back in step."""
        _fatal(self.model.group, message)


def serving(model: PipelineModel) -> Lockstep:
    """Make a loaded stage serve: only rank 0 samples (the logits go to it alone)."""
    object.__setattr__(model, "leader_samples", True)
    return Lockstep(model)


def follow(model: str, group: mx.distributed.Group, parallel: int, kv_bits: int | None) -> None:
    """`mlxllm serve` on a rank other than 0: load this rank's stage and run the server's
    generation loop as rank 0 drives it, until rank 0 stops (then return: exit status 0)."""
    from .generate import BatchGenerator, batch_forms

    # Ctrl-C reaches every rank of a terminal's launch: rank 0 stops the others in order
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    net, _ = load(model, group=group)
    lockstep = serving(net)
    generator = BatchGenerator(net, None, parallel, kv_bits=kv_bits if batch_forms(net) else None, lockstep=lockstep)
    try:
        while True:
            generator.step()
    except Stopped:
        mx.synchronize()


def pipeline_pool(group: mx.distributed.Group, model: str):
    """The server's `ModelPool` for rank 0 of a pipeline (`serve_async`'s pool_class): it
    serves `model` alone, loaded as rank 0's stage, kept loaded until the server stops, its
    engine driving the other ranks (`Lockstep`). When the pipeline fails, every request in
    flight ends with the error and new ones are refused (503) until the process exits."""
    from .server.common import ApiError
    from .server.engine import Engine
    from .server.pool import Loaded, ModelPool, file_digest, model_path

    class PipelinePool(ModelPool):
        def __init__(self, **options) -> None:
            options["keep_alive"] = None  # the other ranks hold their stages as long as the server runs
            options["prefix_cache_bytes"] = 0  # see BatchGenerator: not across ranks
            super().__init__(**options)
            self.path = model_path(model)
            self.lockstep: Lockstep | None = None
            self.broken: str | None = None
            global _on_fatal
            _on_fatal = self._fail_requests

        def _load(self, name: str, path: str) -> Loaded:  # on the worker thread
            from .generate import batch_forms
            start = time.perf_counter()
            net, tokenizer = load(path, group=group)
            self.lockstep = serving(net)
            engine = Engine(net, tokenizer, name, self.parallel, 0,
                            kv_bits=self.kv_bits if batch_forms(net) else None, lockstep=self.lockstep)
            self.worker.engines.append(engine)
            self.worker.idle_tick = self.lockstep.heartbeat
            seconds = time.perf_counter() - start
            stage = net.stage
            logging.getLogger("mlxllm.server").info("loaded %s (%s) in %.2f s: rank 0 of a %d-rank pipeline (layers %d-%d here), %s", name, path,
                      seconds, stage.size, stage.start, stage.stop - 1,
                      "continuous batching" if engine.batched else "one forward per request per step")
            return Loaded(name, path, net, tokenizer, engine, int(seconds * 1e9), file_digest(path))

        def _unload(self, loaded: Loaded) -> None:  # on the worker thread: the server stops
            super()._unload(loaded)
            self.worker.idle_tick = None
            if self.lockstep is not None:
                self.lockstep.stop()
                self.lockstep = None

        async def acquire(self, name: str, keep_alive=None):
            if self.broken:
                raise ApiError(503, f"the pipeline failed: {self.broken}", "server")
            path = await asyncio.get_running_loop().run_in_executor(None, model_path, name)
            if path != self.path:
                raise ApiError(400, f"this server runs {model!r} across {group.size()} ranks and loads no other "
                                    "model", "model", "model_not_supported")
            return await super().acquire(name, None)

        def _fail_requests(self, message: str) -> None:  # on whichever thread found the failure
            self.broken = message
            for engine in list(self.worker.engines):
                jobs = []
                for _ in range(10):  # the worker thread may still be changing them
                    with suppress(RuntimeError):
                        jobs = list(engine.jobs.values())
                        break
                for job in jobs:
                    job.emit(("error", f"the pipeline failed: {message}"))

    return PipelinePool

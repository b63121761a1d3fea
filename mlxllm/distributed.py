"""Pipeline-parallel inference across processes or machines, on MLX's own distributed engine.

    mlx.launch -n 2 --backend ring "$(command -v mlxllm)" run MODEL PROMPT
    mlx.launch --hostfile hosts.json --backend ring "$(command -v mlxllm)" run MODEL PROMPT

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

Failure: each forward pass runs under a watchdog. A rank that dies makes its neighbours'
transfers fail at once; one that stalls makes them wait past MLXLLM_PIPELINE_TIMEOUT
seconds (default 120; MLXLLM_PIPELINE_LOAD_TIMEOUT, default 1800, while the ranks load).
Either way every rank still running writes one `error:` line to stderr and exits with
status 1: a pipeline with a stage missing cannot go on, and none waits forever. (mlx.launch
itself exits 0 whatever its ranks did; it also ends the other ranks once one exits with
an error.)
"""

from __future__ import annotations

import io
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
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


def _fatal(group: mx.distributed.Group | None, message: str) -> None:
    """One line on stderr, then exit at once: the other ranks' transfers to this one fail,
    so they follow within moments instead of waiting on a stage that is gone."""
    where = f"pipeline rank {group.rank()} of {group.size()}" if group is not None else "pipeline"
    with suppress(Exception):  # exiting anyway
        sys.stdout.flush()
    os.write(2, f"error: {where}: {message}\n".encode(errors="replace"))
    os._exit(1)


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
                return logits
            mx.eval(mx.distributed.send(h, self._next(), group=group))
            logits = mx.distributed.recv((B, L, inner.args.vocab_size), self.logits_dtype, self._logits_from(),
                                         group=group)
            if self._forwards_logits():
                logits = mx.distributed.send(logits, self._next(), group=group)
            mx.eval(logits)
            return logits

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
            agreed = mx.distributed.all_sum(mx.array([seed, int(self._batchable)], mx.int32), group=group).tolist()
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

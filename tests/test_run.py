"""`mlxllm run` as a user runs it (argument, piped stdin, interactive chat on a terminal),
and the generation loop's contract: stop strings, max tokens, EOS, seeds."""

import subprocess
import sys

import pexpect
import pytest

from mlxllm import generate, load, stream_generate
from mlxllm.sample import SamplingParams

MODEL = "smollm2:135m"
GREEDY = ["--temperature", "0", "--max-tokens", "24"]


@pytest.fixture(scope="module")
def smollm():
    return load(MODEL)


@pytest.fixture(autouse=True)
def no_server(monkeypatch):
    """`run` answers in-process here, even while someone runs `mlxllm serve` on the default
    port (tests/test_cli.py checks `run` through a server)."""
    monkeypatch.setenv("MLXLLM_HOST", "http://127.0.0.1:9")


def cli(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "mlxllm", "run", MODEL, *args],
                          input=stdin, capture_output=True, text=True, timeout=300, check=False)


def test_prompt_argument_matches_the_api(smollm):
    model, tok = smollm
    r = cli("What is the capital of France?", *GREEDY)
    assert r.returncode == 0, r.stderr
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    assert r.stdout.strip() == generate(model, tok, prompt, max_tokens=24, temperature=0).strip()
    assert "Paris" in r.stdout


def test_prompt_from_stdin_and_verbose_stats():
    r = cli(*GREEDY, "--verbose", stdin="What is the capital of France?")
    assert r.returncode == 0 and "Paris" in r.stdout
    assert "tokens/s" in r.stderr and "generation" in r.stderr


def test_speculation_flags_keep_the_greedy_output():
    """--prompt-lookup and --draft (the model drafting for itself here: every draft is
    accepted) give plain greedy decoding's text; --verbose reports the acceptance."""
    prompt = "Repeat exactly: red, green, blue, red, green, blue, red, green, blue"
    plain = cli(prompt, *GREEDY, "--repeat-penalty", "1")
    lookup = cli(prompt, *GREEDY, "--repeat-penalty", "1", "--prompt-lookup", "--verbose")
    drafted = cli(prompt, *GREEDY, "--repeat-penalty", "1", "--draft", MODEL, "--draft-tokens", "3", "--verbose")
    assert plain.returncode == lookup.returncode == drafted.returncode == 0, lookup.stderr + drafted.stderr
    assert lookup.stdout == plain.stdout == drafted.stdout
    assert "drafts accepted" in lookup.stderr and "drafts accepted 100%" in drafted.stderr
    both = cli(prompt, "--prompt-lookup", "--draft", MODEL)
    assert both.returncode != 0 and "not both" in both.stderr


def test_seed_minus_one_is_random_not_an_error():
    r = cli("Say hi.", "--seed", "-1", "--max-tokens", "4")
    assert r.returncode == 0 and r.stdout.strip() and "Traceback" not in r.stderr


def test_raw_prompt_skips_the_template(smollm):
    model, tok = smollm
    r = cli("The capital of France is", "--raw", *GREEDY)
    assert r.stdout.strip() == generate(model, tok, "The capital of France is", max_tokens=24, temperature=0).strip()


def test_interactive_chat_keeps_history_and_leaves_on_bye():
    child = pexpect.spawn(sys.executable, ["-m", "mlxllm", "run", MODEL, *GREEDY], encoding="utf-8", timeout=300)
    child.expect(">>> ")
    child.sendline("My name is Ada. What is the capital of France?")
    child.expect("Paris")
    child.expect(">>> ")
    child.sendline("/bye")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_bad_options_and_unknown_model_are_one_line_errors():
    r = cli("hi", "--temperature", "-1")
    assert r.returncode != 0 and "temperature" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "mlxllm", "run", "./no-such-model.gguf", "hi"], capture_output=True,
                       text=True, check=False)
    assert r.returncode == 1 and "no-such-model" in r.stderr and r.stderr.count("\n") == 1
    # a name `run` would pull: offline here, the registry's answer (or its absence) is one line
    r = subprocess.run([sys.executable, "-m", "mlxllm", "run", "no-such-model", "hi"], capture_output=True, text=True,
                       check=False)
    assert r.returncode == 1 and r.stderr.splitlines()[-1].startswith("error: ") and "Traceback" not in r.stderr


def test_stop_string_split_across_tokens_is_never_emitted(smollm):
    model, tok = smollm
    prompt = "The capital of France is"
    full = generate(model, tok, prompt, max_tokens=30, temperature=0)
    ids = tok.encode(full, add_special=False)
    # A stop string that starts inside one token and ends inside the next.
    pieces = [tok.decode([i]) for i in ids]
    k = next(i for i in range(1, len(pieces)) if len(pieces[i - 1].strip()) >= 2 and len(pieces[i].strip()) >= 2)
    start = len("".join(pieces[:k])) - 1
    stop = full[start:start + 3]
    out = list(stream_generate(model, tok, prompt, SamplingParams(temperature=0), 30, stop=[stop]))
    text = "".join(r.text for r in out)
    assert text == full[:full.index(stop)]
    assert out[-1].finish_reason == "stop" and stop not in text


def test_max_tokens_and_eos(smollm):
    model, tok = smollm
    out = list(stream_generate(model, tok, "Count: one, two, three,", SamplingParams(temperature=0), 3))
    assert out[-1].finish_reason == "length" and out[-1].generation_tokens == 3
    chat = tok.apply_chat_template([{"role": "user", "content": "Say hi."}])
    out = list(stream_generate(model, tok, chat, SamplingParams(temperature=0), 200))
    assert out[-1].finish_reason == "stop" and out[-1].generation_tokens < 200  # <|im_end|>


def test_same_seed_same_output(smollm):
    model, tok = smollm
    kw = {"max_tokens": 16, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "seed": 1234}
    a = generate(model, tok, "Once upon a time", **kw)
    b = generate(model, tok, "Once upon a time", **kw)
    c = generate(model, tok, "Once upon a time", **{**kw, "seed": 99})
    assert a == b and a != c


def test_bench_reports_pp_tg_load_and_memory():
    r = subprocess.run([sys.executable, "-m", "mlxllm", "bench", MODEL, "-p", "16", "-n", "4", "-r", "2", "--json"],
                       capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stderr
    info = __import__("json").loads(r.stdout)
    assert set(info["tokens_per_s"]) == {"pp16", "tg4"}
    assert all(v["mean"] > 0 and len(v["runs"]) == 2 for v in info["tokens_per_s"].values())
    assert info["load_s"] > 0 and info["peak_memory_gb"] > 0
    assert "openblas" in info["blas"].lower() or "mkl" in info["blas"].lower() or "own" in info["blas"]


def test_bench_at_a_depth_measures_after_that_context(monkeypatch):
    """llama-bench's -d: pp and tg after 40 tokens already in the cache, named for it."""
    from mlxllm import load
    from mlxllm.bench import bench

    model, tokenizer = load(MODEL)
    calls, forward = [], type(model).__call__

    def recorded(self, x, cache=None):
        calls.append((x.shape[1], cache[0].offset))
        return forward(self, x, cache=cache)

    monkeypatch.setattr(type(model), "__call__", recorded)
    results = bench(model, tokenizer, n_prompt=8, n_gen=3, repetitions=1, depth=40)
    assert set(results) == {"pp8@d40", "tg3@d40"}
    assert all(r["mean"] > 0 for r in results.values())
    # the timed prompt (7 tokens, then its last) and the decode steps start after the context
    # (BOS and 40 tokens)
    assert (7, 41) in calls and (1, 48) in calls and (1, 42) in calls

"""The command line as people use it, through the real `mlxllm` process: the interactive
chat on a terminal (pexpect) with Ollama's commands, Ctrl-C and Ctrl-D; `run`'s flags;
progress on a terminal and not in a pipe; `show`'s views; `bench`'s outputs; help."""

import json
import os
import socket
import signal
import subprocess
import sys
import time
from pathlib import Path

import gguf
import httpx
import pexpect
import pytest
from gguf.scripts.gguf_new_metadata import MetadataDetails, copy_with_new_metadata

from mlxllm.cli import main as cli_main

MODEL = "smollm2:135m"
FIXTURES = Path(__file__).parent / "fixtures" / "archs"
PROMPT = ">>> "


@pytest.fixture(autouse=True)
def no_server(monkeypatch):
    """`run` answers in-process here: a server someone runs on the default port must not
    answer these tests (the one test that wants a server starts its own)."""
    monkeypatch.setenv("MLXLLM_HOST", "http://127.0.0.1:9")


def mlxllm(*args, stdin=None, env=None):
    return subprocess.run([sys.executable, "-m", "mlxllm", *args], check=False, input=stdin, capture_output=True, text=True,
                          timeout=300, env=env)


@pytest.fixture
def home(tmp_path):
    """A HOME of its own (the chat's history file) and no progress bars, for pexpect runs."""
    return dict(os.environ, HOME=str(tmp_path), MLXLLM_NO_PROGRESS="1")


def _terminal_signals() -> None:
    """Ctrl-C as a user's terminal delivers it: a suite started in the background (bash makes
    its background jobs ignore SIGINT) would otherwise hand the chat an ignored SIGINT."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def chat(env, *flags, timeout=120):
    child = pexpect.spawn(sys.executable, ["-m", "mlxllm", "run", MODEL, *flags], encoding="utf-8",
                          timeout=timeout, env=env, dimensions=(50, 200), preexec_fn=_terminal_signals)
    child.expect_exact(PROMPT)
    return child


def ask(child, line) -> str:
    """What the chat prints for one line, up to the next prompt."""
    child.sendline(line)
    child.expect_exact(PROMPT)
    text = child.before.replace("\r\n", "\n")
    return text.split("\n", 1)[1] if "\n" in text else ""  # after the echoed line


def leaves_cleanly(child) -> None:
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0, child.before
    assert child.before.endswith("\n")  # the shell's prompt starts a line of its own


def test_help_lists_every_command_and_no_arguments_is_help():
    r = mlxllm()
    assert r.returncode == 0 and "Usage:" in r.stdout
    for name in cli_main.commands:
        assert f"  {name} " in r.stdout, name
    assert mlxllm("--help").stdout == r.stdout
    version = mlxllm("--version")
    assert version.returncode == 0 and "version" in version.stdout
    run_help = mlxllm("run", "--help").stdout
    for flag in ("--ctx-size", "--format", "--think", "--hidethinking", "--seed", "--max-tokens"):
        assert flag in run_help, flag


def test_chat_commands(home):
    """/? and /help are answered, not sent to the model; /set changes what the next answer
    uses (seed: the same answer twice; temperature 0: the one-shot greedy answer; system:
    /show system); /show views; /load; /clear; Ctrl-D leaves with exit code 0."""
    child = chat(home, "--max-tokens", "12")
    for line in ("/?", "/help"):
        out = ask(child, line)
        assert "/set" in out and "/bye" in out and '"""' in out
    assert "parameter" in ask(child, "/? set")
    assert "Set parameter 'seed' to '42'" in ask(child, "/set parameter seed 42")
    ask(child, "/set parameter temperature 1.5")
    first = ask(child, "Name an animal.")
    assert "Cleared" in ask(child, "/clear")
    assert ask(child, "Name an animal.") == first  # same seed, same sampled answer
    ask(child, "/clear")
    ask(child, "/set parameter temperature 0")
    greedy = ask(child, "What is the capital of France?")
    assert "Paris" in greedy and "cut off" not in greedy  # it ended by itself: no note
    one_shot = mlxllm("run", MODEL, "What is the capital of France?", "--temperature", "0", "--max-tokens", "12")
    assert greedy.strip() == one_shot.stdout.strip()
    shown = ask(child, "/show parameters")
    assert "seed" in shown and "temperature" in shown and '"<|im_end|>"' in shown
    assert "unknown parameter" in ask(child, "/set parameter no_such 1")
    assert "Set system message" in ask(child, '/set system "You are a pirate."')
    assert ask(child, "/show system").strip() == "You are a pirate."
    assert "<|im_start|>" in ask(child, "/show template")
    assert "architecture" in ask(child, "/show info")
    assert "Loading model" in ask(child, f"/load {MODEL}")
    assert "Unknown command" in ask(child, "/nonsense")
    child.sendeof()
    leaves_cleanly(child)


def test_multiline_input_is_one_message(home):
    child = chat(home, "--temperature", "0", "--max-tokens", "10")
    child.sendline('"""Repeat these two lines:')
    child.expect_exact("... ")
    child.sendline('red apple')
    child.expect_exact("... ")
    child.sendline('green pear"""')
    child.expect_exact(PROMPT)
    answer = child.before.replace("\r\n", "\n").split('pear"""\n', 1)[1].split("[cut off")[0]
    answer = answer.removesuffix("\x1b[33m")  # the note's colour
    one_shot = mlxllm("run", MODEL, "Repeat these two lines:\nred apple\ngreen pear", "--temperature", "0",
                      "--max-tokens", "10")
    assert answer.strip() == one_shot.stdout.strip()
    child.sendline("/bye")
    leaves_cleanly(child)


def test_ctrl_c_stops_an_answer_then_leaves_at_an_empty_prompt(home):
    """Ctrl-C during an answer returns to the prompt at once (the conversation goes on);
    Ctrl-C on a half-typed line clears it; at an empty prompt it leaves with exit code 0."""
    child = chat(home, "--max-tokens", "400", "--seed", "1")
    child.sendline("Write a long story about a dragon.")
    child.expect_exact("dragon.\r\n")
    child.expect(r"\w+ \w+ \w+")  # it is answering
    start = time.monotonic()
    child.sendintr()
    child.expect_exact(PROMPT, timeout=10)
    assert time.monotonic() - start < 3
    assert "Available Commands" in ask(child, "/?")  # still listening
    time.sleep(0.3)
    child.send("half a line")
    time.sleep(0.3)
    child.sendintr()
    child.expect_exact(PROMPT, timeout=10)
    time.sleep(0.3)
    child.sendintr()
    leaves_cleanly(child)


def test_ctrl_c_during_a_long_prefill_is_answered_at_once(home):
    """A ~4,000-token prompt takes seconds to prefill: Ctrl-C in it returns to the prompt
    without waiting for the chunk in progress; a prompt past --ctx-size is refused."""
    system = " ".join(f"Fact {i}: the sky is blue." for i in range(400))
    child = chat(home, "--max-tokens", "20", "--system", system)
    child.sendline("Summarize the facts.")
    time.sleep(1.0)
    start = time.monotonic()
    child.sendintr()
    child.expect_exact(PROMPT, timeout=30)
    assert time.monotonic() - start < 1.5
    out = ask(child, "/set parameter num_ctx 100")
    assert "num_ctx" in out
    assert "context holds 100" in ask(child, "Summarize the facts.")
    child.sendline("/bye")
    leaves_cleanly(child)


def test_chat_history_is_saved(home):
    child = chat(home, "--max-tokens", "4")
    ask(child, "/show info")
    child.sendline("/bye")
    leaves_cleanly(child)
    assert "/show info" in (Path(home["HOME"]) / ".mlxllm" / "history").read_text()


def test_cut_off_answers_are_marked():
    r = mlxllm("run", MODEL, "Count from one to fifty in words.", "--temperature", "0", "--max-tokens", "3")
    assert r.returncode == 0 and "cut off" in r.stderr and "--max-tokens" in r.stderr
    assert "cut off" not in r.stdout
    r = mlxllm("run", MODEL, "Count from one to fifty in words.", "--temperature", "0", "--ctx-size", "41",
               "--max-tokens", "100")  # the prompt is 38 tokens
    assert r.returncode == 0 and "filled the context" in r.stderr


def test_prompt_past_ctx_size_is_a_one_line_error():
    r = mlxllm("run", MODEL, "Why is the sky blue?", "--ctx-size", "8")
    assert r.returncode == 1 and "context holds 8" in r.stderr and r.stderr.count("\n") == 1


def test_format_json_and_schema(tmp_path):
    r = mlxllm("run", MODEL, "Describe a cat in JSON.", "--format", "json", "--max-tokens", "80", "--seed", "3")
    assert r.returncode == 0, r.stderr
    assert isinstance(json.loads(r.stdout), dict)
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                               "age": {"type": "integer", "minimum": 0, "maximum": 99}},
              "required": ["name", "age"], "additionalProperties": False}
    path = tmp_path / "schema.json"
    path.write_text(json.dumps(schema))
    r = mlxllm("run", MODEL, "Invent a person.", "--format", str(path), "--max-tokens", "40", "--seed", "3")
    assert r.returncode == 0, r.stderr
    value = json.loads(r.stdout)
    assert set(value) == {"name", "age"} and isinstance(value["age"], int)
    r = mlxllm("run", MODEL, "hi", "--format", "yaml")
    assert r.returncode == 2 and "--format" in r.stderr


@pytest.fixture(scope="module")
def thinking_model(tmp_path_factory):
    """The tiny qwen3 fixture with a template that thinks as Qwen 3's does: the reply starts
    inside <think> unless enable_thinking is false (an empty block then)."""
    template = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
                "<|im_start|>assistant\n{% if enable_thinking is defined and not enable_thinking %}"
                "<think>\n\n</think>\n\n{% else %}<think>\n{% endif %}")
    out = tmp_path_factory.mktemp("thinking") / "qwen3-thinks.gguf"
    reader = gguf.GGUFReader(FIXTURES / "qwen3.q8_0.gguf")
    writer = gguf.GGUFWriter(str(out), reader.get_field(gguf.Keys.General.ARCHITECTURE).contents())
    copy_with_new_metadata(reader, writer, {gguf.Keys.Tokenizer.CHAT_TEMPLATE:
                                            MetadataDetails(gguf.GGUFValueType.STRING, template)}, [])
    return str(out)


def test_thinking_is_shown_apart_or_hidden(thinking_model):
    flags = ["--max-tokens", "6", "--seed", "1"]
    shown = mlxllm("run", thinking_model, "hi", *flags)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.startswith("Thinking...\n")
    hidden = mlxllm("run", thinking_model, "hi", "--hidethinking", *flags)
    assert hidden.returncode == 0 and hidden.stdout.strip() == ""  # all of it was thinking
    r = mlxllm("run", thinking_model, "hi", "--think=false", *flags)  # the template closes the block
    assert r.returncode == 0 and "Thinking..." not in r.stdout and r.stdout.strip()
    assert mlxllm("run", thinking_model, "hi", "--think", *flags).stdout.startswith("Thinking...")
    r = mlxllm("run", MODEL, "hi", "--think")
    assert r.returncode == 1 and "does not support thinking" in r.stderr and r.stderr.count("\n") == 1


def test_show_views():
    def show(*flags):
        r = mlxllm("show", MODEL, *flags)
        assert r.returncode == 0, r.stderr
        return r.stdout

    template = show("--template")
    assert "<|im_start|>" in template and "{%" in template
    assert 'stop                           "<|im_end|>"' in show("--parameters")
    modelfile = show("--modelfile")
    assert modelfile.startswith("# Modelfile") and "\nFROM " in modelfile and 'TEMPLATE """' in modelfile
    assert 'PARAMETER stop "<|im_end|>"' in modelfile
    assert show("--license").strip() == "apache-2.0"
    verbose = show("--verbose")
    assert "general.architecture" in verbose and "token_embd.weight" in verbose and "architecture" in verbose


def test_bench_outputs_and_progress_only_on_a_terminal(tmp_path):
    """On a terminal bench shows its runs as they go; in a pipe it prints the results
    alone. One repetition: no spread; two: mean ± spread, here as a markdown table."""
    env = dict(os.environ, HOME=str(tmp_path))
    env.pop("MLXLLM_NO_PROGRESS", None)
    child = pexpect.spawn(sys.executable, ["-m", "mlxllm", "bench", MODEL, "-p", "16", "-n", "4", "-r", "2", "-o", "md"],
                          encoding="utf-8", timeout=300, env=env)
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0, child.before
    out = child.before
    assert "loading smollm2:135m" in out and "warm-up" in out and "runs" in out  # progress
    assert "| smollm2:135m | auto | pp16 |" in out and " ± " in out
    piped = mlxllm("bench", MODEL, "-p", "16", "-n", "4", "-r", "1", env=env)
    assert piped.returncode == 0, piped.stderr
    assert "warm-up" not in piped.stderr and "loading" not in piped.stderr and "\r" not in piped.stderr
    assert "±" not in piped.stdout and "no spread" in piped.stdout and "pp16" in piped.stdout
    as_json = json.loads(mlxllm("bench", MODEL, "-p", "16", "-n", "4", "-r", "1", "-o", "json").stdout)
    assert all(v["stdev"] is None and len(v["runs"]) == 1 for v in as_json["tokens_per_s"].values())


def test_run_shows_loading_on_a_terminal_only(tmp_path):
    env = dict(os.environ, HOME=str(tmp_path))
    env.pop("MLXLLM_NO_PROGRESS", None)
    child = pexpect.spawn(sys.executable, ["-m", "mlxllm", "run", MODEL, "Hi", "--max-tokens", "2"],
                          encoding="utf-8", timeout=120, env=env)
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0 and "loading smollm2:135m" in child.before
    piped = mlxllm("run", MODEL, "Hi", "--max-tokens", "2", env=env)
    assert piped.returncode == 0 and "loading" not in piped.stderr


@pytest.fixture
def server(tmp_path):
    """`mlxllm serve` on a free port, as MLXLLM_HOST."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ, HOME=str(tmp_path), MLXLLM_NO_PROGRESS="1")
    proc = subprocess.Popen([sys.executable, "-m", "mlxllm", "serve", "--port", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    host = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                httpx.get(f"{host}/api/version", timeout=1)
                break
            except httpx.TransportError:
                time.sleep(0.2)
        yield dict(env, MLXLLM_HOST=host)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_run_talks_to_a_running_server(server):
    """As `ollama run` does: the answer comes from the server (the model stays loaded
    there), equal to the in-process one; the chat's commands and Ctrl-C work through it;
    --local stays in-process."""
    question = ["What is the capital of France?", "--temperature", "0", "--max-tokens", "12"]
    remote = mlxllm("run", MODEL, *question, "--verbose", "--keep-alive", "10m", env=server)
    local = mlxllm("run", MODEL, *question, "--verbose", "--local", env=server)
    assert remote.returncode == 0 and local.returncode == 0, remote.stderr + local.stderr
    assert "| server http://127.0.0.1" in remote.stderr and "server" not in local.stderr
    assert remote.stdout == local.stdout and "Paris" in remote.stdout
    loaded = httpx.get(server["MLXLLM_HOST"] + "/api/ps").json()["models"]
    assert [m["name"] for m in loaded] == [MODEL]
    child = chat(server, "--max-tokens", "300", "--seed", "1")
    assert "server" in ask(child, "/show info")
    child.sendline("Write a long story about a dragon.")
    child.expect_exact("dragon.\r\n")
    child.expect(r"\w+ \w+ \w+")
    start = time.monotonic()
    child.sendintr()
    child.expect_exact(PROMPT, timeout=10)
    assert time.monotonic() - start < 3
    assert "not found" in ask(child, "/load no-such-model")
    child.sendline("/bye")
    leaves_cleanly(child)

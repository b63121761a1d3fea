"""`mlxllm run` on a terminal: answers streamed and stopped by Ctrl-C within a fraction of a
second, thinking shown apart from the answer, and the interactive chat with Ollama's
commands (`/?` lists them)."""

from __future__ import annotations

import http.client
import json
import os
import queue
import readline
import shlex
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import click
import mlx.core as mx

from .generate import BatchGenerator, Event, GenerationRequest, encode_prompt
from .reasoning import THINK, Delta, Reasoning, ReasoningStream
from .sample import SamplingParams


@dataclass
class Answer:
    """One generation: the text (thinking removed), the thinking, and why it ended
    (None: stopped with Ctrl-C)."""

    content: str = ""
    thinking: str = ""
    finish_reason: str | None = None
    prompt_tokens: int = 0
    generation_tokens: int = 0
    prompt_tps: float = 0.0
    generation_tps: float = 0.0
    draft_acceptance: float | None = None


def events(net, tokenizer, ids: list[int], params: SamplingParams, max_tokens: int, stop=(), constraint=None,
           speculation: dict | None = None, stats: dict | None = None,
           cancelled: Callable[[], bool] = lambda: False) -> Iterator[Event]:
    """The lone request's events until it ends or `cancelled()` (checked between steps).
    `stats` (a dict, if given) receives the speculation's acceptance at the end."""
    generator = BatchGenerator(net, tokenizer, max_batch=1, **(speculation or {}))
    generator.insert(GenerationRequest(ids, params, max_tokens, stop, constraint))
    try:
        while generator.busy and not cancelled():
            for event in generator.step():
                if event.error is not None:
                    raise RuntimeError(event.error)
                yield event
    finally:
        # A step may still be in flight (cancelled, or a caller that stopped early): an
        # interpreter exiting right after would abort on MLX's still-running stream thread.
        mx.synchronize()
        if stats is not None and generator.speculation is not None:
            stats["draft_acceptance"] = generator.speculation.acceptance


class Worker:
    """The one thread that runs `run`'s MLX work: loading and generating. Ctrl-C raises
    KeyboardInterrupt in the main thread only between bytecodes, and a step of the model (a
    512-token prefill chunk: seconds for a large model, more on a busy machine) holds the
    thread that issued it inside MLX until the step ends. With the work here, the main
    thread waits on a queue, answers Ctrl-C at once and returns to the prompt; the
    generation stops after its current step. One thread, not one per answer: MLX's streams
    belong to the thread that made them, and the model's arrays with them."""

    def __init__(self) -> None:
        self._inbox: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._unfinished = 0  # queued or running
        threading.Thread(target=self._loop, name="mlxllm-run", daemon=True).start()

    @property
    def busy(self) -> bool:
        return self._unfinished > 0

    def _loop(self) -> None:
        while True:
            fn, done = self._inbox.get()
            try:
                done.put(("ok", fn()))
            except BaseException as e:  # noqa: BLE001  (handed to the caller, raised there)
                done.put(("error", e))
            finally:
                with self._lock:
                    self._unfinished -= 1

    def submit(self, fn: Callable[[], Any]) -> queue.Queue:
        """Queue fn after the work before it; its ("ok", result) or ("error", e) arrives in
        the returned queue."""
        done: queue.Queue = queue.Queue()
        with self._lock:
            self._unfinished += 1
        self._inbox.put((fn, done))
        return done

    def call(self, fn: Callable, *args, **kwargs) -> Any:
        kind, value = self.submit(lambda: fn(*args, **kwargs)).get()
        if kind == "error":
            raise value
        return value

    def settle(self) -> None:
        """Wait for the work queued so far (a stopped generation's last step) to end."""
        self.call(lambda: None)


_WORKER: Worker | None = None


def busy() -> bool:
    """Whether the worker (if any) has work queued or running."""
    return _WORKER is not None and _WORKER.busy


def worker() -> Worker:
    global _WORKER
    if _WORKER is None:
        _WORKER = Worker()
    return _WORKER


class Background:
    """events(...) run on the worker, read here: stopping the iteration (Ctrl-C) cancels
    the generation at its next step."""

    def __init__(self, *args, **kwargs) -> None:
        self._args, self._kwargs = args, kwargs
        self._queue: queue.Queue = queue.Queue()
        self._cancel = threading.Event()

    def _work(self) -> None:
        try:
            for event in events(*self._args, cancelled=self._cancel.is_set, **self._kwargs):
                self._queue.put(("event", event))
        except BaseException as e:  # noqa: BLE001  (handed to the main thread, raised there)
            self._queue.put(("error", e))
        self._queue.put(("end", None))

    def __iter__(self) -> Iterator[Event]:
        worker().submit(self._work)
        try:
            while True:
                kind, value = self._queue.get()
                if kind == "end":
                    return
                if kind == "error":
                    raise value
                yield value
        finally:
            self._cancel.set()


def thinks(tokenizer) -> bool:
    """Whether a model writes reasoning blocks (<think> ... </think>): its template has them."""
    return Reasoning.for_template(tokenizer.chat_template) is not None


@dataclass
class Settings:
    """What a conversation runs with: `run`'s flags, changed by /set."""

    params: SamplingParams
    max_tokens: int | None  # None: until the context is full (num_predict -1)
    num_ctx: int | None = None  # None: the model's context length
    system: str | None = None
    stop: list[str] = field(default_factory=list)
    schema: dict | None = None  # --format: JSON values of this schema only
    think: bool | None = None  # None: the template's default
    hide_thinking: bool = False
    verbose: bool = False
    raw: bool = False
    speculation: dict = field(default_factory=dict)


def context_length(net) -> int:
    return int(net.gguf.metadata.get("context_length", 4096))


def fit(tokenizer, messages: list[dict], settings: Settings, limit: int) -> tuple[list[int], list[dict]]:
    """Prompt ids for the conversation within `limit` tokens (leaving one to answer in): the
    oldest turns after the system prompt leave first, as Ollama drops them. Returns the
    ids and the messages they came from."""
    messages = list(messages)
    while True:
        ids = encode_prompt(tokenizer, render(tokenizer, messages, settings))
        if len(ids) < limit:
            return ids, messages
        first = 1 if messages and messages[0]["role"] == "system" else 0
        if len(messages) - first <= 1:
            raise ValueError(f"the prompt is {len(ids)} tokens; the context holds {limit} "
                             "(raise it with --ctx-size or /set parameter num_ctx)")
        del messages[first]  # the oldest turn: a user message and the answer to it
        if len(messages) - first > 1 and messages[first]["role"] == "assistant":
            del messages[first]


def render(tokenizer, messages: list[dict], settings: Settings) -> str:
    if settings.raw:
        return "\n\n".join(m["content"] for m in messages if m["role"] == "user")
    kwargs: dict[str, Any] = {}
    if settings.think is not None:
        kwargs["enable_thinking"] = settings.think  # Qwen3's and SmolLM3's templates read it
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, **kwargs)


def constraint_for(net, tokenizer, schema: dict | None):
    """A fresh grammar state for one answer (the server's path: mlxllm.constrain)."""
    if schema is None:
        return None
    from .constrain import vocabulary_for

    vocab = vocabulary_for(net, tokenizer)
    return vocab.constraint(vocab.json_grammar(schema))


class Printer:
    """Writes an answer as it streams: reasoning between "Thinking..." and "...done
    thinking." (dimmed on a terminal; left out with hide_thinking), then the answer."""

    def __init__(self, hide_thinking: bool) -> None:
        self.hide_thinking = hide_thinking
        self.in_thinking = False
        self.dim = click.get_text_stream("stdout").isatty()

    def _echo(self, text: str, dim: bool = False) -> None:
        click.echo(click.style(text, dim=True) if dim and self.dim else text, nl=False)

    def write(self, kind: str, text: str) -> None:
        if kind == "reasoning":
            if self.hide_thinking:
                return
            if not self.in_thinking:
                self.in_thinking = True
                self._echo("Thinking...\n", dim=True)
            self._echo(text, dim=True)
            return
        self.end()
        self._echo(text)

    def end(self) -> None:
        """Close a reasoning block still open (the answer starts, or it ended inside)."""
        if self.in_thinking:
            self.in_thinking = False
            self._echo("\n...done thinking.\n\n", dim=True)


def answer(net, tokenizer, ids: list[int], settings: Settings, max_tokens: int, prompt_text: str = "") -> Answer:
    """Stream one answer to stdout. KeyboardInterrupt stops it: the Answer so far comes back
    with finish_reason None."""
    result = Answer(prompt_tokens=len(ids))
    split = not settings.raw and settings.schema is None and thinks(tokenizer)
    stream = ReasoningStream(THINK, inside=THINK.inside(prompt_text)) if split else None
    printer = Printer(settings.hide_thinking)
    parts: dict[str, list[str]] = {"content": [], "reasoning": []}
    stats: dict = {}

    def take(pieces):
        for piece in pieces:
            parts[piece.kind].append(piece.text)
            printer.write(piece.kind, piece.text)

    constraint = constraint_for(net, tokenizer, settings.schema)
    params = settings.params
    try:
        for event in Background(net, tokenizer, ids, params, max_tokens, settings.stop, constraint,
                                settings.speculation, stats):
            if event.text:
                take(stream.feed(event.text) if stream is not None else [Delta("content", event.text)])
            if event.finish_reason is not None:
                result.finish_reason = event.finish_reason
                s = event.stats
                if s is not None:
                    result.generation_tokens = s.generation_tokens
                    result.prompt_tps = s.prompt_tokens / (s.prompt_ns / 1e9) if s.prompt_ns else 0.0
                    result.generation_tps = (s.generation_tokens - 1) / (s.eval_ns / 1e9) \
                        if s.generation_tokens > 1 and s.eval_ns else 0.0
    except KeyboardInterrupt:
        pass
    finally:
        if stream is not None:
            take(stream.close())
        printer.end()
        result.content = "".join(parts["content"])
        result.thinking = "".join(parts["reasoning"]).strip()
        result.draft_acceptance = stats.get("draft_acceptance")
    click.echo()
    if settings.verbose:
        click.echo(f"prompt: {result.prompt_tokens} tokens, {result.prompt_tps:.1f} tokens/s | "
                   f"generation: {result.generation_tokens} tokens, {result.generation_tps:.1f} tokens/s | "
                   f"peak memory {mx.get_peak_memory() / 1e9:.2f} GB | finish: {result.finish_reason or 'interrupted'}"
                   + (f" | drafts accepted {result.draft_acceptance:.0%}" if result.draft_acceptance is not None
                      else ""), err=True)
    return result


def budget(settings: Settings, prompt_tokens: int, limit: int) -> int:
    """Tokens an answer may take: max tokens, within what the context has left."""
    room = limit - prompt_tokens
    return room if settings.max_tokens is None else min(settings.max_tokens, room)


def cut_off_note(result: Answer, max_tokens: int | None, settings: Settings) -> None:
    """Say when an answer ended for lack of tokens, not because the model finished
    (max_tokens: what it was allowed, None: not known here, the server's answer)."""
    if result.finish_reason != "length":
        return
    if settings.max_tokens is not None and (max_tokens is None or max_tokens >= settings.max_tokens):
        why = (f"the answer reached the limit of {settings.max_tokens} tokens "
               "(--max-tokens; /set parameter num_predict)")
    else:
        why = "the answer filled the context (--ctx-size; /set parameter num_ctx)"
    click.echo(click.style(f"[cut off: {why}]", fg="yellow") if click.get_text_stream("stderr").isatty()
               else f"[cut off: {why}]", err=True)


# ---------------------------------------------------------------------------- a running server

DEFAULT_HOST = "http://127.0.0.1:11434"
OPTION_NAMES = ("temperature", "top_k", "top_p", "min_p", "repeat_penalty", "repeat_last_n", "presence_penalty",
                "frequency_penalty", "seed")


class ServerError(RuntimeError):
    """What a running server answered instead (or that it stopped answering)."""


class Remote:
    """A running `mlxllm serve`, which `run` talks to as `ollama run` talks to Ollama's
    server: the model stays loaded between runs (--keep-alive), and the answer streams
    from /api/chat. Ctrl-C closes the connection, which cancels the request there."""

    def __init__(self, host: str) -> None:
        self.host = host.rstrip("/")

    @classmethod
    def find(cls) -> Remote | None:
        """The server at MLXLLM_HOST (default 127.0.0.1:11434) if it answers at once and is
        mlxllm's own, of this version (not Ollama on the same port); None otherwise."""
        import urllib.request

        from . import __version__

        host = os.environ.get("MLXLLM_HOST") or DEFAULT_HOST
        if "://" not in host:
            host = "http://" + host
        try:
            with urllib.request.urlopen(f"{host.rstrip('/')}/api/version", timeout=0.5) as r:
                ours = "aiohttp" in r.headers.get("Server", "") and json.load(r).get("version") == __version__
        except (OSError, ValueError):
            return None
        return cls(host) if ours else None

    def _post(self, path: str, body: dict, timeout: float | None = None):
        import urllib.error
        import urllib.request

        request = urllib.request.Request(self.host + path, json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})
        try:
            return urllib.request.urlopen(request, timeout=timeout)
        except urllib.error.HTTPError as e:
            try:
                message = json.load(e).get("error", e.reason)
            except (OSError, ValueError):
                message = e.reason
            message = message.get("message", message) if isinstance(message, dict) else message
            raise ServerError(f"{self.host}: {message}") from None
        except OSError as e:
            raise ServerError(f"{self.host}: {getattr(e, 'reason', e)}") from None

    @staticmethod
    def _keep_alive(value: str) -> str | float:
        """--keep-alive as the API takes it: a number of seconds, or a duration ("5m")."""
        try:
            return float(value)
        except ValueError:
            return value

    def load(self, model: str, keep_alive: str | None) -> None:
        """Load the model there (Ollama's empty chat request), so a missing one fails now."""
        body = {"model": model, "messages": []}
        if keep_alive is not None:
            body["keep_alive"] = self._keep_alive(keep_alive)
        self._post("/api/chat", body).close()

    def show(self, model: str) -> dict:
        with self._post("/api/show", {"model": model}) as r:
            return json.load(r)

    def answer(self, model: str, messages: list[dict], settings: Settings, keep_alive: str | None) -> Answer:
        """Stream one answer to stdout (KeyboardInterrupt: finish_reason None)."""
        p = settings.params
        options: dict[str, Any] = {name: getattr(p, name) for name in OPTION_NAMES if getattr(p, name) is not None}
        options["num_predict"] = settings.max_tokens if settings.max_tokens is not None else -1
        if settings.num_ctx is not None:
            options["num_ctx"] = settings.num_ctx
        if settings.stop:
            options["stop"] = settings.stop
        body: dict[str, Any] = {"model": model, "messages": messages, "stream": True, "options": options}
        if settings.schema is not None:
            body["format"] = "json" if settings.schema == {"type": "object"} else settings.schema
        if settings.think is not None:
            body["think"] = settings.think
        if keep_alive is not None:
            body["keep_alive"] = self._keep_alive(keep_alive)
        result = Answer()
        printer = Printer(settings.hide_thinking)
        parts: dict[str, list[str]] = {"content": [], "reasoning": []}
        response = None
        try:
            response = self._post("/api/chat", body)
            for line in response:
                if not line.strip():
                    continue
                chunk = json.loads(line)
                if "error" in chunk:
                    raise ServerError(f"{self.host}: {chunk['error']}")
                message = chunk.get("message") or {}
                for kind, key in (("reasoning", "thinking"), ("content", "content")):
                    if message.get(key):
                        parts[kind].append(message[key])
                        printer.write(kind, message[key])
                if chunk.get("done"):
                    result.finish_reason = chunk.get("done_reason", "stop")
                    result.prompt_tokens = chunk.get("prompt_eval_count", 0)
                    result.generation_tokens = chunk.get("eval_count", 0)
                    if chunk.get("prompt_eval_duration"):
                        result.prompt_tps = result.prompt_tokens / (chunk["prompt_eval_duration"] / 1e9)
                    if chunk.get("eval_duration") and result.generation_tokens > 1:
                        result.generation_tps = (result.generation_tokens - 1) / (chunk["eval_duration"] / 1e9)
        except KeyboardInterrupt:
            pass
        except (OSError, http.client.HTTPException) as e:  # the connection broke mid-answer
            raise ServerError(f"{self.host}: {e}") from None
        finally:
            if response is not None:
                response.close()  # before the answer is done: the server cancels it
            printer.end()
            result.content = "".join(parts["content"])
            result.thinking = "".join(parts["reasoning"]).strip()
        click.echo()
        if settings.verbose:
            click.echo(f"prompt: {result.prompt_tokens} tokens, {result.prompt_tps:.1f} tokens/s | "
                       f"generation: {result.generation_tokens} tokens, {result.generation_tps:.1f} tokens/s | "
                       f"finish: {result.finish_reason or 'interrupted'} | server {self.host}", err=True)
        return result


# ---------------------------------------------------------------------------- the chat

HELP = """Available Commands:
  /set            Set session variables
  /show           Show model information
  /load <model>   Load a session or model
  /clear          Clear session context
  /bye            Exit
  /?, /help       Help for a command
  /? shortcuts    Help for keyboard shortcuts

Use \"\"\" to begin a multi-line message.
"""

HELP_SET = """Available Commands:
  /set parameter ...     Set a parameter
  /set system <string>   Set system message
  /set history           Enable history
  /set nohistory         Disable history
  /set format json       Enable JSON mode
  /set noformat          Disable formatting
  /set verbose           Show LLM stats
  /set quiet             Disable LLM stats
  /set think             Enable thinking
  /set nothink           Disable thinking
"""

HELP_PARAMETERS = """Parameters:
  /set parameter seed <int>             Random number seed (-1: random)
  /set parameter num_predict <int>      Max number of tokens to predict (-1: until the context is full)
  /set parameter top_k <int>            Pick from top k num of tokens
  /set parameter top_p <float>          Pick token based on sum of probabilities
  /set parameter min_p <float>          Pick token based on top token probability * min_p
  /set parameter num_ctx <int>          Set the context size
  /set parameter temperature <float>    Set creativity level
  /set parameter repeat_penalty <float> How strongly to penalize repetitions
  /set parameter repeat_last_n <int>    Set how far back to look for repetitions
  /set parameter presence_penalty <float>
  /set parameter frequency_penalty <float>
  /set parameter stop <string> <string> ...   Set the stop parameters
"""

HELP_SHOW = """Available Commands:
  /show info         Show details for this model
  /show license      Show model license
  /show modelfile    Show Modelfile for this model
  /show parameters   Show parameters for this model
  /show system       Show system message
  /show template     Show prompt template
"""

HELP_SHORTCUTS = """Available keyboard shortcuts:
  Ctrl + a            Move to the beginning of the line (Home)
  Ctrl + e            Move to the end of the line (End)
  Ctrl + w            Delete the word before the cursor
  Ctrl + u            Delete the line
  Up / Down           Previous / next message in the history
  Ctrl + c            Stop the model from responding; at an empty prompt: exit
  Ctrl + d            Exit (/bye)
"""

SAMPLING_NAMES = {f.name for f in fields(SamplingParams)}
INT_PARAMETERS = {"seed", "num_predict", "top_k", "num_ctx", "repeat_last_n"}


def history_file() -> Path:
    return Path.home() / ".mlxllm" / "history"


class Chat:
    """The interactive loop. `load` loads a model by name: (net, tokenizer)."""

    def __init__(self, name: str, net, tokenizer, settings: Settings, load, remote: Remote | None = None,
                 keep_alive: str | None = None) -> None:
        """remote: answers come from that server (net and tokenizer are None)."""
        self.name, self.net, self.tokenizer, self.settings, self._load = name, net, tokenizer, settings, load
        self.remote, self.keep_alive = remote, keep_alive
        self.messages: list[dict] = []
        self.user_parameters: dict[str, Any] = {}
        self.history = True

    # -- input

    def read(self) -> str | None:
        """The next message or command; None: leave (Ctrl-D, or Ctrl-C at an empty prompt)."""
        while True:
            try:
                line = input(">>> ")
            except EOFError:
                click.echo()
                return None
            except KeyboardInterrupt:
                click.echo()
                if readline.get_line_buffer().strip():  # Ctrl-C on a half-typed line clears it
                    continue
                return None
            if not line.lstrip().startswith('"""'):
                return line
            text = self._multiline(line.lstrip()[3:])
            if text is not None:
                return text

    def _multiline(self, first: str) -> str | None:
        """Lines up to the one ending with \"\"\" (None: Ctrl-C cancelled the message)."""
        lines = []
        line = first
        while True:
            if line.rstrip().endswith('"""'):
                lines.append(line.rstrip()[:-3])
                return "\n".join(lines).strip("\n")
            lines.append(line)
            try:
                line = input("... ")
            except EOFError:
                click.echo()
                return "\n".join(lines).strip("\n")
            except KeyboardInterrupt:
                click.echo()
                return None

    # -- the loop

    def loop(self) -> None:
        path = history_file()
        try:
            readline.read_history_file(path)
        except OSError:
            pass
        readline.set_history_length(1000)
        click.echo("Send a message (/? for help)", err=True)
        try:
            while True:
                text = self.read()
                if text is None:
                    return
                try:
                    if text.startswith("/"):
                        if self.command(text) is False:
                            return
                    elif text.strip():
                        self.say(text)
                except KeyboardInterrupt:  # before or after the answer's own handling
                    click.echo()
                except (ValueError, LookupError, RuntimeError, OSError) as e:  # say why, stay in the chat
                    click.echo(f"error: {e}", err=True)
        finally:
            worker().settle()
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                readline.write_history_file(path)
            except OSError:
                pass

    def say(self, text: str) -> None:
        settings = self.settings
        system = [{"role": "system", "content": settings.system}] if settings.system else []
        if self.remote is not None:
            user = {"role": "user", "content": text}
            result = self.remote.answer(self.name, system + self.messages + [user], settings, self.keep_alive)
            if result.finish_reason is not None:
                cut_off_note(result, None, settings)
                self.messages += [user, {"role": "assistant", "content": result.content}]
            return
        limit = min(settings.num_ctx or context_length(self.net), context_length(self.net))
        try:
            ids, kept = fit(self.tokenizer, system + self.messages + [{"role": "user", "content": text}],
                            settings, limit)
        except ValueError as e:
            click.echo(f"error: {e}", err=True)
            return
        max_tokens = budget(settings, len(ids), limit)
        prompt_text = render(self.tokenizer, kept, settings)
        result = answer(self.net, self.tokenizer, ids, settings, max_tokens, prompt_text)
        if result.finish_reason is None:  # Ctrl-C: this exchange leaves no trace
            return
        cut_off_note(result, max_tokens, settings)
        self.messages = kept[len(system):] + [{"role": "assistant", "content": result.content}]

    # -- commands

    def command(self, line: str) -> bool | None:
        """Run a /command; False: leave."""
        try:
            words = shlex.split(line)
        except ValueError:
            words = line.split()
        head, args = words[0].lower(), words[1:]
        if head in ("/bye", "/exit"):
            return False
        if head in ("/?", "/help"):
            topic = args[0].lower() if args else ""
            click.echo({"set": HELP_SET, "show": HELP_SHOW, "shortcuts": HELP_SHORTCUTS,
                        "shortcut": HELP_SHORTCUTS}.get(topic, HELP))
        elif head == "/clear":
            self.messages = []
            click.echo("Cleared session context")
        elif head == "/set":
            self._set(line, args)
        elif head == "/show":
            self._show(args)
        elif head == "/load":
            if len(args) != 1:
                click.echo("Usage:\n  /load <modelname>")
            else:
                self._load_model(args[0])
        else:
            click.echo(f"Unknown command '{words[0]}'. Type /? for help")
        return None

    def _set(self, line: str, args: list[str]) -> None:
        if not args:
            click.echo(HELP_SET)
            return
        what = args[0].lower()
        s = self.settings
        if what == "parameter":
            if len(args) < 3:
                click.echo(HELP_PARAMETERS)
                return
            self._set_parameter(args[1], args[2:])
        elif what == "system":
            # the rest of the line as typed, quotes removed, so spacing survives
            rest = line.split(None, 2)[2] if len(line.split(None, 2)) > 2 else ""
            if len(rest) >= 2 and rest[0] == rest[-1] and rest[0] in "\"'":
                rest = rest[1:-1]
            if not rest:
                click.echo("Usage:\n  /set system <message>")
                return
            s.system = rest
            click.echo("Set system message.")
        elif what in ("history", "nohistory"):
            self.history = what == "history"
            readline.set_auto_history(self.history)
            click.echo(f"Set history {'on' if self.history else 'off'}.")
        elif what == "format":
            if args[1:] != ["json"]:
                click.echo("Invalid or missing format. For 'json' mode use '/set format json'")
                return
            from .constrain import ANY_OBJECT
            s.schema = ANY_OBJECT
            click.echo("Set format to 'json' mode.")
        elif what == "noformat":
            s.schema = None
            click.echo("Disabled format.")
        elif what in ("verbose", "quiet"):
            s.verbose = what == "verbose"
            click.echo("Set 'verbose' mode." if s.verbose else "Set 'quiet' mode.")
        elif what in ("think", "nothink"):
            if what == "think" and self.tokenizer is not None and not thinks(self.tokenizer):
                click.echo(f"error: {self.name} does not support thinking", err=True)
                return
            s.think = what == "think"
            click.echo("Set 'think' mode." if s.think else "Set 'nothink' mode.")
        else:
            click.echo(f"Unknown command '/set {args[0]}'. Type /? for help")

    def _set_parameter(self, name: str, values: list[str]) -> None:
        s = self.settings
        name = name.lower()
        try:
            if name == "stop":
                s.stop = list(values)
                self.user_parameters["stop"] = list(values)
                click.echo(f"Set parameter 'stop' to '{', '.join(values)}'")
                return
            if name not in SAMPLING_NAMES | {"num_predict", "num_ctx"}:
                click.echo(f"Couldn't set parameter: unknown parameter '{name}'")
                return
            value = int(values[0]) if name in INT_PARAMETERS else float(values[0])
            if name == "num_predict":
                if value == 0 or value < -2:
                    raise ValueError("num_predict must be positive, or -1 (until the context is full)")
                s.max_tokens = value if value > 0 else None
            elif name == "num_ctx":
                if value < 1:
                    raise ValueError("num_ctx must be positive")
                s.num_ctx = value
            else:
                params = replace(s.params, **{name: value if name != "seed" or value >= 0 else None})
                params.validate()
                s.params = params
        except ValueError as e:
            click.echo(f"Couldn't set parameter: {e}")
            return
        self.user_parameters[name] = value
        click.echo(f"Set parameter '{name}' to '{values[0]}'")

    def _show(self, args: list[str]) -> None:
        from .cli import show_text

        if not args:
            click.echo(HELP_SHOW)
            return
        what = args[0].lower()
        if self.remote is not None and what in ("info", "template", "license", "modelfile"):
            self._show_remote(what)
        elif what == "system":
            click.echo(self.settings.system or "No system message was specified for this model.")
        elif what == "parameters":
            if self.user_parameters:
                click.echo("User defined parameters:")
                for k, v in self.user_parameters.items():
                    click.echo(f"{k:<30} {' '.join(map(str, v)) if isinstance(v, list) else v}")
                click.echo()
            click.echo("Model defined parameters:")
            model_defined = self.remote.show(self.name).get("parameters") if self.remote is not None \
                else show_text(self.net.gguf.path, "parameters")
            click.echo(model_defined or "No parameters were specified for this model.")
        elif what in ("info", "template", "license", "modelfile"):
            click.echo(show_text(self.net.gguf.path, what, name=self.name))
        else:
            click.echo(f"Unknown command '/show {args[0]}'. Type /? for help")

    def _show_remote(self, what: str) -> None:
        """/show from the server's /api/show."""
        data = self.remote.show(self.name)
        if what == "info":
            details, info = data.get("details", {}), data.get("model_info", {})
            arch = info.get("general.architecture", details.get("family", ""))
            for key, value in (("architecture", arch), ("parameters", details.get("parameter_size")),
                               ("context length", info.get(f"{arch}.context_length")),
                               ("embedding length", info.get(f"{arch}.embedding_length")),
                               ("quantization", details.get("quantization_level"))):
                click.echo(f"  {key:<18}{value}")
            click.echo(f"  {'server':<18}{self.remote.host}")
        else:
            click.echo(data.get(what) or f"No {what} was specified for this model.")

    def _load_model(self, name: str) -> None:
        click.echo(f"Loading model '{name}'")
        if self.remote is not None:
            self.remote.load(name, self.keep_alive)
            self.name = name
            return
        net, tokenizer = worker().call(self._load, name)  # an error: one line, the chat goes on (loop)
        self.name, self.net, self.tokenizer = name, net, tokenizer


def parse_format(value: str | None) -> dict | None:
    """--format: "json" (any JSON object), a JSON schema, or a file holding one."""
    if value is None or value == "":
        return None
    if value == "json":
        from .constrain import ANY_OBJECT
        return ANY_OBJECT
    text = value
    if not value.lstrip().startswith("{"):
        if not os.path.isfile(value):
            raise click.BadParameter('"json", a JSON schema, or a file holding one', param_hint="--format")
        text = Path(value).read_text()
    try:
        schema = json.loads(text)
    except json.JSONDecodeError as e:
        raise click.BadParameter(f"not a JSON schema: {e}", param_hint="--format") from None
    if not isinstance(schema, dict):
        raise click.BadParameter("a JSON schema is an object", param_hint="--format")
    return schema

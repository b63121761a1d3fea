"""The model commands Ollama users type: `pull`, `list` (`ls`), `rm`, `cp` on the store, and
`ps`, `stop` on a running server; `ensure` lets `run` pull a missing model first."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import sys
import time
import urllib.error
import urllib.request
from datetime import datetime, timezone

import click

from .models import ModelConfig, ModelNotFound, catalog, lookup
from .pull import PullError, pull
from .store import InvalidDigest, InvalidName, ModelName, StoreError, find, local_store

DEFAULT_HOST = "http://127.0.0.1:11434"


def _one_line_errors(f):
    """A store, registry or server error is one line on stderr and exit code 1."""
    @functools.wraps(f)
    def wrapper(*args, **kwargs):
        try:
            return f(*args, **kwargs)
        except (PullError, StoreError, InvalidName, InvalidDigest, ModelNotFound, OSError) as e:
            if os.environ.get("MLXLLM_DEBUG"):
                raise
            click.echo(f"error: {e}", err=True)
            sys.exit(1)
    return wrapper


def _progress_shown() -> bool:
    return sys.stderr.isatty() and not os.environ.get("MLXLLM_NO_PROGRESS")


class _Bars:
    """Ollama's pull display on a terminal: a status line per step, a bar per blob."""

    def __init__(self) -> None:
        from tqdm import tqdm

        self.tqdm = tqdm
        self.bars: dict[str, object] = {}

    def __call__(self, event: dict) -> None:
        digest = event.get("digest")
        if not digest or "total" not in event:
            click.echo(event["status"], err=True)
            return
        bar = self.bars.get(digest)
        if bar is None:
            bar = self.bars[digest] = self.tqdm(total=event["total"], desc=event["status"], unit="B", unit_scale=True,
                                                file=sys.stderr, leave=True)
        bar.update(event["completed"] - bar.n)
        if event["completed"] >= event["total"]:
            bar.close()


def do_pull(name: str, insecure: bool = False) -> ModelConfig:
    progress = _Bars() if _progress_shown() else (lambda event: None)
    entry = pull(name, insecure=insecure, progress=progress)
    return lookup(str(entry.name))


def ensure(name: str, insecure: bool = False) -> ModelConfig:
    """`run`'s model: as named, or pulled first when it is a registry name not here yet (as
    `ollama run` does)."""
    try:
        return lookup(name)
    except ModelNotFound as missing:
        try:
            ModelName.parse(name)
        except InvalidName:
            raise missing from None
        click.echo(f"pulling {name}", err=True)
        try:
            return do_pull(name, insecure)
        except PullError as e:  # a typo is more likely than a registry's model: say both
            raise PullError(f"{e}; nor is it here: {missing}") from None


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} PB"


def _ago(iso: str) -> str:
    seconds = time.time() - datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size:
            n = int(seconds // size)
            return f"{n} {unit}{'s' if n > 1 else ''} ago"
    return "just now"


def _row(config: ModelConfig) -> dict:
    if config.digest:
        digest, size, modified = config.digest, config.size, config.modified_at
    else:  # a loose file: an id from its path, size and time, as the server's listing has
        st = os.stat(config.path)
        digest = hashlib.sha256(f"{os.path.realpath(config.path)}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()
        size = st.st_size
        modified = datetime.fromtimestamp(st.st_mtime, timezone.utc).isoformat().replace("+00:00", "Z")
    return {"name": config.name, "id": digest.removeprefix("sha256:")[:12], "size": size, "modified_at": modified,
            "source": config.source, "path": config.path}


@click.command("pull")
@click.argument("model")
@click.option("--insecure", is_flag=True, help="Plain HTTP to the registry (a registry on 127.0.0.1 gets it anyway).")
@_one_line_errors
def pull_command(model: str, insecure: bool) -> None:
    """Pull MODEL from a registry (Ollama's by default: `qwen3:0.6b`, `HOST/NAMESPACE/MODEL:TAG`)
    or from Hugging Face (`hf.co/ORG/REPO[:QUANT]`) into the store. An interrupted pull resumes."""
    config = do_pull(model, insecure)
    click.echo(f"pulled {config.name} ({_human(config.size or 0)})")


@click.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@_one_line_errors
def list_command(as_json: bool) -> None:
    """List the models loadable by name: the store, Ollama's store, the models folder, packages."""
    rows = []
    for config in catalog():
        try:
            rows.append(_row(config))
        except OSError:
            continue
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    width = max([len(r["name"]) for r in rows] + [4]) + 3
    click.echo(f"{'NAME':<{width}}{'ID':<15}{'SIZE':<11}MODIFIED")
    for r in rows:
        click.echo(f"{r['name']:<{width}}{r['id']:<15}{_human(r['size']):<11}{_ago(r['modified_at'])}")


@click.command("rm")
@click.argument("models", nargs=-1, required=True)
@_one_line_errors
def rm_command(models: tuple[str, ...]) -> None:
    """Remove models from the store (the blobs no other model uses go too)."""
    store = local_store()
    for text in models:
        name = ModelName.parse(text)
        if store.find(name) is None:
            entry = find(name)
            if entry is not None:
                raise StoreError(f"{name} is in Ollama's store ({entry.store.root}): remove it with `ollama rm`")
            raise StoreError(f"model {text!r} not found")
        store.remove(name)
        click.echo(f"deleted '{name}'")


@click.command("cp")
@click.argument("source")
@click.argument("destination")
@_one_line_errors
def cp_command(source: str, destination: str) -> None:
    """Copy a stored model to a new name (no blob is copied in the store)."""
    entry = find(source)
    if entry is None:
        raise StoreError(f"model {source!r} not found in the store")
    copied = local_store().copy(entry, ModelName.parse(destination))
    click.echo(f"copied '{entry.name}' to '{copied.name}'")


def _server(path: str, body: dict | None = None, host: str | None = None) -> dict:
    host = (host or os.environ.get("MLXLLM_HOST") or DEFAULT_HOST).rstrip("/")
    if "://" not in host:
        host = "http://" + host
    headers = {"Content-Type": "application/json"}
    if os.environ.get("MLXLLM_API_KEY"):
        headers["Authorization"] = f"Bearer {os.environ['MLXLLM_API_KEY']}"
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(host + path, data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        try:
            message = json.loads(e.read()).get("error")
        except ValueError:
            message = None
        message = message.get("message") if isinstance(message, dict) else message
        raise StoreError(message or f"HTTP {e.code} from {host}{path}") from None
    except urllib.error.URLError as e:
        raise StoreError(f"no server at {host} ({e.reason}): start one with `mlxllm serve`, or set MLXLLM_HOST") from None


@click.command("ps")
@click.option("--host", default=None, help=f"The server (default: MLXLLM_HOST or {DEFAULT_HOST}).")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@_one_line_errors
def ps_command(host: str | None, as_json: bool) -> None:
    """List the models a running server has loaded."""
    models = _server("/api/ps", host=host).get("models", [])
    if as_json:
        click.echo(json.dumps(models, indent=2))
        return
    width = max([len(m["name"]) for m in models] + [4]) + 3
    click.echo(f"{'NAME':<{width}}{'ID':<15}{'SIZE':<11}{'PROCESSOR':<11}UNTIL")
    for m in models:
        processor = "GPU" if m.get("size_vram") else "CPU"
        until = "forever" if m["expires_at"].startswith("2318") else m["expires_at"]
        click.echo(f"{m['name']:<{width}}{m['digest'][:12]:<15}{_human(m['size']):<11}{processor:<11}{until}")


@click.command("stop")
@click.argument("model")
@click.option("--host", default=None, help=f"The server (default: MLXLLM_HOST or {DEFAULT_HOST}).")
@_one_line_errors
def stop_command(model: str, host: str | None) -> None:
    """Unload MODEL from a running server now (Ollama's `stop`: keep_alive 0)."""
    _server("/api/generate", {"model": model, "keep_alive": 0}, host)


COMMANDS = (pull_command, list_command, rm_command, cp_command, ps_command, stop_command)


def register(group: click.Group) -> None:
    for command in COMMANDS:
        group.add_command(command)
    group.add_command(list_command, "ls")


# Ollama's parameter names that are `run`'s sampling flags too.
RUN_PARAMETERS = ("temperature", "top_k", "top_p", "min_p", "repeat_penalty", "repeat_last_n", "presence_penalty",
                  "frequency_penalty", "seed")


def apply_model_defaults(config: ModelConfig, opts: dict, system: str | None,
                         max_tokens: int) -> tuple[str | None, int, list[str]]:
    """`run` with a pulled model, as `ollama run` applies its manifest: flags left at their
    defaults take its parameters (`num_predict` for --max-tokens), its `stop` strings apply, and
    without --system its system prompt. (system, max_tokens, stop)."""
    ctx = click.get_current_context()

    def unset(key: str) -> bool:
        return ctx.get_parameter_source(key) == click.core.ParameterSource.DEFAULT

    for key in RUN_PARAMETERS:
        if key in config.params and key in opts and unset(key):
            opts[key] = config.params[key]
    n = config.params.get("num_predict")
    if isinstance(n, int) and not isinstance(n, bool) and (n > 0 or n == -1) and unset("max_tokens"):
        max_tokens = n
    stop = config.params.get("stop", [])
    stop = [stop] if isinstance(stop, str) else [x for x in stop if isinstance(x, str)] if isinstance(stop, list) else []
    return (system if system is not None else config.system), max_tokens, stop

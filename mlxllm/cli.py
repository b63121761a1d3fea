"""The `mlxllm` command line."""

from __future__ import annotations

import json
import os
import sys

import click

from . import _blas
from .embeddings import POOLINGS
from .embeddings import embed as embed_texts
from .generate import stream_generate
from .gguf import GGUFError, GGUFFile
from .loader import LoadError, load
from .models import ModelNotFound, resolve
from .quant import UnsupportedTypeError
from .registry import REGISTRY, ArchError
from .sample import SamplingParams

# Errors that describe bad input: one line on stderr and exit code 1, never a traceback
# (MLXLLM_DEBUG=1 shows it).
USER_ERRORS = (GGUFError, ArchError, LoadError, ModelNotFound, UnsupportedTypeError, ValueError)


class Group(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except USER_ERRORS as e:
            if os.environ.get("MLXLLM_DEBUG"):
                raise
            click.echo(f"error: {e}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            sys.exit(130)


@click.group(cls=Group)
@click.version_option(package_name="mlxllm")
def main() -> None:
    """Run GGUF models on MLX."""


def _cpu_kernels_state() -> str:
    from .kernels import cpu

    if cpu.active() is not None:
        return f"CPU kernels on {cpu.KERNELS.num_threads()} threads"
    return "CPU kernels off" + (f": {cpu.UNAVAILABLE}" if cpu.UNAVAILABLE else " (not the CPU)")


def _human(n: float, unit: str = "") -> str:
    for prefix in ("", "K", "M", "G", "T"):
        if abs(n) < 1000:
            return f"{n:.4g}{prefix}{unit}"
        n /= 1000
    return f"{n:.4g}P{unit}"


@main.command()
@click.argument("model")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def show(model: str, as_json: bool) -> None:
    """Describe a GGUF model: architecture, size, quant types, tokenizer."""
    with GGUFFile(resolve(model)) as gf:
        info = gf.summary()
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    rows = [
        ("architecture", info["architecture"]),
        ("name", info["name"]),
        ("parameters", _human(info["parameters"])),
        ("file size", _human(info["file_size"], "B")),
        ("context length", info["context_length"]),
        ("embedding length", info["embedding_length"]),
        ("layers", info["layers"]),
        ("heads", f"{info['heads']} (kv {info['kv_heads']})"),
        ("tensor types", ", ".join(f"{t} x{n}" for t, n in info["tensor_types"].items())),
        ("tokenizer", f"{info['tokenizer']} ({info['vocab_size']} tokens)"),
        ("chat template", "yes" if info["chat_template"] else "no"),
    ]
    click.echo(f"  {info['path']}")
    for key, value in rows:
        click.echo(f"  {key:<18}{value}")


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def archs(as_json: bool) -> None:
    """List the architectures every installed plugin provides."""
    entries = REGISTRY.all()
    rows = [{"name": e.name,
             "aliases": list(e.arch.aliases) if e.arch else [],
             "distribution": e.distribution,
             "module": ", ".join(e.targets),
             "error": e.error} for e in entries]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for r in rows:
        aliases = f" (aliases: {', '.join(r['aliases'])})" if r["aliases"] else ""
        status = f"  ERROR: {r['error']}" if r["error"] else ""
        click.echo(f"{r['name']:<14}{r['distribution']:<24}{r['module']}{aliases}{status}")


@main.command()
@click.argument("hf_dir", type=click.Path(exists=True, file_okay=False))
@click.option("-o", "--outfile", default=None, help="Output GGUF path (default: <HF_DIR>-<outtype>.gguf beside it).")
@click.option("--outtype", type=click.Choice(["f32", "f16", "bf16", "q8_0"]), default="f16", show_default=True,
              help="Type of the weight matrices (norms, biases and routers stay F32).")
def convert(hf_dir: str, outfile: str | None, outtype: str) -> None:
    """Convert a Hugging Face safetensors checkpoint folder to GGUF."""
    from .convert import convert as convert_checkpoint

    out = convert_checkpoint(hf_dir, outfile, outtype=outtype, progress=sys.stderr.isatty())
    click.echo(f"wrote {out} ({_human(out.stat().st_size, 'B')})")


def sampling_options(f):
    """The sampler flags `run` shares with the server's options (llama.cpp's defaults)."""
    d = SamplingParams()
    for name, kind, default, help_ in reversed([
        ("--temperature", float, d.temperature, "0 is greedy."),
        ("--top-k", int, d.top_k, "Keep the k most likely tokens (0: all)."),
        ("--top-p", float, d.top_p, "Keep the most likely tokens up to this probability mass."),
        ("--min-p", float, d.min_p, "Drop tokens below this fraction of the top token's probability."),
        ("--repeat-penalty", float, d.repeat_penalty, "Penalize tokens seen in the last --repeat-last-n."),
        ("--repeat-last-n", int, d.repeat_last_n, "Window for the penalties (-1: all, 0: off)."),
        ("--presence-penalty", float, d.presence_penalty, None),
        ("--frequency-penalty", float, d.frequency_penalty, None),
        ("--seed", int, None, "Same seed, same output."),
    ]):
        f = click.option(name, type=kind, default=default, show_default=default is not None, help=help_)(f)
    return f


def speculation_options(f):
    """Speculative decoding flags `run`, `bench` and `serve` share."""
    f = click.option("--kv-bits", type=click.Choice(["8", "4"]), default=None,
                     help="Store the KV cache quantized (8: 3.2x less memory, 4: 5.3x less; see README).")(f)
    f = click.option("--draft-tokens", type=click.IntRange(min=1), default=4, show_default=True,
                     help="Tokens drafted per step when speculating.")(f)
    f = click.option("--prompt-lookup", is_flag=True,
                     help="Speculate greedy decoding with drafts from the context's own n-grams.")(f)
    f = click.option("--draft", "draft_name", default=None, metavar="MODEL",
                     help="A small model with the same vocabulary that drafts tokens for greedy decoding.")(f)
    return f


def _speculation(draft_name: str | None, prompt_lookup: bool, draft_tokens: int, kv_bits: str | None) -> dict:
    """stream_generate's / BatchGenerator's speculation and cache keywords from the flags."""
    if draft_name and prompt_lookup:
        raise click.BadParameter("choose --draft or --prompt-lookup, not both")
    return {"draft_model": load(draft_name)[0] if draft_name else None, "prompt_lookup": prompt_lookup,
            "draft_tokens": draft_tokens, "kv_bits": int(kv_bits) if kv_bits else None}


def _params(opts: dict) -> SamplingParams:
    params = SamplingParams(**{k: opts.pop(k) for k in list(opts) if k in SamplingParams.__dataclass_fields__})
    params.validate()
    return params


@main.command()
@click.argument("model")
@click.argument("prompt", required=False)
@sampling_options
@click.option("--max-tokens", type=click.IntRange(min=1), default=512, show_default=True)
@click.option("--system", default=None, help="System prompt for chat models.")
@click.option("--raw", is_flag=True, help="Send the prompt as is, without the chat template.")
@click.option("--verbose", is_flag=True, help="Print load and speed statistics to stderr.")
@speculation_options
def run(model: str, prompt: str | None, max_tokens: int, system: str | None, raw: bool, verbose: bool,
        draft_name: str | None, prompt_lookup: bool, draft_tokens: int, kv_bits: str | None, **opts) -> None:
    """Generate from MODEL. Without PROMPT (and no piped input): an interactive chat."""
    from .cli_models import apply_model_defaults, ensure
    config = ensure(model)  # a registry name not here yet is pulled first, as `ollama run` does
    system = apply_model_defaults(config, opts, system)  # a pulled manifest's parameters and system prompt
    params = _params(opts)
    speculation = _speculation(draft_name, prompt_lookup, draft_tokens, kv_bits)
    piped = None if sys.stdin.isatty() else sys.stdin.read()
    net, tokenizer = load(model)
    if verbose:
        stats = net.load_stats
        click.echo(f"loaded {model} in {stats.seconds:.2f} s ({stats.nbytes / 1e6:.0f} MB of weights; BLAS: {_blas.loaded or 'reference'}; {_cpu_kernels_state()})", err=True)
    if prompt is None and piped is None:
        _chat(net, tokenizer, params, max_tokens, system, verbose, speculation)
        return
    text = "\n\n".join(p for p in (prompt, piped) if p)
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
    full = text if raw else tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    _stream(net, tokenizer, full, params, max_tokens, verbose, speculation)


def _stream(net, tokenizer, prompt: str, params: SamplingParams, max_tokens: int, verbose: bool,
            speculation: dict) -> str:
    out = []
    last = None
    for r in stream_generate(net, tokenizer, prompt, params, max_tokens, **speculation):
        click.echo(r.text, nl=False)
        out.append(r.text)
        last = r
    click.echo()
    if verbose and last is not None:
        click.echo(f"prompt: {last.prompt_tokens} tokens, {last.prompt_tps:.1f} tokens/s | "
                   f"generation: {last.generation_tokens} tokens, {last.generation_tps:.1f} tokens/s | "
                   f"peak memory {last.peak_memory_gb:.2f} GB | finish: {last.finish_reason}"
                   + (f" | drafts accepted {last.draft_acceptance:.0%}" if last.draft_acceptance is not None else ""),
                   err=True)
    return "".join(out)


def _chat(net, tokenizer, params, max_tokens, system, verbose, speculation) -> None:
    messages = [{"role": "system", "content": system}] if system else []
    click.echo("Send a message (/bye to leave).", err=True)
    while True:
        try:
            line = input(">>> ")
        except EOFError:
            click.echo()
            return
        if line.strip() in ("/bye", "/exit"):
            return
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        try:
            answer = _stream(net, tokenizer, prompt, params, max_tokens, verbose, speculation)
        except KeyboardInterrupt:  # stop this answer, keep the conversation
            click.echo()
            messages.pop()
            continue
        messages.append({"role": "assistant", "content": answer})


@main.command()
@click.argument("model")
@click.argument("texts", nargs=-1)
@click.option("--pooling", type=click.Choice(POOLINGS), default=None,
              help="Override the file's pooling (none: one vector per token; rank: a reranker's scores).")
@click.option("--no-normalize", is_flag=True, help="Keep the pooled vectors as they are (default: L2-normalized).")
@click.option("--no-truncate", is_flag=True, help="Refuse a text past the model's context instead of cutting it.")
def embed(model: str, texts: tuple[str, ...], pooling: str | None, no_normalize: bool, no_truncate: bool) -> None:
    """Embed TEXTS (or, without them, each line of stdin) with MODEL: a JSON array, one
    vector per text and a line each."""
    if not texts:
        if sys.stdin.isatty():
            raise click.UsageError("give TEXT arguments or pipe lines on stdin")
        texts = tuple(sys.stdin.read().splitlines())
    net, tokenizer = load(model)
    vectors = embed_texts(net, tokenizer, list(texts), pooling=pooling, normalize=not no_normalize,
                        truncate=not no_truncate)
    click.echo("[" + ",\n".join(json.dumps(v) for v in vectors) + "]")


@main.command()
@click.argument("model")
@click.option("-p", "--n-prompt", type=click.IntRange(min=1), default=512, show_default=True, help="Prompt tokens (pp).")
@click.option("-n", "--n-gen", type=click.IntRange(min=1), default=128, show_default=True, help="Generated tokens (tg).")
@click.option("-r", "--repetitions", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@click.option("--layout", type=click.Choice(["auto", "dense", "quantized"]), default="auto", show_default=True,
              help="Weights as float32 (dense) or in their quantized layouts; auto: the device's default.")
@speculation_options
def bench(model: str, n_prompt: int, n_gen: int, repetitions: int, as_json: bool, layout: str,
          draft_name: str | None, prompt_lookup: bool, draft_tokens: int, kv_bits: str | None) -> None:
    """Prompt processing (pp) and generation (tg) speed, llama-bench style. With --draft or
    --prompt-lookup, also greedy generation with and without speculation on one prompt."""
    import mlx.core as mx

    from .bench import bench as run_bench

    mx.reset_peak_memory()
    net, tokenizer = load(model, dense={"auto": None, "dense": True, "quantized": False}[layout])
    results = run_bench(net, tokenizer, n_prompt, n_gen, repetitions, kv_bits=int(kv_bits) if kv_bits else None)
    speculation = _speculation(draft_name, prompt_lookup, draft_tokens, None)
    speculation.pop("kv_bits")
    if speculation["draft_model"] is not None or prompt_lookup:
        from .bench import bench_speculation
        results.update(bench_speculation(net, tokenizer, n_gen, repetitions, **speculation))
    info = {"model": model, "layout": layout, "load_s": net.load_stats.seconds, "weights_mb": net.load_stats.nbytes / 1e6,
            "peak_memory_gb": mx.get_peak_memory() / 1e9, "blas": _blas.loaded,
            "cpu_kernels": _cpu_kernels_state(), "tokens_per_s": results}
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    click.echo(f"model {model}: load {info['load_s']:.2f} s, weights {info['weights_mb']:.0f} MB, "
               f"peak memory {info['peak_memory_gb']:.2f} GB, BLAS {info['blas'] or 'reference'}, {info['cpu_kernels']}")
    click.echo(f"{'test':<8}{'tokens/s':>12}{'+/-':>10}")
    for name, r in results.items():
        extra = f"  ({r['note']})" if "note" in r else ""
        click.echo(f"{name:<8}{r['mean']:>12.2f}{r['stdev']:>10.2f}{extra}")


def _seconds(value: str) -> float | None:
    """--keep-alive: seconds or a duration ("5m", "1h"); negative: forever (None)."""
    from .server import ApiError, keep_alive_of

    try:
        seconds = keep_alive_of({"keep_alive": value})
    except ApiError as e:
        raise click.BadParameter(e.message) from None
    return None if seconds is None else float(seconds)


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (0.0.0.0: every interface).")
@click.option("--port", type=click.IntRange(0, 65535), default=11434, show_default=True,
              help="Port (Ollama's by default; 0 picks a free one, logged at start).")
@click.option("--keep-alive", default="5m", show_default=True,
              help="How long a model stays loaded after its last request (\"5m\", \"30s\", -1: forever).")
@click.option("--parallel", type=click.IntRange(min=1), default=16, show_default=True,
              help="Requests decoded together per model; more wait for a free slot.")
@click.option("--preload", multiple=True, help="Model to load at start (repeatable).")
@click.option("--models-dir", "models_dirs", multiple=True, type=click.Path(exists=True, file_okay=False),
              help="A folder whose .gguf files requests may name (repeatable); requests name models, never paths.")
@click.option("--max-body-mb", type=click.FloatRange(min=0.001), default=16.0, show_default=True,
              help="Largest request body accepted (413 above it).")
@click.option("--prefix-cache-mb", type=click.FloatRange(min=0), default=512.0, show_default=True,
              help="Memory per model for the KV of finished prompts, reused by requests sharing a prefix (0: off).")
@click.option("--api-key", default=None, help="Require this key (Authorization: Bearer KEY) on every route but "
              "/ and /health [env MLXLLM_API_KEY].")
@click.option("--allowed-host", "allowed_hosts", multiple=True,
              help="A Host name to serve besides loopback names, IPs and this machine's name (repeatable; * any) "
                   "[env MLXLLM_ALLOWED_HOSTS].")
@click.option("--allowed-origin", "allowed_origins", multiple=True,
              help="A browser Origin to allow besides localhost's, with * wildcards (repeatable) "
                   "[env MLXLLM_ORIGINS or OLLAMA_ORIGINS].")
@speculation_options
def serve(host: str, port: int, keep_alive: str, parallel: int, preload: tuple[str, ...], max_body_mb: float,
          prefix_cache_mb: float, api_key: str | None, allowed_hosts: tuple[str, ...],
          allowed_origins: tuple[str, ...], draft_name: str | None, prompt_lookup: bool, draft_tokens: int,
          kv_bits: str | None, models_dirs: tuple[str, ...] = ()) -> None:
    """Serve the Ollama (/api) and OpenAI (/v1) APIs; models load on demand by name or path.
    Speculation (--draft, --prompt-lookup) applies while one greedy request is decoding."""
    from .server import Security
    from .server import serve as run_server

    if draft_name and prompt_lookup:
        raise click.BadParameter("choose --draft or --prompt-lookup, not both")
    if draft_name:  # an unknown draft model is a start-up error, not every load's
        from .models import resolve
        resolve(draft_name)
    run_server(host, port, keep_alive=_seconds(keep_alive), parallel=parallel, preload=preload,
               max_body=int(max_body_mb * (1 << 20)), prefix_cache_bytes=int(prefix_cache_mb * (1 << 20)),
               speculation={"draft": draft_name, "prompt_lookup": prompt_lookup, "draft_tokens": draft_tokens},
               kv_bits=int(kv_bits) if kv_bits else None,
               security=Security.from_env(api_key, allowed_hosts, allowed_origins), models_dirs=models_dirs)


# pull, list, rm, cp, ps, stop
from .cli_models import register as _register_model_commands

_register_model_commands(main)

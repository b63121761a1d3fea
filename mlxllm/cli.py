"""The `mlxllm` command line."""

from __future__ import annotations

import json
import os
import sys
import threading
from contextlib import contextmanager

import click

from . import _blas
from .chat import ServerError
from .embeddings import POOLINGS
from .embeddings import embed as embed_texts
from .gguf import GGUFError, GGUFFile
from .loader import LoadError, load
from .models import ModelNotFound, resolve
from .pull import PullError
from .quant import UnsupportedTypeError
from .registry import REGISTRY, ArchError
from .sample import SamplingParams

# Errors that describe bad input: one line on stderr and exit code 1, never a traceback
# (MLXLLM_DEBUG=1 shows it).
USER_ERRORS = (GGUFError, ArchError, LoadError, ModelNotFound, UnsupportedTypeError, ValueError,
               PullError, ServerError)  # `run` pulls a name it does not have: an unreachable registry is one line too


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
            click.echo(err=True)  # the shell's prompt on a line of its own, after "^C"
            from . import chat
            if chat.busy():  # MLX work still running on run's worker thread: an interpreter
                sys.stdout.flush()  # exiting around it aborts ("terminate called ..."), so
                sys.stderr.flush()  # leave without tearing it down
                os._exit(130)
            sys.exit(130)


@click.group(cls=Group, invoke_without_command=True)
@click.version_option(package_name="mlxllm")
@click.pass_context
def main(ctx: click.Context) -> None:
    """Run GGUF models on MLX."""
    if ctx.invoked_subcommand is None:  # `mlxllm` alone: the help, as a question answered
        click.echo(ctx.get_help())


def progress_shown() -> bool:
    """Progress bars and spinners go to stderr, and only when it is a terminal: a pipe or a
    log file gets the results alone (MLXLLM_NO_PROGRESS=1 turns them off everywhere)."""
    return sys.stderr.isatty() and not os.environ.get("MLXLLM_NO_PROGRESS")


@contextmanager
def activity(description: str):
    """A line on stderr that counts the seconds while something without steps runs."""
    if not progress_shown():
        yield
        return
    from tqdm import tqdm

    bar = tqdm(total=None, desc=description, bar_format="{desc} {elapsed}", leave=False, file=sys.stderr)
    done = threading.Event()

    def tick() -> None:
        while not done.wait(0.25):
            bar.refresh()

    ticker = threading.Thread(target=tick, daemon=True)
    ticker.start()
    try:
        yield
    finally:
        done.set()
        ticker.join()
        bar.close()


def load_model(model: str, **kwargs):
    """load() with a spinner on a terminal: a large file takes a while."""
    path = resolve(model)
    size = os.path.getsize(path) if os.path.isfile(path) else 0
    with activity(f"loading {model} ({_human(size, 'B')})" if size else f"loading {model}"):
        return load(model, **kwargs)


def _blas_state() -> str:
    """The BLAS the weight products run on: the one our CPU kernels bind (kernels.BLAS),
    else the one slipped under MLX (_blas), else MLX's wheel's own (reference on Linux)."""
    from . import kernels

    if kernels.cpu.active() is not None and kernels.BLAS:
        return kernels.BLAS
    return _blas.loaded or "MLX's own (reference BLAS on Linux)"


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


# GGUF's recommended sampling keys (general.sampling.*) by the names Ollama's parameters use.
SAMPLING_KEYS = {"general.sampling.temp": "temperature", "general.sampling.top_k": "top_k",
                 "general.sampling.top_p": "top_p", "general.sampling.min_p": "min_p",
                 "general.sampling.penalty_repeat": "repeat_penalty",
                 "general.sampling.penalty_last_n": "repeat_last_n"}


def _parameters(gf: GGUFFile) -> list[tuple[str, str]]:
    """(name, value) of what the file sets for generation: its recommended sampling
    values, and the stop tokens (end-of-generation tokens) that end an answer."""
    from .tokenizer import Tokenizer

    out = [(name, str(gf.metadata.get(key))) for key, name in SAMPLING_KEYS.items() if key in gf.metadata]
    if "tokenizer.ggml.tokens" in gf.metadata:
        tokenizer = Tokenizer.from_metadata(gf.metadata)
        for i in sorted(tokenizer.eos_ids):
            out.append(("stop", json.dumps(tokenizer.token_to_bytes(i).decode("utf-8", "replace"))))
    return out


def _metadata_value(value) -> str:
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        return json.dumps(value) if len(value) <= 8 else f"[{len(value)} items]"
    return json.dumps(value) if isinstance(value, str) else str(value)


def show_text(path: str, what: str, name: str | None = None, config=None) -> str:
    """`show`'s text for one view: info, template, system, parameters, license, modelfile,
    verbose. A pulled model's manifest (`config`, a models.ModelConfig) supplies the template,
    system prompt, parameters and license where it has them, as `ollama show` reports them."""
    with GGUFFile(path) as gf:
        m = gf.metadata
        template = (config and config.template) or m.get("tokenizer.chat_template") or ""
        license_ = (config and config.license) or m.get("general.license") or ""
        system = (config and config.system) or ""
        parameters = [tuple(line.split(None, 1)) for line in config.parameters_text().splitlines()] \
            if config and config.params else _parameters(gf)
        if what == "template":
            return template or "(no chat template in the file: mlxllm uses its fallback, see README)"
        if what == "license":
            return license_
        if what == "system":
            return system
        if what == "parameters":
            return "\n".join(f"{k:<30} {v}" for k, v in parameters)
        if what == "modelfile":
            lines = ['# Modelfile generated by "mlxllm show"', "# To build a new Modelfile based on this, replace FROM with:",
                     f"# FROM {name or path}", "", f"FROM {path}"]
            if template:
                lines.append(f'TEMPLATE """{template}"""')
            if system:
                lines.append(f'SYSTEM """{system}"""')
            lines += [f"PARAMETER {k} {v}" for k, v in parameters]
            if license_:
                lines.append(f'LICENSE """{license_}"""')
            return "\n".join(lines)
        info = gf.summary()
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
        lines = [f"  {info['path']}"] + [f"  {key:<18}{value}" for key, value in rows]
        if parameters:
            lines += ["", "  Parameters"] + [f"    {k:<18}{v}" for k, v in parameters]
        if system:
            lines += ["", "  System"] + [f"    {line}" for line in system.strip().splitlines()[:2]]
        if license_:
            first = license_.strip().splitlines()
            lines += ["", "  License"] + [f"    {line}" for line in first[:2]] + (["    ..."] if len(first) > 2 else [])
        if what == "verbose":
            lines += ["", "  Metadata"] + [f"    {k:<44}{_metadata_value(v)}" for k, v in m.items()]
            lines += ["", "  Tensors"] + [f"    {t:<44}{i.qtype.name:<8}{list(i.shape)}" for t, i in gf.tensors.items()]
        return "\n".join(lines)


@main.command()
@click.argument("model")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@click.option("--template", "view", flag_value="template", help="Show the chat template (Jinja, as in the file).")
@click.option("--parameters", "view", flag_value="parameters",
              help="Show the file's generation parameters: recommended sampling, stop tokens.")
@click.option("--modelfile", "view", flag_value="modelfile", help="Show the model as an Ollama Modelfile.")
@click.option("--license", "view", flag_value="license", help="Show the license text.")
@click.option("--system", "view", flag_value="system", help="Show the system prompt (a pulled model's).")
@click.option("-v", "--verbose", "view", flag_value="verbose", help="Also every metadata key and tensor.")
def show(model: str, as_json: bool, view: str | None) -> None:
    """Describe a model (a name or a GGUF file): architecture, size, quant types, tokenizer;
    a pulled model's template, system prompt and parameters from its manifest (Ollama's `show`)."""
    from .models import lookup

    config = lookup(model)
    if as_json:
        with GGUFFile(config.path) as gf:
            click.echo(json.dumps(gf.summary(), indent=2))
        return
    click.echo(show_text(config.path, view or "info", name=model, config=config))


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
        ("--seed", int, None, "Same seed, same output (-1: a random seed)."),
    ]):
        f = click.option(name, type=kind, default=default, show_default=default is not None, help=help_)(f)
    return f


def speculation_options(f):
    """Speculative decoding flags `run`, `bench` and `serve` share."""
    f = click.option("--kv-bits", type=click.Choice(["16", "8", "4"]), default=None,
                     help="Store the KV cache in fewer bits (16: float16, as llama.cpp's default, 2x less memory; "
                          "8: 3.2x less; 4: 5.3x less; see README).")(f)
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


class RunCommand(click.Command):
    """`run` also takes Ollama's spelling `--think=false` / `--think=true`."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        args = [{"--think=false": "--nothink", "--think=true": "--think"}.get(a, a) for a in args]
        return super().parse_args(ctx, args)


@main.command(cls=RunCommand)
@click.argument("model")
@click.argument("prompt", required=False)
@sampling_options
@click.option("--max-tokens", "--num-predict", type=click.IntRange(min=-1), default=512, show_default=True,
              help="Most tokens in an answer (-1: until the context is full).")
@click.option("--ctx-size", "--num-ctx", "ctx_size", type=click.IntRange(min=1), default=None,
              help="Context size in tokens: prompt and answer together (default: the model's).")
@click.option("--system", default=None, help="System prompt for chat models.")
@click.option("--format", "format_", default=None, metavar="json|SCHEMA",
              help='Answer in JSON: "json" (any object), or a JSON schema (inline or a file) it follows.')
@click.option("--think/--nothink", default=None,
              help="Let a thinking model think first, or not (--think=false too; default: its template's).")
@click.option("--hidethinking", is_flag=True, help="Leave a thinking model's thinking out of the output.")
@click.option("--raw", is_flag=True, help="Send the prompt as is, without the chat template.")
@click.option("--verbose", is_flag=True, help="Print load and speed statistics to stderr.")
@click.option("--keep-alive", default=None, metavar="DURATION",
              help='With a running server: how long it keeps the model loaded after this ("5m", "1h", -1: forever).')
@click.option("--local", is_flag=True, help="Run in this process even when an mlxllm server is running.")
@speculation_options
def run(model: str, prompt: str | None, max_tokens: int, ctx_size: int | None, system: str | None,
        format_: str | None, think: bool | None, hidethinking: bool, raw: bool, verbose: bool,
        keep_alive: str | None, local: bool, draft_name: str | None, prompt_lookup: bool, draft_tokens: int,
        kv_bits: str | None, **opts) -> None:
    """Generate from MODEL. Without PROMPT (and no piped input): an interactive chat
    (/? lists its commands). Ctrl-C stops an answer. When `mlxllm serve` is running
    (MLXLLM_HOST, default 127.0.0.1:11434), the answer comes from it, where the model may
    already be loaded (not with --local, --raw, speculation, --kv-bits or a file path)."""
    from . import chat

    if max_tokens == 0:
        raise click.BadParameter("must be positive, or -1 (until the context is full)", param_hint="--max-tokens")
    from .cli_models import apply_model_defaults, ensure
    config = ensure(model)  # a registry name not here yet is pulled first, as `ollama run` does
    # a pulled manifest's parameters (num_predict too), stop strings and system prompt
    system, max_tokens, stop = apply_model_defaults(config, opts, system, max_tokens)
    params = _params(opts)
    schema = chat.parse_format(format_)
    from . import distributed
    group = distributed.cli_group()  # one rank of several (mlx.launch): a pipeline; only rank 0 prints
    if group is not None and prompt is None:
        raise ValueError("across several ranks, give the prompt as an argument (mlx.launch never closes stdin)")
    piped = None if sys.stdin.isatty() or group is not None else sys.stdin.read()
    in_process = local or raw or draft_name or prompt_lookup or kv_bits or group is not None \
        or os.path.sep in model or model.endswith(".gguf")
    remote = None if in_process else chat.Remote.find()
    if remote is not None:
        settings = chat.Settings(params=params, max_tokens=None if max_tokens == -1 else max_tokens,
                                 num_ctx=ctx_size, system=system, stop=stop, schema=schema, think=think,
                                 hide_thinking=hidethinking, verbose=verbose)
        _run_remote(remote, model, prompt, piped, settings, keep_alive)
        return
    # MLX work runs on one worker thread, so Ctrl-C is answered at once (chat.Worker)
    speculation = chat.worker().call(_speculation, draft_name, prompt_lookup, draft_tokens, kv_bits)
    net, tokenizer = chat.worker().call(distributed.load if group is not None else load_model, model)
    if think and not chat.thinks(tokenizer):
        raise ValueError(f"{model} does not support thinking (its template and vocabulary have no <think>)")
    if verbose:
        stats = net.load_stats
        click.echo(f"loaded {model} in {stats.seconds:.2f} s ({stats.nbytes / 1e6:.0f} MB of weights; BLAS: {_blas_state()}; {_cpu_kernels_state()})", err=True)
    settings = chat.Settings(params=params, max_tokens=None if max_tokens == -1 else max_tokens, num_ctx=ctx_size,
                             system=system, stop=stop, schema=schema, think=think, hide_thinking=hidethinking,
                             verbose=verbose, raw=raw, speculation=speculation)
    if prompt is None and piped is None:
        chat.Chat(model, net, tokenizer, settings, load_model).loop()
        return
    text = "\n\n".join(p for p in (prompt, piped) if p)
    messages = ([{"role": "system", "content": system}] if system and not raw else []) + \
        [{"role": "user", "content": text}]
    limit = min(ctx_size or chat.context_length(net), chat.context_length(net))
    ids, kept = chat.fit(tokenizer, messages, settings, limit)
    budget = chat.budget(settings, len(ids), limit)
    result = chat.answer(net, tokenizer, ids, settings, budget, chat.render(tokenizer, kept, settings))
    if result.finish_reason is None:  # Ctrl-C: leave once the worker's step is done
        chat.worker().settle()
        sys.exit(130)
    chat.cut_off_note(result, budget, settings)


def _run_remote(remote, model: str, prompt: str | None, piped: str | None, settings, keep_alive: str | None) -> None:
    """`run` through a running server: the chat, or one answer."""
    from . import chat

    remote.load(model, keep_alive)  # an unknown model, or one the server refuses: one line now
    if prompt is None and piped is None:
        chat.Chat(model, None, None, settings, load_model, remote=remote, keep_alive=keep_alive).loop()
        return
    text = "\n\n".join(p for p in (prompt, piped) if p)
    messages = ([{"role": "system", "content": settings.system}] if settings.system else []) + \
        [{"role": "user", "content": text}]
    result = remote.answer(model, messages, settings, keep_alive)
    if result.finish_reason is None:  # Ctrl-C
        sys.exit(130)
    chat.cut_off_note(result, None, settings)


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


class Phases:
    """A progress bar over a benchmark's runs, named after the one running, with tqdm's
    estimate of the time left (the runs alternate pp and tg, so their mean rate holds)."""

    def __init__(self, total: int) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total, unit="run", leave=False, file=sys.stderr,
                        bar_format="{desc:<18}{bar:20} {n_fmt}/{total_fmt} runs [{elapsed}<{remaining}]")
        self.started = False

    def __call__(self, label: str) -> None:
        if self.started:
            self.bar.update(1)
        self.started = True
        self.bar.set_description_str(label)

    def close(self) -> None:
        self.bar.close()


@contextmanager
def phases(total: int):
    """A Phases bar on a terminal; elsewhere a callback that does nothing."""
    if not progress_shown():
        yield lambda label: None
        return
    bar = Phases(total)
    try:
        yield bar
    finally:
        bar.close()


def _spread(r: dict) -> str:
    return f" ± {r['stdev']:.2f}" if r.get("stdev") is not None else ""


@main.command()
@click.argument("model")
@click.option("-p", "--n-prompt", type=click.IntRange(min=1), default=512, show_default=True, help="Prompt tokens (pp).")
@click.option("-n", "--n-gen", type=click.IntRange(min=1), default=128, show_default=True, help="Generated tokens (tg).")
@click.option("-r", "--repetitions", type=click.IntRange(min=1), default=3, show_default=True,
              help="Runs of each test after a warm-up; the spread (±) needs 2 or more.")
@click.option("-o", "--output", type=click.Choice(["text", "json", "md"]), default="text", show_default=True,
              help="Output format (llama-bench's -o): a table, JSON, or a markdown table.")
@click.option("--json", "as_json", is_flag=True, help="Same as -o json.")
@click.option("-d", "--depth", type=click.IntRange(min=0), default=0, show_default=True,
              help="Tokens already in the context before each test (llama-bench's -d).")
@click.option("--layout", type=click.Choice(["auto", "dense", "quantized"]), default="auto", show_default=True,
              help="Weights as float32 (dense) or in their quantized layouts; auto: the device's default.")
@speculation_options
def bench(model: str, n_prompt: int, n_gen: int, repetitions: int, output: str, as_json: bool, depth: int, layout: str,
          draft_name: str | None, prompt_lookup: bool, draft_tokens: int, kv_bits: str | None) -> None:
    """Prompt processing (pp) and generation (tg) speed, llama-bench style. With --draft or
    --prompt-lookup, also greedy generation with and without speculation on one prompt."""
    import mlx.core as mx

    from .bench import bench as run_bench

    output = "json" if as_json else output
    mx.reset_peak_memory()
    net, tokenizer = load_model(model, dense={"auto": None, "dense": True, "quantized": False}[layout])
    speculation = _speculation(draft_name, prompt_lookup, draft_tokens, None)
    speculation.pop("kv_bits")
    speculates = speculation["draft_model"] is not None or prompt_lookup
    with phases(2 * (repetitions + 1) * (2 if speculates else 1)) as progress:
        results = run_bench(net, tokenizer, n_prompt, n_gen, repetitions, kv_bits=int(kv_bits) if kv_bits else None,
                            progress=progress, depth=depth)
        if speculates:
            from .bench import bench_speculation
            results.update(bench_speculation(net, tokenizer, n_gen, repetitions, progress=progress, **speculation))
    info = {"model": model, "layout": layout, "load_s": net.load_stats.seconds, "weights_mb": net.load_stats.nbytes / 1e6,
            "peak_memory_gb": mx.get_peak_memory() / 1e9, "blas": _blas_state(),
            "cpu_kernels": _cpu_kernels_state(), "repetitions": repetitions, "tokens_per_s": results}
    if output == "json":
        click.echo(json.dumps(info, indent=2))
        return
    click.echo(f"model {model}: load {info['load_s']:.2f} s, weights {info['weights_mb']:.0f} MB, "
               f"peak memory {info['peak_memory_gb']:.2f} GB, BLAS {info['blas']}, {info['cpu_kernels']}"
               + ("" if repetitions > 1 else " (1 run each: no spread)"))
    if output == "md":
        click.echo("\n| model | layout | test | t/s |\n| --- | --- | ---: | ---: |")
        for name, r in results.items():
            note = f" ({r['note']})" if "note" in r else ""
            click.echo(f"| {model} | {layout} | {name} | {r['mean']:.2f}{_spread(r)}{note} |")
        return
    click.echo(f"{'test':<10}{'tokens/s':>12}" + (f"{'±':>10}" if repetitions > 1 else ""))
    for name, r in results.items():
        extra = f"  ({r['note']})" if "note" in r else ""
        spread = f"{r['stdev']:>10.2f}" if r.get("stdev") is not None else ""
        click.echo(f"{name:<10}{r['mean']:>12.2f}{spread}{extra}")


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
@click.option("--ctx-size", "--num-ctx", "ctx_size", type=click.IntRange(min=1), default=None,
              help="Most context per request in tokens, prompt and answer together (default: each model's own); "
                   "a request's num_ctx may ask for less. An answer with no token limit ends where it is full.")
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
          prefix_cache_mb: float, ctx_size: int | None, api_key: str | None, allowed_hosts: tuple[str, ...],
          allowed_origins: tuple[str, ...], draft_name: str | None, prompt_lookup: bool, draft_tokens: int,
          kv_bits: str | None, models_dirs: tuple[str, ...] = ()) -> None:
    """Serve the Ollama (/api) and OpenAI (/v1) APIs; models load on demand by name or path.
    Speculation (--draft, --prompt-lookup) applies while one greedy request is decoding.
    Under mlx.launch: rank 0 serves the --preload model, the other ranks run their stages
    of it (see mlxllm.distributed)."""
    from . import distributed
    from .server import Security
    from .server import serve as run_server

    if draft_name and prompt_lookup:
        raise click.BadParameter("choose --draft or --prompt-lookup, not both")
    group = distributed.cli_group()  # one rank of several (mlx.launch): a pipeline
    pool_class = None
    if group is not None:
        if len(preload) != 1:
            raise ValueError("across several ranks, name the one model to serve with --preload")
        if draft_name or prompt_lookup:
            raise ValueError("speculative decoding does not run across pipeline ranks")
        if group.rank() != 0:  # no HTTP here: this rank's stage, driven by rank 0
            distributed.follow(preload[0], group, parallel, int(kv_bits) if kv_bits else None)
            return
        pool_class = distributed.pipeline_pool(group, preload[0])
    if draft_name:  # an unknown draft model is a start-up error, not every load's
        from .models import resolve
        resolve(draft_name)
    run_server(host, port, keep_alive=_seconds(keep_alive), parallel=parallel, preload=preload,
               max_body=int(max_body_mb * (1 << 20)), prefix_cache_bytes=int(prefix_cache_mb * (1 << 20)),
               speculation={"draft": draft_name, "prompt_lookup": prompt_lookup, "draft_tokens": draft_tokens},
               kv_bits=int(kv_bits) if kv_bits else None, context_cap=ctx_size,
               security=Security.from_env(api_key, allowed_hosts, allowed_origins), models_dirs=models_dirs,
               **({"pool_class": pool_class} if pool_class is not None else {}))


# pull, list, rm, cp, ps, stop
from .cli_models import register as _register_model_commands

_register_model_commands(main)

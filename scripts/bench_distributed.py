"""Pipeline-parallel inference (mlxllm.distributed) against one process, on this machine.

    python scripts/bench_distributed.py MODEL [--ranks 1,2,3] [--tokens 64]

runs the worker below once alone and once per rank count under `mlx.launch --backend ring`
on 127.0.0.1, and prints per run: tokens/s (and the ratio to one process in the same
run), and per rank its layers, bytes of weights and peak RSS. `worker` is also what
tests/test_distributed.py launches.

    python scripts/bench_distributed.py serve MODEL [--ranks 1,2] [--clients 1,4] [--tokens 64]

runs `mlxllm serve --preload MODEL` alone and under `mlx.launch` per rank count, sends each
count of concurrent greedy /api/generate requests (different prompts), and prints the
aggregate decode tokens/s, each request's own (its eval_count / eval_duration) and the
wall time, then stops the server with SIGTERM and reports how every rank exited.

    python scripts/bench_distributed.py worker MODEL OUT_DIR [--tokens N]

loads MODEL (its stage, when launched as one of several ranks), then writes
OUT_DIR/rank<r>.json: greedy text and tokens through the generation loop, the tokens of
two prompts decoded together (rows sharing forward passes), a sampled text (unseeded: the
ranks must agree on the seed), decode tokens/s, and its stage, weight bytes, RSS after
loading and peak RSS; rank 0 also OUT_DIR/logits.npy (the prompt's last position, then
each greedy step). With --forever it keeps generating, printing a line per token on
stdout (the failure test kills a rank meanwhile).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

PROMPT = "The capital of France is"
PROMPTS = ("Write a haiku about the sea.", "Name three prime numbers:")
LOGIT_STEPS = 8


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def worker(model: str, out: Path, tokens: int, forever: bool) -> None:
    import mlx.core as mx
    import numpy as np

    import mlxllm  # noqa: F401  (first: the BLAS under mlx.core)
    from mlxllm import distributed
    from mlxllm.generate import (
        BatchGenerator,
        GenerationRequest,
        encode_prompt,
        prefill,
        stream_generate,
    )
    from mlxllm.sample import SamplingParams

    group = distributed.init_group()  # the ring's buffers are allocated here
    rank = group.rank() if group is not None else 0
    base_rss = rss_mb()
    net, tokenizer = distributed.load(model, group=group)
    loaded_rss = rss_mb()
    stage = getattr(net, "stage", None)
    result = {"rank": rank, "ranks": group.size() if group is not None else 1,
              "layers": [stage.start, stage.stop] if stage else [0, net.args.n_layers],
              "weights_mb": net.load_stats.nbytes / 2 ** 20, "base_rss_mb": base_rss, "loaded_rss_mb": loaded_rss}
    if forever:
        for r in stream_generate(net, tokenizer, PROMPT, SamplingParams(temperature=0.7, seed=1), max_tokens=10 ** 6):
            print(f"token {r.token}", flush=True)
        return
    ids = encode_prompt(tokenizer, PROMPT)
    # logits: the prompt's last position, then LOGIT_STEPS greedy steps through the caches
    cache = net.make_cache()
    logits = prefill(net, mx.array(ids), cache)
    rows = [np.array(logits[0])]
    for _ in range(LOGIT_STEPS):
        logits = net(mx.argmax(logits, axis=-1)[:, None].astype(mx.int32), cache=cache)[:, -1, :]
        rows.append(np.array(logits[0]))
    if rank == 0:
        np.save(out / "logits.npy", np.stack(rows))
    # greedy text through the generation loop, timed
    pieces, start, first = [], time.perf_counter(), None
    for r in stream_generate(net, tokenizer, ids, SamplingParams(temperature=0), max_tokens=tokens):
        if first is None and r.token is not None:
            first = time.perf_counter()
        pieces.append(r)
    end = time.perf_counter()
    generated = pieces[-1].generation_tokens
    result |= {"text": "".join(p.text for p in pieces), "tokens": [p.token for p in pieces if p.token is not None],
               "generated": generated, "prompt_s": first - start,
               "decode_tps": (generated - 1) / (end - first) if generated > 1 else 0.0}
    # two prompts sharing forward passes
    gen = BatchGenerator(net, tokenizer, max_batch=2)
    uids = [gen.insert(GenerationRequest(encode_prompt(tokenizer, p), SamplingParams(temperature=0), tokens // 2))
            for p in PROMPTS]
    batch = {uid: [] for uid in uids}
    while gen.busy:
        for event in gen.step():
            if event.token is not None:
                batch[event.uid].append(event.token)
    result["batch_tokens"] = [batch[u] for u in uids]
    # sampling without a seed: every rank must draw the same tokens
    result["sampled"] = "".join(r.text for r in stream_generate(
        net, tokenizer, ids, SamplingParams(temperature=1.0), max_tokens=tokens // 2))
    result["peak_rss_mb"] = peak_rss_mb()
    (out / f"rank{rank}.json").write_text(json.dumps(result))


def launch_command(ranks: int, port: int, *command: str) -> list[str]:
    """`mlx.launch` running `command` on `ranks` local processes over the ring backend."""
    launcher = Path(sys.executable).with_name("mlx.launch")
    return [str(launcher), "-n", str(ranks), "--backend", "ring", "-p", str(port), *command]


def run_worker(model: str, ranks: int, out: Path, tokens: int, port: int, env: dict | None = None,
               timeout: float = 900) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, __file__, "worker", model, str(out), "--tokens", str(tokens)]
    if ranks > 1:
        command = launch_command(ranks, port, *command)
    done = subprocess.run(command, check=False, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
    results = []
    for r in range(ranks):
        path = out / f"rank{r}.json"
        if not path.exists():
            raise RuntimeError(f"rank {r} of {ranks} wrote no result:\n{done.stdout}\n{done.stderr}")
        results.append(json.loads(path.read_text()))
    return results


SERVE_PROMPTS = ("Once upon a time", "The history of Rome", "A recipe for bread:", "Dear diary,",
                 "In the year 2050,", "The best way to learn", "My favourite animal is", "Rules of chess:")


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=900) as response:
        return json.loads(response.read())


def serve_bench(model: str, ranks: int, clients: list[int], tokens: int, port: int) -> tuple[dict, str]:
    """`mlxllm serve` on `ranks` ranks: per count of concurrent clients, (aggregate decode
    tokens/s, each request's own, median); and how the ranks exited on SIGTERM."""
    mlxllm = str(Path(sys.executable).with_name("mlxllm"))
    command = [mlxllm, "serve", "--port", "0", "--preload", model]
    if ranks > 1:
        command = launch_command(ranks, port, *command)
    proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "MLXLLM_NO_PROGRESS": "1"}, start_new_session=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(line.decode(errors="replace") for line in proc.stderr),
                     daemon=True).start()
    figures: dict[int, tuple[float, float]] = {}
    try:
        deadline = time.monotonic() + 600
        while not re.search(r"loaded .* in [\d.]+ s", "".join(lines)):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the server did not start:\n" + "".join(lines))
            time.sleep(0.2)
        url = re.search(r"serving on (http://[\d.]+:\d+)", "".join(lines)).group(1) + "/api/generate"
        _post(url, {"model": model, "prompt": "Hi", "raw": True, "stream": False,
                    "options": {"temperature": 0, "num_predict": 2}})  # warm up
        for n in clients:
            results: list[dict] = [{}] * n

            def one(i: int) -> None:
                results[i] = _post(url, {"model": model, "prompt": SERVE_PROMPTS[i % len(SERVE_PROMPTS)],
                                         "raw": True, "stream": False,
                                         "options": {"temperature": 0, "num_predict": tokens}})
            start = time.perf_counter()
            threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.perf_counter() - start
            generated = sum(r["eval_count"] for r in results)
            own = statistics.median(r["eval_count"] / (r["eval_duration"] / 1e9) for r in results)
            figures[n] = (generated / wall, own)
    finally:
        pids = [int(p) for p in subprocess.run(["pgrep", "-s", str(proc.pid)], capture_output=True,
                                               text=True).stdout.split()]
        rank0 = next((p for p in pids if _environ_rank(p) == 0), proc.pid)
        with contextlib.suppress(ProcessLookupError):
            os.kill(rank0, signal.SIGTERM)  # rank 0 stops the others
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        failed = [line.strip() for line in lines if "exited with code" in line or "was killed" in line
                  or line.startswith("error")]
    return figures, "every rank exited with status 0" if not failed else "; ".join(failed)


def _environ_rank(pid: int) -> int | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    return next((int(e.split(b"=")[1]) for e in env if e.startswith(b"MLX_RANK=")), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("--ranks", default="1,2,3")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=1,
                        help="rounds over the rank counts, interleaved (a busy machine's load shifts): medians")
    parser.add_argument("--port", type=int, default=43210)
    args = parser.parse_args()
    counts = [int(n) for n in args.ranks.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="bench_distributed_"))
    try:
        runs: dict[int, list[list[dict]]] = {n: [] for n in counts}
        for round_ in range(args.repeat):
            for ranks in counts:
                out = tmp / f"{ranks}-{round_}"
                runs[ranks].append(run_worker(args.model, ranks, out, args.tokens, args.port + 10 * ranks + round_))
        base = base_text = None
        for ranks in counts:
            tps = statistics.median(results[0]["decode_tps"] for results in runs[ranks])
            prompt_s = statistics.median(results[0]["prompt_s"] for results in runs[ranks])
            results = runs[ranks][0]
            base = base or tps
            same = "" if ranks == 1 or base_text is None else \
                f", text {'equal to' if results[0]['text'] == base_text else 'DIFFERENT from'} one process"
            if ranks == 1:
                base_text = results[0]["text"]
            print(f"{ranks} rank(s): {tps:.1f} tokens/s decode ({tps / base:.2f}x one process), "
                  f"first token {prompt_s:.2f} s{same}"
                  + (f" (medians of {args.repeat})" if args.repeat > 1 else ""))
            for r in results:
                print(f"  rank {r['rank']}: layers {r['layers'][0]}-{r['layers'][1] - 1}, weights {r['weights_mb']:.1f} MiB; "
                      f"RSS before loading {r['base_rss_mb']:.0f} MiB, after {r['loaded_rss_mb']:.0f} MiB "
                      f"(+{r['loaded_rss_mb'] - r['base_rss_mb']:.0f}), peak {r['peak_rss_mb']:.0f} MiB")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "serve":
        p = argparse.ArgumentParser()
        p.add_argument("cmd")
        p.add_argument("model")
        p.add_argument("--ranks", default="1,2")
        p.add_argument("--clients", default="1,4")
        p.add_argument("--tokens", type=int, default=64)
        p.add_argument("--port", type=int, default=43310)
        p.add_argument("--repeat", type=int, default=1, help="rounds over the rank counts, interleaved: medians")
        a = p.parse_args()
        counts, clients = [int(n) for n in a.ranks.split(",")], [int(n) for n in a.clients.split(",")]
        rounds: dict[int, list[dict]] = {r: [] for r in counts}
        for k in range(a.repeat):
            for r in counts:
                figures, stopped = serve_bench(a.model, r, clients, a.tokens, a.port + 10 * k + r)
                rounds[r].append(figures)
                shown = ", ".join(f"{n} client(s) {t:.1f} ({own:.1f} each)" for n, (t, own) in figures.items())
                print(f"round {k + 1}, {r} rank(s): tokens/s {shown}; on SIGTERM {stopped}", flush=True)
        for r in counts:
            for n in clients:
                aggregate = statistics.median(f[n][0] for f in rounds[r])
                own = statistics.median(f[n][1] for f in rounds[r])
                print(f"{r} rank(s), {n} client(s): {aggregate:.1f} tokens/s in aggregate, each request's own "
                      f"decode {own:.1f} tokens/s" + (f" (medians of {a.repeat})" if a.repeat > 1 else ""))
    elif len(sys.argv) > 1 and sys.argv[1] == "worker":
        p = argparse.ArgumentParser()
        p.add_argument("cmd")
        p.add_argument("model")
        p.add_argument("out", type=Path)
        p.add_argument("--tokens", type=int, default=32)
        p.add_argument("--forever", action="store_true")
        a = p.parse_args()
        worker(a.model, a.out, a.tokens, a.forever)
    else:
        main()

"""Soak test for `mlxllm serve` (a script, not a CI test): N clients for M minutes, good
requests (both APIs, streamed and not, prompts that share prefixes and prompts that do
not) mixed with bad requests and clients that disconnect mid-answer.

Reports: requests by outcome (none may be lost: every request ends complete, or with its
4xx, or was dropped by its own client), the server's RSS after warm-up and at the end
(flat once the prefix cache reaches its budget), and /health afterwards (nothing active or
queued, the prefix cache within its budget).

    python scripts/soak.py                          # smollm2:135m, 16 clients, 10 minutes
    python scripts/soak.py --minutes 2 --clients 8
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from collections import Counter
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).parent))
from load_test import PROMPTS, start_server

BAD_REQUESTS = [
    ("/api/chat", b"{not json"),
    ("/api/generate", json.dumps({"model": "no-such-model", "prompt": "hi"}).encode()),
    ("/v1/chat/completions", json.dumps({"model": "{model}", "messages": [], "max_tokens": 5}).encode()),
    ("/v1/chat/completions", json.dumps({"model": "{model}", "messages": [{"role": "user", "content": "hi"}],
                                         "max_tokens": -1}).encode()),
    ("/api/chat", b"[" * 50_000 + b"]" * 50_000),
    ("/api/generate", json.dumps({"model": "{model}", "prompt": "hi", "options": {"temperature": "hot"}}).encode()),
    ("/v1/completions", json.dumps({"model": "{model}", "prompt": "hi", "max_tokens": 10**12}).encode()),
]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def good(session: aiohttp.ClientSession, url: str, model: str, rng: random.Random, disconnect: bool) -> str:
    prompt = rng.choice(PROMPTS) + ("" if rng.random() < 0.5 else f" (request {rng.randrange(10**9)})")
    tokens = rng.randint(8, 40)
    openai_api = rng.random() < 0.5
    stream = disconnect or rng.random() < 0.5
    if openai_api:
        path, body = "/v1/chat/completions", {"model": model, "messages": [{"role": "user", "content": prompt}],
                                              "max_tokens": tokens, "stream": stream, "temperature": 0.7}
    else:
        path, body = "/api/chat", {"model": model, "messages": [{"role": "user", "content": prompt}],
                                   "stream": stream, "options": {"num_predict": tokens, "temperature": 0.7}}
    async with session.post(url + path, json=body) as r:
        if r.status != 200:
            return f"unexpected {r.status}"
        if not stream:
            data = await r.json()
            done = data["choices"][0]["finish_reason"] if openai_api else data.get("done_reason")
            return "complete" if done in ("stop", "length") else f"incomplete {done}"
        lines = 0
        finished = False
        async for raw in r.content:
            line = raw.decode().strip()
            if not line:
                continue
            lines += 1
            if disconnect and lines >= 3:
                return "disconnected"  # leaving the `async with` closes the connection
            if openai_api:
                finished = finished or line == "data: [DONE]"
                if '"error"' in line:
                    return "stream error"
            else:
                finished = finished or json.loads(line).get("done") is True
        return "complete" if finished else "incomplete stream"


async def bad(session: aiohttp.ClientSession, url: str, model: str, rng: random.Random) -> str:
    path, raw = rng.choice(BAD_REQUESTS)
    async with session.post(url + path, data=raw.replace(b"{model}", model.encode())) as r:
        await r.read()
        return "refused 4xx" if 400 <= r.status < 500 else f"unexpected {r.status}"


async def client(url: str, model: str, seed: int, deadline: float, outcomes: Counter) -> None:
    rng = random.Random(seed)
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        while time.time() < deadline:
            roll = rng.random()
            try:
                if roll < 0.15:
                    outcome = await bad(session, url, model, rng)
                else:
                    outcome = await good(session, url, model, rng, disconnect=roll < 0.30)
            except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                outcome = f"lost: {type(e).__name__}"
            outcomes[outcome] += 1


async def sample_rss(pid: int, deadline: float, samples: list) -> None:
    start = time.time()
    while time.time() < deadline:
        samples.append((round(time.time() - start), round(rss_mb(pid), 1)))
        await asyncio.sleep(5)


async def soak(args, url: str, pid: int) -> dict:
    deadline = time.time() + args.minutes * 60
    outcomes: Counter = Counter()
    samples: list = []
    await asyncio.gather(sample_rss(pid, deadline, samples),
                         *(client(url, args.model, i, deadline, outcomes) for i in range(args.clients)))
    async with aiohttp.ClientSession() as session:
        for _ in range(100):  # disconnected jobs free their slots within a step or two
            async with session.get(url + "/health") as r:
                health = await r.json()
            if health["active"] == 0 and health["queued"] == 0:
                break
            await asyncio.sleep(0.2)
    warm = [mb for t, mb in samples if t >= args.minutes * 60 * args.warmup]
    return {"outcomes": dict(outcomes), "lost": sum(n for k, n in outcomes.items()
                                                      if k.startswith(("lost", "unexpected", "incomplete", "stream"))),
            "rss_mb": {"after_warmup": warm[0] if warm else None, "end": samples[-1][1] if samples else None,
                       "max_after_warmup": max(warm) if warm else None, "samples": samples},
            "health": health}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2:135m")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--warmup", type=float, default=0.2, help="share of the run before RSS counts as warm")
    ap.add_argument("--prefix-cache-mb", type=float, default=64)
    args = ap.parse_args()
    proc, url, log = start_server(["--parallel", str(args.clients), "--prefix-cache-mb", str(args.prefix_cache_mb),
                                   "--preload", args.model])
    try:
        result = asyncio.run(soak(args, url, proc.pid))
    finally:
        proc.terminate()
        proc.wait(60)
    result["server_exit"] = proc.returncode
    result["traceback_in_log"] = "Traceback" in Path(log.name).read_text()
    print(json.dumps(result, indent=1))
    ok = not result["lost"] and result["health"]["active"] == 0 and result["server_exit"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

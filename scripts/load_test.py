"""Load test for `mlxllm serve` (a benchmark, not a timed test).

Starts the server on a free loopback port (or uses --url), then:
1. reference answers: each prompt alone, greedy, not streamed;
2. one streaming client: its tokens/s;
3. N concurrent streaming clients (OpenAI SSE): every response must be complete (a
   finish_reason, usage, `data: [DONE]`) and equal its reference answer; aggregate tokens/s,
   and the rate while all N streams run (the batched step at N rows, no prompt joining);
4. a client that disconnects mid-stream: seconds until /health shows its slot free;
5. a long prompt (--long-prompt tokens, ~3,000) prefilling: a 2-token request sent while
   it prefills, its seconds to the full answer; then a client that disconnects while its
   long prompt prefills: seconds until its slot is free.

    python scripts/load_test.py                      # smollm2:135m, 16 clients, 48 tokens each
    python scripts/load_test.py --model gemma3:270m --clients 8 --raw
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

import aiohttp

# Open-ended prompts, so that every answer runs to --tokens: the batch then stays whole and
# "while all N decode" counts the batched step at N rows over most of the stream.
PROMPTS = [
    "Write a story about a dragon who learns to cook.", "Describe a day in the life of a lighthouse keeper.",
    "Explain how a bicycle works, step by step.", "Write a letter to a friend about your summer holiday.",
    "Describe the city of Paris to someone who has never been there.", "Explain why people enjoy music.",
    "Write a story about a robot who wants to become a gardener.", "Describe how bread is made, in detail.",
    "Explain the water cycle to a child.", "Write a diary entry of a sailor crossing the ocean.",
    "Describe your ideal house, room by room.", "Explain how the internet works, in simple words.",
    "Write a story about a cat who becomes the mayor of a small town.", "Describe the four seasons.",
    "Explain how to plant a tree and care for it.", "Write a speech for the opening of a new library.",
    "Describe a busy market in the morning.", "Explain the history of the bicycle.",
    "Write a story about two friends lost in a forest.", "Describe what the world might look like in 100 years.",
]


def start_server(extra: list[str]) -> tuple[subprocess.Popen, str, object]:
    log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
    proc = subprocess.Popen([sys.executable, "-m", "mlxllm", "serve", "--port", "0", *extra],
                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        found = re.search(r"serving on (http://[\d.]+:\d+)", open(log.name).read())
        if found:
            return proc, found.group(1), log
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    proc.kill()
    sys.exit(f"the server did not start; its log:\n{open(log.name).read()}")


def body(args, prompt: str, stream: bool) -> dict:
    out = {"model": args.model, "temperature": 0, "max_tokens": args.tokens, "stream": stream}
    if args.raw:
        out["prompt"] = prompt
    else:
        out["messages"] = [{"role": "user", "content": prompt}]
    if stream:
        out["stream_options"] = {"include_usage": True}
    return out


def route(args) -> str:
    return "/v1/completions" if args.raw else "/v1/chat/completions"


def piece(args, chunk: dict) -> str:
    if not chunk.get("choices"):
        return ""
    choice = chunk["choices"][0]
    return choice.get("text") or "" if args.raw else choice["delta"].get("content") or ""


async def ask(session: aiohttp.ClientSession, url: str, args, prompt: str) -> str:
    async with session.post(url + route(args), json=body(args, prompt, False)) as r:
        data = await r.json()
        if r.status != 200:
            raise RuntimeError(f"{r.status}: {data}")
        choice = data["choices"][0]
        return choice["text"] if args.raw else choice["message"]["content"]


async def stream(session: aiohttp.ClientSession, url: str, args, prompt: str) -> dict:
    """One streaming request: text, token count, time to first token, end time, completeness."""
    start = time.perf_counter()
    result = {"text": "", "tokens": 0, "ttft": None, "finish": None, "done": False, "times": []}
    async with session.post(url + route(args), json=body(args, prompt, True)) as r:
        if r.status != 200:
            raise RuntimeError(f"{r.status}: {await r.text()}")
        async for raw in r.content:
            line = raw.decode().strip()
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                result["done"] = True
                break
            chunk = json.loads(data)
            if "error" in chunk:
                raise RuntimeError(chunk["error"])
            text = piece(args, chunk)
            if text:
                result["times"].append(time.perf_counter())
            if text and result["ttft"] is None:
                result["ttft"] = time.perf_counter() - start
            result["text"] += text
            if chunk.get("choices") and chunk["choices"][0].get("finish_reason"):
                result["finish"] = chunk["choices"][0]["finish_reason"]
            if chunk.get("usage"):
                result["tokens"] = chunk["usage"]["completion_tokens"]
    result["end"] = time.perf_counter()
    result["start"] = start
    return result


async def active_slots(session: aiohttp.ClientSession, url: str) -> int:
    async with session.get(url + "/health") as r:
        health = await r.json()
    return health["active"] + health["queued"]


async def disconnect(session: aiohttp.ClientSession, url: str, args) -> float:
    """Seconds from closing a stream mid-way to its slot being free."""
    request = body(args, "Write a very long story about a dragon.", True)
    request["max_tokens"] = 2000
    async with session.post(url + route(args), json=request) as r:
        seen = 0
        async for raw in r.content:
            if raw.startswith(b"data: "):
                seen += 1
            if seen >= 4:
                break
        r.close()  # drop the connection mid-stream
    closed = time.perf_counter()
    while await active_slots(session, url):
        if time.perf_counter() - closed > 30:
            raise RuntimeError("the disconnected client's slot was not freed within 30 s")
        await asyncio.sleep(0.05)
    return time.perf_counter() - closed


def cpu_seconds(server: subprocess.Popen | None) -> tuple[float, float]:
    """CPU seconds used so far by this process (the clients) and by the server (0 with --url)."""
    own = time.process_time()
    if server is None:
        return own, 0.0
    with open(f"/proc/{server.pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return own, (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def decode_rates(results: list[dict], single: dict) -> tuple[float, float, int]:
    """Tokens/s while every client's stream is running (from the last first chunk to the
    first last chunk: the batch is whole, no prompt joins), against the single client's
    rate over its own stream; and the chunks counted in that window."""
    begin = max(r["times"][0] for r in results)
    end = min(r["times"][-1] for r in results)
    inside = sum(sum(begin < t <= end for t in r["times"]) for r in results)
    alone = (len(single["times"]) - 1) / (single["times"][-1] - single["times"][0])
    return (inside / (end - begin) if end > begin else 0.0), alone, inside


def long_text(tokens: int) -> str:
    """A prompt of about `tokens` tokens (~1.3 words per token in English-like text)."""
    words = ("the quick brown fox jumps over a lazy dog while seven wizards quietly "
             "hex jumbo crates near the old river bank").split()
    return " ".join(words[i % len(words)] for i in range(int(tokens / 1.3)))


async def short_during_long(session: aiohttp.ClientSession, url: str, args) -> tuple[float, float]:
    """(seconds a 2-token request takes while a long prompt prefills, the long request's
    own seconds)."""
    request = body(args, long_text(args.long_prompt), False)
    request["max_tokens"] = 2
    long_start = time.perf_counter()
    long_task = asyncio.create_task(session.post(url + route(args), json=request))
    await asyncio.sleep(1.0)  # its prefill is under way
    short = body(args, "What is 2+2?", False)
    short["max_tokens"] = 2
    start = time.perf_counter()
    async with session.post(url + route(args), json=short) as r:
        await r.json()
    short_s = time.perf_counter() - start
    response = await long_task
    data = await response.json()
    if response.status != 200:
        raise RuntimeError(f"the long prompt failed: {data}")
    return short_s, time.perf_counter() - long_start


async def disconnect_in_prefill(session: aiohttp.ClientSession, url: str, args) -> float:
    """Seconds from a client closing its connection during its long prompt's prefill to
    its slot being free."""
    request = body(args, long_text(args.long_prompt), True)
    request["max_tokens"] = 2
    task = asyncio.create_task(session.post(url + route(args), json=request))
    deadline = time.perf_counter() + 30
    while not await active_slots(session, url):  # wait until the engine has it
        if time.perf_counter() > deadline:
            raise RuntimeError("the long request never reached the engine")
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.5)
    task.cancel()  # closes the connection while the prompt is prefilling
    closed = time.perf_counter()
    while await active_slots(session, url):
        if time.perf_counter() - closed > 60:
            raise RuntimeError("the disconnected client's slot was not freed within 60 s")
        await asyncio.sleep(0.05)
    return time.perf_counter() - closed


async def main(args) -> None:
    proc = log = None
    url = args.url
    if url is None:
        proc, url, log = start_server(["--preload", args.model, "--parallel", str(max(args.clients, 1))])
    timeout = aiohttp.ClientTimeout(total=3600)
    try:
        async with aiohttp.ClientSession(timeout=timeout) as session:
            await ask(session, url, args, "hi")  # warm-up (and load, when --url names a fresh server)
            async with session.get(url + "/health") as r:
                models = (await r.json())["models"]
            batched = next((m["batched"] for m in models if m["name"] == args.model), None)
            prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.clients)]
            reference = {}
            if not args.no_verify:
                for p in dict.fromkeys(prompts):
                    reference[p] = await ask(session, url, args, p)

            single = await stream(session, url, args, prompts[0])
            single_tps = single["tokens"] / (single["end"] - single["start"])

            wall, cpu = time.perf_counter(), cpu_seconds(proc)
            results = await asyncio.gather(*(stream(session, url, args, p) for p in prompts))
            wall, cpu = time.perf_counter() - wall, [b - a for a, b in zip(cpu, cpu_seconds(proc))]
            total = sum(r["tokens"] for r in results)
            complete = sum(bool(r["done"] and r["finish"] and r["tokens"]) for r in results)
            correct = sum(r["text"] == reference[p] for r, p in zip(results, prompts)) if reference else None
            freed = await disconnect(session, url, args)
            short_s, long_s = await short_during_long(session, url, args)
            freed_in_prefill = await disconnect_in_prefill(session, url, args)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)

    ttfts = [r["ttft"] for r in results if r["ttft"] is not None]
    print(f"model {args.model} ({'continuous batching' if batched else 'one forward per request per step'}), "
          f"{args.tokens} tokens per request, greedy")
    print(f"single client      : {single['tokens']} tokens in {single['end'] - single['start']:.2f} s "
          f"= {single_tps:.1f} tokens/s (time to first token {single['ttft']:.2f} s)")
    print(f"{args.clients:>2} concurrent clients: {total} tokens in {wall:.2f} s = {total / wall:.1f} tokens/s aggregate "
          f"({total / wall / single_tps:.2f}x single); time to first token median {statistics.median(ttfts):.2f} s, "
          f"max {max(ttfts):.2f} s")
    whole, alone, counted = decode_rates(results, single)
    print(f"while all {args.clients} decode: {whole:.1f} text chunks/s ({whole / alone:.2f}x the single client's "
          f"{alone:.1f} over its stream; {counted} chunks counted)")
    print(f"CPU while {args.clients} streamed: server {cpu[1]:.1f} s, clients {cpu[0]:.1f} s in {wall:.1f} s of "
          f"{os.cpu_count()} cores (the clients' share is taken from the server on a small machine)")
    print(f"complete responses : {complete}/{args.clients}")
    if correct is not None:
        print(f"equal to the answer served alone: {correct}/{args.clients}")
        for r, p in zip(results, prompts):
            if r["text"] != reference[p]:
                print(f"  differs for {p!r}:\n    alone   : {reference[p]!r}\n    together: {r['text']!r}")
    print(f"disconnect         : slot free {freed:.2f} s after the client closed the stream")
    print(f"long prompt        : a 2-token request answered in {short_s:.2f} s while a {args.long_prompt}-token "
          f"prompt prefilled (that request took {long_s:.2f} s)")
    print(f"disconnect, prefill: slot free {freed_in_prefill:.2f} s after the client closed during its prefill")
    if complete != args.clients or (correct is not None and correct != args.clients):
        sys.exit(1)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2:135m")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=48, help="max_tokens per request")
    parser.add_argument("--raw", action="store_true", help="/v1/completions with raw prompts (base models)")
    parser.add_argument("--url", help="an already running server (default: start one)")
    parser.add_argument("--no-verify", action="store_true", help="skip the reference answers")
    parser.add_argument("--long-prompt", type=int, default=3000, help="tokens of the long prompt (step 5)")
    asyncio.run(main(parser.parse_args()))

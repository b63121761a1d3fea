"""A mutation fuzzer for the server's request parsing: valid requests for every route, one
mutation each (a value swapped for a hostile one, a key dropped or added, the JSON cut or
its bytes flipped), sent to a running server. Every answer must be a 2xx or a 4xx in the
route's API's error shape, never a 500, a hang or a dead server; afterwards /health must
show nothing left running.

    mlxllm serve --ctx-size 256 &   # a dropped token limit then ends within 256 tokens
    python scripts/fuzz_http.py --url http://127.0.0.1:11434 --cases 20000 --model smollm2:135m

tests/test_fuzz_http.py runs a few hundred cases in CI; failing cases are written to
--failures as JSON, ready to become regression cases.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

import httpx

# Max-token keys are only ever given values that must be refused (a valid huge one would
# just generate for minutes): which keys, per route.
LIMIT_KEYS = {"num_predict", "max_tokens", "max_completion_tokens", "max_output_tokens"}
REFUSED_LIMITS = ["3", 3.5, -5, 10**18, 2**63, True, [], {}, 0, "NaN"]

HOSTILE = [None, True, False, 0, -1, 1, 2**31, 2**63, 10**18, -(10**18), 1e308, -1e308, 0.5, float("nan"),
           float("inf"), "", "x" * 10_000, "\ud800", "\x00", "../../../etc/passwd", "/etc/shadow", "json",
           "%s%n", [], {}, [1, 2, 3], ["a"], [None], {"type": "object"}, {"a": {"b": {"c": [1]}}},
           json.loads("[" * 40 + "]" * 40), {"role": "user", "content": "hi"}, "user", "assistant",
           "tool", "system", {"$ref": "#"}, {"type": "array", "items": {"$ref": "#"}}, "🦙" * 50]


def base_requests(model: str, embed_model: str | None) -> list[tuple[str, str, dict]]:
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    out = [
        ("POST", "/api/generate", {"model": model, "prompt": "Hi", "stream": False,
                                   "options": {"num_predict": 3, "temperature": 0, "seed": 1}}),
        ("POST", "/api/chat", {"model": model, "messages": chat, "stream": False, "format": "json",
                               "options": {"num_predict": 3, "top_k": 5, "stop": ["\n"]}}),
        ("POST", "/v1/chat/completions", {"model": model, "messages": chat, "max_tokens": 3, "temperature": 0.5,
                                          "stop": ["x"], "response_format": {"type": "json_object"}}),
        ("POST", "/v1/completions", {"model": model, "prompt": "Hi", "max_tokens": 3, "logit_bias": {},
                                     "seed": 3}),
        ("POST", "/api/show", {"model": model}),
        ("POST", "/api/embed", {"model": embed_model or model, "input": ["hi", "there"]}),
        ("POST", "/v1/embeddings", {"model": embed_model or model, "input": "hi", "encoding_format": "float"}),
        ("POST", "/api/embeddings", {"model": embed_model or model, "prompt": "hi"}),
        ("POST", "/v1/messages", {"model": model, "max_tokens": 3, "system": "Be brief.",
                                  "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]}),
        ("POST", "/v1/messages/count_tokens", {"model": model, "messages": [{"role": "user", "content": "Hi"}]}),
        ("POST", "/v1/responses", {"model": model, "input": "Hi", "max_output_tokens": 3}),
    ]
    return out


def paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    """Every key/index path in a JSON value."""
    out = [prefix] if prefix else []
    if isinstance(value, dict):
        for k, v in value.items():
            out += paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += paths(v, (*prefix, i))
    return out


def _parent(body: Any, path: tuple) -> Any:
    for step in path[:-1]:
        body = body[step]
    return body


def mutate(rng: random.Random, body: dict) -> tuple[bytes, str]:
    """One mutation of a request body: (the bytes to send, what was done)."""
    body = copy.deepcopy(body)
    kind = rng.choice(["swap", "swap", "swap", "swap", "drop", "add", "cut", "flip", "stream"])
    if kind == "cut":
        raw = json.dumps(body).encode()
        n = rng.randrange(len(raw))
        return raw[:n], f"cut at {n}"
    if kind == "flip":
        raw = bytearray(json.dumps(body).encode())
        for _ in range(rng.randint(1, 4)):
            raw[rng.randrange(len(raw))] = rng.randrange(256)
        return bytes(raw), "bytes flipped"
    if kind == "stream":
        body["stream"] = True
        return json.dumps(body).encode(), "stream"
    path = rng.choice(paths(body))
    parent, key = _parent(body, path), path[-1]
    limit = isinstance(key, str) and key in LIMIT_KEYS
    if kind == "drop" and not limit:
        del parent[key]
        return json.dumps(body).encode(), f"drop {path}"
    if kind == "add" and isinstance(parent, dict):
        parent[rng.choice(["stream", "tools", "n", "logprobs", "top_logprobs", "think", "images", "keep_alive",
                           "template", "raw", "context", "suffix", "tool_choice", "echo", "user", "x"])] = \
            rng.choice(HOSTILE)
        return json.dumps(body).encode(), f"add to {path[:-1]}"
    value = rng.choice(REFUSED_LIMITS if limit else HOSTILE)
    parent[key] = value
    return json.dumps(body).encode(), f"set {path} = {json.dumps(value)[:80]}"


def well_formed_error(path: str, response: httpx.Response) -> bool:
    try:
        body = response.json()
    except ValueError:
        return False
    error = body.get("error") if isinstance(body, dict) else None
    if path.startswith("/v1/messages"):  # Anthropic's shape
        return body.get("type") == "error" and isinstance(error, dict) and isinstance(error.get("message"), str)
    if path.startswith("/v1/"):
        return isinstance(error, dict) and isinstance(error.get("message"), str)
    return isinstance(error, str)


def run(url: str, cases: int, seed: int, model: str, embed_model: str | None = None,
        headers: dict | None = None, timeout: float = 300.0, log=print) -> dict:
    """Send `cases` mutated requests; returns counts and the failing cases."""
    rng = random.Random(seed)
    client = httpx.Client(base_url=url, headers=headers or {}, timeout=timeout)
    routes = [r for r in base_requests(model, embed_model)
              if client.post(r[1], content=b"{").status_code != 404]  # only the routes this server has
    counts = {"cases": 0, "2xx": 0, "4xx": 0, "failures": 0}
    failures = []
    started = time.time()
    for i in range(cases):
        method, path, body = rng.choice(routes)
        raw, what = mutate(rng, body)
        try:
            response = client.request(method, path, content=raw, headers={"Content-Type": "application/json"})
            status = response.status_code
            bad = status >= 500 or (status >= 400 and not well_formed_error(path, response))
            detail = response.text[:300]
        except httpx.HTTPError as e:
            status, bad, detail = 0, True, f"{type(e).__name__}: {e}"
        counts["cases"] += 1
        if bad:
            counts["failures"] += 1
            failures.append({"path": path, "mutation": what, "body": raw.decode("utf-8", "replace"),
                             "status": status, "answer": detail})
            log(f"FAIL {status} {path} {what}: {detail[:200]}")
        else:
            counts["2xx" if status < 300 else "4xx"] += 1
        if (i + 1) % 500 == 0:
            log(f"{i + 1} cases, {counts['failures']} failures, {time.time() - started:.0f} s")
    deadline = time.time() + 30
    while time.time() < deadline:
        health = client.get("/health").json()
        if health["active"] == 0 and health["queued"] == 0:
            break
        time.sleep(0.2)
    counts["health"] = health
    counts["seconds"] = round(time.time() - started, 1)
    return {"counts": counts, "failures": failures}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", default="http://127.0.0.1:11434")
    ap.add_argument("--cases", type=int, default=20_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default="smollm2:135m")
    ap.add_argument("--embed-model", default=None, help="an embedding model for the embedding routes")
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--failures", type=Path, default=Path("fuzz_http_failures.json"))
    args = ap.parse_args()
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    result = run(args.url, args.cases, args.seed, args.model, args.embed_model, headers)
    print(json.dumps(result["counts"]))
    if result["failures"]:
        args.failures.write_text(json.dumps(result["failures"], indent=1))
        print(f"{len(result['failures'])} failing cases written to {args.failures}")
    return 1 if result["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())

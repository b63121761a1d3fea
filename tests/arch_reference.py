"""llama.cpp and mlxllm side by side on the architecture fixtures (tests/fixtures/archs):
the same file, the same token ids, llama.cpp with an F32 KV cache."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np

FIXTURES = Path(__file__).parent / "fixtures" / "archs"
MANIFEST = json.loads((FIXTURES / "manifest.json").read_text())
PROMPT_LEN = 48  # past every fixture's sliding window (16)
GREEDY = 32


def token_ids(name: str, n: int = PROMPT_LEN) -> list[int]:
    """A fixed pseudo-random sequence inside the fixture's vocabulary (ids 0-3 are specials)."""
    vocab = MANIFEST[name]["config"].get("vocab_size") or 384
    rng = np.random.default_rng(sum(map(ord, name)))
    return [int(t) for t in rng.integers(4, vocab, n)]


def llama_cpp(path: Path):
    import llama_cpp

    return llama_cpp.Llama(model_path=str(path), n_ctx=256, n_batch=256, n_threads=2, logits_all=True,
                           type_k=0, type_v=0, verbose=False)


def llama_cpp_logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def llama_cpp_greedy(llm, ids: list[int], n: int = GREEDY) -> list[int]:
    llm.reset()
    out = []
    for tok in llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0):
        out.append(int(tok))
        if len(out) == n:
            break
    return out


def mlxllm_logits(model, ids: list[int], chunk: int = 0) -> np.ndarray:
    """Logits of every position; chunk > 0 feeds the ids through the KV cache in pieces."""
    if not chunk:
        return np.array(model(mx.array([ids]))[0])
    cache = model.make_cache()
    return np.concatenate([np.array(model(mx.array([ids[s:s + chunk]]), cache=cache)[0])
                           for s in range(0, len(ids), chunk)])


def mlxllm_greedy(model, ids: list[int], n: int = GREEDY) -> list[int]:
    from mlxllm.generate import generate_step
    from mlxllm.sample import SamplingParams

    return list(generate_step(model, ids, SamplingParams(temperature=0.0, repeat_penalty=1.0), max_tokens=n))

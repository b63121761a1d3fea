"""Regenerate tests/fixtures/reference/*.json: llama.cpp's view of the real models.

For each model and prompt, llama.cpp (through llama-cpp-python, same GGUF, its own
tokenizer) tokenizes the prompt, greedily continues it, and records, at every position of
prompt + continuation, its argmax and its top-8 logits. The tests feed the same token
sequence to mlxllm (teacher forcing) and compare argmaxes and logits.

    python scripts/make_reference_fixtures.py            # both models
    python scripts/make_reference_fixtures.py gemma3:270m
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "reference"
CONTINUATION = 48
TOP = 8

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Once upon a time, in a small village at the edge of a great forest, there lived",
    "Q: What is 17 multiplied by 23?\nA:",
    "Les trois couleurs du drapeau français sont",
    "Here is a list of the planets in our solar system, in order from the Sun:\n1.",
    "import numpy as np\n\n# Compute the mean and standard deviation of a list of numbers\ndata = [",
]


def long_prompt() -> str:
    """A prompt of well over 1500 tokens (past Gemma 3's 512-token sliding window)."""
    paragraphs = [
        "The history of computing stretches from the abacus and Napier's bones through "
        "Babbage's analytical engine to the electronic machines of the twentieth century.",
        "In 1936 Alan Turing described an abstract machine that manipulates symbols on a tape "
        "according to a table of rules; it captured what it means to compute.",
        "During the Second World War, Colossus and ENIAC showed that electronic valves could "
        "carry out thousands of operations per second, far beyond any mechanical device.",
        "The invention of the transistor at Bell Labs in 1947, and of the integrated circuit a "
        "decade later, made computers smaller, cheaper and far more reliable.",
        "Programming languages grew alongside the hardware: FORTRAN for scientists, COBOL for "
        "business, Lisp for research on symbolic reasoning, and C for writing operating systems.",
        "Personal computers arrived in the late 1970s, and within two decades networks had "
        "connected them into a global web of documents, services and people.",
        "Today, specialised accelerators train neural networks with billions of parameters, "
        "and the same models answer questions on laptops and phones.",
    ]
    text = []
    for i in range(9):
        for j, p in enumerate(paragraphs):
            text.append(f"Section {i + 1}.{j + 1}. {p}")
    return "\n\n".join(text) + "\n\nIn summary, the history of computing shows that"


def prompts() -> list[str]:
    """The prompts of every fixture, the long one last."""
    return PROMPTS + [long_prompt()]


def open_llama(path, **llama_options):
    """llama.cpp on `path`, keeping the logits of every position, with room for the long prompt."""
    import llama_cpp

    return llama_cpp.Llama(model_path=str(path), n_ctx=4096, n_batch=512, n_threads=2, logits_all=True,
                           verbose=False, **llama_options)


def prompt_ids(llm, prompt: str) -> list[int]:
    """llama.cpp's tokens for `prompt`, with BOS where the file asks for it."""
    return llm.tokenize(prompt.encode(), add_bos=llm.metadata.get("tokenizer.ggml.add_bos_token", "true") != "false")


def greedy(llm, prompt: str) -> tuple[list[int], np.ndarray]:
    """llama.cpp's tokens for `prompt` plus its greedy continuation (up to CONTINUATION tokens,
    ending at EOS), and its logits at every position of that sequence."""
    llm.reset()
    llm.eval(prompt_ids(llm, prompt))
    for _ in range(CONTINUATION):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        if nxt == llm.token_eos():
            break
        llm.eval([nxt])
    tokens = list(llm.eval_tokens)
    return tokens, np.array(llm.scores[: len(tokens)], dtype=np.float32)  # (n, vocab), a copy: llm.scores is reused


def reference(llm, prompt: str) -> dict:
    tokens, scores = greedy(llm, prompt)
    top = np.argsort(-scores, axis=-1)[:, :TOP]
    return {
        "prompt": prompt,
        "tokens": tokens,
        "n_prompt": len(prompt_ids(llm, prompt)),
        "argmax": scores.argmax(-1).tolist(),
        "top_ids": top.tolist(),
        "top_logits": np.take_along_axis(scores, top, -1).round(4).tolist(),
    }


def main(names: list[str]) -> None:
    import llama_cpp

    from mlxllm.models import resolve

    OUT.mkdir(parents=True, exist_ok=True)
    for name in names:
        path = resolve(name)
        llm = open_llama(path)
        cases = [reference(llm, p) for p in prompts()]
        doc = {"model": name, "llama_cpp_python": llama_cpp.__version__, "cases": cases}
        target = OUT / f"{name.replace(':', '-')}.json"
        target.write_text(json.dumps(doc, separators=(",", ":")))
        print(f"{target}: {len(cases)} prompts, {sum(len(c['tokens']) for c in cases)} positions")


if __name__ == "__main__":
    main(sys.argv[1:] or ["smollm2:135m", "gemma3:270m"])

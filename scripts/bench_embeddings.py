"""Embeddings per second for 256 short texts: mlxllm against llama.cpp on the same GGUF, in
one run. llama.cpp runs through llama-cpp-python with embeddings on (the file's pooling,
normalized, as Ollama's /api/embed gives them), every text in one call (`Llama.embed`, which
packs sequences into batches of n_batch tokens, up to n_seq_max sequences each; the fastest
of several n_batch); mlxllm runs
`mlxllm.embed` on the same texts (rows of similar length padded into forward passes of about
8192 tokens). Both sides tokenize inside the timed call; "forward" also times mlxllm with the
tokens given, to show what tokenizing in Python costs. Same thread count on both sides (the
BLAS under MLX is limited to it). The vectors of the two sides are compared before timing
(cosine), so both compute the same thing.

    python scripts/bench_embeddings.py tests/fixtures/archs/modern-bert.f32.gguf [-r 5] [-t 2]
    python scripts/bench_embeddings.py --make-minilm /work/models/minilm-l6-random   # then bench its GGUFs

--make-minilm builds a random BertModel of all-MiniLM-L6-v2's shape (hidden 384, 6 layers, 12
heads, FFN 1536, a WordPiece vocabulary of up to 30522 tokens trained on the Python standard
library's sources, mean pooling), converts it with llama.cpp's converter (F32) and quantizes a Q8_0 copy.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

N_TEXTS = 256
# llama.cpp's n_batch = n_ubatch = n_ctx (an encoder's batch must fit one ubatch), tried in
# turn: its attention spans the whole ubatch (other sequences masked out), so packing more
# texts per batch costs quadratically; the fastest setting is the one compared.
BATCHES = (512, 1024, 2048, 4096)
VOCABULARY = ("the a an of to in on for with by from at as is was are be been it this that these those we you "
         "they he she model text search query document answer question vector embedding language data "
         "cat dog house river city market price music film book science history energy water light "
         "quick slow small large new old first last good bad red blue green open close run read write "
         "find make take give show learn build test measure compare store load serve batch token")


def texts(n: int = N_TEXTS, seed: int = 0) -> list[str]:
    """Short English-like texts, 4 to 24 words, the same every run."""
    rng = random.Random(seed)
    words = VOCABULARY.split()
    out = []
    for _ in range(n):
        text = " ".join(rng.choice(words) for _ in range(rng.randint(4, 24)))
        out.append(text.capitalize() + rng.choice(".?!"))
    return out


def bench_llama_cpp(path: str, inputs: list[str], reps: int, threads: int, batch: int) -> tuple[list[float], list, int]:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=path, embedding=True, n_ctx=batch, n_batch=batch, n_ubatch=batch,
                          n_threads=threads, n_threads_batch=threads, verbose=False)
    try:
        vectors = llm.embed(inputs, normalize=True)  # warm-up, and the vectors to compare
        tokens = sum(len(llm.tokenize(t.encode())) for t in inputs)
        runs = []
        for _ in range(reps):
            start = time.perf_counter()
            llm.embed(inputs, normalize=True)
            runs.append(len(inputs) / (time.perf_counter() - start))
        return runs, vectors, tokens
    finally:
        llm.close()


def bench_mlxllm(path: str, inputs: list[str], reps: int) -> tuple[list[float], list[float], list, int]:
    import mlx.core as mx

    from mlxllm import embed, load
    from mlxllm.embeddings import embed_tokens, tokenize

    model, tokenizer = load(path)
    vectors = embed(model, tokenizer, inputs)  # warm-up
    ids = tokenize(tokenizer, inputs, model.args.context_length)
    embed_tokens(model, ids)
    runs, forward = [], []
    for _ in range(reps):
        start = time.perf_counter()
        embed(model, tokenizer, inputs)
        runs.append(len(inputs) / (time.perf_counter() - start))
        start = time.perf_counter()
        embed_tokens(model, ids)
        forward.append(len(inputs) / (time.perf_counter() - start))
    mx.clear_cache()
    return runs, forward, vectors, sum(map(len, ids))


def run(paths: list[str], reps: int, threads: int, batches: tuple[int, ...] = BATCHES) -> None:
    import numpy as np

    import mlxllm  # noqa: F401  (loads the BLAS before mlx.core)
    from mlxllm import _blas

    inputs = texts()
    print(f"{N_TEXTS} texts, {threads} threads; BLAS {_blas.loaded or 'reference'}; embeddings/s: mean of {reps} "
          f"(best)")
    print(f"{'model':<34}{'tokens':>7}{'n_batch':>8}{'llama.cpp':>17}{'mlxllm':>17}{'ratio':>7}{'forward':>17}{'ratio':>7}"
          f"{'min cos':>9}")
    for path in paths:
        tried = {b: bench_llama_cpp(path, inputs, reps, threads, b) for b in batches}
        batch = max(tried, key=lambda b: statistics.mean(tried[b][0]))
        theirs, ref, tokens = tried[batch]
        ours, forward, vectors, our_tokens = bench_mlxllm(path, inputs, reps)
        assert our_tokens == tokens, f"{path}: {our_tokens} tokens here, {tokens} in llama.cpp"
        cosine = float((np.array(vectors) * np.array(ref)).sum(1).min())

        def cell(r: list[float]) -> str:
            return f"{statistics.mean(r):.1f} ({max(r):.1f})"

        t, o, f = statistics.mean(theirs), statistics.mean(ours), statistics.mean(forward)
        print(f"{os.path.basename(path):<34}{tokens:>7}{batch:>8}{cell(theirs):>17}{cell(ours):>17}{o / t:>7.2f}"
              f"{cell(forward):>17}{f / t:>7.2f}{cosine:>9.5f}", flush=True)


# ---------------------------------------------------------------------------- a MiniLM-shaped file

MINILM = {"hidden_size": 384, "num_hidden_layers": 6, "num_attention_heads": 12, "intermediate_size": 1536,
          "vocab_size": 30522, "max_position_embeddings": 512, "type_vocab_size": 2, "hidden_act": "gelu",
          "layer_norm_eps": 1e-12, "pad_token_id": 0}
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def _stdlib_lines():
    import sysconfig

    for p in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        if "test" in p.parts or "idlelib" in p.parts:
            continue
        for line in p.read_text(encoding="utf-8", errors="ignore").splitlines():
            line = line.strip()
            if line and line.isascii():
                yield line


def make_minilm(out: Path) -> list[str]:
    """Random BertModel weights of MiniLM-L6's shape -> llama.cpp's converter (F32) -> Q8_0."""
    import torch
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import BertConfig, BertModel

    sys.path.insert(0, str(Path(__file__).parent))
    import make_arch_fixtures as fixtures  # convert() and quantize_q8(): the fixtures' converter runs

    hf = out / "hf"
    hf.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(_stdlib_lines(), trainers.WordPieceTrainer(
        vocab_size=MINILM["vocab_size"], special_tokens=SPECIALS, show_progress=False))
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tok.save(str(hf / "tokenizer.json"))
    (hf / "vocab.txt").write_text("".join(f"{t}\n" for t, _ in vocab))
    (hf / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "BertTokenizer", "do_lower_case": True, "unk_token": "[UNK]", "sep_token": "[SEP]",
        "pad_token": "[PAD]", "cls_token": "[CLS]", "mask_token": "[MASK]", "model_max_length": 512}))
    torch.manual_seed(0)
    model = BertModel(BertConfig(**{**MINILM, "vocab_size": len(vocab)}), add_pooling_layer=False).eval()
    model.save_pretrained(hf)
    fixtures._write_pooling(hf, "mean", MINILM["hidden_size"])  # modules.json: the converter's pooling type
    f32, q8 = out / "minilm-l6-random.f32.gguf", out / "minilm-l6-random.q8_0.gguf"
    fixtures.convert(hf, f32)
    fixtures.quantize_q8(f32, q8)
    return [str(f32), str(q8)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="*", help="GGUF paths")
    ap.add_argument("-r", "--repetitions", type=int, default=3)
    ap.add_argument("-t", "--threads", type=int, default=os.cpu_count())
    ap.add_argument("--n-batch", type=int, nargs="+", default=BATCHES,
                    help="llama.cpp batch sizes to try (n_batch = n_ubatch = n_ctx); the fastest is compared")
    ap.add_argument("--make-minilm", type=Path, metavar="DIR", help="build the MiniLM-shaped files in DIR first")
    args = ap.parse_args()
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):  # before the BLAS loads
        os.environ[var] = str(args.threads)
    paths = list(args.models)
    if args.make_minilm:
        paths += make_minilm(args.make_minilm)
    if not paths:
        ap.error("give GGUF paths or --make-minilm DIR")
    run(paths, args.repetitions, args.threads, tuple(args.n_batch))


if __name__ == "__main__":
    main()

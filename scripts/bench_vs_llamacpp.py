"""mlxllm against llama.cpp on the same GGUF, in one run: pp512 and tg128 tokens/s and the
ratios (mlxllm / llama.cpp). llama.cpp runs through llama-cpp-python with the same thread
count (the machine's cores); both measure the llama-bench way: pp = one prompt of random
tokens, tg = single-token steps from a one-token context, repeated. Besides the means, the best
run of each side and their ratio: on a machine other work shares, llama.cpp's spinning threads
lose most when a core is taken, and the best runs are the least disturbed.

    python scripts/bench_vs_llamacpp.py smollm2:135m gemma3:270m [-r 3]
    python scripts/bench_vs_llamacpp.py /work/models/qwen3moe-bench.q4_k_m.gguf   # any GGUF path
    python scripts/bench_vs_llamacpp.py --mlx-first   # import mlx.core before mlxllm: same figures
    python scripts/bench_vs_llamacpp.py --depth 4096  # both after a 4096-token context (llama-bench -d)
    python scripts/bench_vs_llamacpp.py --kv f32      # both decode with a float32 KV cache

--kv: the KV cache both sides decode with. f16 (the default) is llama.cpp's default cache,
mlxllm's `--kv-bits 16`; f32 is mlxllm's default, llama.cpp's type_k / type_v F32.
llama.cpp's prompts fill the same cache; mlxllm's pp runs (mlxllm.bench) fill a float32 one.

--mlx-first imports `mlx.core` before `mlxllm`, as a user's script may: then no BLAS can be
slipped under MLX's own matmul, and the figures show that mlxllm's products do not need it.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time

N_PROMPT, N_GEN = 512, 128


GGML_TYPE_F32 = 0


def bench_llama_cpp(path: str, reps: int, threads: int, depth: int = 0, kv: str = "f16") -> dict[str, list[float]]:
    import llama_cpp

    kv_type = GGML_TYPE_F32 if kv == "f32" else None  # None: llama.cpp's default, F16
    llm = llama_cpp.Llama(model_path=path, n_ctx=depth + N_PROMPT + N_GEN + 8, n_batch=N_PROMPT, n_threads=threads,
                          n_threads_batch=threads, type_k=kv_type, type_v=kv_type, verbose=False)
    rng = random.Random(0)
    vocab = llm.n_vocab()

    def context() -> None:  # eval() after reset() drops the KV cache past position 0
        llm.reset()
        llm.eval([llm.token_bos()] + [rng.randrange(vocab) for _ in range(depth)])

    def pp() -> float:
        context()
        tokens = [rng.randrange(vocab) for _ in range(N_PROMPT)]
        start = time.perf_counter()
        llm.eval(tokens)
        return N_PROMPT / (time.perf_counter() - start)

    def tg() -> float:
        context()
        start = time.perf_counter()
        for _ in range(N_GEN):
            llm.eval([rng.randrange(vocab)])
        return N_GEN / (time.perf_counter() - start)

    pp(), tg()  # warm-up
    return {"pp": [pp() for _ in range(reps)], "tg": [tg() for _ in range(reps)]}


def bench_mlxllm(name: str, reps: int, depth: int = 0, kv: str = "f16") -> dict[str, list[float]]:
    from mlxllm import load
    from mlxllm.bench import bench

    model, tokenizer = load(name)
    r = bench(model, tokenizer, N_PROMPT, N_GEN, reps, depth=depth, kv_bits=16 if kv == "f16" else None)
    at = f"@d{depth}" if depth else ""
    return {"pp": r[f"pp{N_PROMPT}{at}"]["runs"], "tg": r[f"tg{N_GEN}{at}"]["runs"]}


def main() -> None:
    if "--mlx-first" in sys.argv:
        import mlx.core  # noqa: F401  (before mlxllm: MLX keeps the BLAS its wheel links)
    import mlxllm.kernels
    from mlxllm import _blas
    from mlxllm.kernels import BLAS
    from mlxllm.models import resolve

    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="*", default=["smollm2:135m", "gemma3:270m"])
    ap.add_argument("-r", "--repetitions", type=int, default=3)
    ap.add_argument("-t", "--threads", type=int, default=os.cpu_count())
    ap.add_argument("--mlx-first", action="store_true", help="import mlx.core before mlxllm")
    ap.add_argument("-d", "--depth", type=int, default=0, help="tokens already in the context (llama-bench -d)")
    ap.add_argument("--kv", choices=["f16", "f32"], default="f16", help="the KV cache both sides decode with")
    args = ap.parse_args()
    if mlxllm.kernels.cpu.KERNELS is not None:  # the same threads on both sides
        mlxllm.kernels.cpu.KERNELS.set_num_threads(args.threads)
    print(f"threads: {args.threads}; MLX's BLAS: {_blas.loaded or 'as its wheel links it'}; mlxllm's CPU kernels' BLAS: "
          f"{BLAS or 'none (their own GEMM)'}; CPU kernels: {mlxllm.kernels.cpu.UNAVAILABLE or 'on'}; "
          f"decode's KV cache: {args.kv} on both sides")
    width = max(14, *(len(os.path.basename(n)) + 1 for n in args.models))
    test_width = 7 + (len(f"@d{args.depth}") if args.depth else 0)
    print(f"{'model':<{width}}{'test':<{test_width}}{'llama.cpp':>11}{'mlxllm':>10}{'ratio':>8}{'best':>9}{'best':>9}{'ratio':>8}"
          f"   (tokens/s: means of {args.repetitions}, then the best runs of llama.cpp and mlxllm)")
    for name in args.models:
        theirs = bench_llama_cpp(resolve(name), args.repetitions, args.threads, args.depth, args.kv)
        ours = bench_mlxllm(name, args.repetitions, args.depth, args.kv)
        at = f"@d{args.depth}" if args.depth else ""
        for test, label in (("pp", f"pp{N_PROMPT}{at}"), ("tg", f"tg{N_GEN}{at}")):
            t, o = statistics.mean(theirs[test]), statistics.mean(ours[test])
            print(f"{os.path.basename(name):<{width}}{label:<{test_width}}{t:>11.1f}{o:>10.1f}{o / t:>8.2f}"
                  f"{max(theirs[test]):>9.1f}{max(ours[test]):>9.1f}{max(ours[test]) / max(theirs[test]):>8.2f}", flush=True)


if __name__ == "__main__":
    main()

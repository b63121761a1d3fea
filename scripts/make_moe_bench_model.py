"""A random-weight MoE GGUF with a real model's per-layer shapes, for speed and memory runs.

The layers are Qwen3-30B-A3B's (GGUF arch qwen3moe): hidden 2048, 32 query heads and 4 KV heads
of 128, 128 experts of width 768, 8 chosen per token, per-head q/k RMSNorm. Only a few layers
(default 3, ~0.36 GB each at Q4_K_M) and the 384-token vocabulary of the architecture fixtures
(tests/fixtures/archs, tokenizer copied from qwen3moe-wide), so that the file is about 1 GB and
the time per token is the layers' (the real 151936-token head would be a third of a
3-layer model's decode work).

1. gguf-py's GGUFWriter streams an F16 file (F32 norms and router, as the converter writes
   them), one tensor drawn at a time: weights N(0, 1/fan_in), the router x3 so that routing is
   decisive, norms 1 + N(0, 0.1). Peak memory is one expert tensor in float32 and float16
   (~1.2 GB).
2. llama.cpp's quantizer (llama_cpp.llama_model_quantize) writes each requested type from it.
3. --check: llama.cpp and mlxllm on a few tokens of each file (mean |Δlogit| / std, argmax).

    python scripts/make_moe_bench_model.py [--out /work/models] [--layers 3]
                                           [--types Q4_K_M,Q4_0,Q8_0] [--check]

Then, e.g. python scripts/bench_vs_llamacpp.py /work/models/qwen3moe-bench.q4_k_m.gguf and
python scripts/measure_load.py /work/models/qwen3moe-bench.q4_0.gguf.
"""

from __future__ import annotations

import argparse
import ctypes
import math
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
TOKENIZER_SOURCE = ROOT / "tests" / "fixtures" / "archs" / "qwen3moe-wide.q4_k_m.gguf"

# Qwen3-30B-A3B's config.json
HIDDEN, HEADS, KV_HEADS, HEAD_DIM = 2048, 32, 4, 128
EXPERTS, EXPERTS_USED, EXPERT_FFN, DENSE_FFN = 128, 8, 768, 6144
ROPE_THETA, RMS_EPS, CONTEXT = 1e6, 1e-6, 40960
ROUTER_SCALE = 3.0


def tensor_plan(n_layers: int, vocab: int) -> list[tuple[str, tuple[int, ...], str, int]]:
    """(name, numpy shape, kind, fan_in) in file order; kind: embed | matrix | router | norm."""
    from gguf import MODEL_TENSOR as T
    from gguf import TENSOR_NAMES

    def name(t, bid=None) -> str:
        return TENSOR_NAMES[t].format(bid=bid) + ".weight"

    plan = [(name(T.TOKEN_EMBD), (vocab, HIDDEN), "embed", HIDDEN)]
    q, kv = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    for b in range(n_layers):
        plan += [
            (name(T.ATTN_NORM, b), (HIDDEN,), "norm", 0),
            (name(T.ATTN_Q, b), (q, HIDDEN), "matrix", HIDDEN),
            (name(T.ATTN_K, b), (kv, HIDDEN), "matrix", HIDDEN),
            (name(T.ATTN_V, b), (kv, HIDDEN), "matrix", HIDDEN),
            (name(T.ATTN_Q_NORM, b), (HEAD_DIM,), "norm", 0),
            (name(T.ATTN_K_NORM, b), (HEAD_DIM,), "norm", 0),
            (name(T.ATTN_OUT, b), (HIDDEN, q), "matrix", q),
            (name(T.FFN_NORM, b), (HIDDEN,), "norm", 0),
            (name(T.FFN_GATE_INP, b), (EXPERTS, HIDDEN), "router", HIDDEN),
            (name(T.FFN_GATE_EXP, b), (EXPERTS, EXPERT_FFN, HIDDEN), "matrix", HIDDEN),
            (name(T.FFN_UP_EXP, b), (EXPERTS, EXPERT_FFN, HIDDEN), "matrix", HIDDEN),
            (name(T.FFN_DOWN_EXP, b), (EXPERTS, HIDDEN, EXPERT_FFN), "matrix", EXPERT_FFN),
        ]
    plan += [(name(T.OUTPUT_NORM), (HIDDEN,), "norm", 0), (name(T.OUTPUT), (vocab, HIDDEN), "matrix", HIDDEN)]
    return plan


def draw(rng: np.random.Generator, shape: tuple[int, ...], kind: str, fan_in: int) -> np.ndarray:
    if kind == "norm":
        return (1.0 + 0.1 * rng.standard_normal(shape, dtype=np.float32)).astype(np.float32)
    scale = {"embed": 2.0 / math.sqrt(HIDDEN), "router": ROUTER_SCALE / math.sqrt(fan_in)}.get(kind, 1 / math.sqrt(fan_in))
    w = rng.standard_normal(shape, dtype=np.float32)
    w *= scale
    return w if kind == "router" else w.astype(np.float16)  # llama.cpp keeps the router in F32


def write_f16(dst: Path, n_layers: int, seed: int) -> None:
    from gguf import GGUFReader, GGUFValueType, GGUFWriter, LlamaFileType

    tok = GGUFReader(str(TOKENIZER_SOURCE))
    vocab = len(tok.fields["tokenizer.ggml.tokens"].data)
    writer = GGUFWriter(str(dst), "qwen3moe")
    writer.add_name(f"qwen3moe-bench-{n_layers}L (random weights, Qwen3-30B-A3B layer shapes)")
    writer.add_block_count(n_layers)
    writer.add_context_length(CONTEXT)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(DENSE_FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_key_length(HEAD_DIM)
    writer.add_value_length(HEAD_DIM)
    writer.add_rope_freq_base(ROPE_THETA)
    writer.add_layer_norm_rms_eps(RMS_EPS)
    writer.add_expert_count(EXPERTS)
    writer.add_expert_used_count(EXPERTS_USED)
    writer.add_expert_feed_forward_length(EXPERT_FFN)
    writer.add_file_type(LlamaFileType.MOSTLY_F16)
    for field in tok.fields.values():
        if field.name.startswith("tokenizer."):
            sub = field.types[-1] if field.types[0] == GGUFValueType.ARRAY else None
            writer.add_key_value(field.name, field.contents(), field.types[0], sub_type=sub)
    plan = tensor_plan(n_layers, vocab)
    for name, shape, kind, _ in plan:
        dtype = np.float32 if kind in ("norm", "router") else np.float16
        writer.add_tensor_info(name, shape, np.dtype(dtype), math.prod(shape) * np.dtype(dtype).itemsize)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    rng = np.random.default_rng(seed)
    for name, shape, kind, fan_in in plan:  # one tensor in memory at a time
        writer.write_tensor_data(draw(rng, shape, kind, fan_in))
    writer.close()


def quantize(src: Path, dst: Path, ftype: str, threads: int) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    params.nthread = threads
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise SystemExit(f"llama_model_quantize {ftype} returned {rc}")


def check(path: Path, n_tokens: int = 16) -> dict:
    """llama.cpp (F32 KV cache) and mlxllm on the same random tokens of the file."""
    import llama_cpp
    import mlx.core as mx

    import mlxllm  # noqa: F401  (the BLAS before mlx.core's first matmul)
    from mlxllm.loader import load_model

    ids = [int(t) for t in np.random.default_rng(0).integers(5, 384, n_tokens)]
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_batch=64, logits_all=True, type_k=0, type_v=0,
                          verbose=False)
    llm.eval(ids)
    ref = np.array(llm.scores[:n_tokens], dtype=np.float32)
    llm.close()
    ours = np.array(load_model(str(path))[0](mx.array([ids]))[0])
    diff = np.abs(ours - ref) / ref.std()
    return {"file": path.name, "logits_std": round(float(ref.std()), 3),
            "mean_diff_over_std": round(float(diff.mean()), 4), "max_diff_over_std": round(float(diff.max()), 4),
            "argmax_agree": float((ours.argmax(-1) == ref.argmax(-1)).mean())}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="/work/models")
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--types", default="Q4_K_M,Q4_0,Q8_0")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    f16 = out / "qwen3moe-bench.f16.gguf"
    if not f16.exists():
        start = time.perf_counter()
        write_f16(f16, args.layers, args.seed)
        print(f"{f16}: {f16.stat().st_size / 1e9:.2f} GB in {time.perf_counter() - start:.0f}s", flush=True)
    for ftype in filter(None, args.types.split(",")):
        dst = out / f"qwen3moe-bench.{ftype.lower()}.gguf"
        if not dst.exists():
            start = time.perf_counter()
            quantize(f16, dst, ftype, args.threads)
            print(f"{dst}: {dst.stat().st_size / 1e9:.3f} GB in {time.perf_counter() - start:.0f}s", flush=True)
        if args.check:
            print(check(dst), flush=True)


if __name__ == "__main__":
    main()

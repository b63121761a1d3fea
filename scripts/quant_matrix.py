"""Every quant type end to end: SmolLM2 in each type llama.cpp can write, mlxllm vs llama.cpp.

1. Widen SmolLM2-135M-Instruct (Q4_1) to an all-F32 GGUF (gguf-py writer, same metadata).
2. Have llama.cpp (`llama_model_quantize`) write every file type it can from it.
3. For each file: llama.cpp's greedy continuation of the fidelity fixtures' prompts (eight,
   one past 1500 tokens: scripts/make_reference_fixtures.py), then teacher-forced argmax
   agreement of mlxllm with llama.cpp at every position, and the tensor types the
   file holds (llama.cpp mixes types where row sizes force it).
4. llama.cpp's own noise floor (column "llama/KV32"): the agreement of llama.cpp with
   itself when only its KV cache changes from float16 to float32. llama.cpp's CPU matmuls
   round activations to 8 bits per block before multiplying quantized weights; a block's
   scale follows its largest element, and the hidden-state outliers of these models make that
   step large, so small changes flip roundings that then grow through the layers. On
   SmolLM2 in Q8_0, llama.cpp's logits move by 0.18 on average (logits average 7.5 in
   magnitude) when only its KV cache goes from float16 to float32; on the F32 file, by
   0.0025. No implementation that does not repeat llama.cpp's float operations in order can
   agree with it much better than it agrees with itself here. Column "vs KV32" is mlxllm
   against that float32-KV run. (mlxllm with llama.cpp's 8-bit rounding, MLXLLM_CPU_ACTIVATIONS=int8,
   lands as far from llama.cpp's run as float activations do, the README has the figures; with
   that rounding a 1e-6 change of the embeddings moved our logits by 0.18 too.)
5. The same as 3 against llama.cpp running a float32 copy of that file (its own
   dequantization, `llama_model_quantize` with ftype F32) with a float32 KV cache: float32
   from end to end on both sides, so this isolates our dequantization and compute from
   llama.cpp's roundings. It also gives the largest logit difference ("max|dlogit|").

    python scripts/quant_matrix.py [--out DIR] [--types Q4_0,Q6_K,...] [--json results.json]
                                   [--layout default|dense|quantized] [--model NAME_OR_PATH]

--model runs the same method on another GGUF (default smollm2:135m), widened to F32 the same
way; e.g. the 256-wide MoE fixture (tests/fixtures/archs/qwen3moe-wide.q4_k_m.gguf, whose
rows are long enough for k-quant and i-quant experts). A prompt longer than MAX_PROMPT_TOKENS
in the model's tokenizer (a 384-token vocabulary makes ~6700 tokens of the long one) is cut to
about LONG_PROMPT_TOKENS, SmolLM2's length of it. For a MoE file the results also list the
types of the expert tensors ("expert_types").

The types llama.cpp writes only with an importance matrix (IQ1_S, IQ1_M, IQ2_XXS, IQ2_XS,
IQ2_S, IQ2_M, Q2_K_S) cannot go through llama-cpp-python, whose API takes the matrix as a C++
object. For them the script builds llama.cpp's own `llama-imatrix` and `llama-quantize` from
the source of the installed llama-cpp-python (its source package, once, into --out; needs
cmake and a C++ compiler, ~5 minutes on 2 cores), computes the matrix of the F32 model on a
fixed text (the source of Python's argparse module) and quantizes with it.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import inspect
import json
import shutil
import subprocess
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

# The same measurement as the fidelity fixtures: their prompts (the long one past 1500 tokens)
# and their greedy continuation, through the same llama.cpp settings.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_reference_fixtures import greedy, open_llama, prompt_ids, prompts  # noqa: E402

# llama.h LLAMA_FTYPE_MOSTLY_* values
FTYPES = {
    "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q2_K": 10, "Q3_K_S": 11,
    "Q3_K_M": 12, "Q3_K_L": 13, "Q4_K_S": 14, "Q4_K_M": 15, "Q5_K_S": 16, "Q5_K_M": 17, "Q6_K": 18,
    "IQ2_XXS": 19, "IQ2_XS": 20, "Q2_K_S": 21, "IQ3_XS": 22, "IQ3_XXS": 23, "IQ1_S": 24,
    "IQ4_NL": 25, "IQ3_S": 26, "IQ3_M": 27, "IQ2_S": 28, "IQ2_M": 29, "IQ4_XS": 30, "IQ1_M": 31,
    "BF16": 32, "TQ1_0": 36, "TQ2_0": 37, "MXFP4_MOE": 38,
}

KV32 = {"type_k": 0, "type_v": 0}  # llama.cpp's KV cache in GGML_TYPE_F32 rather than its default F16

# llama.cpp refuses these without an importance matrix.
NEEDS_IMATRIX = {"IQ2_XXS", "IQ2_XS", "Q2_K_S", "IQ1_S", "IQ2_S", "IQ2_M", "IQ1_M"}


def write_f32(src: str, dst: Path) -> None:
    """The same model with every tensor widened to F32 (gguf-py dequantizes)."""
    from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter
    from gguf.quants import dequantize

    reader = GGUFReader(src)
    writer = GGUFWriter(str(dst), arch=reader.get_field("general.architecture").contents())
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name in ("general.architecture", "general.file_type"):
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), vtype, sub_type=sub)
    writer.add_file_type(0)  # LLAMA_FTYPE_ALL_F32
    for t in reader.tensors:
        data = dequantize(t.data, t.tensor_type).astype(np.float32)
        writer.add_tensor(t.name, data.reshape([int(d) for d in reversed(t.shape)]),
                          raw_dtype=GGMLQuantizationType.F32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def quantize(src: Path, dst: Path, ftype: int) -> str | None:
    """None on success, else why llama.cpp refused."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = 2
    params.allow_requantize = ftype == 0  # the float32 copy of a quantized file
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    return None if rc == 0 and dst.exists() else f"llama_model_quantize returned {rc}"


def llamacpp_tools(out: Path) -> Path:
    """The folder holding llama-imatrix and llama-quantize, built from the llama.cpp inside
    the installed llama-cpp-python's source package."""
    bin_dir = out / "llama.cpp-build" / "bin"
    if (bin_dir / "llama-imatrix").exists() and (bin_dir / "llama-quantize").exists():
        return bin_dir
    version = importlib.metadata.version("llama-cpp-python")
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                    f"llama-cpp-python=={version}", "-d", str(out)], check=True)
    root = f"llama_cpp_python-{version}/vendor/llama.cpp"
    with tarfile.open(out / f"llama_cpp_python-{version}.tar.gz") as tar:
        tar.extractall(out, members=[m for m in tar.getmembers() if m.name.startswith(root)], filter="data")
    cmake = shutil.which("cmake") or "cmake"
    build = out / "llama.cpp-build"
    subprocess.run([cmake, "-S", str(out / root), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF",
                    "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF"],
                   check=True, stdout=subprocess.DEVNULL)
    subprocess.run([cmake, "--build", str(build), "--target", "llama-imatrix", "llama-quantize", "-j", "2"],
                   check=True, stdout=subprocess.DEVNULL)
    return bin_dir


def importance_matrix(f32: Path, out: Path) -> Path:
    """llama-imatrix's importance matrix of the F32 model over a fixed calibration text."""
    imatrix = out / "imatrix.gguf"
    if not imatrix.exists():
        text = out / "calibration.txt"
        text.write_text(inspect.getsource(argparse))
        subprocess.run([str(llamacpp_tools(out) / "llama-imatrix"), "-m", str(f32), "-f", str(text), "-o", str(imatrix),
                        "-c", "256", "-t", "2", "--chunks", "32"], check=True, capture_output=True)
    return imatrix


def quantize_with_imatrix(f32: Path, dst: Path, name: str, out: Path) -> str | None:
    """llama-quantize with the importance matrix; None on success, else why it failed."""
    done = subprocess.run([str(llamacpp_tools(out) / "llama-quantize"), "--imatrix", str(importance_matrix(f32, out)),
                           str(f32), str(dst), name, "2"], capture_output=True, text=True)
    return None if done.returncode == 0 and dst.exists() else f"llama-quantize: {done.stderr.strip().splitlines()[-1:]}"


MAX_PROMPT_TOKENS, LONG_PROMPT_TOKENS = 3000, 2500


def fitted_prompts(llm) -> list[str]:
    """The fixture prompts, each longer than MAX_PROMPT_TOKENS in `llm`'s tokenizer cut to the
    characters that make about LONG_PROMPT_TOKENS (SmolLM2's prompts are left as they are)."""
    out = []
    for prompt in prompts():
        n = len(prompt_ids(llm, prompt))
        out.append(prompt if n <= MAX_PROMPT_TOKENS else prompt[: len(prompt) * LONG_PROMPT_TOKENS // n])
    return out


def llamacpp_greedy(path: Path, **llama_options) -> tuple[list[list[int]], list[np.ndarray]]:
    """llama.cpp's greedy continuation of each prompt on `path`, and its logits at every
    position of that sequence."""
    llm = open_llama(path, **llama_options)
    sequences, logits = [], []
    try:
        for prompt in fitted_prompts(llm):
            tokens, scores = greedy(llm, prompt)
            sequences.append(tokens)
            logits.append(scores)
    finally:
        llm.close()  # its logits buffer (n_ctx x vocab floats) goes now, not at a later gc
    return sequences, logits


def llamacpp_teacher_forced(path: Path, sequences: list[list[int]], **llama_options) -> list[np.ndarray]:
    """llama.cpp's argmax at every position of each given sequence."""
    llm = open_llama(path, **llama_options)
    argmax = []
    try:
        for tokens in sequences:
            llm.reset()
            llm.eval(tokens)
            argmax.append(np.asarray(llm.scores[: llm.n_tokens]).argmax(-1))
    finally:
        llm.close()
    return argmax


CHUNK = 256  # positions per forward, through the KV cache as generation runs a prompt


def mlxllm_logits(model, tokens: list[int]) -> np.ndarray:
    """mlxllm's logits at every position of `tokens`, (positions, vocab). Every chunk is a
    prompt's many rows: a last chunk of a few rows joins the one before, since a few rows
    take decode's path on the CPU (activations rounded to 8 bits, as llama.cpp's CPU
    matmuls round them), which would blur the comparison with a float32 copy at the tail."""
    import mlx.core as mx
    from mlxllm.kernels import CPU_MATVEC_ROWS

    starts = list(range(0, len(tokens), CHUNK))
    if len(starts) > 1 and len(tokens) - starts[-1] <= CPU_MATVEC_ROWS:
        starts.pop()
    ends = starts[1:] + [len(tokens)]
    cache = model.make_cache()
    return np.concatenate([np.array(model(mx.array([tokens[a:b]]), cache=cache)[0]) for a, b in zip(starts, ends)])


def compare(model, sequences: list[list[int]], logits: list[np.ndarray],
            argmax: list[np.ndarray] | None = None) -> tuple[float, float]:
    """The share of positions where mlxllm's argmax is llama.cpp's, and the largest
    difference between the two sides' logits; mlxllm's argmax per sequence is appended to
    `argmax` when given."""
    same = total = 0
    worst = 0.0
    for tokens, theirs in zip(sequences, logits):
        ours = mlxllm_logits(model, tokens)
        picks = ours.argmax(-1)
        if argmax is not None:
            argmax.append(picks)
        same += int((picks == theirs.argmax(-1)).sum())
        total += len(tokens)
        worst = max(worst, float(np.abs(ours - theirs).max()))
    return same / total, worst


def share(ours: list[np.ndarray], theirs: list[np.ndarray]) -> float:
    """The share of positions where two argmax sequences agree."""
    return float(np.mean(np.concatenate([a == b for a, b in zip(ours, theirs)])))


def main() -> None:
    from mlxllm.gguf import GGUFFile
    from mlxllm.loader import load_model
    from mlxllm.models import resolve

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="/tmp/mlxllm-quant-matrix")
    ap.add_argument("--types", default=",".join(FTYPES))
    ap.add_argument("--json", default=None)
    ap.add_argument("--model", default="smollm2:135m", help="the GGUF (name or path) to widen to F32 and re-quantize")
    ap.add_argument("--layout", choices=["default", "dense", "quantized"], default="default",
                    help="weights as float32 (dense), in their quantized layouts (quantized: the "
                         "packed types as their exact widened image on the CPU), or the device default")
    args = ap.parse_args()
    dense = {"default": None, "dense": True, "quantized": False}[args.layout]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "smollm2-135m" if args.model == "smollm2:135m" else Path(args.model).name.split(".")[0]
    f32 = out / f"{stem}-f32.gguf"
    if not f32.exists():
        write_f32(resolve(args.model), f32)
    results = {}
    print(f"{'file type':<11}{'agree':>8}{'llama/KV32':>12}{'vs KV32':>9}{'vs f32':>8}{'max|dlogit|':>12}  tensor types")
    for name in args.types.split(","):
        dst = out / f"{stem}-{name.lower()}.gguf"
        start = time.perf_counter()
        if dst.exists():
            error = None
        elif name in NEEDS_IMATRIX:
            error = quantize_with_imatrix(f32, dst, name, out)
        else:
            error = quantize(f32, dst, FTYPES[name])
        if error:
            results[name] = {"error": error}
            print(f"{name:<11}{'-':>8}  {error}")
            continue
        model, *_ = load_model(str(dst), dense=dense)
        sequences, logits = llamacpp_greedy(dst)
        ours = []
        agreement, _ = compare(model, sequences, logits, ours)
        kv32 = llamacpp_teacher_forced(dst, sequences, **KV32)
        itself, vs_kv32 = share(kv32, [x.argmax(-1) for x in logits]), share(ours, kv32)
        del logits  # ~0.6 GB of llama.cpp logits, before the next runs make as many
        f32_copy = out / f"{dst.stem}-as-f32.gguf"
        if not f32_copy.exists():
            quantize(dst, f32_copy, 0)
        exact, worst = compare(model, *llamacpp_greedy(f32_copy, **KV32))
        f32_copy.unlink()
        r = {"agreement": agreement, "llamacpp_f32_kv": itself, "agreement_vs_llamacpp_f32_kv": vs_kv32,
             "agreement_vs_f32_copy": exact,
             "max_logit_diff_vs_f32_copy": worst, "positions": sum(map(len, sequences))}
        tensors = GGUFFile(str(dst)).tensors
        r["types"] = dict(Counter(t.qtype.name for t in tensors.values()).most_common())
        experts = Counter(t.qtype.name for n, t in tensors.items() if "_exps." in n)
        if experts:
            r["expert_types"] = dict(experts.most_common())
        r["seconds"] = round(time.perf_counter() - start, 1)
        results[name] = r
        types = ", ".join(f"{k} x{v}" for k, v in r["types"].items())
        print(f"{name:<11}{r['agreement']:>8.2%}{r['llamacpp_f32_kv']:>12.2%}{r['agreement_vs_llamacpp_f32_kv']:>9.2%}"
              f"{r['agreement_vs_f32_copy']:>8.2%}"
              f"{r['max_logit_diff_vs_f32_copy']:>12.4f}  {types}",
              flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

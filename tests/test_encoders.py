"""Encoders (BERT and its descendants) and embeddings against llama.cpp on the same files.

The fixtures are the manifest entries with "kind": "encoder" (scripts/make_arch_fixtures.py:
tiny random checkpoints through llama.cpp's converter, F32 and its Q8_0 copy). llama.cpp runs
with embeddings on: per-token hidden states with pooling none, pooled vectors with the
file's pooling type (or one forced), several texts in one batch (separate sequences).
"""

from __future__ import annotations

import mlxllm  # noqa: F401  (first: puts an optimized BLAS under mlx.core)
import mlx.core as mx
import numpy as np
import pytest
from gguf import MODEL_ARCH_NAMES, MODEL_TENSORS, TENSOR_NAMES, Keys
from mlx.utils import tree_flatten

from arch_reference import FIXTURES, MANIFEST
from mlxllm.embeddings import embed, embed_tokens, pooling_of
from mlxllm.loader import load
from mlxllm.nn.pooling import POOLING
from mlxllm.registry import get_arch

ENCODERS = sorted(n for n in MANIFEST if MANIFEST[n].get("kind") == "encoder")
# F32: what is left is ggml's GELU, which looks its input up in an fp16 table (GGML_GELU_FP16):
# measured max |Δ| 0.7-1.6e-3 of the hidden states' std with GELU, 2-3e-6 with SiLU only
# (nomic-bert, eurobert, modern-bert-silu).
F32_TOLERANCE = 5e-3
# Q8_0: llama.cpp rounds activations to 8 bits before each product with a Q8_0 weight (we
# multiply in float32); measured max |Δ| 0.028-0.087 and mean 0.005-0.015 of the std (BERT
# lowest, EuroBERT highest).
Q8_MAX_TOLERANCE = 0.15
Q8_MEAN_TOLERANCE = 0.03
TEXTS = ["Hello world.", "The quick brown fox jumps over the lazy dog, twice!",
         "def f(x): return x * 2", "a", "Embeddings of many texts run as one batch."]
N_CTX = 512


def _llama(path, pooling: int):
    import llama_cpp

    return llama_cpp.Llama(model_path=str(path), embedding=True, pooling_type=pooling, n_ctx=N_CTX,
                           n_batch=N_CTX, n_ubatch=N_CTX, n_threads=2, verbose=False)


def llama_hidden(path, ids: list[int]) -> np.ndarray:
    """llama.cpp's (L, D) hidden states for one sequence (pooling none)."""
    import llama_cpp

    llm = _llama(path, llama_cpp.LLAMA_POOLING_TYPE_NONE)
    try:
        llm._batch.reset()
        llm._batch.add_sequence(ids, 0, True)
        llm._ctx.decode(llm._batch)
        n = llm.n_embd()
        ptr = llama_cpp.llama_get_embeddings(llm._ctx.ctx)
        return np.ctypeslib.as_array(ptr, shape=(len(ids) * n,)).reshape(len(ids), n).copy()
    finally:
        llm.close()


def llama_pooled(path, texts: list[str], pooling: int = -1) -> tuple[np.ndarray, list[list[int]]]:
    """llama.cpp's pooled vectors (not normalized) for texts in one batch, and its tokens."""
    llm = _llama(path, pooling)
    try:
        tokens = [llm.tokenize(t.encode()) for t in texts]
        return np.array(llm.embed(texts, normalize=False), np.float32), tokens
    finally:
        llm.close()


@pytest.fixture(scope="module")
def models():
    cache = {}

    def get(name: str, kind: str = "f32"):
        if (name, kind) not in cache:
            cache[(name, kind)] = load(str(FIXTURES / f"{name}.{kind}.gguf"))
        return cache[(name, kind)]
    return get


def test_encoder_fixtures_exist():
    assert {"bert", "distilbert", "roberta", "nomic-bert", "jina-bert-v2", "modern-bert", "eurobert"} <= set(ENCODERS)
    assert {"roberta-rerank", "bert-classifier", "modern-bert-rerank", "jina-bert-v2-code"} <= set(RANKERS)


@pytest.mark.parametrize("name", ENCODERS)
def test_f32_hidden_states_match_llama_cpp(name, models):
    ids = MANIFEST[name]["eval_ids"]
    ref = llama_hidden(FIXTURES / f"{name}.f32.gguf", ids)
    model, _ = models(name)
    ours = np.array(model(mx.array([ids]))[0])
    assert ours.shape == ref.shape
    diff = np.abs(ours - ref).max() / ref.std()
    assert diff <= F32_TOLERANCE, f"{name}: max |Δ| = {diff:.2e} × std"


@pytest.mark.parametrize("name", ENCODERS)
def test_q8_0_hidden_states_near_llama_cpp(name, models):
    ids = MANIFEST[name]["eval_ids"]
    ref = llama_hidden(FIXTURES / f"{name}.q8_0.gguf", ids)
    model, _ = models(name, "q8_0")
    diff = np.abs(np.array(model(mx.array([ids]))[0]) - ref) / ref.std()
    assert diff.max() <= Q8_MAX_TOLERANCE and diff.mean() <= Q8_MEAN_TOLERANCE, \
        f"{name} Q8_0: max {diff.max():.3f}, mean {diff.mean():.4f} × std"


@pytest.mark.parametrize("name", ENCODERS)
def test_pooled_embeddings_match_llama_cpp(name, models):
    """The file's pooling over texts of different lengths in one batch (ours padded, llama.cpp's
    as separate sequences); the tokens too."""
    path = FIXTURES / f"{name}.f32.gguf"
    model, tokenizer = models(name)
    assert model.args.pooling == (MANIFEST[name]["pooling"] or "none")
    ref, ref_tokens = llama_pooled(path, TEXTS, POOLING.index(pooling_of(model)))  # none: mean
    assert [tokenizer.encode(t) for t in TEXTS] == ref_tokens
    ours = np.array(embed(model, tokenizer, TEXTS, normalize=False))
    assert np.abs(ours - ref).max() <= F32_TOLERANCE * ref.std()
    unit = np.array(embed(model, tokenizer, TEXTS))
    assert np.allclose(np.linalg.norm(unit, axis=1), 1.0, atol=1e-5)
    cosine = (unit * ref).sum(1) / np.linalg.norm(ref, axis=1)
    assert cosine.min() >= 0.99999, cosine


RANKERS = [n for n in ENCODERS if any(t.startswith("cls.") for t in MANIFEST[n]["tensors"])]
# As a fraction of the largest |score|: F32 measured max |Δ| 0.7-1.1e-3 (ggml's fp16 GELU table
# again), Q8_0 0.007-0.046.
RANK_TOLERANCE = {"f32": 5e-3, "q8_0": 0.1}


@pytest.mark.parametrize("kind", ["f32", "q8_0"])
@pytest.mark.parametrize("name", RANKERS)
def test_rank_scores_match_llama_cpp(name, kind, models):
    """A cross-encoder's classifier head (llama.cpp's rank pooling, forced as llama-server's
    --reranking forces it): dense + tanh where the file has cls, then cls.output."""
    path = FIXTURES / f"{name}.{kind}.gguf"
    model, tokenizer = models(name, kind)
    labels = len(model.gguf.metadata.get(Keys.Classifier.OUTPUT_LABELS, [None]))  # unnamed: one score
    ref, _ = llama_pooled(path, TEXTS, POOLING.index("rank"))
    ours = np.array(embed(model, tokenizer, TEXTS, pooling="rank"))
    assert ours.shape == (len(TEXTS), labels)
    ref = ref[:, :labels]
    assert np.abs(ours - ref).max() <= RANK_TOLERANCE[kind] * np.abs(ref).max()


def test_rank_needs_a_classifier(models):
    model, tokenizer = models("bert")
    with pytest.raises(ValueError, match="classifier"):
        embed(model, tokenizer, TEXTS, pooling="rank")


@pytest.mark.parametrize("pooling", ["mean", "cls", "last"])
def test_each_pooling_matches_llama_cpp(pooling, models):
    """Pooling forced on the same file, as llama.cpp's pooling_type parameter forces it."""
    model, tokenizer = models("bert")
    ref, _ = llama_pooled(FIXTURES / "bert.f32.gguf", TEXTS, POOLING.index(pooling))
    ours = np.array(embed(model, tokenizer, TEXTS, pooling=pooling, normalize=False))
    assert np.abs(ours - ref).max() <= F32_TOLERANCE * ref.std()


@pytest.mark.parametrize("name", ENCODERS)
def test_a_batch_equals_one_text_at_a_time(name, models):
    """Padding is masked: a text's vector does not depend on the others in its batch."""
    model, tokenizer = models(name)
    together = np.array(embed(model, tokenizer, TEXTS, pooling="mean"))
    alone = np.array([embed(model, tokenizer, t, pooling="mean")[0] for t in TEXTS])
    assert np.abs(together - alone).max() <= 1e-5


def test_per_token_vectors_are_the_hidden_states(models):
    model, tokenizer = models("bert")
    ids = tokenizer.encode(TEXTS[1])
    per_token = np.array(embed_tokens(model, [ids], pooling="none", normalize=False)[0])
    assert np.allclose(per_token, np.array(model(mx.array([ids]))[0]), atol=1e-5)


def test_bad_inputs_are_clear_errors(models):
    model, tokenizer = models("bert")
    with pytest.raises(ValueError, match="no texts"):
        embed(model, tokenizer, [])
    with pytest.raises(TypeError, match="not a string"):
        embed(model, tokenizer, ["fine", 3])
    long = " ".join(["word"] * (model.args.context_length + 10))
    with pytest.raises(ValueError, match="past the context"):
        embed(model, tokenizer, [long], truncate=False)
    ids, n = tokenizer.encode(long), model.args.context_length
    assert ids[-1] == tokenizer.sep_id
    cut = ids[:n - 1] + [tokenizer.sep_id]  # truncated to the context, its closing [SEP] kept
    assert np.allclose(embed(model, tokenizer, [long])[0], embed_tokens(model, [cut])[0], atol=1e-6)


def test_an_encoder_keeps_no_cache(models):
    model, _ = models("bert")
    with pytest.raises(TypeError, match="no cache"):
        model.make_cache()


def test_registry_declares_encoders():
    for name in ("bert", "nomic-bert", "jina-bert-v2", "modern-bert", "eurobert"):
        assert get_arch(name).kind == "encoder"
    assert get_arch("llama").kind == "decoder"
    with pytest.raises(ValueError, match="kind"):
        mlxllm.Arch(name="x", args=dict, model=dict, kind="vision")


def _leaf(template: str) -> str:
    return template.replace("blk.{bid}.", "blk.N.")


@pytest.mark.parametrize("name", ENCODERS)
def test_parameter_names_are_gguf_py_names(name, models):
    model, _ = models(name)
    arch = next(a for a, n in MODEL_ARCH_NAMES.items() if n == MANIFEST[name]["gguf_arch"])
    allowed = {_leaf(TENSOR_NAMES[t]) for t in MODEL_TENSORS[arch]}
    for param, _ in tree_flatten(model.parameters()):
        parts = param.rsplit(".", 1)[0].split(".")
        base = ".".join(["blk", "N", *parts[2:]]) if parts[0] == "blk" else ".".join(parts)
        assert base in allowed, f"{name}: {param} is not in gguf-py's MODEL_TENSORS[{arch.name}]"


def test_decoder_embeddings_match_llama_cpp():
    """A decoder's last hidden states (after its final norm) pooled by mean, as llama.cpp
    gives them with embeddings on."""
    path = FIXTURES / "qwen3.f32.gguf"
    model, tokenizer = load(str(path))
    ref, ref_tokens = llama_pooled(path, TEXTS, POOLING.index("mean"))
    assert [tokenizer.encode(t) for t in TEXTS] == ref_tokens
    ours = np.array(embed(model, tokenizer, TEXTS, normalize=False))
    assert np.abs(ours - ref).max() <= F32_TOLERANCE * ref.std()

"""Multi-head latent attention (mlxllm/nn/mla.py) in the layouts deepseek2 files come in,
beyond the logits test_archs.py compares with llama.cpp on every fixture:

- deepseek2:      today's converter, q-LoRA (attn_q_a / attn_q_b), split attn_k_b / attn_v_b
- deepseek2-lite: V2-Lite style, attn_q (no query compression)
- deepseek2-kvb:  the deepseek2 fixture's model as converters wrote it before llama.cpp's MLA
                  support: one attn_kv_b, which mlxllm splits into the absorbed form
"""

from __future__ import annotations

import mlxllm  # noqa: F401  (first: puts an optimized BLAS under mlx.core)

# isort: split
import gguf
import mlx.core as mx
import numpy as np
import pytest
from arch_reference import FIXTURES, mlxllm_logits, token_ids

from mlxllm.loader import load_model

LAYOUTS = ["deepseek2", "deepseek2-lite", "deepseek2-kvb"]


@pytest.mark.parametrize("name", LAYOUTS)
@pytest.mark.parametrize("kind", ["f32", "q8_0"])
def test_cache_holds_only_the_latent(name, kind):
    """kv_lora_rank + rope dims per token and layer, whatever the file's layout (a legacy
    attn_kv_b file too, which llama.cpp caches as full per-head keys and values)."""
    model, gf, *_ = load_model(str(FIXTURES / f"{name}.{kind}.gguf"))
    cache = model.make_cache()
    model(mx.array([token_ids(name, 20)]), cache=cache)
    m = gf.metadata
    per_token = (m["deepseek2.attention.kv_lora_rank"] + m["deepseek2.rope.dimension_count"]) * 4  # float32
    held = sum(k.nbytes + v.nbytes for k, v in (c.state for c in cache))
    assert held == 20 * per_token * len(cache)


def test_lite_file_runs_the_uncompressed_query():
    model = load_model(str(FIXTURES / "deepseek2-lite.f32.gguf"))[0]
    assert all("attn_q" in b and "attn_q_a" not in b for b in model.blk)
    assert len(model.blk) == 26  # llama.cpp accepts a file without q_lora_rank at 26 / 27 layers only


def test_legacy_kv_b_splits_into_the_converters_absorbed_tensors():
    """The legacy file's attn_kv_b, split by mlxllm, is exactly the attn_k_b / attn_v_b that
    today's converter writes for the same model (the deepseek2 fixture), and both files give
    the same logits."""
    legacy = load_model(str(FIXTURES / "deepseek2-kvb.f32.gguf"))[0]
    split = load_model(str(FIXTURES / "deepseek2.f32.gguf"))[0]
    assert all("attn_kv_b" in b and "attn_k_b" not in b for b in legacy.blk)
    ids = token_ids("deepseek2")
    a, b = mlxllm_logits(legacy, ids), mlxllm_logits(split, ids)
    for old, new in zip(legacy.blk, split.blk):
        assert "attn_kv_b" not in old
        assert np.array_equal(np.array(old.attn_k_b.weight), np.array(new.attn_k_b.weight))
        assert np.array_equal(np.array(old.attn_v_b.weight), np.array(new.attn_v_b.weight))
    assert np.abs(a - b).max() <= 1e-5 * b.std()


def test_quantized_legacy_kv_b_splits_into_its_exact_float_image():
    """A Q8_0 attn_kv_b becomes per-head float matrices equal to the file's dequantized
    blocks (gguf-py's dequantizer as the reference)."""
    path = FIXTURES / "deepseek2-kvb.q8_0.gguf"
    reader = gguf.GGUFReader(path)
    model = load_model(str(path), dense=False)[0]
    mlxllm_logits(model, token_ids("deepseek2-kvb", 4))
    for i, block in enumerate(model.blk):
        t = next(t for t in reader.tensors if t.name == f"blk.{i}.attn_kv_b.weight")
        assert t.tensor_type == gguf.GGMLQuantizationType.Q8_0
        w = gguf.quants.dequantize(t.data, t.tensor_type)  # (heads * (nope + v), kv_lora)
        H, nope = block.args.n_heads, block.d_nope
        w = w.reshape(H, -1, w.shape[-1])
        assert np.array_equal(np.array(block.attn_k_b.weight), w[:, :nope].transpose(0, 2, 1))
        assert np.array_equal(np.array(block.attn_v_b.weight), w[:, nope:])

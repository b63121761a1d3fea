"""The shared blocks against MLX's own ops (each block's use in a real graph is checked
against llama.cpp in test_archs.py)."""

import mlxllm  # noqa: F401
import mlx.core as mx
import pytest

from mlxllm import kernels
from mlxllm.cache import window_mask
from mlxllm.nn import LayerNorm, RMSNorm, RopeArgs, Rope, alibi_slopes


def test_layer_norm_matches_mlx():
    mx.random.seed(0)
    x = mx.random.normal((2, 5, 64)) * 3 + 1
    w, b = mx.random.normal((64,)), mx.random.normal((64,))
    norm = LayerNorm(64, eps=1e-5)
    norm.weight, norm.bias = w, b
    assert mx.allclose(norm(x), mx.fast.layer_norm(x, w, b, 1e-5), atol=1e-5)
    bare = LayerNorm(64, eps=1e-5, weight=False, bias=False)  # OLMo: no parameters
    assert not bare.parameters() and mx.allclose(bare(x), mx.fast.layer_norm(x, None, None, 1e-5), atol=1e-5)


def test_per_head_norm_weights():
    """A (heads, head_dim) weight (Command-R+, StableLM 2 12B) scales each head by its row."""
    mx.random.seed(1)
    x, w = mx.random.normal((1, 3, 4, 16)), mx.random.normal((4, 16))
    norm = RMSNorm(16, eps=1e-6)
    norm.weight = w
    assert mx.allclose(norm(x), mx.fast.rms_norm(x, None, 1e-6) * w, atol=1e-5)


@pytest.mark.parametrize("traditional", [True, False])
def test_partial_rope_matches_mlx(traditional):
    mx.random.seed(2)
    x = mx.random.normal((1, 7, 2, 32))  # (B, L, H, D), 8 of 32 entries rotate
    rope = Rope(RopeArgs(dims=8, traditional=traditional, base=10000.0, freq_scale=0.5))
    ref = mx.fast.rope(x.swapaxes(1, 2), 8, traditional=traditional, base=10000.0, scale=0.5, offset=3)
    assert mx.allclose(rope(x, 3), ref.swapaxes(1, 2), atol=1e-5)


def test_alibi_slopes_are_ggml_slopes():
    # 8 heads, max bias 8: 2^-1 .. 2^-8; 12 heads add the odd powers of 2^-0.5 (ggml soft_max)
    assert mx.allclose(alibi_slopes(8, 8.0), mx.array([2.0 ** -(h + 1) for h in range(8)]))
    twelve = alibi_slopes(12, 8.0)
    assert mx.allclose(twelve[8:], mx.array([2.0 ** (-0.5 * (2 * i + 1)) for i in range(4)]))


@pytest.mark.parametrize("mask", ["causal", "window", None])
def test_attention_bias_and_softcap_match_plain_math(mask):
    mx.random.seed(3)
    q = mx.random.normal((1, 4, 6, 8)) * 2
    k, v = mx.random.normal((1, 2, 10, 8)) * 2, mx.random.normal((1, 2, 10, 8))
    bias = mx.random.normal((4, 6, 10))
    m = window_mask(4, 6, 0, 10, 3) if mask == "window" else mask
    keep = window_mask(4, 6, 0, 10, 11) if mask == "causal" else m
    kr, vr = mx.repeat(k, 2, axis=1), mx.repeat(v, 2, axis=1)
    s = 1.5 * mx.tanh((q * 0.3) @ kr.swapaxes(-1, -2) / 1.5) + bias
    if keep is not None:
        s = mx.where(keep, s, -mx.inf)
    ref = mx.softmax(s, axis=-1) @ vr
    assert mx.allclose(kernels.attention(q, k, v, 0.3, m, softcap=1.5, bias=bias), ref, atol=1e-5)
    # the plain-MLX path a GPU, or a CPU without mlxllm's kernels, takes
    mask_array = window_mask(4, 6, 0, 10, 11) if mask == "causal" else m
    assert mx.allclose(kernels._attention_reference(q, k, v, 0.3, mask_array, 1.5, bias), ref, atol=1e-5)


@pytest.mark.parametrize("mask", ["causal", "window"])
def test_attention_sinks_take_probability_unscaled(mask):
    """gpt-oss's sinks: one more logit per head in the softmax, not scaled, attending to nothing."""
    mx.random.seed(4)
    q = mx.random.normal((1, 4, 6, 8))
    k, v = mx.random.normal((1, 2, 10, 8)), mx.random.normal((1, 2, 10, 8))
    sinks = mx.array([0.5, -1.0, 2.0, 0.0])
    m = window_mask(4, 6, 0, 10, 3) if mask == "window" else mask
    keep = window_mask(4, 6, 0, 10, 11) if mask == "causal" else m
    kr, vr = mx.repeat(k, 2, axis=1), mx.repeat(v, 2, axis=1)
    s = mx.where(keep, (q * 0.3) @ kr.swapaxes(-1, -2), -mx.inf)
    e = mx.exp(s - s.max(-1, keepdims=True))
    sink = mx.exp(sinks.reshape(1, 4, 1, 1) - s.max(-1, keepdims=True))
    ref = (e / (e.sum(-1, keepdims=True) + sink)) @ vr
    assert mx.allclose(kernels.attention(q, k, v, 0.3, m, sinks=sinks), ref, atol=1e-5)
    assert mx.allclose(kernels._attention_reference(q, k, v, 0.3, keep, 0.0, None, sinks), ref, atol=1e-5)

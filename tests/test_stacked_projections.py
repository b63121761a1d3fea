"""Projections of one input (q/k/v, gate/up) stacked by rows into one product.

The loader stacks each run of neighbouring projections that share a layout; each member's
arrays become row views of the stacked ones. The products must equal the separate ones, the
weights must still be held once, and projections that do not share a layout stay apart.
"""

import mlx.core as mx
import mlx.nn as nn
import pytest
from gguf.constants import GGMLQuantizationType as T

from mlxllm import kernels, layers
from mlxllm.layers import QuantizedLinear, project, stack_projections
from mlxllm.loader import load_model
from mlxllm.models import resolve
from mlxllm.quant import QuantizedTensor


def affine(rows: int, cols: int, bits: int, qtype: T) -> QuantizedTensor:
    w, scales, biases = mx.quantize(mx.random.normal((rows, cols)) * 0.05, group_size=32, bits=bits)
    return QuantizedTensor(qtype, (rows, cols), w, scales, biases)


class Block(nn.Module):
    def __init__(self, v_bits: int):
        super().__init__()
        mx.random.seed(0)
        self.q = QuantizedLinear(affine(96, 64, 4, T.Q4_1))
        self.k = QuantizedLinear(affine(32, 64, 4, T.Q4_1))
        self.v = QuantizedLinear(affine(32, 64, v_bits, T.Q4_1 if v_bits == 4 else T.Q8_0))


@pytest.mark.parametrize("rows", [1, 3, 40])  # decode, batched decode, a prompt
@pytest.mark.parametrize("v_bits", [4, 8])
def test_stacked_products_equal_separate_ones(rows, v_bits):
    block = Block(v_bits)
    x = mx.random.normal((1, rows, 64))
    separate = [m(x) for m in (block.q, block.k, block.v)]
    stack_projections(block, ("q", "k", "v"))
    assert hasattr(block.q, "stacked") and hasattr(block.k, "stacked")
    # v in another layout than q and k: q and k stack alone, v stays apart
    assert hasattr(block.v, "stacked") == (v_bits == 4)
    group, calls = block.q.stacked, []
    product = group.layer
    group.layer = lambda a: calls.append(a.shape) or product(a)
    stacked = project(x, (block.q, block.k, block.v))
    assert bool(calls) == (rows <= kernels.STACKED_MAX_ROWS)  # decode: one product; a prompt: one each
    for ours, ref in zip(stacked, separate, strict=True):
        assert ours.shape == ref.shape
        assert mx.allclose(ours, ref, rtol=1e-5, atol=1e-5).item()
    # each member still computes alone, from its row view of the stacked weight
    for m, ref in zip((block.q, block.k, block.v), separate):
        assert mx.allclose(m(x), ref, rtol=1e-5, atol=1e-5).item()
    # another order than the stacked one: one product each
    again = project(x, (block.k, block.q))
    assert mx.allclose(again[0], separate[1]).item() and mx.allclose(again[1], separate[0]).item()


def test_dense_and_biased_projections_stay_apart():
    block = Block(4)
    block.k.bias = mx.zeros((32,))
    block.v = nn.Linear(64, 32, bias=False)
    stack_projections(block, ("q", "k", "v"))
    assert not any(hasattr(m, "stacked") for m in (block.q, block.k, block.v))


@pytest.mark.parametrize("name, stacked", [("smollm2:135m", {"attn_q": 3, "attn_v": 3, "ffn_gate": 2}),
                                           # Gemma's file holds v as Q8_0, q and k as Q5_0
                                           ("gemma3:270m", {"attn_q": 2, "attn_v": 0, "ffn_gate": 2})])
def test_real_models_stack_without_holding_weights_twice(name, stacked, monkeypatch):
    mx.clear_cache()
    before = mx.get_active_memory()
    model, _, _, stats = load_model(resolve(name))
    held = mx.get_active_memory() - before
    block = model.layers[0]
    for attr, n in stacked.items():
        group = getattr(getattr(block, attr), "stacked", None)
        assert (len(group.ids) if group else 0) == n, attr
    tokens = mx.array([[1, 450, 7483, 310, 3444, 338, 263, 4824, 310, 2]])
    cache = model.make_cache()
    logits = [model(tokens[:, :-1], cache=cache), model(tokens[:, -1:], cache=cache)]

    monkeypatch.setattr(layers, "project", lambda x, linears: [m(x) for m in linears])
    cache = model.make_cache()
    separate = [model(tokens[:, :-1], cache=cache), model(tokens[:, -1:], cache=cache)]
    for ours, ref in zip(logits, separate):
        assert mx.allclose(ours, ref, rtol=1e-5, atol=1e-4).item()
    # the stacked weights replace the members' own: the loaded model holds what its tensors
    # take, not that plus a stacked copy
    assert held < 1.05 * stats.nbytes, (held, stats.nbytes)

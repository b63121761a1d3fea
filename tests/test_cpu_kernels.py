"""mlxllm's compiled CPU kernels (mlxllm/kernels/cpu) against MLX's own ops as the oracle:
mx.dequantize for the affine layout (bit for bit), the float32 matmul over it, mx.softmax,
nn.silu / nn.gelu_approx, and mx.fast.scaled_dot_product_attention."""

from __future__ import annotations

import platform
import shutil
import subprocess
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import pytest

from mlxllm import kernels
from mlxllm.kernels import cpu

K = cpu.KERNELS
needs_kernels = pytest.mark.skipif(K is None, reason=f"CPU kernels unavailable: {cpu.UNAVAILABLE}")

MLX_BITS = (1, 2, 3, 4, 5, 6, 8)


def test_kernels_are_built_where_they_can_run():
    """The install builds them on Linux/macOS: a silent fallback would only show as speed."""
    if platform.machine() == "x86_64" and not all(f in cpu._cpu_flags() for f in cpu.X86_64_V3_FLAGS):
        pytest.skip("this CPU predates x86-64-v3")
    assert K is not None, cpu.UNAVAILABLE
    assert K.mlx_version == mx.__version__
    assert K.num_threads() >= 1


def _quantized(rows: int, cols: int, bits: int, seed: int):
    w = mx.random.normal((rows, cols), key=mx.random.key(seed))
    wq, scales, biases = mx.quantize(w, group_size=32, bits=bits)
    return wq, scales, biases, mx.dequantize(wq, scales, biases, group_size=32, bits=bits)


@needs_kernels
@pytest.mark.parametrize("bits", MLX_BITS)
@pytest.mark.parametrize("shape", [(37, 96), (64, 576), (300, 640), (5, 2080)])
def test_affine_dequantize_is_mlx_bit_for_bit(bits, shape):
    wq, scales, biases, ref = _quantized(*shape, bits, seed=bits)
    biases[::3] = -0.0  # zeros keep their sign (gguf's Q4_K gives -0 for q = 0 with d < 0)
    ref = mx.dequantize(wq, scales, biases, group_size=32, bits=bits)
    out = K.affine_dequantize(wq, scales, biases, bits)
    assert out.shape == ref.shape and out.dtype == mx.float32
    assert mx.array_equal(out.view(mx.uint32), ref.view(mx.uint32)).item()  # bits, signed zeros too


@needs_kernels
@pytest.mark.parametrize("bits", MLX_BITS)
@pytest.mark.parametrize("shape", [(37, 96), (64, 576), (300, 640), (5, 2080)])
@pytest.mark.parametrize("batch", [(1,), (3,), (9,), (2, 3)])
def test_affine_matvec_matches_float_matmul(bits, shape, batch):
    """Every lane arrangement (bits 1/2/4/8 word lanes, 3/5/6 byte runs), rows that end in a
    partial superblock (96, 2080), 1-9 activation rows and leading batch dims."""
    wq, scales, biases, ref = _quantized(*shape, bits, seed=10 + bits)
    x = mx.random.normal((*batch, shape[1]), key=mx.random.key(len(batch) + bits))
    y = K.affine_matvec(x, wq, scales, biases, bits)
    want = x @ ref.T
    assert y.shape == want.shape
    bound = (mx.abs(x) @ mx.abs(ref).T).max().item()
    assert mx.abs(y - want).max().item() <= 1e-5 * bound


@needs_kernels
@pytest.mark.parametrize("bits", MLX_BITS)
@pytest.mark.parametrize("rows", [1, 3, 6])
def test_affine_gather_matvec_matches_each_experts_matmul(bits, rows):
    """Each row's chosen experts read in place from the stacked (experts, out, in) weight:
    the float product with that expert, rows repeating an expert included."""
    experts, out, inn, k = 5, 40, 96, 3
    wq, scales, biases, ref = _quantized(experts * out, inn, bits, seed=20 + bits)
    wq, scales, biases = (a.reshape(experts, out, -1) for a in (wq, scales, biases))
    ref = ref.reshape(experts, out, inn)
    x = mx.random.normal((rows, inn), key=mx.random.key(bits))
    indices = mx.random.randint(0, experts, (rows, k), key=mx.random.key(rows))
    indices[0] = mx.array([4, 0, 4])[:k]
    y = K.affine_gather_matvec(x, wq, scales, biases, indices, bits)
    want = mx.stack([mx.stack([x[n] @ ref[e].T for e in indices[n].tolist()]) for n in range(rows)])
    assert y.shape == (rows, k, out)
    bound = (mx.abs(x) @ mx.abs(ref.reshape(-1, inn)).T).max().item()
    assert mx.abs(y - want).max().item() <= 1e-5 * bound


@needs_kernels
def test_affine_gather_matvec_index_past_the_experts_is_nan():
    wq, scales, biases, _ = _quantized(2 * 8, 64, 4, seed=0)
    wq, scales, biases = (a.reshape(2, 8, -1) for a in (wq, scales, biases))
    y = K.affine_gather_matvec(mx.ones((1, 64)), wq, scales, biases, mx.array([[1, 7]]), 4)
    assert not mx.isnan(y[0, 0]).any().item() and mx.isnan(y[0, 1]).all().item()
    with pytest.raises(ValueError, match="3-D"):
        K.affine_gather_matvec(mx.ones((1, 64)), wq[0], scales[0], biases[0], mx.array([[0]]), 4)
    with pytest.raises(ValueError, match="indices"):
        K.affine_gather_matvec(mx.ones((1, 64)), wq, scales, biases, mx.array([[0.5]]), 4)


@needs_kernels
def test_affine_bad_layouts_are_one_line_errors():
    wq, scales, biases, _ = _quantized(8, 64, 4, seed=0)
    with pytest.raises(ValueError, match="bits must be"):
        K.affine_matvec(mx.zeros((1, 64)), wq, scales, biases, 7)
    with pytest.raises(ValueError, match="last dimension"):
        K.affine_matvec(mx.zeros((1, 32)), wq, scales, biases, 4)
    with pytest.raises(ValueError, match="scales and biases"):
        K.affine_dequantize(wq, scales.astype(mx.float16), biases, 4)


def _reference_softmax(s, scale, queries, keep):
    """keep: (queries, T) bool or None; rows are query r % queries."""
    s = s * scale
    if keep is not None:
        rows = s.shape[-2]
        s = mx.where(mx.tile(keep, (rows // queries, 1)), s, -mx.inf)
    p = mx.softmax(s, axis=-1, precise=True)
    return mx.where(mx.isnan(p), 0.0, p)  # a row that sees nothing: zeros


@needs_kernels
@pytest.mark.parametrize("T", [1, 7, 8, 33, 520])
def test_masked_softmax(T):
    queries = min(T, 5)
    s = 4 * mx.random.normal((2, 3 * queries, T), key=mx.random.key(T))
    got = K.masked_softmax(s, 0.3, queries, False)
    assert mx.allclose(got, _reference_softmax(s, 0.3, queries, None), atol=1e-6).item()
    causal = mx.arange(T)[None, :] <= (T - queries + mx.arange(queries))[:, None]
    got = K.masked_softmax(s, 0.3, queries, True)
    assert mx.allclose(got, _reference_softmax(s, 0.3, queries, causal), atol=1e-6).item()
    keep = mx.random.uniform(shape=(queries, T), key=mx.random.key(99)) > 0.4
    keep[0] = False  # a query that sees nothing
    got = K.masked_softmax(s, 0.3, queries, False, keep)
    assert mx.allclose(got, _reference_softmax(s, 0.3, queries, keep), atol=1e-6).item()
    assert (got[:, 0::queries] == 0).all().item()


@needs_kernels
@pytest.mark.parametrize("kind,act", [("silu", nn.silu), ("gelu_tanh", nn.gelu_approx)])
@pytest.mark.parametrize("shape", [(1, 1, 7), (3, 511, 1536)])
def test_gated_activation(kind, act, shape):
    gate = 6 * mx.random.normal(shape, key=mx.random.key(1))
    up = mx.random.normal(shape, key=mx.random.key(2))
    got, want = K.gated_activation(gate, up, kind), act(gate) * up
    assert mx.allclose(got, want, rtol=1e-5, atol=1e-6).item()
    with pytest.raises(ValueError, match="kind"):
        K.gated_activation(gate, up, "relu")


@needs_kernels
@pytest.mark.parametrize("kind", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("shape", [(1, 1, 2 * 7), (3, 5, 2 * 1536), (2, 1, 2 * 5000)])
def test_gated_activation_of_stacked_halves_is_the_split_ones_bit_for_bit(kind, shape):
    """Without up, each row of gate is a stacked projection's [gate | up]: the same values as
    the op on its split halves (what a decode step computed with two split nodes more)."""
    both = 6 * mx.random.normal(shape, key=mx.random.key(3))
    gate, up = mx.split(both, 2, axis=-1)
    got = K.gated_activation(both, None, kind)
    assert got.shape == gate.shape
    assert mx.array_equal(got, K.gated_activation(gate, up, kind)).item()
    assert mx.array_equal(kernels.gated(both, None, kind), got).item()
    with pytest.raises(ValueError, match="even"):
        K.gated_activation(both[..., 1:], None, kind)


@needs_kernels
@pytest.mark.parametrize("H,H_kv,L,T,mask", [(9, 3, 1, 40, None), (9, 3, 17, 17, "causal"), (4, 1, 6, 30, "causal"),
                                             (4, 1, 12, 20, "window"), (2, 2, 5, 5, None),
                                             (4, 1, 300, 300, "causal"), (9, 3, 257, 400, "causal")])
def test_attention_dispatch_matches_mlx_sdpa(H, H_kv, L, T, mask):
    D = 64
    q = mx.random.normal((1, H, L, D), key=mx.random.key(3))
    k = mx.random.normal((1, H_kv, T, D), key=mx.random.key(4))
    v = mx.random.normal((1, H_kv, T, D), key=mx.random.key(5))
    if mask == "window":  # a sliding window of 6 over the last L of T positions
        qpos, kpos = mx.arange(T - L, T)[:, None], mx.arange(T)[None, :]
        mask = (kpos <= qpos) & (qpos - kpos < 6)
    got = kernels.attention(q, k, v, D ** -0.5, mask)
    want = mx.fast.scaled_dot_product_attention(q, k, v, scale=D ** -0.5, mask=mask)
    assert got.shape == want.shape
    assert mx.allclose(got, want, atol=2e-5).item()


@needs_kernels
@pytest.mark.parametrize("L", [1, 7])
def test_attention_with_each_sequences_mask_matches_mlx_sdpa(L):
    """A batch whose rows are left-padded to the longest (BatchKVCache.make_mask: (B, 1, L, T),
    one mask per sequence): the kernels' softmax takes it, as MLX's attention does, a
    padding query that sees nothing included."""
    B, H, H_kv, T, D = 3, 6, 2, 20, 32
    q = mx.random.normal((B, H, L, D), key=mx.random.key(13))
    k = mx.random.normal((B, H_kv, T, D), key=mx.random.key(14))
    v = mx.random.normal((B, H_kv, T, D), key=mx.random.key(15))
    pad = mx.array([0, 5, 17])[:, None, None]
    qpos, kpos = mx.arange(T - L, T)[:, None], mx.arange(T)[None, :]
    mask = ((kpos <= qpos)[None] & (kpos[None] >= pad))[:, None]  # (B, 1, L, T)
    got = kernels.attention(q, k, v, D ** -0.5, mask)
    want = mx.fast.scaled_dot_product_attention(q, k, v, scale=D ** -0.5, mask=mask)
    sees = mask.any(axis=-1, keepdims=True)  # (B, 1, L, 1): a padding query may see nothing,
    assert mx.allclose(mx.where(sees, got, 0.0), mx.where(sees, want, 0.0), atol=2e-5).item()
    assert (mx.where(sees, 0.0, got) == 0).all().item()  # ... and then gets zeros here (MLX: some mean)
    with pytest.raises(ValueError, match="batch"):
        K.masked_softmax(mx.zeros((2, 4, 3)), 1.0, 2, False, mx.ones((3, 2, 3), mx.bool_))


def _decode_operands(B: int, H: int, H_kv: int, L: int, T: int, D: int, seed: int):
    """q as the decoder hands it (a transposed view of (B, L, H, D)) and keys and values as
    a KV cache's slices: its first T of more stored positions."""
    q = mx.random.normal((B, L, H, D), key=mx.random.key(seed)).transpose(0, 2, 1, 3)
    k = mx.random.normal((B, H_kv, T + 11, D), key=mx.random.key(seed + 1))[:, :, :T]
    v = mx.random.normal((B, H_kv, T + 11, D + 8), key=mx.random.key(seed + 2))[:, :, :T]
    return q, k, v


@needs_kernels
@pytest.mark.parametrize("B,H,H_kv,L,T", [(1, 9, 3, 1, 40), (16, 9, 3, 1, 100), (2, 4, 1, 2, 9), (3, 8, 8, 1, 300),
                                         (1, 4, 2, 4, 4), (1, 4, 1, 1, 1), (1, 8, 1, 1, 700)])
@pytest.mark.parametrize("mask", [None, "causal", "shared", "each"])
def test_few_query_attention_is_the_three_ops_bit_for_bit(monkeypatch, B, H, H_kv, L, T, mask):
    """Decode's attention as one op (`K.attention`) computes what the score product,
    masked_softmax and value product compute for a head group of at most 8 query rows, bit
    for bit, with q a transposed view and keys and values a cache's slices read in place."""
    q, k, v = _decode_operands(B, H, H_kv, L, T, 32, seed=30)
    if mask == "causal" and L == 1:
        mask = None
    elif mask == "shared":
        mask = mx.random.uniform(shape=(L, T), key=mx.random.key(33)) > 0.2
    elif mask == "each":  # left padding, one sequence's queries seeing nothing
        mask = (mx.arange(T)[None, None, None, :] >= mx.array([0, 3, T, 1] * 4)[:B, None, None, None])
        mask = mx.broadcast_to(mask, (B, 1, L, T))
    one_op = kernels.attention(q, k, v, 0.2, mask)
    monkeypatch.setattr(kernels, "FEW_QUERIES", 0)
    three_ops = kernels.attention(q, k, v, 0.2, mask)
    assert one_op.shape == three_ops.shape == (B, H, L, v.shape[-1])
    assert mx.array_equal(one_op, three_ops).item()


@needs_kernels
@pytest.mark.parametrize("mask", ["causal", "each"])
@pytest.mark.parametrize("T", [150, 700])
def test_few_query_attention_row_is_the_same_alone_or_in_a_batch(mask, T):
    """A lone sequence's attention is split finer (key blocks, rows, value columns and, past
    256 keys, blocks of the value product's sums) than a batch's (whole head groups): each
    output is still summed in one order, so a sequence's attention does not depend on its
    company. Keys and values here sit in a (B, T, H_kv, D) cache, rows H_kv * D apart."""
    B, H, H_kv, L, D = 6, 8, 2, 2, 64
    q = mx.random.normal((B, L, H, D), key=mx.random.key(40)).transpose(0, 2, 1, 3)
    k, v = (mx.random.normal((B, T + 9, H_kv, D), key=mx.random.key(n))[:, :T].transpose(0, 2, 1, 3) for n in (41, 42))
    keep = None
    if mask == "each":
        keep = mx.arange(T)[None, None, :] >= mx.array([0, 3, 40, 1, T - 1, 7])[:, None, None]
        keep = mx.broadcast_to(keep, (B, L, T))
    batch = K.attention(q, k, v, 0.125, mask == "causal", keep)
    for b in range(B):
        alone = K.attention(q[b:b + 1], k[b:b + 1], v[b:b + 1], 0.125, mask == "causal",
                            None if keep is None else keep[b:b + 1])
        assert mx.array_equal(alone[0], batch[b]).item()
    sdpa_mask = "causal" if keep is None else keep[:, None]
    want = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.125, mask=sdpa_mask).transpose(0, 2, 1, 3)
    assert mx.allclose(batch, want, atol=2e-5).item()


@needs_kernels
def test_few_query_attention_bad_shapes_are_one_line_errors():
    q, k, v = _decode_operands(2, 6, 3, 2, 5, 16, seed=50)
    for args, match in [((q[0], k, v, 1.0, False), "4-D"), ((q, k[:1], v, 1.0, False), "H_kv"),
                        ((q[:, :5], k, v, 1.0, False), "multiple"), ((q, k[:, :, :1], v[:, :, :1], 1.0, True), "causal"),
                        ((q, k, v, 1.0, False, mx.ones((3, 5), mx.bool_)), "mask"),
                        ((q[:, :0], k, v, 1.0, False), "multiple"), ((mx.concatenate([q] * 4, 2), k, v, 1.0, False), "at most")]:
        with pytest.raises(ValueError, match=match):
            K.attention(*args)


def _cached_operands(B: int, H: int, H_kv: int, L: int, S: int, D: int, Dv: int, seed: int):
    """One projection's [q | k | v] (B, L, H * D + H_kv * (D + Dv)), its split (views, rows as
    far apart) and a cache's float storage (B, H_kv, S, D) / (B, H_kv, S, Dv) of earlier keys."""
    qkv = mx.random.normal((B, L, H * D + H_kv * (D + Dv)), key=mx.random.key(seed))
    q, k, v = mx.split(qkv, [H * D, (H + H_kv) * D], axis=-1)
    keys = mx.random.normal((B, H_kv, S, D), key=mx.random.key(seed + 1))
    values = mx.random.normal((B, H_kv, S, Dv), key=mx.random.key(seed + 2))
    mx.eval(qkv, q, k, v, keys, values)
    return qkv, q, k, v, keys, values


@needs_kernels
@pytest.mark.parametrize("B,H,H_kv,L,slot", [(1, 9, 3, 1, 40), (3, 4, 2, 2, 0), (2, 8, 8, 1, 299), (1, 4, 1, 1, 0)])
@pytest.mark.parametrize("mask", [None, "causal", "each"])
@pytest.mark.parametrize("rotary,normed", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("stored", [mx.float32, mx.float16])
@pytest.mark.parametrize("fused", [True, False], ids=["qkv", "q,k,v"])
def test_attention_step_is_the_separate_ops_bit_for_bit(B, H, H_kv, L, slot, mask, rotary, normed, stored, fused):
    """The cache writes and the attention reading the storage (norms and rotation inside), from
    one [q | k | v] projection or three, against the ops a decode step runs without the kernel:
    rms_norm, rope, the slice updates of the storage and attention, bit for bit, each row
    rotated at its own position where the tables have a row per sequence. A float16 storage:
    each new entry rounded as astype(float16) rounds it, every entry widened exactly."""
    D, Dv, S = 32, 40, 300
    qkv, q, k, v, keys, values = _cached_operands(B, H, H_kv, L, S, D, Dv, seed=60 + L + slot)
    keys, values = keys.astype(stored), values.astype(stored)
    T = slot + L
    keep = None
    if mask == "causal" and L == 1:
        mask = None
    elif mask == "each":  # left padding, one sequence seeing one key only
        keep = mx.broadcast_to(mx.arange(T)[None, None, :] >= mx.array([0, T - 1, 2])[:B, None, None], (B, L, T))
    rope = norms = None
    if rotary:
        cos, sin = kernels.rope_tables(L, mx.array([slot, 7, 130])[:B] if B > 1 else slot, 24, 10000.0, 1.0,
                                       None, 1.0)
        rope = (cos, sin, False)
    if normed:
        norms = (mx.random.normal((D,), key=mx.random.key(70)), mx.random.normal((D,), key=mx.random.key(71)), 1e-6)
    old_keys, old_values = mx.array(keys), mx.array(values)
    cos, sin, traditional = rope or (None, None, False)
    q_norm, k_norm, eps = norms or (None, None, 1e-6)
    out, new_keys, new_values = K.attention_step([qkv] if fused else [q, k, v], H, keys, values, slot, 0.3,
                                                 mask == "causal", keep, cos, sin, traditional, q_norm, k_norm, eps)

    q4, k4 = q.reshape(B, L, H, D), k.reshape(B, L, H_kv, D)
    if normed:
        q4, k4 = K.rms_norm(q4, norms[0], 1e-6), K.rms_norm(k4, norms[1], 1e-6)
    if rotary:
        q4, k4 = K.rope(q4, rope[0], rope[1], False), K.rope(k4, rope[0], rope[1], False)
    want_keys, want_values = mx.array(old_keys), mx.array(old_values)
    want_keys[:, :, slot:T] = k4.transpose(0, 2, 1, 3)
    want_values[:, :, slot:T] = v.reshape(B, L, H_kv, Dv).transpose(0, 2, 1, 3)
    want = K.attention(q4.transpose(0, 2, 1, 3), want_keys[:, :, :T].astype(mx.float32),
                       want_values[:, :, :T].astype(mx.float32), 0.3, mask == "causal", keep)
    assert out.shape == (B, L, H * Dv)
    assert mx.array_equal(out, want.reshape(B, L, H * Dv)).item()
    assert new_keys.dtype == stored and new_values.dtype == stored
    assert mx.array_equal(new_keys, want_keys).item() and mx.array_equal(new_values, want_values).item()
    # the storage was held here too (keys, values): the writes went to copies, not what others read
    assert mx.array_equal(keys, old_keys).item() and mx.array_equal(values, old_values).item()


@needs_kernels
@pytest.mark.parametrize("stored", [mx.float32, mx.float16])
def test_attention_step_writes_storage_nothing_else_holds_in_place(stored):
    """The cache replaces its storage by the step's outputs: with no other reference left,
    the new slots go into the old buffers (as MLX's slice_update does), so a decode step does
    not copy the whole cache. Measured by the memory the evaluation allocates."""
    B, H, H_kv, S, D = 1, 4, 2, 8192, 64
    qkv, _, k, v, _, _ = _cached_operands(B, H, H_kv, 1, 1, D, D, seed=80)
    keys, values = mx.zeros((B, H_kv, S, D), stored), mx.zeros((B, H_kv, S, D), stored)
    mx.eval(keys, values)
    for slot in range(3):
        before = mx.get_active_memory()
        mx.reset_peak_memory()
        out, keys, values = K.attention_step([qkv], H, keys, values, slot, 1.0, False)
        mx.eval(out, keys, values)
        assert mx.get_peak_memory() - before < keys.nbytes / 4, "the storage was copied"
    for storage, new in ((keys, k), (values, v)):
        rows = storage[0, :, :4]
        assert mx.array_equal(rows[:, :3], mx.broadcast_to(new.reshape(H_kv, 1, D).astype(stored), (H_kv, 3, D))).item()
        assert (rows[:, 3] == 0).all().item()


@needs_kernels
def test_attention_step_bad_arguments_are_one_line_errors():
    qkv, q, k, v, keys, values = _cached_operands(1, 4, 2, 2, 10, 16, 16, seed=90)
    for args, kw, match in [
        (([q, k], 4, keys, values, 0), {}, "one projection"), (([qkv], 4, keys[0], values, 0), {}, "one projection"),
        (([qkv], 4, keys.astype(mx.bfloat16), values, 0), {}, "float16"),
        (([qkv], 4, keys, values.astype(mx.float16), 0), {}, "both"),
        (([qkv[0]], 4, keys, values, 0), {}, "must be"), (([qkv], 3, keys, values, 0), {}, "must be"),
        (([q, k, v[..., :8]], 4, keys, values, 0), {}, "must be"),
        (([q, k, v], 4, keys[..., :8], values, 0), {}, "must be"),
        (([mx.concatenate([q] * 4, -1), k, v], 16, keys, values, 0), {}, "at most"),
        (([qkv], 4, keys, values, 9), {}, "slots"), (([qkv], 4, keys, values, -1), {}, "slots"),
        (([qkv], 4, keys, values, 0), {"mask": mx.ones((2, 3), mx.bool_)}, "mask"),
        (([qkv], 4, keys, values, 0), {"cos": mx.zeros((2, 8))}, "together"),
        (([qkv], 4, keys, values, 0), {"cos": mx.zeros((2, 9)), "sin": mx.zeros((2, 9))}, "dims"),
        (([qkv], 4, keys, values, 0), {"q_norm": mx.ones((16,))}, "together"),
        (([qkv], 4, keys, values, 0), {"q_norm": mx.ones((8,)), "k_norm": mx.ones((8,))}, "norms")]:
        with pytest.raises(ValueError, match=match):
            K.attention_step(*args, 1.0, False, **kw)


@needs_kernels
@pytest.mark.parametrize("traditional", [True, False])
def test_rope_with_each_rows_offset_matches_mlx_rope(traditional):
    """A batch whose rows are at different positions (offset (B,)): one table row per row
    and position, as mx.fast.rope takes an offset per row."""
    x = mx.random.normal((3, 4, 2, 64), key=mx.random.key(21))  # (B, L, H, D)
    offset = mx.array([0, 9, 130])
    got = kernels.rope(x, 64, traditional=traditional, base=10000.0, scale=1.0, offset=offset)
    want = mx.fast.rope(x.swapaxes(1, 2), 64, traditional=traditional, base=10000.0, scale=1.0,
                        offset=offset).swapaxes(1, 2)
    assert mx.allclose(got, want, atol=1e-4).item()


@needs_kernels
@pytest.mark.parametrize("traditional", [True, False])
@pytest.mark.parametrize("D,dims,offset,scale,with_freqs", [(64, 64, 0, 1.0, False), (256, 256, 700, 0.125, False),
                                                            (128, 96, 3, 1.0, False), (64, 64, 5000, 1.0, True)])
def test_rope_dispatch_matches_mlx_rope(traditional, D, dims, offset, scale, with_freqs):
    x = mx.random.normal((2, 9, 3, D), key=mx.random.key(D + offset))  # (B, L, H, D)
    freqs = 10000.0 ** (mx.arange(0, dims, 2) / dims) * mx.linspace(1, 8, dims // 2) if with_freqs else None
    base = None if with_freqs else 10000.0
    got = kernels.rope(x, dims, traditional=traditional, base=base, scale=scale, offset=offset, freqs=freqs)
    want = mx.fast.rope(x.swapaxes(1, 2), dims, traditional=traditional, base=base, scale=scale, offset=offset,
                        freqs=freqs).swapaxes(1, 2)
    assert got.shape == x.shape
    # Angles are float32 either way; at position ~5000 one ulp of the angle is ~5e-4 rad.
    assert mx.allclose(got, want, atol=2e-3 if offset > 1000 else 1e-4).item()


@needs_kernels
@pytest.mark.parametrize("shape", [(1, 1, 576), (2, 511, 640), (3, 4, 256), (5, 13)])
def test_rms_norm_dispatch_matches_mlx(shape):
    x = 3 * mx.random.normal(shape, key=mx.random.key(7))
    w = mx.random.normal(shape[-1:], key=mx.random.key(8))
    got, want = kernels.rms_norm(x, w, 1e-6), mx.fast.rms_norm(x, w, 1e-6)
    assert mx.allclose(got, want, rtol=1e-5, atol=1e-6).item()


def _views(a: mx.array) -> dict[str, mx.array]:
    """a as the strided views a graph hands the kernels: transposed twice (same values,
    column-major strides), a slice with a step, and broadcast from one row."""
    swapped = mx.contiguous(a.swapaxes(0, -1)).swapaxes(0, -1) if a.ndim > 1 else a
    doubled = mx.repeat(a, 2, axis=-1)[..., ::2]
    return {"transposed": swapped, "strided": doubled, "broadcast": mx.broadcast_to(a[:1], a.shape)}


@needs_kernels
@pytest.mark.parametrize("view", ["transposed", "strided", "broadcast"])
def test_strided_inputs_are_read_in_place_of_copies(view):
    """Inputs that are not row-contiguous are gathered inside the kernels' eval (no
    mx.contiguous node in the graph): every kernel, every input, against the same call on
    row-contiguous copies."""
    def same(f, *args):
        views = [_views(a)[view] for a in args]
        dense = [mx.contiguous(a) for a in views]  # row-contiguous copies of the same values
        for i in range(len(args)):
            mixed = [views[j] if j == i else dense[j] for j in range(len(args))]
            assert mx.array_equal(f(*mixed), f(*dense)).item(), (view, i)

    wq, scales, biases, _ = _quantized(64, 96, 4, seed=3)
    x = mx.random.normal((4, 96), key=mx.random.key(11))
    same(lambda x: K.affine_matvec(x, wq, scales, biases, 4), x)
    same(lambda s, b: K.affine_dequantize(wq, s, b, 4), scales, biases)
    same(lambda s, b: K.affine_matvec(x, wq, s, b, 4), scales, biases)
    s = mx.random.normal((6, 40), key=mx.random.key(12))
    keep = mx.random.uniform(shape=(6, 40), key=mx.random.key(13)) > 0.3
    same(lambda s: K.masked_softmax(s, 0.5, 3, True), s)
    same(lambda s, k: K.masked_softmax(s, 0.5, 6, False, k), s, keep)
    g, u = mx.random.normal((5, 64), key=mx.random.key(14)), mx.random.normal((5, 64), key=mx.random.key(15))
    same(lambda g, u: K.gated_activation(g, u, "silu"), g, u)
    w = mx.random.normal((64,), key=mx.random.key(16))
    same(lambda x: K.rms_norm(x, w, 1e-6), g)
    xr = mx.random.normal((2, 5, 3, 16), key=mx.random.key(17))
    cos, sin = mx.cos(mx.random.normal((5, 8))), mx.sin(mx.random.normal((5, 8)))
    same(lambda x, c, s: K.rope(x, c, s, False), xr, cos, sin)
    qa = mx.random.normal((2, 4, 3, 16), key=mx.random.key(18))
    ka, va = (mx.random.normal((2, 2, 6, 16), key=mx.random.key(n))[:, :, :4] for n in (19, 20))  # a cache's slice
    keep = mx.random.uniform(shape=(2, 3, 4), key=mx.random.key(22)) > 0.3
    same(lambda q, k, v, m: K.attention(q, k, v, 0.5, False, m), qa, ka, va, keep)


@needs_kernels
@pytest.mark.parametrize("N,k,D", [(1, 8, 2048), (5, 2, 13), (3, 1, 40)])
def test_expert_sum_is_the_multiply_and_adds_bit_for_bit(N, k, D):
    """The experts' weighted sum as one op: each product rounded, then added in order of the
    choice, exactly as MLX's multiply and chain of adds give it (no fused multiply-add), a
    tail shorter than 8 included; without weights, the plain sum in order."""
    y = mx.random.normal((N, k, D), key=mx.random.key(100)) * 3
    weights = mx.softmax(mx.random.normal((N, k), key=mx.random.key(101)), axis=-1)
    products = y * weights[..., None]
    want, plain = products[:, 0], y[:, 0]
    for j in range(1, k):
        want, plain = want + products[:, j], plain + y[:, j]
    assert mx.array_equal(K.expert_sum(y, weights), want).item()
    assert mx.array_equal(kernels.expert_sum(y), plain).item()
    with pytest.raises(ValueError, match=r"\(N, k\)"):
        K.expert_sum(y, weights[:, :1] if k > 1 else weights[:1])


@needs_kernels
@pytest.mark.parametrize("gating,normalize,scale,biased", [("softmax", False, 1.0, False), ("softmax", True, 2.5, False),
                                                           ("sigmoid", True, 1.0, True), ("softmax_weight", False, 1.0, False)])
def test_moe_route_is_the_routing_ops(gating, normalize, scale, biased, monkeypatch):
    """The routing as one op against nn.moe.route's MLX ops: the same experts in the same
    order, weights within float rounding (the sums are ordered differently); NaN logits are
    never chosen first; bad arguments are one-line errors."""
    from mlxllm.nn.moe import MoEArgs, route

    logits = mx.random.normal((7, 64), key=mx.random.key(110)) * 2
    bias = mx.random.normal((64,), key=mx.random.key(111)) * 0.1 if biased else None
    args = MoEArgs(64, 6, gating=gating, normalize=normalize, scale=scale)
    chosen, weights = route(logits, args, bias)
    monkeypatch.setattr(kernels, "moe_route", lambda *a: None)  # nn.moe.route's own ops
    want_chosen, want_weights = route(logits, args, bias)
    assert chosen.dtype == mx.uint32 and mx.array_equal(chosen, want_chosen).item()
    assert mx.allclose(weights, want_weights, rtol=1e-5, atol=1e-7).item()
    nan_row = mx.where(mx.arange(64) == 3, mx.nan, logits[0])[None]
    assert 3 not in K.moe_route(nan_row, 6, "sigmoid", False, 1.0)[0].tolist()[0][:5]
    for bad, match in [(("tanh",), "gating"), ((), "k")]:
        with pytest.raises(ValueError, match=match):
            K.moe_route(logits, 65 if not bad else 6, *(bad or ("softmax",)), False, 1.0)


@pytest.mark.parametrize("compiler", [["g++", "-march=x86-64"], ["aarch64-linux-gnu-g++"]],
                         ids=["x86-64-baseline", "arm64"])
def test_sources_compile_for_the_paths_no_machine_here_runs(compiler):
    """The portable paths (x86 builds without AVX2 / F16C) and arm64's (NEON vectors, the
    4-lane weight GEMM) stay valid C++: every kernel source passes a syntax check for baseline
    x86-64 and for arm64 (scripts/test.sh installs Debian's cross compiler). Nothing else
    here builds them, and a name declared only under __AVX2__ once broke them unseen."""
    import mlx

    if platform.machine() not in ("x86_64", "AMD64") and compiler[0] == "g++":
        pytest.skip("the host's g++ targets this machine's own architecture")
    if not shutil.which(compiler[0]):
        pytest.skip(f"{compiler[0]} is not installed (scripts/test.sh installs it where apt-get can)")
    include = Path(next(iter(mlx.__path__))) / "include"
    sources = Path(cpu.__file__).parent
    kernels_cpp = [s for s in sorted(sources.glob("*.cpp")) if s.name != "bindings.cpp"]  # bindings: nanobind glue
    assert len(kernels_cpp) >= 7, "the kernel sources are not beside the package"
    for source in kernels_cpp:
        result = subprocess.run([*compiler, "-std=c++20", "-fsyntax-only", "-Wno-psabi",
                                 f"-I{include}", f"-I{sources}", str(source)], capture_output=True, text=True)
        assert result.returncode == 0, f"{source.name}: {result.stderr[-2000:]}"

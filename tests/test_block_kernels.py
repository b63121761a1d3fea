"""mlxllm's CPU kernels on GGUF blocks as stored (mlxllm/kernels/cpu/gguf.cpp) and their
private GEMM (blas.cpp).

- gguf_dequantize equals gguf.quants.dequantize bit for bit on random blocks (every bit
  random but finite scales, edge scales included), for every type the kernels take (F16
  and BF16 too: any finite value, subnormals and signed zeros included).
- gguf_matmul equals a float64 product within float32 tolerance, in the three arithmetics:
  float activations, int16 (activations rounded to 16 bits per block of 32) and int8
  (8 bits per block, as llama.cpp defines q8_0 / q8_K), the reference being the product
  with the activations so rounded, computed here in numpy; decode rows (blocks read in
  place) and prefill rows (dequantized tiles + GEMM), on every ISA path this machine runs
  (AVX2 and the portable one); a row gives the same product alone or among many, and in
  float and int16 mode bit for bit the same alone or in any decode batch.
- Bad shapes, types and tables are exceptions, never reads out of bounds.
"""

from __future__ import annotations

import platform
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q
from gguf import quants as gq
from quant_blocks import assert_bit_identical, random_blocks

from mlxllm.kernels import cpu, source

pytestmark = pytest.mark.skipif(cpu.KERNELS is None, reason=f"CPU kernels unavailable: {cpu.UNAVAILABLE}")

K = cpu.KERNELS
TYPES = [t for t in Q if K is not None and K.gguf_has_kernel(int(t))]
INTEGER = [t for t in TYPES if K.gguf_integer_dots(int(t))]


def test_every_type_with_a_block_decoder_has_a_kernel():
    expected = {Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.MXFP4,
                *source.kernel_types()}
    assert set(TYPES) == expected
    assert set(INTEGER) == {Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.IQ4_NL, Q.IQ4_XS, Q.MXFP4}
    # float activations have dedicated kernels for every type where the build has AVX2
    if platform.machine() in ("x86_64", "AMD64"):
        assert {t for t in TYPES if K.gguf_float_kernel(int(t))} == set(TYPES)


def _weight(qtype: Q, rows: int, blocks_per_row: int, seed: int, edge: bool = False) -> tuple[np.ndarray, int]:
    """(rows, bytes per row) of random blocks, and the weights per row. F16 and BF16 are
    stored element by element; the kernels read them in blocks of 32."""
    per_block = GGML_QUANT_SIZES[qtype][0]
    block = 32 if per_block == 1 else per_block
    raw = random_blocks(qtype, rows * blocks_per_row * block // per_block, seed=seed, edge=edge)
    return raw.reshape(rows, -1), block * blocks_per_row


def _table(qtype: Q) -> mx.array:
    return mx.array(source.table(qtype))


@pytest.mark.parametrize("edge", [False, True], ids=["scales", "edge_scales"])
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_dequantize_bit_exact(qtype, edge):
    raw, cols = _weight(qtype, 37, 3, seed=1, edge=edge)
    ours = np.array(K.gguf_dequantize(mx.array(raw), int(qtype), cols, _table(qtype)))
    ref = gq.dequantize(raw, qtype).astype(np.float32)
    assert_bit_identical(ours, ref)


def _q8_rows(x: np.ndarray, block: int) -> np.ndarray:
    """x as llama.cpp's CPU matmuls see it: rounded per block of `block` to 8 bits with one
    scale (fp16 for q8_0's blocks of 32, float32 for q8_K's 256), back as float64."""
    xb = x.reshape(x.shape[0], -1, block).astype(np.float32)
    amax = np.abs(xb).max(axis=-1, keepdims=True)
    scale = amax / np.float32(127)
    if block == 32:
        scale = scale.astype(np.float16).astype(np.float32)
    inv = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    q = np.clip(np.rint(xb * inv), -127, 127)
    return (q.astype(np.float64) * scale.astype(np.float64)).reshape(x.shape)


@pytest.fixture(params=["simd", "portable"])
def isa(request):
    K.gguf_use_simd(request.param == "simd")
    yield request.param
    K.gguf_use_simd(True)


def _q16_rows(x: np.ndarray) -> np.ndarray:
    """x as int16 mode multiplies it: rounded per block of 32 to 16-bit integers with one
    float32 scale (amax / 32767), back as float64."""
    xb = x.reshape(x.shape[0], -1, 32).astype(np.float32)
    amax = np.abs(xb).max(axis=-1, keepdims=True)
    inv = np.where(amax > 0, np.float32(32767) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    q = np.clip(np.rint(xb * inv), -32767, 32767)
    return (q.astype(np.float64) * (amax / np.float32(32767)).astype(np.float64)).reshape(x.shape)


@pytest.fixture(params=["float", "int16", "int8"])
def activations(request):
    return request.param


def _int16_applies(qtype: Q) -> bool:
    """Whether int16 mode rounds activations for this type now: every type the AVX2 float
    kernels unpack into integer codes (not F16 / BF16); elsewhere it multiplies floats."""
    return K.gguf_int16_dots(int(qtype))


def _activations(x: np.ndarray, qtype: Q, activations: str) -> np.ndarray:
    """x as the kernels multiply it: float, rounded to 16-bit blocks in int16 mode, or to
    q8_0 / q8_K blocks in int8 mode for the types with integer dots."""
    rows = x.reshape(-1, x.shape[-1])
    if activations == "int8" and qtype in INTEGER:
        return _q8_rows(rows, 32 if GGML_QUANT_SIZES[qtype][0] == 32 else 256).reshape(x.shape)
    if activations == "int16" and _int16_applies(qtype):
        return _q16_rows(rows).reshape(x.shape)
    return x.astype(np.float64)


@pytest.mark.parametrize("rows", [1, 2, 3, 5, 16], ids=lambda r: f"{r}rows")  # passes of 4 rows: full, partial
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_matvec_against_float64(qtype, rows, isa, activations):
    if isa == "portable" and qtype not in INTEGER and not K.gguf_float_kernel(int(qtype)):
        pytest.skip("one path: the block decoders")
    if activations == "int8" and qtype not in INTEGER or activations == "int16" and not _int16_applies(qtype):
        pytest.skip("float activations in this mode")
    raw, cols = _weight(qtype, 75, 2 if GGML_QUANT_SIZES[qtype][0] == 256 else 9, seed=rows)
    x = np.random.default_rng(rows).standard_normal((rows, cols)).astype(np.float32)
    w64 = gq.dequantize(raw, qtype).astype(np.float64)
    xq = _activations(x, qtype, activations)
    ref = xq @ w64.T
    ours = np.array(K.gguf_matmul(mx.array(x), mx.array(raw), int(qtype), _table(qtype), activations))
    assert ours.shape == (rows, 75)
    tol = 2e-5 * (np.abs(xq) @ np.abs(w64).T) + 1e-6
    assert (np.abs(ours - ref) <= tol).all(), np.abs(ours - ref).max()


@pytest.mark.parametrize("qtype", [t for t in TYPES if K is not None and K.gguf_float_kernel(int(t))] or [Q.Q4_0],
                         ids=lambda t: t.name)
@pytest.mark.parametrize("activations", ["float", "int16"])
def test_gather_matvec_reads_the_chosen_experts(qtype, isa, activations):
    """Experts as GGUF blocks (E, out, bytes): each row's chosen experts against a float64
    reference; repeated and unordered choices; an index past the experts is NaN, never a read."""
    E, out = 5, 24
    raw, cols = _weight(qtype, E * out, 2 if GGML_QUANT_SIZES[qtype][0] == 256 else 9, seed=11)
    w64 = gq.dequantize(raw, qtype).astype(np.float64).reshape(E, out, cols)
    x = np.random.default_rng(11).standard_normal((3, cols)).astype(np.float32)
    indices = np.array([[4, 0], [2, 2], [1, E]], np.int32)
    ours = np.array(K.gguf_gather_matmul(mx.array(x), mx.array(raw.reshape(E, out, -1)), int(qtype), _table(qtype),
                                         mx.array(indices), activations))
    x64 = _activations(x, qtype, activations)
    assert ours.shape == (3, 2, out)
    for n in range(3):
        for j in range(2):
            e = indices[n, j]
            if e == E:
                assert np.isnan(ours[n, j]).all()
                continue
            ref = w64[e] @ x64[n]
            tol = 2e-5 * (np.abs(w64[e]) @ np.abs(x64[n])) + 1e-6
            assert (np.abs(ours[n, j] - ref) <= tol).all(), (n, j, np.abs(ours[n, j] - ref).max())


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q6_K, Q.Q4_0, Q.IQ2_XS], ids=lambda t: t.name)
@pytest.mark.parametrize("activations", ["float", "int16"])
def test_gather_matmul_groups_a_prompts_rows_by_expert(qtype, activations):
    """More than 16 rows: the op groups the (row, choice) slots by expert and multiplies each
    expert's rows as gguf_matmul multiplies those rows gathered (the matvec for an expert
    with up to 16 rows, tiles and a GEMM past that), bit for bit; an expert chosen by no row
    is skipped, an index past the experts is NaN. 150 output rows: tiles of 64 and a tail."""
    E, out, N, k = 6, 150, 40, 3
    raw, cols = _weight(qtype, E * out, 2 if GGML_QUANT_SIZES[qtype][0] == 256 else 9, seed=12)
    experts = mx.array(raw.reshape(E, out, -1))
    x = mx.array(np.random.default_rng(12).standard_normal((N, cols)).astype(np.float32))
    rng = np.random.default_rng(13)
    # experts 0, 2 and 5: 40, 30 and 28 rows (GEMMs); 1 and 3: 10 and 12 (matvecs); 4: none; 6: invalid
    indices = np.stack([np.zeros(N, np.int32), rng.permutation([1] * 10 + [2] * 30),
                        rng.permutation([3] * 12 + [5] * 28)], axis=1).astype(np.int32)
    indices[7, 2] = E
    ours = K.gguf_gather_matmul(x, experts, int(qtype), _table(qtype), mx.array(indices), activations)
    assert ours.shape == (N, k, out)
    ours = np.array(ours)
    counts = {e: int((indices == e).sum()) for e in range(E)}
    assert counts[0] > 16 and 0 < counts[1] <= 16 and counts[4] == 0 and counts[5] > 16
    for e in range(E):
        slots = np.argwhere(indices == e)  # (row, choice) pairs in slot order
        if not len(slots):
            continue
        want = np.array(K.gguf_matmul(x[mx.array(slots[:, 0])], experts[e], int(qtype), _table(qtype), activations))
        assert np.array_equal(ours[slots[:, 0], slots[:, 1]], want), e
    assert np.isnan(ours[7, 2]).all() and not np.isnan(np.delete(ours.reshape(N * k, out), 7 * k + 2, 0)).any()


@pytest.fixture(params=K.gemm_isas() if K is not None else [])
def gemm_isa(request):
    """Each vector ISA prefill's weight GEMM has that this CPU runs (the others compile in
    test_cpu_kernels' check of the paths no machine here runs)."""
    default = K.gemm_isa()
    K.set_gemm_isa(request.param)
    yield request.param
    K.set_gemm_isa(default)


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q6_K, Q.IQ4_XS, Q.Q3_K], ids=lambda t: t.name)
def test_prefill_tiles_against_float64(qtype, activations, gemm_isa):
    """More than 16 rows: dequantized tiles and a GEMM, exact weights; in int16 and int8 mode
    the activations rounded to the same blocks as decode's integer path.
    3000 weight rows span several tiles."""
    raw, cols = _weight(qtype, 3000, 1 if GGML_QUANT_SIZES[qtype][0] == 256 else 8, seed=5)
    x = np.random.default_rng(5).standard_normal((2, 40, cols)).astype(np.float32)
    ref = _activations(x, qtype, activations) @ gq.dequantize(raw, qtype).astype(np.float64).T
    ours = np.array(K.gguf_matmul(mx.array(x), mx.array(raw), int(qtype), _table(qtype), activations))
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q8_0], ids=lambda t: t.name)
@pytest.mark.parametrize("activations", ["float", "int16"])
def test_prefill_gemm_sums_each_row_in_one_order(qtype, activations):
    """Past 16 rows (packed activations, dequantized tiles): a row's product is bit for bit
    the same in a prompt of any length (17-75 rows: full panels, one-vector and two-vector
    last panels of either width) and on every vector ISA this CPU runs (AVX-512 and AVX2
    here), since each output is one multiply-add chain over k. 150 weight rows: 64-row
    tiles, passes of 12 and 6 rows, and their tails."""
    raw, cols = _weight(qtype, 150, 2 if GGML_QUANT_SIZES[qtype][0] == 256 else 16, seed=14)
    x = np.random.default_rng(14).standard_normal((75, cols)).astype(np.float32)
    default = K.gemm_isa()

    def product(rows, isa):
        K.set_gemm_isa(isa)
        try:
            return np.array(K.gguf_matmul(mx.array(rows), mx.array(raw), int(qtype), _table(qtype), activations))
        finally:
            K.set_gemm_isa(default)

    whole = product(x, default)
    for isa in K.gemm_isas():
        assert np.array_equal(product(x, isa), whole), isa
        for length in (17, 24, 33, 40, 48, 70):
            assert np.array_equal(product(x[5:5 + length], isa), whole[5:5 + length]), (isa, length)


def test_gemm_isas_are_the_cpus():
    """The weight GEMM's default is the widest vector ISA the CPU has, whatever the build
    targets: AVX-512 exactly where the CPU lists avx512f, beside the build's own (AVX2: the
    x86 build targets x86-64-v3)."""
    isas = K.gemm_isas()
    assert K.gemm_isa() == isas[0] and len(set(isas)) == len(isas)
    cpuinfo = Path("/proc/cpuinfo")
    if platform.machine() in ("x86_64", "AMD64") and cpuinfo.exists():
        flags = set(next(line for line in cpuinfo.read_text().splitlines() if line.startswith("flags")).split())
        assert ("avx512" in isas) == ("avx512f" in flags)
        assert isas[-1] == "avx2"


def test_gemm_isa_refuses_what_the_cpu_lacks():
    with pytest.raises(ValueError, match="does not run 'sse9'"):
        K.set_gemm_isa("sse9")
    assert K.gemm_isa() in K.gemm_isas()


@pytest.mark.parametrize("qtype", INTEGER + [Q.Q3_K, Q.IQ2_XS, Q.TQ1_0], ids=lambda t: t.name)
def test_prefill_rows_equal_decode_rows(qtype, isa, activations):
    """A prompt's logits do not depend on its chunking: the same activation row gives the
    same product (to float rounding) whether it runs alone (blocks read in place) or among
    40 (tiles + GEMM)."""
    raw, cols = _weight(qtype, 96, 2 if GGML_QUANT_SIZES[qtype][0] == 256 else 16, seed=7)
    x = np.random.default_rng(7).standard_normal((40, cols)).astype(np.float32)

    def product(rows):
        return np.array(K.gguf_matmul(mx.array(rows), mx.array(raw), int(qtype), _table(qtype), activations))

    together = product(x)
    alone = np.concatenate([product(x[i:i + 1]) for i in range(len(x))])
    assert np.abs(together - alone).max() <= 2e-6 * np.abs(together).max() * np.sqrt(cols / 32)


@pytest.mark.parametrize("activations", ["float", "int16"])
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_decode_rows_are_batch_invariant(qtype, isa, activations):
    """Float or int16 activations, 1-16 rows (decode, where a server batches requests): a
    row's product is bit for bit the same alone or in a batch of any size, whichever kernel
    the batch size picks (blocks multiplied as they unpack, or decoded rows in register
    tiles; int16's passes of 4 rows), so a request's greedy answer does not depend on who
    else is being served."""
    raw, cols = _weight(qtype, 37, 2 if GGML_QUANT_SIZES[qtype][0] == 256 else 16, seed=9)
    x = np.random.default_rng(9).standard_normal((16, cols)).astype(np.float32)

    def product(rows):
        return np.array(K.gguf_matmul(mx.array(rows), mx.array(raw), int(qtype), _table(qtype), activations))

    alone = np.concatenate([product(x[i:i + 1]) for i in range(len(x))])
    for batch in (2, 3, 4, 5, 7, 16):
        together = np.concatenate([product(x[i:i + batch]) for i in range(0, len(x), batch)])
        np.testing.assert_array_equal(together, alone, err_msg=f"batches of {batch}")


def test_no_rows_give_an_empty_product(activations):
    raw, cols = _weight(Q.Q8_0, 8, 2, seed=1)
    out = K.gguf_matmul(mx.zeros((0, cols)), mx.array(raw), int(Q.Q8_0), _table(Q.Q8_0), activations)
    assert out.shape == (0, 8)
    mx.eval(out)


def test_integer_path_follows_the_8_bit_activations():
    """int8 mode's decode result is the product with 8-bit activations: nearer that than the float
    product (the quantization step is what llama.cpp's CPU results carry too)."""
    raw, cols = _weight(Q.Q8_0, 64, 8, seed=3)
    x = np.random.default_rng(3).standard_normal((1, cols)).astype(np.float32)
    w64 = gq.dequantize(raw, Q.Q8_0).astype(np.float64)
    ours = np.array(K.gguf_matmul(mx.array(x), mx.array(raw), int(Q.Q8_0), _table(Q.Q8_0), "int8"))
    assert np.abs(ours - _q8_rows(x, 32) @ w64.T).max() < 1e-2 * np.abs(ours - x.astype(np.float64) @ w64.T).max()


def test_int16_rounding_is_far_finer_than_int8():
    """int16 mode's products stay ~256x nearer the float product than int8 mode's (each
    activation moves by at most amax / 65534 against amax / 254)."""
    raw, cols = _weight(Q.Q4_K, 64, 8, seed=3)
    x = np.random.default_rng(3).standard_normal((1, cols)).astype(np.float32)
    exact = x.astype(np.float64) @ gq.dequantize(raw, Q.Q4_K).astype(np.float64).T

    def error(activations):
        return np.abs(np.array(K.gguf_matmul(mx.array(x), mx.array(raw), int(Q.Q4_K), _table(Q.Q4_K),
                                             activations)) - exact).max()

    assert error("int16") < error("int8") / 50


def test_unknown_activations_are_refused():
    raw, cols = _weight(Q.Q8_0, 8, 2, seed=1)
    with pytest.raises(ValueError, match="activations must be float, int8 or int16"):
        K.gguf_matmul(mx.zeros((1, cols)), mx.array(raw), int(Q.Q8_0), _table(Q.Q8_0), "int4")


@pytest.mark.parametrize("activations", ["float", "int16", "int8"])
def test_every_type_stays_blocks_where_the_build_has_float_kernels(activations, monkeypatch):
    """With AVX2 every quantized type loads as its GGUF blocks, weights and experts, in every
    arithmetic (the types without integer dots multiply float activations in int8 mode)."""
    from mlxllm.quant import keeps_blocks_on_cpu

    if not all(K.gguf_float_kernel(int(t)) for t in TYPES):
        pytest.skip("a build without the AVX2 float kernels")
    monkeypatch.setenv("MLXLLM_CPU_ACTIVATIONS", activations)
    for t in TYPES:
        assert keeps_blocks_on_cpu(t, (8, 256)) and keeps_blocks_on_cpu(t, (4, 8, 256)), t.name


@pytest.mark.parametrize("mode", ["float", "int16", "int8"])
def test_linear_layer_keeps_its_load_time_mode(mode, monkeypatch):
    """A QuantizedLinear multiplies with the arithmetic MLXLLM_CPU_ACTIVATIONS chose when it
    was built (a later change of the variable does not reach it), and its memoized blocks
    follow a replaced weight."""
    from mlxllm.layers import QuantizedLinear
    from mlxllm.quant import QuantizedTensor

    raw, cols = _weight(Q.Q4_K, 8, 2, seed=5)
    x = mx.array(np.random.default_rng(5).standard_normal((1, cols)).astype(np.float32))
    monkeypatch.setenv("MLXLLM_CPU_ACTIVATIONS", mode)
    layer = QuantizedLinear(QuantizedTensor(Q.Q4_K, (8, cols), mx.array(raw)))
    monkeypatch.setenv("MLXLLM_CPU_ACTIVATIONS", "int8" if mode == "float" else "float")
    expected = K.gguf_matmul(x, mx.array(raw), int(Q.Q4_K), _table(Q.Q4_K), mode)
    assert np.array_equal(np.array(layer(x)), np.array(expected))
    other, _ = _weight(Q.Q4_K, 8, 2, seed=6)
    layer.weight = mx.array(other)
    expected = K.gguf_matmul(x, mx.array(other), int(Q.Q4_K), _table(Q.Q4_K), mode)
    assert np.array_equal(np.array(layer(x)), np.array(expected))


@pytest.mark.parametrize("rows", [3, 7, 12])  # up to 8: direct products (decode attention); more: BLAS
@pytest.mark.parametrize("transpose_b", [False, True])
def test_gemm_on_strided_views(transpose_b, rows):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((2, 3, rows, 37)).astype(np.float32)
    cache = rng.standard_normal((2, 3, 64, 37)).astype(np.float32)  # a KV cache, 33 of 64 slots used
    b = mx.array(cache)[:, :, :33]
    if transpose_b:
        ours = K.matmul(mx.array(a), b, True)
        ref = a.astype(np.float64) @ cache[:, :, :33].astype(np.float64).swapaxes(-1, -2)
    else:
        a = a[..., :33]
        ours = K.matmul(mx.array(a), b, False)
        ref = a.astype(np.float64) @ cache[:, :, :33].astype(np.float64)
    np.testing.assert_allclose(np.array(ours), ref, rtol=1e-5, atol=1e-4)
    # a transposed view (not row-contiguous) is gathered first
    np.testing.assert_allclose(np.array(K.matmul(mx.array(a).swapaxes(-1, -2).swapaxes(-1, -2), b, transpose_b)),
                               ref, rtol=1e-5, atol=1e-4)


def test_experts_kept_as_blocks_dequantize_whole():
    """kernels.dequantize of experts held as GGUF blocks (E, out, bytes): gguf-py's values."""
    from mlxllm import kernels
    from mlxllm.layers import QuantizedSwitchLinear
    from mlxllm.quant import QuantizedTensor

    E, out = 3, 8
    raw, cols = _weight(Q.Q8_0, E * out, 4, seed=2)
    experts = QuantizedSwitchLinear(QuantizedTensor(Q.Q8_0, (E, out, cols), mx.array(raw.reshape(E, out, -1))))
    assert experts.mode == "packed"
    ours = np.array(kernels.dequantize(experts))
    assert_bit_identical(ours.reshape(-1), gq.dequantize(raw, Q.Q8_0).reshape(-1))


def test_bad_arguments_raise():
    raw, cols = _weight(Q.Q4_K, 4, 1, seed=0)
    w, x = mx.array(raw), mx.zeros((1, cols))
    experts, choice = w.reshape(2, 2, -1), mx.zeros((1, 1), mx.int32)
    with pytest.raises(ValueError, match="must be uint8 \\(experts"):
        K.gguf_gather_matmul(x, w, int(Q.Q4_K), _table(Q.Q4_K), choice)
    with pytest.raises(ValueError, match="do not hold"):
        K.gguf_gather_matmul(mx.zeros((1, cols - 32)), experts, int(Q.Q4_K), _table(Q.Q4_K), choice)
    with pytest.raises(ValueError, match="indices"):
        K.gguf_gather_matmul(x, experts, int(Q.Q4_K), _table(Q.Q4_K), mx.zeros((2, 1), mx.int32))
    with pytest.raises(ValueError, match="indices"):
        K.gguf_gather_matmul(x, experts, int(Q.Q4_K), _table(Q.Q4_K), mx.zeros((1, 1), mx.float32))
    with pytest.raises(ValueError, match="32-bit"):  # 2**32 + 1 would wrap onto expert 1
        K.gguf_gather_matmul(x, experts, int(Q.Q4_K), _table(Q.Q4_K), mx.array([[2**32 + 1]], mx.int64))
    with pytest.raises(ValueError, match="must be uint8 \\(experts"):
        K.gguf_gather_matmul(x, experts.astype(mx.float32), int(Q.Q4_K), _table(Q.Q4_K), choice)
    with pytest.raises(ValueError, match="no CPU kernel"):
        K.gguf_matmul(x, w, int(Q.Q8_1), _table(Q.Q4_K))
    with pytest.raises(ValueError, match="do not hold"):
        K.gguf_matmul(mx.zeros((1, cols - 32)), w, int(Q.Q4_K), _table(Q.Q4_K))
    with pytest.raises(ValueError, match="do not hold"):
        K.gguf_matmul(x, w[:, :-1], int(Q.Q4_K), _table(Q.Q4_K))
    with pytest.raises(ValueError, match="uint8"):
        K.gguf_matmul(x, w.astype(mx.int32), int(Q.Q4_K), _table(Q.Q4_K))
    with pytest.raises(ValueError, match="table"):
        K.gguf_dequantize(mx.array(_weight(Q.IQ2_XXS, 1, 1, 0)[0]), int(Q.IQ2_XXS), 256, mx.zeros(16, mx.uint8))
    with pytest.raises(ValueError, match="batch"):
        K.matmul(mx.zeros((2, 3, 4)), mx.zeros((3, 4, 5)))
    with pytest.raises(ValueError, match="columns"):
        K.matmul(mx.zeros((3, 4)), mx.zeros((5, 3)), True)


# Peak resident memory of loading a file, over the file's size: the GGUF blocks are the
# weights, so loading holds little more than the file. Four file types of SmolLM2 written
# by llama.cpp (its 576 columns make k-quant files mostly 32-block types; Gemma 3's Q4_K_M
# is checked in test_real_models.py; F16 once loaded as float32, twice the file), with
# MLXLLM_CPU_BLOCKS=all: the default's choice on an AVX2 build, and on one without it every
# type present still stays blocks (see quant.keeps_blocks_on_cpu).
RSS_TYPES = ["Q4_0", "Q5_1", "IQ4_XS", "F16"]


@pytest.fixture(scope="module")
def smollm2_f32(tmp_path_factory):
    from mlxllm.models import resolve

    path = tmp_path_factory.mktemp("load-rss") / "smollm2-135m-f32.gguf"
    _quant_matrix().write_f32(resolve("smollm2:135m"), path)
    return path


def _quant_matrix():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "quant_matrix", Path(__file__).parent.parent / "scripts" / "quant_matrix.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", RSS_TYPES)
def test_peak_rss_of_loading_is_the_file(name, smollm2_f32):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    qm = _quant_matrix()
    dst = smollm2_f32.with_name(f"smollm2-135m-{name.lower()}.gguf")
    assert qm.quantize(smollm2_f32, dst, qm.FTYPES[name]) is None
    script = Path(__file__).parent.parent / "scripts" / "measure_load.py"
    env = {**os.environ, "MLXLLM_CPU_BLOCKS": "all"}
    r = subprocess.run([sys.executable, str(script), "--one", str(dst)], capture_output=True, text=True, check=True,
                       env=env)
    m = json.loads(r.stdout)
    assert m["loaded"] == "model" and m["widening"] <= 1.0, m
    assert m["ratio"] <= 1.15, m


def test_float_matrices_multiply_on_the_kernels_gemm():
    """A float matrix in the file (the MoE fixture's F32 routers) loads as FloatLinear, whose
    product is the kernels' GEMM, bit for bit, not MLX's matmul, whose BLAS follows the order
    of imports (netlib's reference one when mlx.core came first: 50x slower)."""
    import mlx.nn as nn

    from mlxllm import load
    from mlxllm.layers import FloatLinear

    model, _ = load(str(Path(__file__).parent / "fixtures" / "archs" / "qwen3moe-wide.q4_k_m.gguf"))
    modules = [m for _, m in model.named_modules()]
    routers = [m for m in modules if isinstance(m, FloatLinear)]
    assert routers and not any(type(m) is nn.Linear for m in modules)
    x = mx.array(np.random.default_rng(0).standard_normal((5, routers[0].weight.shape[1])).astype(np.float32))
    for router in routers:
        assert np.array_equal(np.array(router(x)), np.array(K.matmul(x, router.weight, True)))
    bias = mx.arange(routers[0].weight.shape[0], dtype=mx.float32)
    with_bias = FloatLinear(routers[0].weight, bias)
    assert np.array_equal(np.array(with_bias(x)), np.array(K.matmul(x, routers[0].weight, True) + bias))


def _graph_ops(out: mx.array, tmp_path: Path) -> list[str]:
    """The primitives of the graph that evaluating `out` would run."""
    dot = tmp_path / "graph.dot"
    mx.export_to_dot(str(dot), out)
    return [line.split('label ="')[1].split('"')[0] for line in dot.read_text().splitlines() if 'label ="' in line]


@pytest.mark.parametrize("rows", [1, 3, 20], ids=lambda r: f"{r}rows")  # the matvec, and prefill's tiles
@pytest.mark.parametrize("qtype", [Q.Q4_1, Q.Q4_K, Q.Q8_0], ids=lambda t: t.name)
@pytest.mark.parametrize("activations", ["float", "int16"])
def test_product_takes_over_its_pending_input_op_bit_for_bit(qtype, rows, activations, tmp_path):
    """A product whose input is a pending rms_norm or gated_activation computes that op's rows
    itself, and residual_add of a pending product (or of a pending RMS norm of one) normalizes
    and adds the residual as the product writes: each the same values as the ops run apart
    (their inputs evaluated first), bit for bit, and the graph has no node for the op taken over."""
    raw, cols = _weight(qtype, 40, 2 if GGML_QUANT_SIZES[qtype][0] == 256 else 16, seed=21)
    w, table = mx.array(raw), _table(qtype)
    rng = np.random.default_rng(21)
    x = mx.array(3 * rng.standard_normal((rows, cols)).astype(np.float32))
    norm_weight = mx.array(rng.standard_normal(cols).astype(np.float32))
    both = mx.array(2 * rng.standard_normal((rows, 2 * cols)).astype(np.float32))
    residual = mx.array(rng.standard_normal((rows, 40)).astype(np.float32))
    post_weight = mx.array(rng.standard_normal(40).astype(np.float32))

    def product(v: mx.array) -> mx.array:
        return K.gguf_matmul(v, w, int(qtype), table, activations)

    def apart(v: mx.array) -> mx.array:  # the op's result evaluated: nothing left to take over
        mx.eval(v)
        return product(v)

    gate, up = mx.split(both, 2, axis=-1)
    inputs = {"rms_norm": lambda: K.rms_norm(x, norm_weight, 1e-5),
              "gated_halves": lambda: K.gated_activation(both, None, "silu"),
              "gated": lambda: K.gated_activation(gate, up, "gelu_tanh")}
    for name, make in inputs.items():
        fused = product(make())
        assert _graph_ops(fused, tmp_path).count("GgufMatmul") == 1, name
        assert not {"RmsNorm", "GatedActivation"} & set(_graph_ops(fused, tmp_path)), name
        assert np.array_equal(np.array(fused), np.array(apart(make()))), name

        summed = K.residual_add(residual, product(make()))
        assert "Add" not in _graph_ops(summed, tmp_path), name
        assert np.array_equal(np.array(summed), np.array(residual + apart(make()))), name

        post = K.residual_add(residual, K.rms_norm(product(make()), post_weight, 1e-6))  # a post-norm's
        assert _graph_ops(post, tmp_path).count("GgufMatmul") == 1, name
        assert not {"Add", "RmsNorm", "GatedActivation"} & set(_graph_ops(post, tmp_path)), name
        normed = K.rms_norm(apart(make()), post_weight, 1e-6)
        mx.eval(normed)
        assert np.array_equal(np.array(post), np.array(residual + normed)), name


def test_residual_add_is_an_add_where_no_product_is_pending():
    """Anything but a pending product of x's shape and dtype is MLX's add: broadcasts, other
    dtypes, an evaluated product, a product that adds a residual already."""
    raw, cols = _weight(Q.Q4_0, 8, 2, seed=22)
    x = mx.array(np.random.default_rng(22).standard_normal((2, cols)).astype(np.float32))
    r = mx.arange(8, dtype=mx.float32)
    y = K.gguf_matmul(x, mx.array(raw), int(Q.Q4_0), _table(Q.Q4_0), "int16")
    want = np.array(y) + np.array(r)  # y evaluated from here on
    assert np.array_equal(np.array(K.residual_add(r, y)), want)  # evaluated, and broadcast
    pending = K.gguf_matmul(x, mx.array(raw), int(Q.Q4_0), _table(Q.Q4_0), "int16")
    twice = K.residual_add(r + mx.zeros((2, 8)), K.residual_add(r + mx.zeros((2, 8)), pending))
    assert np.array_equal(np.array(twice), want + np.array(r))
    pending = K.gguf_matmul(x, mx.array(raw), int(Q.Q4_0), _table(Q.Q4_0), "int16")
    half = K.residual_add(mx.ones((2, 8), mx.float16), pending)
    assert half.dtype == mx.float32 and np.array_equal(np.array(half), np.array(y) + 1)

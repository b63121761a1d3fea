"""Matrix products over GGUF weights, attention and the feed-forward gates: the one
dispatch between architectures and kernels.

Architectures call `matmul(x, w)` / `embed(ids, w)` with a `QuantizedTensor`, and
`attention` / `gated` for the rest; this module picks how.
- The CPU (MLX's CPU backend) with our compiled kernels (cpu/): 2-D weights of the types
  with dedicated kernels stay GGUF blocks as stored (quant.keeps_blocks_on_cpu) and go to
  `gguf_matmul` (cpu/gguf.cpp): blocks read in place for a few rows (decode; activations
  rounded to 16-bit blocks, float or llama.cpp's 8-bit ones with MLXLLM_CPU_ACTIVATIONS,
  quant.cpu_activations), dequantized tiles + GEMM for more (prefill). Experts and the other packed types keep MLX's
  affine layouts (native types, widened packed ones) for our affine matvec / dequantize. Every float GEMM (prefill, attention) runs on the BLAS our
  module binds itself (`_bind_blas`), never on the one MLX links, so the order of imports
  cannot make it slow; softmax and gates run on ours.
- A GPU: layouts MLX holds natively go to MLX's own `quantized_matmul`; the packed GGUF
  types to our kernels (gpu.py through metal.py or cuda.py): the fused
  dequantize-and-multiply for up to 8 activation rows, dequantize-then-GEMM in row tiles
  above that.
- Otherwise (the CPU without our kernels) MLX's own ops, with the pure-MLX reference
  dequantizer (reference.py) for packed types.
"""

from __future__ import annotations

import ctypes
import functools
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .. import _blas
from . import cpu, reference, source, widen
from .gpu import MAX_BATCH, GpuKernels
from .widen import Part

if TYPE_CHECKING:
    from ..quant import QuantizedTensor

GROUP = 32


# On MLX's CPU backend quantized_matmul has no optimized kernel: for a batch of rows,
# dequantizing the weight once and handing the product to BLAS is ~7x faster at 64 rows
# (measured, 4096x4096, 2 cores); for a single row quantized_matmul still wins.
CPU_DEQUANTIZE_ROWS = 8

# With our CPU kernels: up to this many activation rows (decode, batched decode in the
# server) the matvec reads the quantized weight, 4 rows per pass over it; more rows
# (prefill) dequantize it for one BLAS GEMM. Not tuned: the crossover was not measured.
CPU_MATVEC_ROWS = 16


# Projections stacked by rows (layers.stack_projections) run as one product for up to this
# many activation rows: decode, where one pass over the weights and one dispatch instead of
# several pay (measured: Gemma 3 270M tg128 +10%). A prompt's rows go through each weight
# alone: there the stacked product's split outputs cost copies (Gemma pp512 -13%).
STACKED_MAX_ROWS = CPU_MATVEC_ROWS


# Prefill on a GPU dequantizes a packed weight this many output rows at a time, so the
# float copy in flight stays small next to the packed weight.
PREFILL_TILE_ROWS = 4096


def _bind_blas() -> str | None:
    """Binds the CPU kernels' GEMM to an optimized BLAS (_blas.kernel_blas_candidates):
    the library's path, or None (then our own GEMM runs, and this says so once)."""
    if cpu.KERNELS is None:
        if sys.platform == "linux" and _blas.loaded is None:
            warnings.warn("mlxllm: MLX runs on its reference BLAS (mlxllm's CPU kernels are "
                          f"{cpu.UNAVAILABLE}): prompts run ~20x slower; reinstall mlxllm with a C++ compiler "
                          "present", RuntimeWarning, stacklevel=2)
        return None
    for path, prefix in _blas.kernel_blas_candidates():
        if cpu.KERNELS.bind_blas(path, prefix):
            return path
    if sys.platform == "linux":
        warnings.warn("mlxllm: no optimized BLAS found for the CPU kernels; prompts run on mlxllm's own "
                      "GEMM, 2-5x slower. Fix: pip install scipy-openblas32", RuntimeWarning, stacklevel=2)
    return None


# The BLAS the CPU kernels' GEMMs run on (None: ours). MLX's own matmul is used instead
# only off Linux (macOS: Accelerate, which MLX links).
BLAS = _bind_blas()
_OWN_GEMM = cpu.KERNELS is not None and sys.platform == "linux"


def _gemm(a: mx.array, b: mx.array, transpose_b: bool = False) -> mx.array:
    """a (..., M, K) @ b (..., K, N), or @ b.T for b (..., N, K): same batch dimensions."""
    if _OWN_GEMM and mx.default_device() == mx.cpu:
        return cpu.KERNELS.matmul(a, b, transpose_b)
    return a @ (b.swapaxes(-1, -2) if transpose_b else b)


def dense_matmul(x: mx.array, w: mx.array) -> mx.array:
    """x (..., in) @ w.T for a float w (out, in)."""
    if _OWN_GEMM and mx.default_device() == mx.cpu:
        y = cpu.KERNELS.matmul(x.reshape(-1, x.shape[-1]), w, True)
        return y.reshape(*x.shape[:-1], w.shape[0]).astype(x.dtype)
    return x @ w.T


@functools.cache
def _table(qtype) -> mx.array:
    """The codebook bytes a packed type's kernels read (source.table)."""
    return mx.array(source.table(qtype))


def _cpu_blocks(w: QuantizedTensor) -> mx.array | None:
    """W's GGUF blocks when the CPU kernels read them (a packed weight, or projections
    stacked from packed weights), else None."""
    if cpu.active() is None:
        return None
    return w.cpu_blocks() if hasattr(w, "cpu_blocks") else blocks_of(w)


def blocks_of(w: QuantizedTensor) -> mx.array | None:
    """`_cpu_blocks` worked out anew (layers.QuantizedLinear keeps the answer per weight)."""
    if w.mode == "packed":
        blocks = w.weight
    elif w.mode == "widened" and len(w.parts) == 1 and w.parts[0].mode == "gguf":
        blocks = w.parts[0].weight
    else:
        return None
    return blocks if blocks.ndim == 2 and cpu.KERNELS.gguf_has_kernel(int(w.qtype)) else None


@functools.cache
def _gpu_kernels(backend: str) -> GpuKernels | None:
    if backend == "metal":
        from .metal import METAL
        return GpuKernels(METAL)
    if backend == "cuda":
        from .cuda import CUDA
        return GpuKernels(CUDA)
    return None


def gpu_kernels() -> GpuKernels | None:
    """The packed-type kernels for the default device, or None on the CPU."""
    if mx.default_device() != mx.gpu:
        return None
    if mx.metal.is_available():
        return _gpu_kernels("metal")
    if mx.cuda.is_available():
        return _gpu_kernels("cuda")
    return None


def _dequantize_packed(w: QuantizedTensor, data: mx.array, shape: tuple[int, ...]) -> mx.array:
    kernels = gpu_kernels()
    if kernels is not None:
        return kernels.dequantize(w.qtype, data, shape)
    if cpu.active() is not None and cpu.KERNELS.gguf_has_kernel(int(w.qtype)):  # rows of blocks, experts' too
        rows = data.reshape(-1, data.shape[-1])
        return cpu.KERNELS.gguf_dequantize(rows, int(w.qtype), shape[-1], _table(w.qtype)).reshape(shape)
    return reference.dequantize(w.qtype, data, shape)


def _cpu_affine_parts(w: QuantizedTensor) -> list[Part] | None:
    """W as the affine parts our CPU kernels read (group 32, float32 scales and biases),
    when the kernels are active and W has that form; else None."""
    parts = _affine_parts(w) if cpu.active() is not None else None
    if parts is None:
        return None
    ok = all(p.mode == "affine" and p.group_size == GROUP and p.scales.dtype == mx.float32 for p in parts)
    return parts if ok else None


def _affine_parts(w: QuantizedTensor) -> list[Part] | None:
    """W as MLX affine-or-native parts (one for a native layout, several for a widened one)."""
    if w.mode == "widened":
        return w.parts
    if w.mode == "affine":
        return [Part(w.weight, w.scales, w.biases, w.bits, GROUP, "affine")]
    return None


def stacking_layout(w: QuantizedTensor) -> tuple | None:
    """What weights must share to be stacked by rows into one weight (`stack_rows`): the
    column count and, part for part, bits, group, mode, scale dtype and whether there are
    biases; for GGUF blocks on the CPU, the type. None for a layout that does not stack
    (the packed GGUF types on a GPU)."""
    if w.mode == "packed" and _cpu_blocks(w) is not None:
        return (w.shape[1], "gguf", w.qtype)
    parts = _affine_parts(w)
    if parts is None:
        return None
    return (w.shape[1], *((p.bits, p.group_size, p.mode, p.scales.dtype, p.biases is None) for p in parts))


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL(None).malloc_trim if sys.platform == "linux" else None
    except (OSError, AttributeError):  # not glibc
        return None


def _return_freed_memory() -> None:
    """Hands the C heap's free pages back to the system. MLX's CPU buffers come from
    malloc; stacking frees each projection's original buffer after copying it, and glibc
    keeps those holes mapped: measured, SmolLM2's resident memory stayed at 1.3x the file
    after loading, 1.0x once trimmed."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def stack_rows(ws: list[QuantizedTensor]) -> list[Part]:
    """W0, W1, ... (one `stacking_layout`) stacked by rows, as the parts of one weight: one
    product then reads them all in one pass."""
    _return_freed_memory()  # the buffers the previous stacking replaced
    if _cpu_blocks(ws[0]) is not None:  # one part holding the stacked blocks (mode "gguf")
        blocks = mx.concatenate([w.weight for w in ws])
        return [Part(blocks, mx.zeros((blocks.shape[0], 0), mx.float32), None, 0, 0, "gguf")]
    parts = [_affine_parts(w) for w in ws]
    return [Part(mx.concatenate([ps[i].weight for ps in parts]), mx.concatenate([ps[i].scales for ps in parts]),
                 None if parts[0][i].biases is None else mx.concatenate([ps[i].biases for ps in parts]),
                 *parts[0][i][3:])
            for i in range(len(parts[0]))]


def dequantize(w: QuantizedTensor, dtype: mx.Dtype = mx.float32) -> mx.array:
    """The whole weight as floats, (out, in)."""
    blocks = _cpu_blocks(w)
    if blocks is not None:
        return cpu.KERNELS.gguf_dequantize(blocks, int(w.qtype), w.shape[-1], _table(w.qtype)).astype(dtype)
    parts = _cpu_affine_parts(w)
    if parts is not None:
        return widen.sum_in_order(cpu.KERNELS.affine_dequantize(p.weight, p.scales, p.biases, p.bits)
                                  for p in parts).astype(dtype)
    if w.mode == "packed":
        return _dequantize_packed(w, w.weight, w.shape).astype(dtype)
    if w.mode == "widened":
        return widen.dequantize(w.parts).astype(dtype)
    return mx.dequantize(w.weight, w.scales, w.biases, group_size=GROUP, bits=w.bits, mode=w.mode, dtype=dtype)


def _packed_matmul(x: mx.array, w: QuantizedTensor) -> mx.array:
    kernels = gpu_kernels()
    if kernels is None:
        return x @ dequantize(w, x.dtype).T
    out_features, in_features = w.shape
    x2 = x.reshape(-1, in_features)
    if x2.shape[0] <= MAX_BATCH:
        y = kernels.matvec(w.qtype, w.weight, x2.astype(mx.float32), out_features).astype(x.dtype)
    else:
        tiles = []
        for start in range(0, out_features, PREFILL_TILE_ROWS):
            rows = w.weight[start:start + PREFILL_TILE_ROWS]
            tile = kernels.dequantize(w.qtype, rows, (rows.shape[0], in_features))
            tiles.append(x2 @ tile.astype(x.dtype).T)
        y = tiles[0] if len(tiles) == 1 else mx.concatenate(tiles, axis=-1)
    return y.reshape(*x.shape[:-1], out_features)


def matmul(x: mx.array, w: QuantizedTensor) -> mx.array:
    """x (..., in) @ W.T for W of shape (out, in) -> (..., out)."""
    rows = x.size // x.shape[-1]
    blocks = _cpu_blocks(w)
    if blocks is not None:
        activations = getattr(w, "activations", "float")  # fixed at load (layers._Quantized)
        return cpu.KERNELS.gguf_matmul(x, blocks, int(w.qtype), _table(w.qtype), activations).astype(x.dtype)
    parts = _cpu_affine_parts(w)
    if parts is not None:
        if rows <= CPU_MATVEC_ROWS:
            return widen.sum_in_order(cpu.KERNELS.affine_matvec(x, p.weight, p.scales, p.biases, p.bits)
                                      for p in parts).astype(x.dtype)
        return dense_matmul(x, dequantize(w, x.dtype))
    if w.mode == "packed":
        return _packed_matmul(x, w)
    if rows >= CPU_DEQUANTIZE_ROWS and mx.default_device() == mx.cpu:
        return x @ dequantize(w, x.dtype).T
    if w.mode == "widened":
        return widen.matmul(x, w.parts)
    return mx.quantized_matmul(x, w.weight, w.scales, w.biases, transpose=True,
                               group_size=GROUP, bits=w.bits, mode=w.mode)


def gather_matmul(x: mx.array, w: mx.array | QuantizedTensor, indices: mx.array) -> mx.array:
    """x (N, in) @ W[e].T for each expert e in indices (N, k), W of shape (experts, out, in)
    as floats or a quantized layout -> (N, k, out). Only the chosen experts' rows are read."""
    xe = x[:, None, None, :]  # (N, 1, 1, in): one row, broadcast over the k choices
    if not isinstance(w, mx.array) and w.mode == "packed" and _cpu_expert_blocks(w):
        return _gather_blocks_cpu(x, w, indices)
    parts = None if isinstance(w, mx.array) else _cpu_affine_parts(w)
    if parts is not None:
        return _gather_matmul_cpu(x, parts, indices)
    if isinstance(w, mx.array):
        return mx.gather_mm(xe, w.swapaxes(-1, -2), rhs_indices=indices).squeeze(-2)
    parts = _affine_parts(w)
    if parts is not None:
        return widen.sum_in_order(
            mx.gather_qmm(xe, p.weight, p.scales, p.biases, rhs_indices=indices, transpose=True,
                          group_size=p.group_size, bits=p.bits, mode=p.mode).squeeze(-2)
            for p in parts).astype(x.dtype)
    if w.mode == "mxfp4":
        return mx.gather_qmm(xe, w.weight, w.scales, None, rhs_indices=indices, transpose=True,
                             group_size=GROUP, bits=w.bits, mode=w.mode).squeeze(-2)
    # packed GGUF blocks (a GPU): few rows through the fused gather kernel; a prompt's rows
    # grouped by expert, each chosen expert dequantized once for one product
    kernels = gpu_kernels()
    if kernels is not None and x.shape[0] <= CPU_MATVEC_ROWS:
        return kernels.gather_matvec(w.qtype, w.weight, x.astype(mx.float32), indices).astype(x.dtype)
    shape = tuple(w.shape[1:])
    return _by_expert(x, indices, lambda e, rows: rows @ _dequantize_packed(w, w.weight[e], shape).astype(x.dtype).T)


def _cpu_expert_blocks(w: QuantizedTensor) -> bool:
    """Whether the CPU kernels read these experts' GGUF blocks in place."""
    return cpu.active() is not None and w.weight.ndim == 3 and cpu.KERNELS.gguf_float_kernel(int(w.qtype))


def _by_expert(x: mx.array, indices: mx.array, product) -> mx.array:
    """x's rows grouped by chosen expert, `product(e, rows)` -> (rows, out) once per chosen
    expert e, put back as (N, k, out). Grouping reads the router's choices on the host."""
    N, k = indices.shape
    flat = np.array(indices).reshape(-1)  # (N * k,) expert of each (row, slot)
    order = np.argsort(flat, kind="stable")
    starts = np.flatnonzero(np.diff(flat[order])) + 1
    products = [product(int(flat[group[0]]), x[mx.array(group // k)]) for group in np.split(order, starts)]
    inverse = np.empty_like(order)
    inverse[order] = np.arange(order.size)
    out = mx.concatenate(products)
    return out[mx.array(inverse)].reshape(N, k, out.shape[-1])


def _gather_blocks_cpu(x: mx.array, w: QuantizedTensor, indices: mx.array) -> mx.array:
    """`gather_matmul` over experts kept as GGUF blocks (E, out, bytes per row), one op: few
    rows read each chosen expert's rows in place; more rows are grouped by expert inside it,
    each expert's multiplied as `gguf_matmul` multiplies them (its rows' matvec, or
    dequantized tiles and BLAS past 16): no float copy of an expert, and a row's result the
    same whichever way its prompt was chunked."""
    # int8 mode's integer dots have no experts' kernel: its experts multiply floats
    activations = "int16" if getattr(w, "activations", "float") == "int16" else "float"
    return cpu.KERNELS.gguf_gather_matmul(x, w.weight, int(w.qtype), _table(w.qtype), indices,
                                          activations).astype(x.dtype)


def _gather_matmul_cpu(x: mx.array, parts: list[Part], indices: mx.array) -> mx.array:
    """`gather_matmul` on the CPU kernels (MLX's CPU gather_qmm reads ~0.5 GB/s).

    Few rows (decode): one matvec over every row's chosen experts, read in place.
    More rows (prefill): rows grouped by expert, each chosen expert dequantized once for one
    BLAS product; grouping reads the router's choices on the host."""
    if x.shape[0] <= CPU_MATVEC_ROWS:
        return widen.sum_in_order(cpu.KERNELS.affine_gather_matvec(x, p.weight, p.scales, p.biases, indices, p.bits)
                                  for p in parts).astype(x.dtype)

    def product(e: int, rows: mx.array) -> mx.array:
        weight = widen.sum_in_order(
            cpu.KERNELS.affine_dequantize(p.weight[e], p.scales[e], None if p.biases is None else p.biases[e], p.bits)
            for p in parts)
        return dense_matmul(rows, weight.astype(x.dtype))
    return _by_expert(x, indices, product)


# Causal attention over at least this many queries runs in CAUSAL_BLOCKS blocks of queries,
# each against only the keys it can see: 4 blocks do 5/8 of the score and value products.
CAUSAL_BLOCKED_QUERIES = 256
CAUSAL_BLOCKS = 4
# At most this many query rows per kv head (query heads per kv head x queries: decode) take
# the one-op kernel, whose score and value products are the path below's few-row ones.
FEW_QUERIES = 8


def attention(q: mx.array, k: mx.array, v: mx.array, scale: float, mask: mx.array | str | None,
              softcap: float = 0.0, bias: mx.array | None = None, sinks: mx.array | None = None) -> mx.array:
    """softmax(scores + bias + mask) @ v for q (B, H, L, D) against k, v (B, H_kv, T, D), H a
    multiple of H_kv (grouped-query heads share a key/value head, never copied).
    scores = scale * q @ k.T, squashed to cap * tanh(scores / cap) when softcap is set
    (Gemma 2, llama.cpp's attn_soft_cap). bias: additive scores (H, L, T), e.g. ALiBi.
    sinks: one logit per head (H,) that joins every softmax unscaled and attends to nothing
    (gpt-oss): it only takes probability away from the keys.
    mask: None, "causal" (the L queries are the last L of the T positions) or a bool
    array (L, T) or broadcastable to (B, H, L, T), true where a query sees a key."""
    kernels = cpu.active()
    B, H, L, D = q.shape
    H_kv, T = k.shape[1], k.shape[2]
    rep = H // H_kv
    if kernels is None or not _kernel_mask(mask, B, L, T):
        if not softcap and bias is None and sinks is None:
            return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
        return _attention_reference(q, k, v, scale, mask, softcap, bias, sinks)
    if isinstance(mask, mx.array) and mask.ndim == 4:  # (B, 1, L, T): each sequence's own, e.g. a batch's padding
        mask = mask[:, 0]
    if rep * L <= FEW_QUERIES and not softcap and bias is None and sinks is None:
        keep = mask if isinstance(mask, mx.array) else None
        # (B, L, H, Dv) as a (B, H, L, Dv) view: the caller's transpose back is then free
        return kernels.attention(q, k, v, scale, isinstance(mask, str), keep).transpose(0, 2, 1, 3).astype(q.dtype)
    # Each key/value head's query heads stacked as rows: one BLAS product per kv head.
    q = q.reshape(B, H_kv, rep, L, D)
    if bias is not None:
        bias = bias.reshape(H_kv, rep, L, T)
    if sinks is not None:
        sinks = sinks.astype(mx.float32).reshape(H_kv, rep, 1, 1)

    def block(start: int, end: int, keys: int) -> mx.array:
        """Queries [start, end) against the first `keys` keys -> (B, H_kv, rep, end - start, Dv)."""
        n = end - start
        scores = _gemm(q[:, :, :, start:end].reshape(B, H_kv, rep * n, D), k[:, :, :keys], transpose_b=True)
        softmax_scale = scale
        if softcap:  # the kernel's softmax then takes the squashed scores as they are
            scores, softmax_scale = softcap * mx.tanh(scores * (scale / softcap)), 1.0
        if bias is not None:
            scores = scores + (bias[:, :, start:end, :keys] / softmax_scale).reshape(H_kv, rep * n, keys)
        keep = mask[..., start:end, :keys] if isinstance(mask, mx.array) else None
        if sinks is not None:  # the sink as key column 0: visible to every query, causal alignment kept
            column = mx.broadcast_to(sinks / softmax_scale, (B, H_kv, rep, n, 1)).reshape(B, H_kv, rep * n, 1)
            scores = mx.concatenate([column.astype(scores.dtype), scores], axis=-1)
            if keep is not None:
                keep = mx.concatenate([mx.ones((*keep.shape[:-1], 1), mx.bool_), keep], axis=-1)
        p = kernels.masked_softmax(scores, softmax_scale, n, isinstance(mask, str), keep)
        if sinks is not None:
            p = p[..., 1:]
        return _gemm(p, v[:, :, :keys]).reshape(B, H_kv, rep, n, v.shape[-1])

    if mask == "causal" and L >= CAUSAL_BLOCKED_QUERIES:
        step = -(-L // CAUSAL_BLOCKS)
        # Query i is position T - L + i: it sees keys up to there.
        out = mx.concatenate([block(s, min(L, s + step), T - L + min(L, s + step)) for s in range(0, L, step)], axis=3)
    else:
        out = block(0, L, T)
    return out.reshape(B, H, L, v.shape[-1]).astype(q.dtype)


# False: decode attention as separate ops (norms, rotations, cache update, attention), as
# prefill runs it; the tests compare the two.
CACHED_ATTENTION = True


def cached_attention(projections: Sequence[mx.array], cache, n_heads: int, n_kv_heads: int, head_dim: int,
                     value_dim: int, scale: float, mask: mx.array | str | None,
                     rope: Callable[[], tuple[mx.array, mx.array, bool]] | None = None,
                     norms: tuple[mx.array, mx.array, float] | None = None) -> mx.array | None:
    """A decode step's attention with the cache update as one op (cpu.attention_step) instead
    of a dozen, or None where it does not apply and the caller runs the separate ones.
    projections: q (B, L, n_heads * head_dim), k (B, L, n_kv_heads * head_dim) and
    v (B, L, n_kv_heads * value_dim) as the projections give them, or one array holding the
    three side by side (a fused or stacked projection's [q | k | v]), read as it is; each head
    of q and k RMS-normalized by norms = (q weight, k weight, eps), then rotated by
    rope() = (cos, sin, traditional) (`rope_tables`; called only where the kernel applies,
    so a prompt does not make tables here for nothing); cache a `BatchKVCache` with float
    storage; mask as `attention` takes it. Returns (B, L, n_heads * value_dim)."""
    kernels = cpu.active()
    B, L, _ = projections[0].shape
    if (kernels is None or not CACHED_ATTENTION or n_heads // n_kv_heads * L > FEW_QUERIES
            or not getattr(cache, "writes_in_place", lambda: False)()):
        return None
    if isinstance(mask, mx.array):
        if not _kernel_mask(mask, B, L, mask.shape[-1]):
            return None
        if mask.ndim == 4:  # (B, 1, L, T): each sequence's own
            mask = mask[:, 0]
    causal, keep = isinstance(mask, str), mask if isinstance(mask, mx.array) else None
    cos, sin, traditional = rope() if rope is not None else (None, None, False)
    q_norm, k_norm, eps = norms if norms is not None else (None, None, 0.0)

    def write(keys: mx.array, values: mx.array, slot: int) -> list[mx.array]:
        return kernels.attention_step(list(projections), n_heads, keys, values, slot, scale, causal, keep, cos, sin,
                                      traditional, q_norm, k_norm, eps)

    return cache.update_in_place(B, n_kv_heads, L, head_dim, value_dim, write).astype(projections[0].dtype)


def _kernel_mask(mask: mx.array | str | None, B: int, L: int, T: int) -> bool:
    """Whether masked_softmax takes this mask: none, causal, one (L, T) for every sequence
    and head, or one per sequence (B, 1, L, T), shared by its heads."""
    return not isinstance(mask, mx.array) or mask.shape == (L, T) or mask.shape == (B, 1, L, T)


def _attention_reference(q, k, v, scale: float, mask, softcap: float, bias: mx.array | None,
                         sinks: mx.array | None = None) -> mx.array:
    """`attention` in plain MLX ops, for softcap, bias or sinks where the CPU kernels do not run."""
    B, H, L, D = q.shape
    H_kv, T = k.shape[1], k.shape[2]
    qg = q.reshape(B, H_kv, H // H_kv, L, D)  # (B, H_kv, rep, L, D): heads share a kv head
    s = (qg * scale) @ k[:, :, None].swapaxes(-1, -2)  # (B, H_kv, rep, L, T)
    if softcap:
        s = softcap * mx.tanh(s / softcap)
    s = s.reshape(B, H, L, T)
    if bias is not None:
        s = s + bias
    if isinstance(mask, str):
        mask = mx.arange(T)[None] <= mx.arange(T - L, T)[:, None]
    if mask is not None:
        s = mx.where(mask, s, -mx.inf)
    s = s.astype(mx.float32)
    if sinks is not None:
        s = mx.concatenate([mx.broadcast_to(sinks.astype(mx.float32).reshape(1, H, 1, 1), (B, H, L, 1)), s], axis=-1)
    p = mx.softmax(s, axis=-1, precise=True)
    if sinks is not None:
        p = p[..., 1:]
    p = p.reshape(B, H_kv, H // H_kv, L, T)
    return (p.astype(v.dtype) @ v[:, :, None]).reshape(B, H, L, -1)


# Rotation tables by (L, offset, dims, base, scale, freqs, mscale): the layers of one forward
# pass share them. Entries keep their freqs array alive, so its id cannot be reused meanwhile.
_ROPE_TABLES: dict[tuple, tuple[mx.array | None, mx.array, mx.array]] = {}


def rope_tables(L: int, offset: int | mx.array, dims: int, base: float | None, scale: float,
                freqs: mx.array | None, mscale: float) -> tuple[mx.array, mx.array]:
    """cos and sin (L, dims / 2) for positions offset + l, or (B * L, dims / 2) for a batch's
    rows at their own positions (offset (B,)), with mx.fast.rope's parameters (freqs:
    per-pair wavelengths instead of base; mscale multiplies both, as YaRN's does). Kept for
    the next calls: every layer of a forward pass rotates by the same tables."""
    offsets = (offset,) if isinstance(offset, int) else tuple(offset.tolist())
    key = (L, offsets, dims, base, scale, None if freqs is None else id(freqs), mscale)
    if key not in _ROPE_TABLES:
        if len(_ROPE_TABLES) >= 32:
            _ROPE_TABLES.clear()
        inv = 1.0 / freqs if freqs is not None else base ** (-mx.arange(0, dims, 2, dtype=mx.float32) / dims)
        positions = (mx.array(offsets, mx.float32)[:, None] + mx.arange(L, dtype=mx.float32)).reshape(-1)
        theta = (positions * scale)[:, None] * inv[None, :]
        cos, sin = mx.cos(theta), mx.sin(theta)
        if mscale != 1.0:  # ggml rope_yarn scales cos and sin: the rotated entries grow
            cos, sin = cos * mscale, sin * mscale
        _ROPE_TABLES[key] = (freqs, cos, sin)
    _, cos, sin = _ROPE_TABLES[key]
    return cos, sin


def rope(x: mx.array, dims: int, *, traditional: bool, base: float | None, scale: float,
         offset: int | mx.array, freqs: mx.array | None = None, mscale: float = 1.0) -> mx.array:
    """Rotary embedding of x (B, L, H, D) at positions offset + l, with mx.fast.rope's
    parameters (freqs: per-pair wavelengths instead of base), the first `dims` entries of
    each head multiplied by mscale (YaRN). Returns (B, L, H, D)."""
    kernels = cpu.active()
    if kernels is None:
        y = mx.fast.rope(x.swapaxes(1, 2), dims, traditional=traditional, base=base, scale=scale,
                         offset=offset, freqs=freqs).swapaxes(1, 2)
        if mscale != 1.0:
            y = mx.concatenate([y[..., :dims] * mscale, y[..., dims:]], axis=-1)
        return y
    cos, sin = rope_tables(x.shape[1], offset, dims, base, scale, freqs, mscale)
    return kernels.rope(x, cos, sin, traditional).astype(x.dtype)


def rms_norm(x: mx.array, weight: mx.array, eps: float) -> mx.array:
    """mx.fast.rms_norm, on all CPU threads when our kernels run."""
    kernels = cpu.active()
    if kernels is None:
        return mx.fast.rms_norm(x, weight, eps)
    return kernels.rms_norm(x, weight, eps).astype(x.dtype)


def residual_add(x: mx.array, y: mx.array) -> mx.array:
    """x + y: a residual stream plus a block's output. On the CPU kernels, where y is a
    pending product of GGUF blocks (or a pending RMS norm of one: a post-norm), the product
    normalizes its rows and adds x as it writes them (bit for bit the RmsNorm's and the
    Add's values, their graph nodes spared)."""
    kernels = cpu.active()
    return x + y if kernels is None else kernels.residual_add(x, y)


def gated(gate: mx.array, up: mx.array | None, activation: str) -> mx.array:
    """activation(gate) * up, activation "silu" (SwiGLU) or "gelu_tanh" (GeGLU, ggml_gelu).
    up None: gate holds [gate | up] on its last axis (a stacked projection's output), which
    the CPU kernel reads as it is, with no split nodes."""
    kernels = cpu.active()
    if kernels is not None:
        return kernels.gated_activation(gate, up, activation).astype(gate.dtype)
    if up is None:
        gate, up = mx.split(gate, 2, axis=-1)
    act = nn.silu if activation == "silu" else nn.gelu_approx
    return act(gate) * up


def moe_route(logits: mx.array, k: int, gating: str, normalize: bool, scale: float,
              bias: mx.array | None) -> tuple[mx.array, mx.array] | None:
    """nn.moe.route without expert groups as one op on the CPU ((chosen, weights), each
    (N, k)); None elsewhere, where the caller runs its MLX ops (a dozen graph nodes a layer)."""
    kernels = cpu.active()
    if kernels is None:
        return None
    chosen, weights = kernels.moe_route(logits, k, gating, normalize, scale, bias)
    return chosen, weights


def expert_sum(y: mx.array, weights: mx.array | None = None) -> mx.array:
    """y (N, k, D) -> (N, D): the k expert outputs of each row, each times its weight (N, k)
    where given, added in order (llama.cpp's order), each product rounded before its add.
    One op on the CPU where the multiply, the k slices and the k - 1 adds were ~2k nodes."""
    kernels = cpu.active()
    if kernels is not None:
        ones = weights if weights is not None else mx.ones(y.shape[:2], mx.float32)
        return kernels.expert_sum(y, ones).astype(y.dtype)
    if weights is not None:
        y = y * weights[..., None].astype(y.dtype)
    out = y[:, 0]
    for j in range(1, y.shape[1]):
        out = out + y[:, j]
    return out


def embed(ids: mx.array, w: QuantizedTensor) -> mx.array:
    """Rows `ids` of W (vocab, dim), dequantized to float32: only the looked-up rows."""
    if w.mode == "widened":
        return widen.dequantize([p._replace(weight=p.weight[ids], scales=p.scales[ids],
                                            biases=None if p.biases is None else p.biases[ids])
                                 for p in w.parts])
    rows = w.weight[ids]  # (..., packed_row)
    if w.mode == "packed":
        return _dequantize_packed(w, rows.reshape(-1, rows.shape[-1]), (*ids.shape, w.shape[-1]))
    scales = w.scales[ids]
    biases = w.biases[ids] if w.biases is not None else None
    return mx.dequantize(rows, scales, biases, group_size=GROUP, bits=w.bits, mode=w.mode,
                         dtype=mx.float32)
